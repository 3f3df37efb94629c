// The Metal Shading Language standard library on NVPTX: included (-include) before every pre-passed .metal file
// that msl/cuda compiles to PTX with clang-19 (-x cuda --cuda-device-only -nocudainc -nocudalib).
//
// Mapping: a simdgroup is a warp (32 lanes), threadgroup memory is __shared__, threadgroup_barrier is bar.sync,
// simdgroup_barrier is bar.warp.sync. Simd collectives use the active mask, so in divergent code only the active
// lanes take part (as in Metal). half is _Float16, bfloat is __bf16. Math never calls libdevice: fast:: uses the
// PTX approximate instructions, precise:: range-reduced versions of them (documented error bounds below); the plain
// names are fast:: when MCU_FAST_MATH is defined (Metal's default), else precise::. simdgroup_matrix<T, 8, 8> keeps
// Apple's lane layout, two elements per lane, and multiplies on tensor cores (mma.sync) or with shuffles
// (MCU_SIMDGROUP_MMA, below).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <type_traits>

#define __device__ __attribute__((__device__))
#define __global__ __attribute__((__global__))
#define __host__ __attribute__((__host__))
#define __shared__ __attribute__((__shared__))
#define __constant__ __attribute__((__constant__))

// Every function from here on (the shim, the .metal source) is __host__ __device__; the device compile emits the
// ones the generated __global__ entry points reach.
#pragma clang force_cuda_host_device begin

#include "simdgroup_layout.h"  // Apple's simdgroup_matrix lane layout and the mma.sync fragments

#define MCU_INLINE inline __attribute__((always_inline))
#define METAL_FUNC MCU_INLINE  // Apple's metal_stdlib defines it; peers' headers use it

#define device
#define constant const
#define threadgroup
#define thread
#define kernel

#define MSL_INLINE MCU_INLINE
#include "../../shim/msl_types.h"

// ---- metal_type_traits: the std traits (msl_types.h), and the address-space ones of this target ------------------
namespace metal {
template <typename T>
using remove_addrspace_t = T;  // the proxy erases address spaces
// uniform<T> marks a value as the same in every thread (a hint to Apple's compiler): here the value itself.
template <typename T>
using uniform = T;
template <typename T>
MCU_INLINE constexpr T make_uniform(T x) {
  return x;
}
}  // namespace metal

// ---- PTX special registers and instructions -----------------------------------------------------------------------
MCU_INLINE uint mcu_lane_id() { return __nvvm_read_ptx_sreg_laneid(); }
// The builtin, not inline asm: asm would count as a memory access and pin every load in the kernels' loops.
MCU_INLINE uint mcu_active_mask() { return __nvvm_activemask(); }
MCU_INLINE float mcu_ex2_approx(float x) { return __nvvm_ex2_approx_f(x); }  // 2^x, rel. error ~2^-22
MCU_INLINE float mcu_lg2_approx(float x) { return __nvvm_lg2_approx_f(x); }  // log2 x, abs. error ~2^-22
MCU_INLINE float mcu_sin_approx(float x) { return __nvvm_sin_approx_f(x); }
MCU_INLINE float mcu_cos_approx(float x) { return __nvvm_cos_approx_f(x); }

