// The target-independent part of the MSL standard library for the emulator's targets (the CPU shim
// msl/cpu/shim/metal_stdlib.h and the NVPTX shim msl/cuda/shim/metal_stdlib.h include it): scalar
// and vector types, constants, vector constructors and conversions, as_type, numeric_limits, min/max/clamp/abs/fma/
// mix/select/all/any/dot, isnan/isinf, the float-function macros, barrier flags, the simdgroup_matrix and atomic type
// names, and the binding helpers of the generated entry points. The including shim defines the address spaces first.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <type_traits>

#ifndef MSL_INLINE
#define MSL_INLINE inline __attribute__((always_inline))
#endif

typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef _Float16 half;
typedef __bf16 bfloat;

#define MSL_VECTORS(T)                                \
  typedef T T##2 __attribute__((ext_vector_type(2))); \
  typedef T T##3 __attribute__((ext_vector_type(3))); \
  typedef T T##4 __attribute__((ext_vector_type(4)));
MSL_VECTORS(float)
MSL_VECTORS(half)
MSL_VECTORS(bfloat)
MSL_VECTORS(int)
MSL_VECTORS(uint)
MSL_VECTORS(short)
MSL_VECTORS(ushort)
MSL_VECTORS(char)
MSL_VECTORS(uchar)
MSL_VECTORS(long)
MSL_VECTORS(ulong)
MSL_VECTORS(bool)
#undef MSL_VECTORS

#define INFINITY __builtin_inff()
#define HUGE_VALF __builtin_huge_valf()
#define NAN __builtin_nanf("")
#define FLT_MAX __FLT_MAX__
#define FLT_MIN __FLT_MIN__
#define FLT_EPSILON __FLT_EPSILON__
#define HALF_MAX ((half)65504.0f)
#define HALF_MIN ((half)6.103515625e-05f)
#define M_PI_F 3.14159265358979323846f
#define M_LOG2E_F 1.44269504088896340736f
#define M_LOG10E_F 0.434294481903251827651f
#define M_LN2_F 0.693147180559945309417f
#define M_LN10_F 2.30258509299404568402f
#define M_SQRT2_F 1.41421356237309504880f
#define M_SQRT1_2_F 0.707106781186547524401f

namespace metal {

// ---- metal_type_traits: the std traits under MSL's names (each shim adds remove_addrspace for its target) ---------
using std::bool_constant;
using std::conditional;
using std::conditional_t;
using std::decay_t;
using std::enable_if;
using std::enable_if_t;
using std::false_type;
using std::integral_constant;
using std::is_arithmetic_v;
using std::is_convertible;
using std::is_convertible_v;
using std::is_floating_point;
using std::is_floating_point_v;
using std::is_integral;
using std::is_integral_v;
using std::is_same;
using std::is_same_v;
using std::is_signed;
using std::is_signed_v;
using std::remove_cv;
using std::remove_cv_t;
using std::remove_reference;
using std::remove_reference_t;
using std::true_type;

// ---- type traits over scalars and ext vectors -------------------------------------------------------------------
template <typename T>
struct mcpu_vec_traits {
  static constexpr int n = 1;
  using elem = T;
};
template <typename T, int N>
struct mcpu_vec_traits<T __attribute__((ext_vector_type(N)))> {
  static constexpr int n = N;
  using elem = T;
};
template <typename T>
using mcpu_elem_t = typename mcpu_vec_traits<std::remove_cv_t<std::remove_reference_t<T>>>::elem;
template <typename T>
constexpr int mcpu_width = mcpu_vec_traits<std::remove_cv_t<std::remove_reference_t<T>>>::n;
template <typename T, int N>
using vec = T __attribute__((ext_vector_type(N)));

// Scalar conversion as MSL does it (half <-> bfloat through float, which is exact for the widening step).
template <typename To, typename From>
MSL_INLINE To mcpu_convert(From x) {
  if constexpr (std::is_same_v<To, From>) {
    return x;
  } else if constexpr (std::is_same_v<To, bool>) {
    return (float)x != 0.0f;
  } else if constexpr ((std::is_same_v<To, half> || std::is_same_v<To, bfloat>) &&
                       (std::is_same_v<From, half> || std::is_same_v<From, bfloat>)) {
    return (To)(float)x;
  } else {
    return (To)x;
  }
}

// MSL vector constructors: the pre-pass rewrites float4(a, b.xy, ...) to mcpu_make<float4>(a, b.xy, ...).
// Arguments are taken by value: that drops the address space of a value read from device / constant / threadgroup
// memory (a reference would keep it, and neither the vector traits nor a temporary swizzle would match).
template <typename V, typename A>
MSL_INLINE void mcpu_put(V& r, int& i, A a) {
  using E = mcpu_elem_t<V>;
  if constexpr (mcpu_width<A> == 1) {
    r[i++] = mcpu_convert<E>(a);
  } else {
    for (int k = 0; k < mcpu_width<A>; ++k) r[i++] = mcpu_convert<E>(a[k]);
  }
}
template <typename V, typename... A>
MSL_INLINE V mcpu_make(A... a) {
  constexpr int n = mcpu_width<V>;
  V r{};
  if constexpr (sizeof...(A) == 0) {
    return r;
  } else if constexpr (sizeof...(A) == 1 && ((mcpu_width<A> == 1) && ...)) {
    for (int k = 0; k < n; ++k) r[k] = mcpu_convert<mcpu_elem_t<V>>(a...);  // splat
    return r;
  } else {
    static_assert((mcpu_width<A> + ...) == n, "vector constructor: the arguments' components do not add up");
    int i = 0;
    (mcpu_put(r, i, a), ...);
    return r;
  }
}

template <typename To, typename From>
MSL_INLINE To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type: sizes differ");
  return __builtin_bit_cast(To, x);
}

