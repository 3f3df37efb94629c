// The Metal Shading Language standard library on the CPU: included (-include) before every pre-passed .metal file.
//
// half is _Float16 and bfloat is __bf16, compiled with excess precision off so every operation rounds as on the
// GPU; vectors are clang ext_vector_type (swizzles work); simd collectives and simdgroup_matrix operations go
// through the runtime's lane exchange (mcpu_simd_exchange), so lanes really meet as on the GPU.
// With MCPU_ADDRESS_SPACES defined (a -fsyntax-only compile) device/constant/threadgroup are distinct clang address
// spaces, so code that mixes them fails to compile as it does in Metal.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <type_traits>

#include "../runtime/mcpu_abi.h"

#define MCPU_INLINE inline __attribute__((always_inline))
#define MCPU_NOSAN __attribute__((noinline, no_sanitize("coverage")))
// Trailing parameters of every barrier and collective: the call site in the .metal source.
#define MCPU_SITE                                                                  \
  const char *mcpu_file = __builtin_FILE(), unsigned mcpu_line = __builtin_LINE(), \
             unsigned mcpu_col = __builtin_COLUMN()
#define MCPU_SITE_ARGS mcpu_file, mcpu_line, mcpu_col

#ifdef MCPU_ADDRESS_SPACES
#define device __attribute__((address_space(1)))
#define constant const __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#else
#define device
#define constant const
#define threadgroup
#endif
#define thread
#define kernel

#define MSL_INLINE MCPU_INLINE
#define METAL_FUNC MCPU_INLINE  // Apple's metal_stdlib defines it; peers' headers use it
#include "../../shim/msl_types.h"

// ---- metal_type_traits: the std traits (msl_types.h), and the address-space ones of this target ------------------
namespace metal {
// The address space of a type, removed (a thread-space type has none).
template <typename T>
struct remove_addrspace {
  using type = T;
};
#ifdef MCPU_ADDRESS_SPACES
template <typename T>
struct remove_addrspace<device T> {
  using type = T;
};
template <typename T>
struct remove_addrspace<const __attribute__((address_space(2))) T> {
  using type = const T;
};
template <typename T>
struct remove_addrspace<threadgroup T> {
  using type = T;
};
#endif
template <typename T>
using remove_addrspace_t = typename remove_addrspace<T>::type;

}  // namespace metal

// ---- the runtime that opened this library (see mcpu_runtime_api) -------------------------------------------------
// Trampolines are not instrumented and not inlined: their return address is the kernel code that called them.
#define MCPU_TRAMPOLINE __attribute__((noinline, no_sanitize("coverage")))
static const mcpu_runtime_api* mcpu_runtime;
static MCPU_TRAMPOLINE void mcpu_bind_runtime(const mcpu_runtime_api* runtime) { mcpu_runtime = runtime; }
#define MCPU_HOOKS(N)                                                 \
  extern "C" MCPU_TRAMPOLINE void __sanitizer_cov_load##N(void* p) {  \
    mcpu_runtime->access(p, N, 0, __builtin_return_address(0));       \
  }                                                                   \
  extern "C" MCPU_TRAMPOLINE void __sanitizer_cov_store##N(void* p) { \
    mcpu_runtime->access(p, N, 1, __builtin_return_address(0));       \
  }