namespace metal {

// ---- float kernels of the math functions --------------------------------------------------------------------------
// 2^n for integer n in [-252, 254] without overflow of the exponent field: two factors.
MCU_INLINE float mcu_pow2i(int n) {
  n = n < -252 ? -252 : n > 254 ? 254 : n;
  const int a = n / 2, b = n - a;
  return __builtin_bit_cast(float, (a + 127) << 23) * __builtin_bit_cast(float, (b + 127) << 23);
}
// fast: one ex2.approx. precise: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, then 2^n * ex2(r log2e):
// ~2 ulp over the whole range (the fast version loses ~|x| * 2^-24 relative).
MCU_INLINE float mcu_exp_fast(float x) { return mcu_ex2_approx(x * M_LOG2E_F); }
MCU_INLINE float mcu_exp_precise(float x) {
  if (x > 88.8f) return __builtin_inff();
  if (x < -103.9f) return 0.0f;
  const float n = __builtin_rintf(x * M_LOG2E_F);
  float r = __builtin_fmaf(-n, 0.693145751953125f, x);  // ln2 high part (exact product)
  r = __builtin_fmaf(-n, 1.428606765330187e-06f, r);    // ln2 low part
  return mcu_ex2_approx(r * M_LOG2E_F) * mcu_pow2i((int)n);
}
MCU_INLINE float mcu_exp2_precise(float x) {
  if (x >= 128.0f) return __builtin_inff();
  if (x < -150.0f) return 0.0f;
  const float n = __builtin_rintf(x);
  return mcu_ex2_approx(x - n) * mcu_pow2i((int)n);
}
// precise log: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(f / (2 + f)), f = m - 1 (series to s^9).
MCU_INLINE float mcu_log_precise(float x) {
  if (!(x > 0.0f)) return x == 0.0f ? -__builtin_inff() : __builtin_nanf("");
  if (x == __builtin_inff()) return x;
  int e = 0;
  if (x < 1.17549435e-38f) {  // subnormal: scale up first
    x *= 16777216.0f;
    e = -24;
  }
  const uint bits = __builtin_bit_cast(uint, x);
  e += (int)((bits >> 23) & 0xff) - 127;
  float m = __builtin_bit_cast(float, (bits & 0x007fffffu) | 0x3f800000u);
  if (m > M_SQRT2_F) {
    m *= 0.5f;
    e += 1;
  }
  const float f = m - 1.0f, s = f / (2.0f + f), s2 = s * s;
  const float poly = s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9))));
  const float lm = 2.0f * s + 2.0f * s * poly;
  return __builtin_fmaf((float)e, 0.693145751953125f, __builtin_fmaf((float)e, 1.428606765330187e-06f, lm));
}
MCU_INLINE float mcu_log_fast(float x) { return mcu_lg2_approx(x) * M_LN2_F; }
// tanh: 1 - 2 / (e^{2|x|} + 1) (absolute error ~1e-7 with the fast exp); precise: odd series below |x| < 0.125.
MCU_INLINE float mcu_tanh_fast(float x) {
  const float ax = __builtin_fabsf(x);
  const float t = ax > 15.0f ? 1.0f : 1.0f - 2.0f / (mcu_exp_fast(2.0f * ax) + 1.0f);
  return __builtin_copysignf(t, x);
}
MCU_INLINE float mcu_tanh_precise(float x) {
  const float ax = __builtin_fabsf(x);
  if (ax < 0.125f) {
    const float x2 = x * x;
    return x + x * x2 * (-1.0f / 3 + x2 * (2.0f / 15 + x2 * (-17.0f / 315 + x2 * (62.0f / 2835))));
  }
  const float t = ax > 15.0f ? 1.0f : 1.0f - 2.0f / (mcu_exp_precise(2.0f * ax) + 1.0f);
  return __builtin_copysignf(t, x);
}
// sin / cos: reduction by 2 pi in three parts, then the approximate instruction (abs. error ~2^-20.9 on [-pi, pi]).
MCU_INLINE float mcu_reduce_2pi(float x) {
  const float n = __builtin_rintf(x * 0.15915494309189535f);
  x = __builtin_fmaf(-n, 6.28125f, x);
  x = __builtin_fmaf(-n, 1.9353071795864769e-3f, x);
  return x;
}

// ---- math -------------------------------------------------------------------------------------------------------
// Float functions: computed in float and rounded once to half/bfloat; vectors elementwise.
#define MCU_UNARY_IN(ns, name, expr) \
  namespace ns {                     \
  MSL_FLOAT_FN1(name, expr, name)    \
  }
#define MCU_UNARY2(name, fast_expr, precise_expr) \
  MCU_UNARY_IN(fast, name, fast_expr)             \
  MCU_UNARY_IN(precise, name, precise_expr)
#define MCU_UNARY(name, expr) MCU_UNARY2(name, expr, expr)

MCU_UNARY2(exp, mcu_exp_fast(x), mcu_exp_precise(x))
MCU_UNARY2(exp2, mcu_ex2_approx(x), mcu_exp2_precise(x))
MCU_UNARY2(exp10, mcu_ex2_approx(x * 3.3219280948873623f), mcu_exp_precise(x* M_LN10_F))
MCU_UNARY2(log, mcu_log_fast(x), mcu_log_precise(x))
MCU_UNARY2(log2, mcu_lg2_approx(x), mcu_log_precise(x) * M_LOG2E_F)
MCU_UNARY2(log10, mcu_lg2_approx(x) * 0.30102999566398120f, mcu_log_precise(x) * M_LOG10E_F)
MCU_UNARY2(tanh, mcu_tanh_fast(x), mcu_tanh_precise(x))
MCU_UNARY2(sqrt, __nvvm_sqrt_approx_f(x), __nvvm_sqrt_rn_f(x))
MCU_UNARY2(rsqrt, __nvvm_rsqrt_approx_f(x), 1.0f / __nvvm_sqrt_rn_f(x))
MCU_UNARY2(sin, mcu_sin_approx(x), mcu_sin_approx(mcu_reduce_2pi(x)))
MCU_UNARY2(cos, mcu_cos_approx(x), mcu_cos_approx(mcu_reduce_2pi(x)))
MCU_UNARY2(tan, mcu_sin_approx(x) / mcu_cos_approx(x),
           mcu_sin_approx(mcu_reduce_2pi(x)) / mcu_cos_approx(mcu_reduce_2pi(x)))