// ---- numeric_limits ---------------------------------------------------------------------------------------------
template <typename T>
struct numeric_limits;
#define MSL_LIMITS(T, MAX, MIN, LOWEST, INF, EPS)  \
  template <>                                      \
  struct numeric_limits<T> {                       \
    static constexpr bool is_specialized = true;   \
    static constexpr T max() { return MAX; }       \
    static constexpr T min() { return MIN; }       \
    static constexpr T lowest() { return LOWEST; } \
    static constexpr T infinity() { return INF; }  \
    static constexpr T epsilon() { return EPS; }   \
  };
MSL_LIMITS(float, __FLT_MAX__, __FLT_MIN__, -__FLT_MAX__, __builtin_inff(), __FLT_EPSILON__)
MSL_LIMITS(half, (half)65504.0f, (half)6.103515625e-05f, (half)-65504.0f, (half)__builtin_inff(), (half)0.0009765625f)
MSL_LIMITS(bfloat, (bfloat)3.3895313892515355e38f, (bfloat)1.1754943508222875e-38f, (bfloat)-3.3895313892515355e38f,
           (bfloat)__builtin_inff(), (bfloat)0.0078125f)
MSL_LIMITS(int, 2147483647, (-2147483647 - 1), (-2147483647 - 1), 0, 0)
MSL_LIMITS(uint, 4294967295u, 0u, 0u, 0u, 0u)
MSL_LIMITS(short, (short)32767, (short)-32768, (short)-32768, (short)0, (short)0)
MSL_LIMITS(ushort, (ushort)65535, (ushort)0, (ushort)0, (ushort)0, (ushort)0)
MSL_LIMITS(long, 9223372036854775807l, (-9223372036854775807l - 1), (-9223372036854775807l - 1), 0l, 0l)
MSL_LIMITS(ulong, 18446744073709551615ul, 0ul, 0ul, 0ul, 0ul)
// The 8-bit integers (peers' limits tables ask for them).
MSL_LIMITS(char, (char)127, (char)-128, (char)-128, (char)0, (char)0)
MSL_LIMITS(signed char, (signed char)127, (signed char)-128, (signed char)-128, (signed char)0, (signed char)0)
MSL_LIMITS(unsigned char, (unsigned char)255, (unsigned char)0, (unsigned char)0, (unsigned char)0, (unsigned char)0)
#undef MSL_LIMITS

// ---- integer, comparison and vector functions (no target-specific math) -------------------------------
// max / min / abs / clamp for every scalar type (half and bfloat compare exactly, no rounding needed).
#define MSL_MINMAX(T)                                  \
  MSL_INLINE T max(T x, T y) { return x > y ? x : y; } \
  MSL_INLINE T min(T x, T y) { return x < y ? x : y; } \
  MSL_INLINE T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
