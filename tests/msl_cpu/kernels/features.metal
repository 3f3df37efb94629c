// Small kernels, one per MSL feature the emulator supports; tests/msl_cpu/test_features.py checks each
// against numpy / torch.
#include <metal_stdlib>
using namespace metal;

// 16 uints per thread: every position builtin, as the thread saw it.
kernel void builtins(device uint* out [[buffer(0)]], uint3 pos_grid [[thread_position_in_grid]],
                     ushort3 pos_tg [[thread_position_in_threadgroup]], uint3 tg_pos [[threadgroup_position_in_grid]],
                     uint3 tgs [[threadgroups_per_grid]], uint3 tpt [[threads_per_threadgroup]],
                     uint2 tpg [[threads_per_grid]], uint idx [[thread_index_in_threadgroup]],
                     ushort sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]],
                     uint width [[threads_per_simdgroup]], uint sgs [[simdgroups_per_threadgroup]]) {
  const uint linear_tg = (tg_pos.z * tgs.y + tg_pos.y) * tgs.x + tg_pos.x;
  device uint* o = out + (linear_tg * (tpt.x * tpt.y * tpt.z) + idx) * 16;
  o[0] = pos_grid.x;
  o[1] = pos_grid.y;
  o[2] = pos_grid.z;
  o[3] = pos_tg.x;
  o[4] = pos_tg.y;
  o[5] = pos_tg.z;
  o[6] = tg_pos.x;
  o[7] = tg_pos.y;
  o[8] = tg_pos.z;
  o[9] = tpg.x;
  o[10] = tpg.y;
  o[11] = idx;
  o[12] = sg;
  o[13] = lane;
  o[14] = width;
  o[15] = sgs;
}

// Vector constructors, swizzles, conversions, as_type.
kernel void vectors(device const float4* in [[buffer(0)]], device float4* out [[buffer(1)]],
                    device half4* out_half [[buffer(2)]], device uint* bits [[buffer(3)]],
                    uint i [[thread_position_in_grid]]) {
  const float4 v = in[i];
  out[4 * i + 0] = v.wzyx;
  out[4 * i + 1] = float4(v.xy, 7.0f, v.z);
  out[4 * i + 2] = float4(2.5f);
  float4 w = v;
  w.yz = float2(v.x, -v.w);
  out[4 * i + 3] = w + float4(int4(1, 2, 3, 4));
  out_half[i] = half4(v);  // converts values (a C-style cast would reinterpret bits)
  bits[i] = as_type<uint>(v.x);
}

// half and bfloat: each operation rounds to the type, as on the GPU.
kernel void half_ops(device const half* a [[buffer(0)]], device const half* b [[buffer(1)]],
                     device half* out [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  half x = a[i] * b[i];
  x = x + a[i];
  x = x * 0.5h + 1.0h;
  out[i] = x;
}
kernel void bfloat_ops(device const bfloat* a [[buffer(0)]], device const bfloat* b [[buffer(1)]],
                       device bfloat* out [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  bfloat x = a[i] * b[i];
  x = x + a[i];
  x = x * bfloat(0.5f) + bfloat(1.0f);
  out[i] = x;
}

// Math functions: 12 results per input.
kernel void math(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                 uint i [[thread_position_in_grid]]) {
  const float x = in[i];
  device float* o = out + 12 * i;
  o[0] = exp(x);
  o[1] = exp2(x);
  o[2] = log(abs(x) + 1.0f);
  o[3] = tanh(x);
  o[4] = fma(x, 2.0f, 1.0f);
  o[5] = max(x, 0.25f);
  o[6] = min(x, 0.25f);
  o[7] = clamp(x, -0.5f, 0.5f);
  o[8] = select(x, -x, x < 0.0f);
  o[9] = fast::exp(x);
  o[10] = precise::exp(x);
  o[11] = float(exp(half(x)));
}

// SIMD collectives: 11 results per thread.
kernel void simd_ops(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                     uint i [[thread_position_in_grid]], uint lane [[thread_index_in_simdgroup]]) {
  const float x = in[i];
  device float* o = out + 11 * i;
  o[0] = simd_sum(x);
  o[1] = simd_max(x);
  o[2] = simd_min(x);
  o[3] = simd_shuffle(x, (lane + 3) % 32);
  o[4] = simd_shuffle_xor(x, 5);
  o[5] = simd_shuffle_down(x, 4);
  o[6] = simd_shuffle_up(x, 4);
  o[7] = simd_broadcast(x, 7);
  o[8] = simd_prefix_inclusive_sum(x);
  o[9] = simd_prefix_exclusive_sum(x);
  float partial = 0.0f;
  if (lane < 8) partial = simd_sum(x);  // a collective among the 8 active lanes only
  o[10] = partial;
}

// Threadgroup reduction: simd_sum per simdgroup, partials through threadgroup memory.
kernel void reduce(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                   threadgroup float* scratch [[threadgroup(0)]], uint tid [[thread_index_in_threadgroup]],
                   uint tg [[threadgroup_position_in_grid]], uint n [[threads_per_threadgroup]],
                   uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]],
                   uint sgs [[simdgroups_per_threadgroup]]) {
  const float s = simd_sum(in[tg * n + tid]);
  if (lane == 0) scratch[sg] = s;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    const float v = lane < sgs ? scratch[lane] : 0.0f;
    const float total = simd_sum(v);
    if (lane == 0) out[tg] = total;
  }
}