MCU_UNARY(floor, __builtin_floorf(x))
MCU_UNARY(ceil, __builtin_ceilf(x))
MCU_UNARY(round, __builtin_truncf(x + __builtin_copysignf(0.5f, x)))
MCU_UNARY(rint, __builtin_rintf(x))
MCU_UNARY(trunc, __builtin_truncf(x))
MCU_UNARY(fabs, __builtin_fabsf(x))
MCU_UNARY(fract, x - __builtin_floorf(x))
MCU_UNARY(sign, x > 0.0f ? 1.0f : x < 0.0f ? -1.0f : 0.0f)
MCU_UNARY(saturate, x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x)
#undef MCU_UNARY
#undef MCU_UNARY2
#undef MCU_UNARY_IN

#define MCU_BINARY_IN(ns, name, expr) \
  namespace ns {                      \
  MSL_FLOAT_FN2(name, expr, name)     \
  }
#define MCU_BINARY2(name, fast_expr, precise_expr) \
  MCU_BINARY_IN(fast, name, fast_expr)             \
  MCU_BINARY_IN(precise, name, precise_expr)
#define MCU_BINARY(name, expr) MCU_BINARY2(name, expr, expr)
MCU_BINARY2(pow, mcu_ex2_approx(y* mcu_lg2_approx(x)), mcu_exp2_precise(y* mcu_log_precise(x) * M_LOG2E_F))
MCU_BINARY2(powr, mcu_ex2_approx(y* mcu_lg2_approx(x)), mcu_exp2_precise(y* mcu_log_precise(x) * M_LOG2E_F))
MCU_BINARY(fmod, x - __builtin_truncf(x / y) * y)
MCU_BINARY(fmax, __builtin_fmaxf(x, y))
MCU_BINARY(fmin, __builtin_fminf(x, y))
MCU_BINARY(step, y < x ? 0.0f : 1.0f)
#undef MCU_BINARY
#undef MCU_BINARY2
#undef MCU_BINARY_IN

// The unqualified names: Metal compiles with fast math unless told otherwise.
#ifdef MCU_FAST_MATH
#define MCU_DEFAULT_MATH fast
#else
#define MCU_DEFAULT_MATH precise
#endif
#define MCU_USING(name) using MCU_DEFAULT_MATH::name;
MCU_USING(exp)
MCU_USING(exp2)
MCU_USING(exp10)
MCU_USING(log)
MCU_USING(log2)
MCU_USING(log10)
MCU_USING(tanh)
MCU_USING(sqrt)
MCU_USING(rsqrt)
MCU_USING(sin)
MCU_USING(cos)
MCU_USING(tan)
MCU_USING(floor)
MCU_USING(ceil)
MCU_USING(round)
MCU_USING(rint)
MCU_USING(trunc)
MCU_USING(fabs)
MCU_USING(fract)
MCU_USING(sign)
MCU_USING(saturate)
MCU_USING(pow)
MCU_USING(powr)
MCU_USING(fmod)
MCU_USING(fmax)
MCU_USING(fmin)
MCU_USING(step)
#undef MCU_USING

// fast:: and precise:: also name the functions that have one version.
#define MCU_SHARED_NAMES(X) X(max) X(min) X(clamp) X(abs) X(fma) X(mix) X(dot) X(isnan) X(isinf) X(select)
#define MCU_USING(name) using metal::name;
namespace fast {
MCU_SHARED_NAMES(MCU_USING)
}
namespace precise {
MCU_SHARED_NAMES(MCU_USING)
}
#undef MCU_USING
#undef MCU_SHARED_NAMES

// ---- barriers ---------------------------------------------------------------------------------------------------
// bar.sync orders shared and global memory among the threads of the block; bar.warp.sync among the given lanes.
MCU_INLINE void threadgroup_barrier(mem_flags) { __syncthreads(); }
MCU_INLINE void simdgroup_barrier(mem_flags) { __nvvm_bar_warp_sync(mcu_active_mask()); }