MCPU_HOOKS(1)
MCPU_HOOKS(2)
MCPU_HOOKS(4)
MCPU_HOOKS(8)
MCPU_HOOKS(16)
#undef MCPU_HOOKS
// -fsanitize=alignment (compiler.py): an access through a pointer whose type needs more alignment than the address
// has, e.g. a vector load at an element offset that is not a multiple of the vector's length. The recoverable
// handler's calls are not merged by the optimiser (noreturn ones are), so each keeps its line; it never returns.
extern "C" MCPU_TRAMPOLINE void __ubsan_handle_type_mismatch_v1(void*, void* p) {
  char message[96];
  __builtin_snprintf(message, sizeof(message), "misaligned access at address %p (below its type's alignment)", p);
  mcpu_runtime->fatal(message, __builtin_return_address(0));
}
static MCPU_TRAMPOLINE void* mcpu_threadgroup_alloc(uint32_t size, uint32_t align, uint32_t decl_id) {
  return mcpu_runtime->threadgroup_alloc(size, align, decl_id, __builtin_return_address(0));
}
static MCPU_TRAMPOLINE void mcpu_threadgroup_barrier(uint32_t flags, const char* file, uint32_t line, uint32_t col) {
  mcpu_runtime->threadgroup_barrier(flags, file, line, col);
}
static MCPU_TRAMPOLINE void mcpu_simdgroup_barrier(uint32_t flags, const char* file, uint32_t line, uint32_t col) {
  mcpu_runtime->simdgroup_barrier(flags, file, line, col);
}
static MCPU_TRAMPOLINE uint32_t mcpu_simd_exchange(const void* value, uint32_t size, void* all, const char* file,
                                                   uint32_t line, uint32_t col) {
  return mcpu_runtime->simd_exchange(value, size, all, file, line, col);
}
static MCPU_TRAMPOLINE uint32_t mcpu_lane_id() { return mcpu_runtime->lane_id(); }
static MCPU_TRAMPOLINE void mcpu_atomic_access(void* addr, uint32_t size, int is_store) {
  mcpu_runtime->atomic_access(addr, size, is_store, __builtin_return_address(0));
}
static MCPU_TRAMPOLINE void mcpu_fatal(const char* message) {
  mcpu_runtime->fatal(message, __builtin_return_address(0));
}

