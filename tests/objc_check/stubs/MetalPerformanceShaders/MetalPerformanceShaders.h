// Stub of MetalPerformanceShaders: only MPSCommandBuffer, which PyTorch's MPSStream.h names.
#pragma once

#include <Metal/Metal.h>

@interface MPSCommandBuffer : NSObject <MTLCommandBuffer>
@property(readonly, retain) id<MTLCommandBuffer> commandBuffer;
@end