// ---- simd collectives -------------------------------------------------------------------------------------------
// Values of any size move as 32-bit words. mode: 0 idx, 1 bfly, 2 down, 3 up.
template <int Mode, typename T>
MCU_INLINE T mcu_shfl(uint mask, T x, uint arg) {
  constexpr int W = (sizeof(T) + 3) / 4;
  uint w[W] = {};
  __builtin_memcpy(w, &x, sizeof(T));
  for (int i = 0; i < W; ++i) {
    if constexpr (Mode == 0) w[i] = (uint)__nvvm_shfl_sync_idx_i32(mask, (int)w[i], (int)arg, 0x1f);
    if constexpr (Mode == 1) w[i] = (uint)__nvvm_shfl_sync_bfly_i32(mask, (int)w[i], (int)arg, 0x1f);
    if constexpr (Mode == 2) w[i] = (uint)__nvvm_shfl_sync_down_i32(mask, (int)w[i], (int)arg, 0x1f);
    if constexpr (Mode == 3) w[i] = (uint)__nvvm_shfl_sync_up_i32(mask, (int)w[i], (int)arg, 0);
  }
  T r;
  __builtin_memcpy(&r, w, sizeof(T));
  return r;
}

// Reductions: a butterfly when the whole warp is active (all lanes get the same bits, the operation being
// commutative), else the active lanes in lane order. The partial path is inlined (a call would make ptxas save the
// caller's live registers on the stack at every reduction) but loops over the mask's set bits, a loop of run-time
// trip count that the unroller leaves rolled: small code, so loops around a reduction still unroll.
template <typename T, typename Op>
MCU_INLINE T mcu_reduce_partial(T x, uint mask, Op op) {
  uint rest = mask;
  const uint first = (uint)__builtin_ctz(rest);
  T s = mcu_shfl<0>(mask, x, first);
  rest &= rest - 1u;
  while (rest != 0u) {
    const uint l = (uint)__builtin_ctz(rest);
    s = op(s, mcu_shfl<0>(mask, x, l));
    rest &= rest - 1u;
  }
  return s;
}
template <typename T, typename Op>
MCU_INLINE T mcu_reduce(T x, Op op) {
  const uint mask = mcu_active_mask();
  if (mask != 0xffffffffu) return mcu_reduce_partial(x, mask, op);
  for (uint d = 1; d < 32; d <<= 1) x = op(x, mcu_shfl<1>(mask, x, d));
  return x;
}
template <typename T>
MCU_INLINE T simd_sum(T x) {
  return mcu_reduce(x, [](T a, T b) { return T(a + b); });
}
template <typename T>
MCU_INLINE T simd_product(T x) {
  return mcu_reduce(x, [](T a, T b) { return T(a * b); });
}
template <typename T>
MCU_INLINE T simd_max(T x) {
  return mcu_reduce(x, [](T a, T b) { return max(a, b); });
}
template <typename T>
MCU_INLINE T simd_min(T x) {
  return mcu_reduce(x, [](T a, T b) { return min(a, b); });
}
template <typename T>
MCU_INLINE T simd_prefix_inclusive_sum(T x) {
  const uint mask = mcu_active_mask(), me = mcu_lane_id();
  if (mask == 0xffffffffu) {
    for (uint d = 1; d < 32; d <<= 1) {
      const T y = mcu_shfl<3>(mask, x, d);
      if (me >= d) x = T(x + y);
    }
    return x;
  }
  T s = T(0);
  for (uint l = 0; l < 32; ++l) {
    if (mask >> l & 1u) {
      const T v = mcu_shfl<0>(mask, x, l);
      if (l <= me) s = T(s + v);
    }
  }
  return s;
}
template <typename T>
MCU_INLINE T simd_prefix_exclusive_sum(T x) {
  return T(simd_prefix_inclusive_sum(x) - x);
}
// Reading a lane that is not active is undefined, as in Metal.
template <typename T>
MCU_INLINE T simd_shuffle(T x, ushort lane) {
  return mcu_shfl<0>(mcu_active_mask(), x, lane);
}
template <typename T>
MCU_INLINE T simd_broadcast(T x, ushort lane) {
  return mcu_shfl<0>(mcu_active_mask(), x, lane);
}
template <typename T>
MCU_INLINE T simd_shuffle_xor(T x, ushort mask) {
  return mcu_shfl<1>(mcu_active_mask(), x, mask);
}
// Lanes whose source lies outside the simdgroup keep their own value (Metal: "the upper delta lanes are unchanged").
template <typename T>
MCU_INLINE T simd_shuffle_down(T x, ushort delta) {
  return mcu_shfl<2>(mcu_active_mask(), x, delta);
}
template <typename T>
MCU_INLINE T simd_shuffle_up(T x, ushort delta) {
  return mcu_shfl<3>(mcu_active_mask(), x, delta);
}
template <typename T>
MCU_INLINE T simd_broadcast_first(T x) {
  const uint mask = mcu_active_mask();
  return mcu_shfl<0>(mask, x, (uint)__builtin_ctz(mask));
}
// A vote on a value known at compile time is that value (LLVM does not fold the vote): a uniform branch on it folds.
MCU_INLINE bool simd_all(bool x) { return __builtin_constant_p(x) ? x : __nvvm_vote_all_sync(mcu_active_mask(), x); }
MCU_INLINE bool simd_any(bool x) { return __builtin_constant_p(x) ? x : __nvvm_vote_any_sync(mcu_active_mask(), x); }
MCU_INLINE bool simd_is_first() { return mcu_lane_id() == (uint)__builtin_ctz(mcu_active_mask()); }