// Macro invocations without semicolons, one per line (clang-format would join them).
// clang-format off
MSL_MINMAX(float)
MSL_MINMAX(half)
MSL_MINMAX(bfloat)
MSL_MINMAX(int)
MSL_MINMAX(uint)
MSL_MINMAX(short)
MSL_MINMAX(ushort)
MSL_MINMAX(char)
MSL_MINMAX(uchar)
MSL_MINMAX(long)
MSL_MINMAX(ulong)
// clang-format on
#undef MSL_MINMAX
template <typename V, std::enable_if_t<(mcpu_width<V> > 1), int> = 0>
MSL_INLINE V max(V x, V y) {
  for (int i = 0; i < mcpu_width<V>; ++i) x[i] = max((mcpu_elem_t<V>)x[i], (mcpu_elem_t<V>)y[i]);
  return x;
}
template <typename V, std::enable_if_t<(mcpu_width<V> > 1), int> = 0>
MSL_INLINE V min(V x, V y) {
  for (int i = 0; i < mcpu_width<V>; ++i) x[i] = min((mcpu_elem_t<V>)x[i], (mcpu_elem_t<V>)y[i]);
  return x;
}
template <typename V, std::enable_if_t<(mcpu_width<V> > 1), int> = 0>
MSL_INLINE V clamp(V x, V lo, V hi) {
  return min(max(x, lo), hi);
}
template <typename V, std::enable_if_t<(mcpu_width<V> > 1), int> = 0>
MSL_INLINE V clamp(V x, mcpu_elem_t<V> lo, mcpu_elem_t<V> hi) {
  return min(max(x, mcpu_make<V>(lo)), mcpu_make<V>(hi));
}
MSL_INLINE float abs(float x) { return __builtin_fabsf(x); }
MSL_INLINE half abs(half x) { return x < (half)0.0f ? (half)-x : x; }
MSL_INLINE bfloat abs(bfloat x) { return (bfloat)__builtin_fabsf((float)x); }
MSL_INLINE int abs(int x) { return x < 0 ? -x : x; }
MSL_INLINE short abs(short x) { return x < 0 ? (short)-x : x; }
MSL_INLINE long abs(long x) { return x < 0 ? -x : x; }
template <typename V, std::enable_if_t<(mcpu_width<V> > 1), int> = 0>
MSL_INLINE V abs(V x) {
  for (int i = 0; i < mcpu_width<V>; ++i) x[i] = abs((mcpu_elem_t<V>)x[i]);
  return x;
}

MSL_INLINE float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
MSL_INLINE half fma(half a, half b, half c) { return (half)__builtin_fmaf((float)a, (float)b, (float)c); }
MSL_INLINE bfloat fma(bfloat a, bfloat b, bfloat c) { return (bfloat)__builtin_fmaf((float)a, (float)b, (float)c); }
template <typename V, std::enable_if_t<(mcpu_width<V> > 1), int> = 0>
MSL_INLINE V fma(V a, V b, V c) {
  for (int i = 0; i < mcpu_width<V>; ++i) a[i] = fma((mcpu_elem_t<V>)a[i], (mcpu_elem_t<V>)b[i], (mcpu_elem_t<V>)c[i]);
  return a;
}
template <typename T>
MSL_INLINE T mix(T x, T y, T a) {
  return x + (y - x) * a;
}
template <typename V, std::enable_if_t<(mcpu_width<V> > 1), int> = 0>
MSL_INLINE V mix(V x, V y, mcpu_elem_t<V> a) {
  return x + (y - x) * a;
}

// select(a, b, c): c ? b : a, elementwise for vectors (c: bool, bool vector or a comparison's integer mask).
template <typename T>
MSL_INLINE T select(T a, T b, bool c) {
  return c ? b : a;
}
template <typename V, typename C, std::enable_if_t<(mcpu_width<V> > 1 && mcpu_width<C> == mcpu_width<V>), int> = 0>
MSL_INLINE V select(V a, V b, C c) {
  for (int i = 0; i < mcpu_width<V>; ++i)
    if (c[i]) a[i] = b[i];
  return a;
}
template <typename C>
MSL_INLINE bool all(C c) {
  for (int i = 0; i < mcpu_width<C>; ++i)
    if (!c[i]) return false;
  return true;
}
template <typename C>
MSL_INLINE bool any(C c) {
  for (int i = 0; i < mcpu_width<C>; ++i)
    if (c[i]) return true;
  return false;
}
template <typename V>
MSL_INLINE mcpu_elem_t<V> dot(V a, V b) {
  mcpu_elem_t<V> s = a[0] * b[0];
  for (int i = 1; i < mcpu_width<V>; ++i) s += a[i] * b[i];
  return s;
}

// ---- float functions --------------------------------------------------------------------------------------------
// A float function with its half and bfloat overloads (computed in float by `via`, rounded once) and its elementwise
// vector template; each shim picks `via` (the emulator's two-variant functions go through precise::).
#define MSL_FLOAT_FN1(name, float_expr, via)                                   \
  MSL_INLINE float name(float x) { return float_expr; }                        \
  MSL_INLINE half name(half x) { return (half)via((float)x); }                 \
  MSL_INLINE bfloat name(bfloat x) { return (bfloat)via((float)x); }           \
  template <typename V, std::enable_if_t<(mcpu_width<V> > 1), int> = 0>        \
  MSL_INLINE V name(V x) {                                                     \
    for (int i = 0; i < mcpu_width<V>; ++i) x[i] = name((mcpu_elem_t<V>)x[i]); \
    return x;                                                                  \
  }