namespace metal {

// uniform<T> marks a value as the same in every thread (a hint to Apple's compiler): here the value itself.
template <typename T>
using uniform = T;
template <typename T>
MCPU_INLINE constexpr T make_uniform(T x) {
  return x;
}

// ---- math -------------------------------------------------------------------------------------------------------
// Metal has two variants of the single-precision math functions: metal::fast:: and metal::precise::; the plain
// names are the fast ones unless the library is compiled without fast math (compile(..., fast_math=False)).
//   precise::f  libm's result (computed with denormals kept, also in a fast-math compile).
//   fast::f     the fast-math model: inputs and results flushed to zero when denormal; exp/exp10/log/log10/pow go
//               through exp2/log2 in fp32 (exp(x) = exp2(x * log2 e): overflows to inf, underflows to 0);
//               tanh(x) = (e^2x - 1) / (e^2x + 1) with the fast exp, so NaN (inf / inf) once e^2x overflows
//               (x > ~44.4), as Apple's fast tanh does; rsqrt(x) = 1 / sqrt(x); divide(x, y) = x * (1 / y).
// half and bfloat have one variant (Metal defines fast/precise for float only): computed in float by precise::,
// rounded once. A fast-math compile also runs every GPU thread with the CPU's flush-to-zero and denormals-are-zero
// modes on (mcpu_thread_fp_mode, called by the generated entry points), so float arithmetic flushes denormals, and
// compiler.py computes every division the compiler may turn into a reciprocal multiply (fast math) as x * (1 / y).
#ifdef MCPU_FAST_MATH
// The flush-to-zero bits: MXCSR FTZ | DAZ on x86-64, FPCR.FZ on AArch64 (it flushes inputs and outputs alike).
#if defined(__x86_64__)
typedef unsigned mcpu_fp_control;
constexpr mcpu_fp_control kMcpuFlushBits = 0x8040u;
MCPU_INLINE mcpu_fp_control mcpu_get_fp_control() { return __builtin_ia32_stmxcsr(); }
MCPU_INLINE void mcpu_set_fp_control(mcpu_fp_control v) { __builtin_ia32_ldmxcsr(v); }
#define MCPU_FLOAT_REG "x"
#elif defined(__aarch64__)
typedef unsigned long mcpu_fp_control;
constexpr mcpu_fp_control kMcpuFlushBits = 1ul << 24;
MCPU_INLINE mcpu_fp_control mcpu_get_fp_control() {
  mcpu_fp_control v;
  __asm__ volatile("mrs %0, fpcr" : "=r"(v));
  return v;
}
MCPU_INLINE void mcpu_set_fp_control(mcpu_fp_control v) { __asm__ volatile("msr fpcr, %0" : : "r"(v)); }
#define MCPU_FLOAT_REG "w"
#else
#error "metal_cpu: fast math is modelled on x86-64 and AArch64"
#endif
MCPU_INLINE void mcpu_thread_fp_mode() { mcpu_set_fp_control(mcpu_get_fp_control() | kMcpuFlushBits); }
// Denormals kept while a precise:: function runs (the control register restored after).
struct mcpu_ieee_scope {
  mcpu_fp_control saved;
  MCPU_INLINE mcpu_ieee_scope() : saved(mcpu_get_fp_control()) { mcpu_set_fp_control(saved & ~kMcpuFlushBits); }
  MCPU_INLINE ~mcpu_ieee_scope() { mcpu_set_fp_control(saved); }
};
// Keeps the computation between the two control-register writes (they have side effects, the empty asm too; the
// value flows through it).
MCPU_INLINE void mcpu_pin(float& v) { __asm__ volatile("" : "+" MCPU_FLOAT_REG(v)); }
#else
MCPU_INLINE void mcpu_thread_fp_mode() {}
struct mcpu_ieee_scope {};
MCPU_INLINE void mcpu_pin(float&) {}
#endif

// The models below are compiled without fast-math flags, so clang computes exactly what they say.
#pragma float_control(push)
#pragma float_control(precise, on)
MCPU_INLINE float mcpu_ftz(float x) { return __builtin_fabsf(x) < __FLT_MIN__ ? __builtin_copysignf(0.0f, x) : x; }
template <float (*F)(float)>
MCPU_INLINE float mcpu_exact1(float x) {
  mcpu_ieee_scope scope;
  mcpu_pin(x);
  float r = F(x);
  mcpu_pin(r);
  return r;
}
template <float (*F)(float, float)>
MCPU_INLINE float mcpu_exact2(float x, float y) {
  mcpu_ieee_scope scope;
  mcpu_pin(x);
  mcpu_pin(y);
  float r = F(x, y);
  mcpu_pin(r);
  return r;
}
#define MCPU_LIBM1(name, expr) \
  MCPU_INLINE float mcpu_libm_##name(float x) { return expr; }
#define MCPU_LIBM2(name, expr) \
  MCPU_INLINE float mcpu_libm_##name(float x, float y) { return expr; }
MCPU_LIBM1(exp, __builtin_expf(x))
MCPU_LIBM1(exp2, __builtin_exp2f(x))
MCPU_LIBM1(exp10, __builtin_exp10f(x))
MCPU_LIBM1(log, __builtin_logf(x))
MCPU_LIBM1(log2, __builtin_log2f(x))
MCPU_LIBM1(log10, __builtin_log10f(x))
MCPU_LIBM1(tanh, __builtin_tanhf(x))
MCPU_LIBM1(sqrt, __builtin_sqrtf(x))
MCPU_LIBM1(rsqrt, 1.0f / __builtin_sqrtf(x))
MCPU_LIBM1(sin, __builtin_sinf(x))
MCPU_LIBM1(cos, __builtin_cosf(x))
MCPU_LIBM1(tan, __builtin_tanf(x))
MCPU_LIBM2(pow, __builtin_powf(x, y))
MCPU_LIBM2(powr, __builtin_powf(x, y))
MCPU_LIBM2(divide, x / y)
#undef MCPU_LIBM1
#undef MCPU_LIBM2

// The fast model's building blocks (arguments already flushed).
MCPU_INLINE float mcpu_fast_exp2(float x) { return mcpu_ftz(__builtin_exp2f(mcpu_ftz(x))); }
MCPU_INLINE float mcpu_fast_log2(float x) { return __builtin_log2f(mcpu_ftz(x)); }
MCPU_INLINE float mcpu_fast_exp(float x) { return mcpu_fast_exp2(mcpu_ftz(x) * M_LOG2E_F); }
MCPU_INLINE float mcpu_fast_tanh(float x) {
  const float e = mcpu_fast_exp(2.0f * mcpu_ftz(x));
  return mcpu_ftz((e - 1.0f) / (e + 1.0f));
}
MCPU_INLINE float mcpu_fast_pow(float x, float y) { return mcpu_fast_exp2(mcpu_ftz(y) * mcpu_fast_log2(x)); }
MCPU_INLINE float mcpu_fast_divide(float x, float y) { return mcpu_ftz(mcpu_ftz(x) * mcpu_ftz(1.0f / mcpu_ftz(y))); }
#pragma float_control(pop)

// One function in both namespaces: float per variant; half, bfloat through precise float; vectors elementwise.
#define MCPU_UNARY_IN(ns, name, float_expr)      \
  namespace ns {                                 \
  MSL_FLOAT_FN1(name, float_expr, precise::name) \
  }
#define MCPU_UNARY2(name, fast_expr)                             \
  MCPU_UNARY_IN(precise, name, mcpu_exact1<mcpu_libm_##name>(x)) \
  MCPU_UNARY_IN(fast, name, fast_expr)
MCPU_UNARY2(exp, mcpu_fast_exp(x))
MCPU_UNARY2(exp2, mcpu_fast_exp2(x))
MCPU_UNARY2(exp10, mcpu_fast_exp2(mcpu_ftz(x) * 3.32192809488736234787f))
MCPU_UNARY2(log, mcpu_fast_log2(x) * M_LN2_F)
MCPU_UNARY2(log2, mcpu_fast_log2(x))
MCPU_UNARY2(log10, mcpu_fast_log2(x) * 0.301029995663981195214f)
MCPU_UNARY2(tanh, mcpu_fast_tanh(x))
MCPU_UNARY2(sqrt, mcpu_ftz(__builtin_sqrtf(mcpu_ftz(x))))
MCPU_UNARY2(rsqrt, mcpu_ftz(1.0f / __builtin_sqrtf(mcpu_ftz(x))))
MCPU_UNARY2(sin, mcpu_ftz(__builtin_sinf(mcpu_ftz(x))))
MCPU_UNARY2(cos, mcpu_ftz(__builtin_cosf(mcpu_ftz(x))))
MCPU_UNARY2(tan, mcpu_ftz(__builtin_tanf(mcpu_ftz(x))))
#undef MCPU_UNARY2
#undef MCPU_UNARY_IN

#define MCPU_BINARY_IN(ns, name, float_expr)     \
  namespace ns {                                 \
  MSL_FLOAT_FN2(name, float_expr, precise::name) \
  }
#define MCPU_BINARY2(name, fast_expr)                                \
  MCPU_BINARY_IN(precise, name, mcpu_exact2<mcpu_libm_##name>(x, y)) \
  MCPU_BINARY_IN(fast, name, fast_expr)
MCPU_BINARY2(pow, mcpu_fast_pow(x, y))
MCPU_BINARY2(powr, mcpu_fast_pow(x, y))
MCPU_BINARY2(divide, mcpu_fast_divide(x, y))
#undef MCPU_BINARY2
#undef MCPU_BINARY_IN

// Functions with one variant (exact in both modes).
#define MCPU_UNARY(name, expr) MSL_FLOAT_FN1(name, expr, name)
MCPU_UNARY(floor, __builtin_floorf(x))
MCPU_UNARY(ceil, __builtin_ceilf(x))
MCPU_UNARY(round, __builtin_roundf(x))
MCPU_UNARY(rint, __builtin_rintf(x))
MCPU_UNARY(trunc, __builtin_truncf(x))
MCPU_UNARY(fabs, __builtin_fabsf(x))
MCPU_UNARY(fract, x - __builtin_floorf(x))
MCPU_UNARY(sign, x > 0.0f ? 1.0f : x < 0.0f ? -1.0f : 0.0f)
MCPU_UNARY(saturate, x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x)
#undef MCPU_UNARY

#define MCPU_BINARY_FLOAT(name, expr) MSL_FLOAT_FN2(name, expr, name)
MCPU_BINARY_FLOAT(atan2, __builtin_atan2f(x, y))
MCPU_BINARY_FLOAT(fmod, __builtin_fmodf(x, y))
MCPU_BINARY_FLOAT(fmax, __builtin_fmaxf(x, y))
MCPU_BINARY_FLOAT(fmin, __builtin_fminf(x, y))
MCPU_BINARY_FLOAT(step, y < x ? 0.0f : 1.0f)
#undef MCPU_BINARY_FLOAT

template <typename T>
MCPU_INLINE T mulhi(T x, T y) {
  return (T)(((unsigned __int128)x * y) >> (8 * sizeof(T)));
}

// The plain names: Metal compiles with fast math unless told otherwise.
#ifdef MCPU_FAST_MATH
#define MCPU_DEFAULT_MATH fast
#else
#define MCPU_DEFAULT_MATH precise
#endif
#define MCPU_TWO_VARIANTS(X) \
  X(exp) X(exp2) X(exp10) X(log) X(log2) X(log10) X(tanh) X(sqrt) X(rsqrt) X(sin) X(cos) X(tan) X(pow) X(powr) X(divide)
#define MCPU_USING_DEFAULT(name) using MCPU_DEFAULT_MATH::name;
MCPU_TWO_VARIANTS(MCPU_USING_DEFAULT)
#undef MCPU_USING_DEFAULT
#undef MCPU_TWO_VARIANTS
#undef MCPU_DEFAULT_MATH

// fast:: and precise:: also name the functions that have one variant.
// An X-macro list: clang-format does not reach a fixed point on it.
// clang-format off
#define MCPU_ONE_VARIANT(X)                                                                                   \
  X(floor) X(ceil) X(round) X(rint) X(trunc) X(fabs) X(fract) X(sign) X(saturate) X(atan2) X(fmod) X(fmax)    \
  X(fmin) X(step) X(max) X(min) X(clamp) X(abs) X(fma) X(mix) X(dot) X(select) X(isnan) X(isinf) X(isfinite)
// clang-format on
#define MCPU_USING(name) using metal::name;
namespace fast {
MCPU_ONE_VARIANT(MCPU_USING)
}
namespace precise {
MCPU_ONE_VARIANT(MCPU_USING)
}
#undef MCPU_USING
#undef MCPU_ONE_VARIANT

// ---- barriers ---------------------------------------------------------------------------------------------------
static_assert((uint)mem_flags::mem_none == MCPU_MEM_NONE && (uint)mem_flags::mem_device == MCPU_MEM_DEVICE &&
                  (uint)mem_flags::mem_threadgroup == MCPU_MEM_THREADGROUP &&
                  (uint)mem_flags::mem_texture == MCPU_MEM_TEXTURE,
              "the runtime reads Metal's mem_flags bits");
MCPU_INLINE void threadgroup_barrier(mem_flags flags, MCPU_SITE) {
  mcpu_threadgroup_barrier((uint)flags, MCPU_SITE_ARGS);
}
MCPU_INLINE void simdgroup_barrier(mem_flags flags, MCPU_SITE) { mcpu_simdgroup_barrier((uint)flags, MCPU_SITE_ARGS); }

// ---- simd collectives -------------------------------------------------------------------------------------------
// Every collective is one exchange among the active lanes: each lane then computes the result itself, in lane
// order, so all lanes agree bit for bit. Reading a lane that is not active returns a poison bit pattern.
template <typename T>
struct mcpu_lanes {
  T v[32];
  uint mask;
};
template <typename T>
MCPU_INLINE mcpu_lanes<T> mcpu_exchange(T x, MCPU_SITE) {
  mcpu_lanes<T> l;
  l.mask = mcpu_simd_exchange(&x, sizeof(T), l.v, MCPU_SITE_ARGS);
  return l;
}
template <typename T>
MCPU_INLINE T mcpu_lane_value(const mcpu_lanes<T>& l, uint lane) {
  if (lane < 32 && (l.mask >> lane & 1u)) return l.v[lane];
  T poison;
  __builtin_memset(&poison, 0xff, sizeof poison);
  return poison;
}

template <typename T>
MCPU_INLINE T simd_sum(T x, MCPU_SITE) {
  mcpu_lanes<T> l = mcpu_exchange(x, MCPU_SITE_ARGS);
  T s = T(0);
  for (uint i = 0; i < 32; ++i)
    if (l.mask >> i & 1u) s = T(s + l.v[i]);
  return s;
}
template <typename T>
MCPU_INLINE T simd_product(T x, MCPU_SITE) {
  mcpu_lanes<T> l = mcpu_exchange(x, MCPU_SITE_ARGS);
  T s = T(1);
  for (uint i = 0; i < 32; ++i)
    if (l.mask >> i & 1u) s = T(s * l.v[i]);
  return s;
}
template <typename T>
MCPU_INLINE T simd_max(T x, MCPU_SITE) {
  mcpu_lanes<T> l = mcpu_exchange(x, MCPU_SITE_ARGS);
  T s = x;
  for (uint i = 0; i < 32; ++i)
    if (l.mask >> i & 1u) s = max(s, l.v[i]);
  return s;
}
template <typename T>
MCPU_INLINE T simd_min(T x, MCPU_SITE) {
  mcpu_lanes<T> l = mcpu_exchange(x, MCPU_SITE_ARGS);
  T s = x;
  for (uint i = 0; i < 32; ++i)
    if (l.mask >> i & 1u) s = min(s, l.v[i]);
  return s;
}
template <typename T>
MCPU_INLINE T simd_prefix_inclusive_sum(T x, MCPU_SITE) {
  mcpu_lanes<T> l = mcpu_exchange(x, MCPU_SITE_ARGS);
  const uint me = mcpu_lane_id();
  T s = T(0);
  for (uint i = 0; i <= me; ++i)
    if (l.mask >> i & 1u) s = T(s + l.v[i]);
  return s;
}
template <typename T>
MCPU_INLINE T simd_prefix_exclusive_sum(T x, MCPU_SITE) {
  mcpu_lanes<T> l = mcpu_exchange(x, MCPU_SITE_ARGS);
  const uint me = mcpu_lane_id();
  T s = T(0);
  for (uint i = 0; i < me; ++i)
    if (l.mask >> i & 1u) s = T(s + l.v[i]);
  return s;
}
template <typename T>
MCPU_INLINE T simd_shuffle(T x, ushort lane, MCPU_SITE) {
  return mcpu_lane_value(mcpu_exchange(x, MCPU_SITE_ARGS), lane);
}
template <typename T>
MCPU_INLINE T simd_broadcast(T x, ushort lane, MCPU_SITE) {
  return mcpu_lane_value(mcpu_exchange(x, MCPU_SITE_ARGS), lane);
}
template <typename T>
MCPU_INLINE T simd_shuffle_xor(T x, ushort mask, MCPU_SITE) {
  return mcpu_lane_value(mcpu_exchange(x, MCPU_SITE_ARGS), mcpu_lane_id() ^ mask);
}
// Lanes whose source lies outside the simdgroup keep their own value (Metal: "the upper delta lanes are unchanged").
template <typename T>
MCPU_INLINE T simd_shuffle_down(T x, ushort delta, MCPU_SITE) {
  mcpu_lanes<T> l = mcpu_exchange(x, MCPU_SITE_ARGS);
  const uint src = mcpu_lane_id() + delta;
  return src < 32 ? mcpu_lane_value(l, src) : x;
}
template <typename T>
MCPU_INLINE T simd_shuffle_up(T x, ushort delta, MCPU_SITE) {
  mcpu_lanes<T> l = mcpu_exchange(x, MCPU_SITE_ARGS);
  const uint me = mcpu_lane_id();
  return me >= delta ? mcpu_lane_value(l, me - delta) : x;
}
template <typename T>
MCPU_INLINE T simd_broadcast_first(T x, MCPU_SITE) {
  mcpu_lanes<T> l = mcpu_exchange(x, MCPU_SITE_ARGS);
  return l.v[__builtin_ctz(l.mask)];
}
MCPU_INLINE bool simd_all(bool x, MCPU_SITE) {
  mcpu_lanes<bool> l = mcpu_exchange(x, MCPU_SITE_ARGS);
  for (uint i = 0; i < 32; ++i)
    if ((l.mask >> i & 1u) && !l.v[i]) return false;
  return true;
}
MCPU_INLINE bool simd_any(bool x, MCPU_SITE) {
  mcpu_lanes<bool> l = mcpu_exchange(x, MCPU_SITE_ARGS);
  for (uint i = 0; i < 32; ++i)
    if ((l.mask >> i & 1u) && l.v[i]) return true;
  return false;
}
MCPU_INLINE bool simd_is_first(MCPU_SITE) {
  mcpu_lanes<bool> l = mcpu_exchange(true, MCPU_SITE_ARGS);
  return mcpu_lane_id() == (uint)__builtin_ctz(l.mask);
}

// ---- simdgroup_matrix -------------------------------------------------------------------------------------------
// Each lane holds the whole matrix (replicated). Loads, stores and products are split over the 32 lanes, two
// elements each, and completed with one exchange, so memory traffic and races are those of real lanes. Apple does
// not document which lane holds which element, so thread_elements() is not offered.
template <typename T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "simdgroup_matrix: only 8x8 is supported");
  T e[64];  // row-major
  simdgroup_matrix() : e{} {}
  explicit simdgroup_matrix(T diagonal) : e{} {
    for (int i = 0; i < 8; ++i) e[i * 9] = diagonal;
  }
  template <typename U = T>
  void thread_elements() const {
    static_assert(sizeof(U) == 0, "thread_elements() is not supported: the lane layout is undocumented");
  }
};

template <typename T, int C, int R>
MCPU_INLINE simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, C, R> m;
  for (int i = 0; i < 64; ++i) m.e[i] = value;
  return m;
}