// ---- what peers' C-style casts become on the proxy (frontend._convert_vector_casts): MSL's value conversion --------
template <typename T, typename... X>
MCU_INLINE T mcu_cast(X... x) {
  if constexpr (mcpu_width<T> > 1)
    return mcpu_make<T>(x...);
  else if constexpr (std::is_class_v<T>)
    return T(x...);  // matrix<...>: the converting constructor
  else
    return T(x...);
}

// ---- Apple's metal_stdlib macros and packed vectors (element-aligned) ----------------------------------------------
#define MAXHALF ((half)65504.0f)
#ifndef MAXFLOAT
#define MAXFLOAT __FLT_MAX__
#endif
#define MCU_PACKED(T)                                                              \
  typedef T packed_##T##2 __attribute__((ext_vector_type(2), aligned(sizeof(T)))); \
  typedef T packed_##T##3 __attribute__((ext_vector_type(3), aligned(sizeof(T)))); \
  typedef T packed_##T##4 __attribute__((ext_vector_type(4), aligned(sizeof(T))));
MCU_PACKED(char)
MCU_PACKED(uchar)
MCU_PACKED(short)
MCU_PACKED(ushort)
MCU_PACKED(int)
MCU_PACKED(uint)
MCU_PACKED(half)
MCU_PACKED(bfloat)
MCU_PACKED(float)
#undef MCU_PACKED

// ---- matrix<T, Cols, Rows> (float4x4, half4x4...): columns of vectors, as MSL stores them --------------------------
// What peers use (llama.cpp's dequantize helpers): m[c] is column c, m[c][r] an element; construction from
// columns, a diagonal scalar, or another element type (converted element-wise).
template <typename T, int Cols, int Rows>
struct matrix {
  vec<T, Rows> columns[Cols];
  matrix() = default;
  explicit matrix(T diagonal) {
    for (int c = 0; c < Cols; ++c)
      for (int r = 0; r < Rows; ++r) columns[c][r] = r == c ? diagonal : T(0);
  }
  template <typename... V, typename = std::enable_if_t<sizeof...(V) == Cols && (Cols > 1)>>
  matrix(V... cols) : columns{vec<T, Rows>(cols)...} {}
  template <typename U>
  explicit matrix(const matrix<U, Cols, Rows>& m) {
    for (int c = 0; c < Cols; ++c)
      for (int r = 0; r < Rows; ++r) columns[c][r] = mcpu_convert<T>(m.columns[c][r]);
  }
  thread vec<T, Rows>& operator[](int c) { return columns[c]; }
  thread const vec<T, Rows>& operator[](int c) const { return columns[c]; }
};
#define MCU_MATRIX_NAMES(T)       \
  typedef matrix<T, 2, 2> T##2x2; \
  typedef matrix<T, 3, 3> T##3x3; \
  typedef matrix<T, 4, 4> T##4x4; \
  typedef matrix<T, 2, 4> T##2x4; \
  typedef matrix<T, 4, 2> T##4x2;
MCU_MATRIX_NAMES(float)
MCU_MATRIX_NAMES(half)
MCU_MATRIX_NAMES(bfloat)
#undef MCU_MATRIX_NAMES

// ---- simdgroup_matrix -------------------------------------------------------------------------------------------
// Storage in Apple's lane layout (simdgroup_layout.h): lane l holds row mcu_sgm::row(l), columns mcu_sgm::col(l) and
// col(l) + 1, so thread_elements() means here what it means on a Mac, and peers that index it (MLX's steel kernels,
// llama.cpp) run unchanged. The project's kernels never use it (the emulator rejects it). Every operation needs all
// 32 lanes: a divergent call traps.
//
// The multiply-accumulate, by MCU_SIMDGROUP_MMA (compiler.py's `simdgroup_mma`, part of the PTX cache key):
//   0: shuffles and fp32 FMAs, for every type (the reference lowering);
//   1 (default): tensor cores. half x half and bfloat x bfloat: one mma.sync m16n8k8 with fp32 accumulators (rows
//      8-15 of A zero), products exact. Any other pair (float, or mixed): every operand split into three bfloats
//      (mcu_sgm::split_pair) and six partial products summed by two m16n8k16 (about fp32 accuracy, never plain tf32);
//   2: tensor cores for half x half and bfloat x bfloat, shuffles for the rest.
// Either way C converts to float, each element is one fp32 sum, and D is rounded once to its type. Only the
// summation order differs between the lowerings (and a tensor core's internal fp32 rounding).
#ifndef MCU_SIMDGROUP_MMA
#define MCU_SIMDGROUP_MMA 1
#endif
template <typename T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "simdgroup_matrix: only 8x8 is supported");
  vec<T, 2> e;
  simdgroup_matrix() : e{T(0), T(0)} {}
  explicit simdgroup_matrix(T diagonal) {
    const uint lane = mcu_lane_id(), r = mcu_sgm::row(lane), c = mcu_sgm::col(lane);
    e[0] = r == c ? diagonal : T(0);
    e[1] = r == c + 1 ? diagonal : T(0);
  }
  thread vec<T, 2>& thread_elements() { return e; }
  thread const vec<T, 2>& thread_elements() const { return e; }
};