// Lanes of one simdgroup exchanging through threadgroup memory, ordered by simdgroup_barrier.
kernel void simd_exchange_tg(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                             uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float buf[32];
  buf[lane] = in[lane];
  simdgroup_barrier(mem_flags::mem_threadgroup);
  out[lane] = buf[lane ^ 1];
}

// simdgroup_matrix: C = A * B (+ C), A from device, B through threadgroup memory, optional transpose of A.
template <typename T>
[[kernel]] void matmul8(device const T* a [[buffer(0)]], device const T* b [[buffer(1)]], device T* c [[buffer(2)]],
                        constant uint& transpose_a [[buffer(3)]], uint lane [[thread_index_in_simdgroup]]) {
  threadgroup T tile[64];
  for (uint k = lane; k < 64; k += 32) tile[k] = b[k];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_matrix<T, 8, 8> ma, mb, mc;
  simdgroup_load(ma, a, 8, ulong2(0, 0), transpose_a != 0);
  simdgroup_load(mb, tile);
  simdgroup_load(mc, c);
  simdgroup_multiply_accumulate(mc, ma, mb, mc);
  simdgroup_store(mc, c);
}
template [[host_name("matmul8_float")]] [[kernel]] decltype(matmul8<float>) matmul8<float>;
template [[host_name("matmul8_half")]] [[kernel]] decltype(matmul8<half>) matmul8<half>;
template [[host_name("matmul8_bfloat")]] [[kernel]] decltype(matmul8<bfloat>) matmul8<bfloat>;

// A 16x16 block of a larger row-major matrix, addressed with elements_per_row and matrix_origin.
kernel void matmul_origin(device const float* a [[buffer(0)]], device const float* b [[buffer(1)]],
                          device float* c [[buffer(2)]]) {
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  simdgroup_float8x8 ma, mb;
  for (uint k = 0; k < 16; k += 8) {
    simdgroup_load(ma, a, 16, ulong2(k, 8));  // rows 8..15, columns k..k+7
    simdgroup_load(mb, b, 16, ulong2(8, k));  // rows k..k+7, columns 8..15
    simdgroup_multiply_accumulate(acc, ma, mb, acc);
  }
  simdgroup_store(acc, c, 16, ulong2(8, 8));
}

// Function constants, read at run time; indices may be named constants (as in a shared params header).
enum FeatureConstant : uint { kUseScale = 0 };
constant bool use_scale [[function_constant(kUseScale)]];
constant float scale_value [[function_constant(1)]];
constant int offset_value [[function_constant(2)]];
constexpr constant uint kOutBuffer = 0;
kernel void function_constants(device float* out [[buffer(kOutBuffer)]], uint i [[thread_position_in_grid]]) {
  float v = float(i);
  if (use_scale) v *= scale_value;
  if (is_function_constant_defined(offset_value)) v += float(offset_value);
  out[i] = v;
}

