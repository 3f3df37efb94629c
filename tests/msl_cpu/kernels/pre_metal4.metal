// Planted: a tile copy through the SIMD-group asynchronous copy, a pre-Metal-4.0 construct (private
// air.simdgroup_async_copy intrinsics, as pre-2024 GEMM kernels declared them). kernel-builder compiles with
// -std=metal4.0, where it does not exist: the emulator must reject it with the place and the reason.
#include <metal_stdlib>
using namespace metal;

struct _simdgroup_event_t;
thread _simdgroup_event_t* __metal_simdgroup_async_copy_1d(ulong, ulong, threadgroup void*, const device void*,
                                                           ulong) __asm("air.simdgroup_async_copy_1d.p3i8.p1i8");

kernel void copy_tile(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                      uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float tile[32];
  __metal_simdgroup_async_copy_1d(sizeof(float), alignof(float), tile, in, 32);  // PRE-METAL-4
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[lane] = tile[lane];
}