MCU_INLINE void mcu_require_full_warp() {
  if (mcu_active_mask() != 0xffffffffu) __builtin_trap();
}

template <typename T, int C, int R = C>
MCU_INLINE simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, C, R> m;
  m.e[0] = m.e[1] = value;
  return m;
}

// Row-major index of this lane's element k.
MCU_INLINE uint mcu_sgm_index(uint k) {
  const uint lane = mcu_lane_id();
  return mcu_sgm::row(lane) * 8u + mcu_sgm::col(lane) + k;
}

template <typename T, typename P>
MCU_INLINE void simdgroup_load(thread simdgroup_matrix<T, 8, 8>& d, P src, ulong elements_per_row = 8,
                               ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  mcu_require_full_warp();
  for (uint k = 0; k < 2; ++k)
    d.e[k] = T(src[mcpu_matrix_offset(mcu_sgm_index(k), elements_per_row, matrix_origin, transpose_matrix)]);
}

template <typename T, typename P>
MCU_INLINE void simdgroup_store(thread const simdgroup_matrix<T, 8, 8>& a, P dst, ulong elements_per_row = 8,
                                ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  mcu_require_full_warp();
  for (uint k = 0; k < 2; ++k)
    dst[mcpu_matrix_offset(mcu_sgm_index(k), elements_per_row, matrix_origin, transpose_matrix)] = a.e[k];
}

struct mcu_float2 {
  float x, y;
};

// Shuffles: lane (r, pair p) sums a(r, k) b(k, 2p + i) over k in order, from c, in fp32.
template <typename TA, typename TB, typename TC>
MCU_INLINE mcu_float2 mcu_sgm_mac_shuffle(const vec<TA, 2> a, const vec<TB, 2> b, const vec<TC, 2> c) {
  const uint full = 0xffffffffu, lane = mcu_lane_id(), r = mcu_sgm::row(lane), p = mcu_sgm::col(lane) / 2u;
  float s0 = (float)c[0], s1 = (float)c[1];
  for (uint j = 0; j < 4; ++j) {
    // a(r, 2j..2j+1) from the lane holding that pair; b(2j, 2p..2p+1) and b(2j + 1, 2p..2p+1) likewise.
    const vec<TA, 2> aj = mcu_shfl<0>(full, a, mcu_sgm::lane(r, j));
    const vec<TB, 2> b0 = mcu_shfl<0>(full, b, mcu_sgm::lane(2 * j, p));
    const vec<TB, 2> b1 = mcu_shfl<0>(full, b, mcu_sgm::lane(2 * j + 1, p));
    s0 += (float)aj[0] * (float)b0[0];
    s1 += (float)aj[0] * (float)b0[1];
    s0 += (float)aj[1] * (float)b1[0];
    s1 += (float)aj[1] * (float)b1[1];
  }
  return {s0, s1};
}

// Into mma lane m's registers: C's pair (as float), and back: D's pair for this Apple lane.
template <typename TC>
MCU_INLINE mcu_float2 mcu_sgm_c_to_mma(const vec<TC, 2> c) {
  const vec<TC, 2> cm = mcu_shfl<0>(0xffffffffu, c, mcu_sgm::ac_source(mcu_lane_id()));
  return {(float)cm[0], (float)cm[1]};
}
MCU_INLINE mcu_float2 mcu_sgm_d_from_mma(float d0, float d1) {
  return mcu_shfl<0>(0xffffffffu, mcu_float2{d0, d1}, mcu_sgm::d_source(mcu_lane_id()));
}