#define MSL_FLOAT_FN2(name, float_expr, via)                                                         \
  MSL_INLINE float name(float x, float y) { return float_expr; }                                     \
  MSL_INLINE half name(half x, half y) { return (half)via((float)x, (float)y); }                     \
  MSL_INLINE bfloat name(bfloat x, bfloat y) { return (bfloat)via((float)x, (float)y); }             \
  template <typename V, std::enable_if_t<(mcpu_width<V> > 1), int> = 0>                              \
  MSL_INLINE V name(V x, V y) {                                                                      \
    for (int i = 0; i < mcpu_width<V>; ++i) x[i] = name((mcpu_elem_t<V>)x[i], (mcpu_elem_t<V>)y[i]); \
    return x;                                                                                        \
  }

// Under fast math clang warns at every inf/NaN use in kernel code (as it should: Metal's fast math makes them
// undefined); the definitions here are not such uses.
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wnan-infinity-disabled"
MSL_INLINE bool isnan(float x) { return __builtin_isnan(x); }
MSL_INLINE bool isnan(half x) { return __builtin_isnan((float)x); }
MSL_INLINE bool isnan(bfloat x) { return __builtin_isnan((float)x); }
MSL_INLINE bool isinf(float x) { return __builtin_isinf(x); }
MSL_INLINE bool isinf(half x) { return __builtin_isinf((float)x); }
MSL_INLINE bool isinf(bfloat x) { return __builtin_isinf((float)x); }
MSL_INLINE bool isfinite(float x) { return __builtin_isfinite(x); }
#pragma clang diagnostic pop
MSL_INLINE uint popcount(uint x) { return (uint)__builtin_popcount(x); }
MSL_INLINE uint ctz(uint x) { return x ? (uint)__builtin_ctz(x) : 32u; }
MSL_INLINE uint clz(uint x) { return x ? (uint)__builtin_clz(x) : 32u; }

// ---- barrier flags ----------------------------------------------------------------------------------------------
enum class mem_flags : uint {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags((uint)a | (uint)b); }

// ---- simdgroup_matrix: the names (each shim defines the storage and the operations) -----------------------------
template <typename T, int Cols, int Rows>
struct simdgroup_matrix;
template <typename T>
using simdgroup_matrix8x8 = simdgroup_matrix<T, 8, 8>;
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

// Where simdgroup_load / simdgroup_store find element idx (row-major in the 8x8 matrix) in memory: rows of
// elements_per_row elements from matrix_origin (x = column, y = row), the matrix transposed or not.
MSL_INLINE ulong mcpu_matrix_offset(uint idx, ulong elements_per_row, ulong2 origin, bool transpose) {
  const uint r = idx / 8, c = idx % 8;
  const ulong row = transpose ? c : r, col = transpose ? r : c;
  return (origin.y + row) * elements_per_row + origin.x + col;
}

// ---- atomic types (each shim defines the operations) ------------------------------------------------------------
template <typename T>
struct _atomic {
  T __value;
};
typedef _atomic<int> atomic_int;
typedef _atomic<uint> atomic_uint;
typedef _atomic<float> atomic_float;
typedef _atomic<bool> atomic_bool;
enum memory_order {
  memory_order_relaxed,
  memory_order_acquire,
  memory_order_release,
  memory_order_acq_rel,
  memory_order_seq_cst
};

}  // namespace metal

// The type of parameter I of a kernel's function type (the generated entry points bind buffers by it).
template <size_t I, typename F>
struct mcpu_param;
template <size_t I, typename R, typename First, typename... Rest>
struct mcpu_param<I, R(First, Rest...)> : mcpu_param<I - 1, R(Rest...)> {};
template <typename R, typename First, typename... Rest>
struct mcpu_param<0, R(First, Rest...)> {
  using type = First;
};
template <size_t I, typename F>
using mcpu_param_t = typename mcpu_param<I, F>::type;

// A buffer or threadgroup argument of a generated entry point: a pointer, or a reference (constant Params& p
// [[buffer(3)]]).
template <typename P>
MSL_INLINE P mcpu_bind(void* p) {
  if constexpr (std::is_reference_v<P>)
    return *reinterpret_cast<std::remove_reference_t<P>*>(p);
  else
    return reinterpret_cast<P>(p);
}
// A position builtin: a uint / ushort scalar (x) or a 2- / 3-vector.
template <typename P>
MSL_INLINE P mcpu_builtin(uint32_t x, uint32_t y, uint32_t z) {
  using T = std::remove_cv_t<P>;
  if constexpr (metal::mcpu_width<T> == 1) {
    return (T)x;
  } else {
    const uint32_t v[3] = {x, y, z};
    T r{};
    for (int i = 0; i < metal::mcpu_width<T>; ++i) r[i] = (metal::mcpu_elem_t<T>)v[i];
    return r;
  }
}