// Gathers elements (2*lane, 2*lane+1) from every lane into a full matrix; all 32 lanes must take part.
template <typename T>
MCPU_INLINE void mcpu_gather_matrix(T (&e)[64], T a, T b, MCPU_SITE) {
  struct Two {
    T v[2];
  } mine{{a, b}};
  mcpu_lanes<Two> l = mcpu_exchange(mine, MCPU_SITE_ARGS);
  if (l.mask != 0xffffffffu) mcpu_fatal("simdgroup_matrix operation with inactive lanes (divergent control flow?)");
  for (int i = 0; i < 32; ++i) e[2 * i] = l.v[i].v[0], e[2 * i + 1] = l.v[i].v[1];
}

template <typename T, typename P>
MCPU_INLINE void simdgroup_load(thread simdgroup_matrix<T, 8, 8>& d, P src, ulong elements_per_row = 8,
                                ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false, MCPU_SITE) {
  const uint lane = mcpu_lane_id();
  T v[2];
  for (int k = 0; k < 2; ++k)
    v[k] = src[mcpu_matrix_offset(2 * lane + k, elements_per_row, matrix_origin, transpose_matrix)];
  mcpu_gather_matrix(d.e, v[0], v[1], MCPU_SITE_ARGS);
}

template <typename T, typename P>
MCPU_INLINE void simdgroup_store(thread const simdgroup_matrix<T, 8, 8>& a, P dst, ulong elements_per_row = 8,
                                 ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false, MCPU_SITE) {
  const uint lane = mcpu_lane_id();
  for (int k = 0; k < 2; ++k) {
    const uint idx = 2 * lane + k;
    dst[mcpu_matrix_offset(idx, elements_per_row, matrix_origin, transpose_matrix)] = a.e[idx];
  }
  // The store is a simdgroup operation: every lane must take part.
  mcpu_lanes<uint> l = mcpu_exchange(lane, MCPU_SITE_ARGS);
  if (l.mask != 0xffffffffu) mcpu_fatal("simdgroup_store with inactive lanes (divergent control flow?)");
}