// half x half / bfloat x bfloat: one m16n8k8. A: this mma lane's pair (one 32-bit word); B: element b_element of
// two rows' pairs, joined by a byte permute (b_join).
template <typename T, typename TC>
MCU_INLINE mcu_float2 mcu_sgm_mac_mma16(const vec<T, 2> a, const vec<T, 2> b, const vec<TC, 2> c) {
  const uint full = 0xffffffffu, m = mcu_lane_id();
  const uint aw = __builtin_bit_cast(uint, mcu_shfl<0>(full, a, mcu_sgm::ac_source(m)));
  const uint b0 = __builtin_bit_cast(uint, mcu_shfl<0>(full, b, mcu_sgm::b_source(m, 0)));
  const uint b1 = __builtin_bit_cast(uint, mcu_shfl<0>(full, b, mcu_sgm::b_source(m, 1)));
  const uint bw = mcu_sgm::b_join(b0, b1, m);
  const mcu_float2 cm = mcu_sgm_c_to_mma(c);
  float d0, d1, d2, d3;
  // Not volatile: a pure function of its operands (CSE and dead-code removal stay possible); clang marks inline asm
  // convergent in CUDA, so it is never sunk into divergent code.
  if constexpr (std::is_same<T, half>::value)
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%7, %8, %9, %10};"
        : "=f"(d0), "=f"(d1), "=f"(d2), "=f"(d3)
        : "r"(aw), "r"(0u), "r"(bw), "f"(cm.x), "f"(cm.y), "f"(0.0f), "f"(0.0f));
  else
    asm("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%7, %8, %9, %10};"
        : "=f"(d0), "=f"(d1), "=f"(d2), "=f"(d3)
        : "r"(aw), "r"(0u), "r"(bw), "f"(cm.x), "f"(cm.y), "f"(0.0f), "f"(0.0f));
  (void)d2;
  (void)d3;
  return mcu_sgm_d_from_mma(d0, d1);
}

// d += A x B, A 16x16 and B 16x8 in bfloat (registers in PTX order), d in fp32.
MCU_INLINE void mcu_mma_bf16_k16(float (&d)[4], uint a0, uint a1, uint a2, uint a3, uint b0, uint b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// Any other pair: operands to float, moved into mma layout, split hi + mid + lo (bfloat each), six partial products
// by two m16n8k16 (mcu_sgm::split_step says which parts go where).
template <typename TA, typename TB, typename TC>
MCU_INLINE mcu_float2 mcu_sgm_mac_split(const vec<TA, 2> a, const vec<TB, 2> b, const vec<TC, 2> c) {
  const uint full = 0xffffffffu, m = mcu_lane_id();
  const mcu_float2 af = mcu_shfl<0>(full, mcu_float2{(float)a[0], (float)a[1]}, mcu_sgm::ac_source(m));
  const mcu_float2 bf = {(float)b[0], (float)b[1]};
  const mcu_float2 br0 = mcu_shfl<0>(full, bf, mcu_sgm::b_source(m, 0));
  const mcu_float2 br1 = mcu_shfl<0>(full, bf, mcu_sgm::b_source(m, 1));
  const bool odd = mcu_sgm::b_element(m) != 0u;
  const mcu_sgm::split3 sa = mcu_sgm::split_pair(af.x, af.y);
  const mcu_sgm::split3 sb = mcu_sgm::split_pair(odd ? br0.y : br0.x, odd ? br1.y : br1.x);
  const mcu_float2 cm = mcu_sgm_c_to_mma(c);
  float d[4] = {cm.x, cm.y, 0.0f, 0.0f};
  for (int step = 0; step < 2; ++step) {
    const mcu_sgm::k16_operands o = mcu_sgm::split_step(step, sa, sb);
    mcu_mma_bf16_k16(d, o.a[0], o.a[1], o.a[2], o.a[3], o.b[0], o.b[1]);
  }
  return mcu_sgm_d_from_mma(d[0] + d[2], d[1] + d[3]);
}

template <typename TD, typename TA, typename TB, typename TC>
MCU_INLINE void simdgroup_multiply_accumulate(thread simdgroup_matrix<TD, 8, 8>& d,
                                              thread const simdgroup_matrix<TA, 8, 8>& a,
                                              thread const simdgroup_matrix<TB, 8, 8>& b,
                                              thread const simdgroup_matrix<TC, 8, 8>& c) {
  mcu_require_full_warp();
  constexpr bool same16 =
      std::is_same<TA, TB>::value && (std::is_same<TA, half>::value || std::is_same<TA, bfloat>::value);
  mcu_float2 s;
  if constexpr (MCU_SIMDGROUP_MMA != 0 && same16)
    s = mcu_sgm_mac_mma16<TA>(a.e, b.e, c.e);
  else if constexpr (MCU_SIMDGROUP_MMA == 1)
    s = mcu_sgm_mac_split(a.e, b.e, c.e);
  else
    s = mcu_sgm_mac_shuffle(a.e, b.e, c.e);
  d.e[0] = (TD)s.x;
  d.e[1] = (TD)s.y;
}
template <typename TD, typename TA, typename TB>
MCU_INLINE void simdgroup_multiply(thread simdgroup_matrix<TD, 8, 8>& d, thread const simdgroup_matrix<TA, 8, 8>& a,
                                   thread const simdgroup_matrix<TB, 8, 8>& b) {
  const simdgroup_matrix<TD, 8, 8> zero = make_filled_simdgroup_matrix<TD, 8, 8>(TD(0));
  simdgroup_multiply_accumulate(d, a, b, zero);
}

// ---- logging (metal_logging, MSL 3.2): a no-op os_log, so that headers which declare loggers compile -------------
struct os_log {
  constexpr os_log(const char*, const char*) {}
  template <typename... Args>
  void log_debug(const char*, Args...) const {}
  template <typename... Args>
  void log_info(const char*, Args...) const {}
  template <typename... Args>
  void log_error(const char*, Args...) const {}
};

// ---- atomics ----------------------------------------------------------------------------------------------------
#define MCU_ATOMIC_RMW(name, builtin)                                              \
  template <typename A, typename T>                                                \
  MCU_INLINE auto atomic_##name##_explicit(volatile A* obj, T arg, memory_order) { \
    auto* p = const_cast<A*>(obj);                                                 \
    return builtin(&p->__value, (decltype(p->__value))arg, __ATOMIC_RELAXED);      \
  }                                                                                \
  template <typename A, typename T>                                                \
  MCU_INLINE auto atomic_##name##_explicit(A* obj, T arg, memory_order o) {        \
    return atomic_##name##_explicit((volatile A*)obj, arg, o);                     \
  }
