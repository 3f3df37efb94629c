#include <metal_stdlib>
using namespace metal;

struct AddParams {
  uint n;
  float scale;
};

kernel void add_scaled(device const float* a [[buffer(0)]], device float* out [[buffer(1)]],
                       constant AddParams& p [[buffer(2)]], uint gid [[thread_position_in_grid]]) {
  if (gid < p.n) out[gid] = a[gid] * p.scale + 1.0h;
}

template <typename T>
[[kernel]] void tg_reverse(device const T* in [[buffer(0)]], device T* out [[buffer(1)]],
                           uint tid [[thread_index_in_threadgroup]], uint tg [[threadgroup_position_in_grid]],
                           uint n [[threads_per_threadgroup]]) {
  threadgroup T tile[256];
  tile[tid] = in[tg * n + tid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float4 v = float4(1.0f, float2(2.0f, 3.0f), 4.0f);
  out[tg * n + tid] = tile[n - 1 - tid] + T(simd_sum(v.y) * 0);
}
template [[host_name("tg_reverse_float")]] [[kernel]] decltype(tg_reverse<float>) tg_reverse<float>;
template [[host_name("tg_reverse_half")]] [[kernel]] decltype(tg_reverse<half>) tg_reverse<half>;