// d = a * b + c, each element a float dot product rounded once to the destination type.
template <typename TD, typename TA, typename TB, typename TC>
MCPU_INLINE void simdgroup_multiply_accumulate(thread simdgroup_matrix<TD, 8, 8>& d,
                                               thread const simdgroup_matrix<TA, 8, 8>& a,
                                               thread const simdgroup_matrix<TB, 8, 8>& b,
                                               thread const simdgroup_matrix<TC, 8, 8>& c, MCPU_SITE) {
  const uint lane = mcpu_lane_id();
  TD v[2];
  for (int k = 0; k < 2; ++k) {
    const uint idx = 2 * lane + k, r = idx / 8, col = idx % 8;
    float s = (float)c.e[idx];
    for (int i = 0; i < 8; ++i) s += (float)a.e[r * 8 + i] * (float)b.e[i * 8 + col];
    v[k] = (TD)s;
  }
  mcpu_gather_matrix(d.e, v[0], v[1], MCPU_SITE_ARGS);
}
template <typename TD, typename TA, typename TB>
MCPU_INLINE void simdgroup_multiply(thread simdgroup_matrix<TD, 8, 8>& d, thread const simdgroup_matrix<TA, 8, 8>& a,
                                    thread const simdgroup_matrix<TB, 8, 8>& b, MCPU_SITE) {
  simdgroup_matrix<TD, 8, 8> zero = make_filled_simdgroup_matrix<TD, 8, 8>(TD(0));
  simdgroup_multiply_accumulate(d, a, b, zero, MCPU_SITE_ARGS);
}

