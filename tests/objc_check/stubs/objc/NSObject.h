// Stub of NSObject (root class and protocol), manual retain/release as in a build without ARC.
#pragma once

#include <objc/objc.h>
#include <stddef.h>

typedef unsigned long NSUInteger;  // LP64
typedef long NSInteger;

#pragma clang assume_nonnull begin

@protocol NSObject
- (instancetype)retain;
- (oneway void)release;
- (instancetype)autorelease;
- (NSUInteger)retainCount;
@end

__attribute__((objc_root_class))
@interface NSObject <NSObject>
+ (instancetype)alloc;
+ (instancetype)new;
- (instancetype)init;
@end

#pragma clang assume_nonnull end
