// Stub of libdispatch: the queue and data types and the three functions the glue and kernel-builder's embedded
// metallib header call. In Objective-C, dispatch objects are Objective-C objects (OS_OBJECT_USE_OBJC), as on macOS.
#pragma once

#include <stddef.h>

#ifdef __OBJC__
#include <objc/NSObject.h>
@protocol OS_dispatch_object <NSObject>
@end
@protocol OS_dispatch_queue <OS_dispatch_object>
@end
@protocol OS_dispatch_data <OS_dispatch_object>
@end
typedef NSObject<OS_dispatch_queue>* dispatch_queue_t;
typedef NSObject<OS_dispatch_data>* dispatch_data_t;
#else
typedef struct dispatch_queue_s* dispatch_queue_t;
typedef struct dispatch_data_s* dispatch_data_t;
#endif

#pragma clang assume_nonnull begin

#ifdef __cplusplus
extern "C" {
#endif

#ifdef __BLOCKS__
typedef void (^dispatch_block_t)(void);

void dispatch_sync(dispatch_queue_t queue, dispatch_block_t block);
void dispatch_async(dispatch_queue_t queue, dispatch_block_t block);
dispatch_data_t dispatch_data_create(const void* buffer, size_t size, dispatch_queue_t _Nullable queue,
                                     dispatch_block_t _Nullable destructor);
#endif

// On macOS an inline function returning the main queue object.
dispatch_queue_t dispatch_get_main_queue(void);

#ifdef __cplusplus
}
#endif

#pragma clang assume_nonnull end