// ---- atomics ----------------------------------------------------------------------------------------------------
// Run by one CPU thread at a time, so plain operations; the runtime checks bounds and counts traffic, and the
// accesses themselves are not instrumented (atomics do not race).
#define MCPU_ATOMIC_RMW(name, op)                                                  \
  template <typename A, typename T>                                                \
  MCPU_NOSAN auto atomic_##name##_explicit(volatile A* obj, T arg, memory_order) { \
    using V = decltype(obj->__value + 0);                                          \
    (void)sizeof(V);                                                               \
    auto* p = const_cast<A*>(obj);                                                 \
    mcpu_atomic_access((void*)p, sizeof(p->__value), 1);                           \
    auto old = p->__value;                                                         \
    auto v = (decltype(old))arg;                                                   \
    p->__value = op;                                                               \
    return old;                                                                    \
  }                                                                                \
  template <typename A, typename T>                                                \
  MCPU_INLINE auto atomic_##name##_explicit(A* obj, T arg, memory_order o) {       \
    return atomic_##name##_explicit((volatile A*)obj, arg, o);                     \
  }
MCPU_ATOMIC_RMW(fetch_add, old + v)
MCPU_ATOMIC_RMW(fetch_sub, old - v)
MCPU_ATOMIC_RMW(fetch_max, old > v ? old : v)
MCPU_ATOMIC_RMW(fetch_min, old < v ? old : v)
MCPU_ATOMIC_RMW(fetch_and, old& v)
MCPU_ATOMIC_RMW(fetch_or, old | v)
MCPU_ATOMIC_RMW(fetch_xor, old ^ v)
MCPU_ATOMIC_RMW(exchange, v)
#undef MCPU_ATOMIC_RMW