MCU_ATOMIC_RMW(fetch_add, __atomic_fetch_add)
MCU_ATOMIC_RMW(fetch_sub, __atomic_fetch_sub)
MCU_ATOMIC_RMW(fetch_max, __atomic_fetch_max)
MCU_ATOMIC_RMW(fetch_min, __atomic_fetch_min)
MCU_ATOMIC_RMW(fetch_and, __atomic_fetch_and)
MCU_ATOMIC_RMW(fetch_or, __atomic_fetch_or)
MCU_ATOMIC_RMW(fetch_xor, __atomic_fetch_xor)
MCU_ATOMIC_RMW(exchange, __atomic_exchange_n)
#undef MCU_ATOMIC_RMW

// The generic builtins (not the _n forms, which take integers and pointers only): atomic_float too.
template <typename A>
MCU_INLINE auto atomic_load_explicit(volatile A* obj, memory_order) {
  decltype(const_cast<A*>(obj)->__value) v;
  __atomic_load(&const_cast<A*>(obj)->__value, &v, __ATOMIC_RELAXED);
  return v;
}
template <typename A>
MCU_INLINE auto atomic_load_explicit(A* obj, memory_order o) {
  return atomic_load_explicit((volatile A*)obj, o);
}
template <typename A, typename T>
MCU_INLINE void atomic_store_explicit(volatile A* obj, T v, memory_order) {
  auto* p = const_cast<A*>(obj);
  decltype(p->__value) x = (decltype(p->__value))v;
  __atomic_store(&p->__value, &x, __ATOMIC_RELAXED);
}
template <typename A, typename T>
MCU_INLINE void atomic_store_explicit(A* obj, T v, memory_order o) {
  atomic_store_explicit((volatile A*)obj, v, o);
}
template <typename A, typename T>
MCU_INLINE bool atomic_compare_exchange_weak_explicit(volatile A* obj, T* expected, T desired, memory_order,
                                                      memory_order) {
  auto* p = const_cast<A*>(obj);
  return __atomic_compare_exchange_n(&p->__value, expected, desired, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}
template <typename A, typename T>
MCU_INLINE bool atomic_compare_exchange_weak_explicit(A* obj, T* expected, T desired, memory_order s, memory_order f) {
  return atomic_compare_exchange_weak_explicit((volatile A*)obj, expected, desired, s, f);
}

}  // namespace metal

// Metal 4 tensors and MetalPerformancePrimitives' matmul2d (<metal_tensor>, <MetalPerformancePrimitives/...>).
#include "metal_tensor_ops.h"

// ---- what generated entry points use ----------------------------------------------------------------------------
// The kernel argument block: buffer pointers by [[buffer(i)]] (setBytes data is uploaded by the launcher and bound
// like a buffer), and byte offsets of [[threadgroup(i)]] arguments in the dynamic shared memory.
#define MCU_MAX_BUFFERS 31
struct mcu_args {
  void* buffers[MCU_MAX_BUFFERS];
  uint32_t threadgroup_offsets[MCU_MAX_BUFFERS];
};
extern __shared__ __attribute__((aligned(16))) unsigned char mcu_dynamic_threadgroup_memory[];
// Arguments are bound by mcpu_bind and mcpu_builtin (msl_types.h).