// Device and threadgroup atomics.
kernel void atomics(device atomic_int* counter [[buffer(0)]], device atomic_float* fsum [[buffer(1)]],
                    device int* per_tg [[buffer(2)]], uint tid [[thread_index_in_threadgroup]],
                    uint tg [[threadgroup_position_in_grid]]) {
  threadgroup atomic_int local;
  if (tid == 0) atomic_store_explicit(&local, 0, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  atomic_fetch_add_explicit(counter, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(fsum, 0.5f, memory_order_relaxed);
  atomic_fetch_max_explicit(&local, int(tid), memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) per_tg[tg] = atomic_load_explicit(&local, memory_order_relaxed);
}

// numeric_limits. infinity() is undefined under fast math: clang says so (an error with -Werror), here silenced.
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wnan-infinity-disabled"
kernel void limits(device float* out [[buffer(0)]]) {
  out[0] = numeric_limits<float>::max();
  out[1] = numeric_limits<float>::lowest();
  out[2] = float(numeric_limits<half>::max());
  out[3] = numeric_limits<float>::infinity();
}
#pragma clang diagnostic pop

// Two views of one buffer, as transformers passes k_cache and v_cache: writes through both must land.
kernel void overlapping_views(device float* a [[buffer(0)]], device float* b [[buffer(1)]],
                              uint i [[thread_position_in_grid]]) {
  if (i == 0) a[0] = 1.0f;  // inside the overlap
  if (i == 1) b[3] = 2.0f;  // inside the overlap too, another element
}

// Thread i writes float(i) at 64-bit element index where[i] (test_sparse_buffers).
kernel void write_far(device float* buf [[buffer(0)]], device const ulong* where [[buffer(1)]],
                      uint i [[thread_position_in_grid]]) {
  buf[where[i]] = float(i);
}

// An int product that passes 2^31, used as an index: wraps (test_int_overflow_wraps).
kernel void int_product_index(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                              constant int2& f [[buffer(2)]]) {
  out[0] = in[f.x * f.y];
}

// MLX's attribute form, with a named thread limit.
constant constexpr uint kCombinedLimit = 64;
[[kernel, max_total_threads_per_threadgroup(kCombinedLimit)]] void combined_attribute(device float* out [[buffer(0)]],
                                                                                      uint i
                                                                                      [[thread_position_in_grid]]) {
  out[i] = 3.0f;
}

// Vector constructors and conversions over every address space: arguments read from device, constant (pointer and
// setBytes reference), threadgroup and thread memory, directly, through pointers and through references. MSL
// converts values (to integers rounding toward zero, bool true -> 1); clang's C-style vector casts would not.
struct ConvParams {
  int4 i;
  float4 f;
};
kernel void conversions(device const int4* di [[buffer(0)]], device const float4* df [[buffer(1)]],
                        constant float4* cf [[buffer(2)]], constant ConvParams& cp [[buffer(3)]],
                        device float4* of [[buffer(4)]], device half4* oh [[buffer(5)]],
                        device bfloat4* ob [[buffer(6)]], device uint4* ou [[buffer(7)]], device int4* oi [[buffer(8)]],
                        uint i [[thread_position_in_grid]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float4 tf[32];
  threadgroup int4 ti[32];
  tf[tid] = df[i];
  ti[tid] = di[i];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  device const float4& rd = df[i];
  constant float4& rc = cf[i];
  threadgroup const float4& rt = tf[tid];
  threadgroup const int4* pt = &ti[tid];
  device const int4* pd = di + i;
  constant float4* pc = cf + i;
  thread int4 li = di[i];
  thread float4 lf = df[i];
  thread const int4* pl = &li;
  thread const float4& rl = lf;

  device float4* o = of + 16 * i;
  o[0] = float4(di[i]) * 0.5f;                   // the issue's form: int4 read from device memory
  o[1] = float4(cf[i].xy, rd.zw);                // swizzles of constant and device values
  o[2] = float4(rt.x);                           // scalar splat from threadgroup memory
  o[3] = float4(ti[tid]);                        // threadgroup int4
  o[4] = float4(*pl);                            // thread int4 through a pointer
  o[5] = float4(cp.i);                           // constant reference (setBytes) int4
  o[6] = float4(float2(rc.xy), float2(pt->yx));  // nested, constant reference and threadgroup pointer
  o[7] = float4(half4(rd));                      // rounded to half
  o[8] = float4(bfloat4(rt));                    // rounded to bfloat
  o[9] = float4(bool4(*pd));                     // int -> bool -> float: 0 or 1
  o[10] = float4(cp.f.w, float3(pc->zyx));       // scalar and 3-vector from constant memory
  o[11] = static_cast<float4>(li);               // static_cast converts in MSL
  o[12] = vec<float, 4>(*pd);                    // vec<T, N> spelling
  o[13] = float4(uint4(bool4(rl)));              // float -> bool (nonzero) -> uint
  o[14] = float4(half2(cp.f.xy), bfloat2(rl.zw));
  o[15] = float4(int4(rl));  // float -> int rounds toward zero

  oh[2 * i] = half4(rd);
  oh[2 * i + 1] = half4(bfloat4(tf[tid]));  // bfloat -> half
  ob[2 * i] = bfloat4(cf[i]);
  ob[2 * i + 1] = bfloat4(ti[tid]);  // int -> bfloat
  ou[2 * i] = uint4(ti[tid]);        // int -> uint: modulo 2^32
  ou[2 * i + 1] = uint4(bool2(cp.i.xy), bool2(rt.xy));
  oi[2 * i] = int4(rd);
  oi[2 * i + 1] = int4(uint4(bool4(rc)));
}