template <typename A>
MCPU_NOSAN auto atomic_load_explicit(volatile A* obj, memory_order) {
  auto* p = const_cast<A*>(obj);
  mcpu_atomic_access((void*)p, sizeof(p->__value), 0);
  return p->__value;
}
template <typename A>
MCPU_INLINE auto atomic_load_explicit(A* obj, memory_order o) {
  return atomic_load_explicit((volatile A*)obj, o);
}
template <typename A, typename T>
MCPU_NOSAN void atomic_store_explicit(volatile A* obj, T v, memory_order) {
  auto* p = const_cast<A*>(obj);
  mcpu_atomic_access((void*)p, sizeof(p->__value), 1);
  p->__value = (decltype(p->__value))v;
}
template <typename A, typename T>
MCPU_INLINE void atomic_store_explicit(A* obj, T v, memory_order o) {
  atomic_store_explicit((volatile A*)obj, v, o);
}
template <typename A, typename T>
MCPU_NOSAN bool atomic_compare_exchange_weak_explicit(volatile A* obj, T* expected, T desired, memory_order,
                                                      memory_order) {
  auto* p = const_cast<A*>(obj);
  mcpu_atomic_access((void*)p, sizeof(p->__value), 1);
  if (p->__value == *expected) {
    p->__value = desired;
    return true;
  }
  *expected = p->__value;
  return false;
}
template <typename A, typename T>
MCPU_INLINE bool atomic_compare_exchange_weak_explicit(A* obj, T* expected, T desired, memory_order s, memory_order f) {
  return atomic_compare_exchange_weak_explicit((volatile A*)obj, expected, desired, s, f);
}

}  // namespace metal

// Metal 4 tensors and MetalPerformancePrimitives' matmul2d (<metal_tensor>, <MetalPerformancePrimitives/...>).
#include "metal_tensor_ops.h"

// ---- what generated entry points use (mcpu_bind and the three-coordinate mcpu_builtin: msl_types.h) -------------
// The alignment Metal requires of a buffer argument's offset: that of the type the kernel reads through it.
template <typename P>
constexpr uint32_t mcpu_bind_align() {
  if constexpr (std::is_reference_v<P>)
    return alignof(std::remove_reference_t<P>);
  else
    return alignof(std::remove_pointer_t<P>);
}
// A position builtin from the runtime's thread arguments: uint/ushort scalar (x) or 2/3-vector.
template <typename P>
MCPU_INLINE P mcpu_builtin(const uint32_t (&v)[3]) {
  return mcpu_builtin<P>(v[0], v[1], v[2]);
}
template <typename P>
MCPU_INLINE P mcpu_builtin(uint32_t v) {
  return (std::remove_cv_t<P>)v;
}
