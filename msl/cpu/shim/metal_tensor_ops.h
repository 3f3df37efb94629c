// Metal 4 tensors and MetalPerformancePrimitives' matmul2d on the CPU: included by metal_stdlib.h.
//
// The subset an attention kernel needs, modelled from Apple's documentation and the published MPP headers
// (msl/README.md, "Tensor operations", says what is modelled and from where):
//   metal::tensor<device T / threadgroup T, extents, tensor_inline>  a view over memory: rank 2, dimension 0 is the
//       innermost (a row-major M x K matrix is extents (K, M)), strides default to packed;
//   .slice(o0, o1) / .slice<E0, E1>(o0, o1)  offsets in dimension order; a dynamic extent is what remains of the
//       parent, a static one is trusted (no predication, as on the GPU: reading past the memory is an overrun);
//   mpp::tensor_ops::matmul2d<matmul2d_descriptor, execution scope>::run(a, b, c)  C = A * B (+ C), a collective
//       over the scope's threads; A / B elements outside their tensor's extents read as 0, C elements outside its
//       extents are not written;
//   the destination cooperative tensor: each thread of the scope holds get_capacity() slots.
// Element ownership inside a cooperative tensor is this shim's own: a seeded affine permutation of the row-major
// element order (it changes with the dispatch seed and never matches a natural layout), so a kernel that assumes
// which thread holds which element computes wrong results here, as it would on another GPU generation.
#pragma once

namespace metal {

constexpr size_t dynamic_extent = ~size_t(0);

template <typename T, size_t N>
struct array {
  T v[N];
  MCPU_INLINE thread T& operator[](size_t i) { return v[i]; }
  MCPU_INLINE const thread T& operator[](size_t i) const { return v[i]; }
  static constexpr size_t size() { return N; }
};

// ---- extents (rank 2) -------------------------------------------------------------------------------------------
template <typename I, size_t E0, size_t E1>
struct extents {
  using index_type = I;
  I e[2];
  MCPU_INLINE constexpr extents() : e{E0 == dynamic_extent ? I(0) : I(E0), E1 == dynamic_extent ? I(0) : I(E1)} {}
  MCPU_INLINE constexpr extents(I e0, I e1) : e{e0, e1} {}
  static constexpr size_t rank() { return 2; }
  static constexpr size_t static_extent(size_t r) { return r == 0 ? E0 : E1; }
  MCPU_INLINE constexpr I extent(size_t r) const { return e[r]; }
};
template <typename I, size_t R>
struct mcpu_dextents {
  static_assert(R == 2, "metal_cpu models rank-2 tensors only");
  using type = extents<I, dynamic_extent, dynamic_extent>;
};
template <typename I, size_t R>
using dextents = typename mcpu_dextents<I, R>::type;

// ---- tensor -----------------------------------------------------------------------------------------------------
struct tensor_inline {};
struct tensor_handle {};
struct tensor_offset {};

template <typename ElementType, typename Extents, typename Kind = tensor_handle>
struct tensor {
  static_assert(sizeof(Kind) == 0, "metal_cpu models tensor_inline tensors only (no MTLTensor bindings)");
};

template <typename E, typename I, size_t E0, size_t E1>
struct tensor<E, extents<I, E0, E1>, tensor_inline> {
  using element_type = E;
  using extents_type = extents<I, E0, E1>;
  using index_type = I;
  E* data_;
  extents_type ext_;
  I stride_[2];

  MCPU_INLINE tensor(E* data, extents_type ext) : data_(data), ext_(ext), stride_{I(1), ext.extent(0)} {}
  MCPU_INLINE tensor(E* data, extents_type ext, array<I, 2> strides)
      : data_(data), ext_(ext), stride_{strides[0], strides[1]} {}

  static constexpr size_t get_rank() { return 2; }
  MCPU_INLINE I get_extent(size_t d) const { return ext_.extent(d); }
  MCPU_INLINE I get_stride(size_t d) const { return stride_[d]; }
  MCPU_INLINE E* get_data_pointer() const { return data_; }
  // Element access: t[i0, i1] needs C++23's multidimensional subscript, so the shim offers t[array{i0, i1}] too.
  MCPU_INLINE E& operator[](array<I, 2> i) const { return data_[(long)i[0] * stride_[0] + (long)i[1] * stride_[1]]; }

  // A view starting at (o0, o1): a dynamic extent is what remains of this tensor (0 past its end), a static one is
  // taken as given.
  template <size_t S0 = dynamic_extent, size_t S1 = dynamic_extent>
  MCPU_INLINE tensor<E, extents<I, S0, S1>, tensor_inline> slice(I o0, I o1) const {
    const I r0 = ext_.extent(0) > o0 ? I(ext_.extent(0) - o0) : I(0);
    const I r1 = ext_.extent(1) > o1 ? I(ext_.extent(1) - o1) : I(0);
    extents<I, S0, S1> ext(S0 == dynamic_extent ? r0 : I(S0), S1 == dynamic_extent ? r1 : I(S1));
    return tensor<E, extents<I, S0, S1>, tensor_inline>(data_ + (long)o0 * stride_[0] + (long)o1 * stride_[1], ext,
                                                        array<I, 2>{{stride_[0], stride_[1]}});
  }

  // What matmul2d reads and writes: bounds-checked against the extents (outside reads 0, outside writes nothing).
  MCPU_INLINE bool mcpu_inside(long i0, long i1) const {
    return i0 >= 0 && i1 >= 0 && i0 < (long)ext_.extent(0) && i1 < (long)ext_.extent(1);
  }
  // Volatile, so the optimiser cannot merge a row into one wide vector load: SanitizerCoverage hooks loads and stores
  // of 1 to 16 bytes only, and a wider one would escape the overrun and race checks.
  MCPU_INLINE float mcpu_read(long i0, long i1) const {
    return mcpu_inside(i0, i1) ? (float)*(const volatile E*)(data_ + i0 * stride_[0] + i1 * stride_[1]) : 0.0f;
  }
  template <typename T>
  MCPU_INLINE void mcpu_write(long i0, long i1, T v) const {
    if (mcpu_inside(i0, i1)) *(volatile E*)(data_ + i0 * stride_[0] + i1 * stride_[1]) = v;
  }
};

template <typename P, typename X>
tensor(P*, X) -> tensor<P, X, tensor_inline>;
template <typename P, typename X, typename I>
tensor(P*, X, array<I, 2>) -> tensor<P, X, tensor_inline>;

// ---- execution scopes -------------------------------------------------------------------------------------------
template <int N>
struct execution_simdgroups {
  static_assert(N >= 1, "execution_simdgroups<N>: N >= 1");
  static constexpr int simdgroups = N;
  static constexpr int threads = 32 * N;
};
using execution_simdgroup = execution_simdgroups<1>;
template <int N>
struct execution_threads {
  static_assert(N == 1, "metal_cpu models execution_threads<1> (execution_thread) only");
  static constexpr int simdgroups = 0;
  static constexpr int threads = 1;
};
using execution_thread = execution_threads<1>;

// ---- cooperative tensors (matmul2d destinations) ----------------------------------------------------------------
// The layout: slot i of scope thread t holds element x = t * capacity + i (if x < M * N) of the permuted order
// P(x) = (a * x + b) mod (M * N), element P(x) being row P / N, column P % N. a and b come from the dispatch seed and
// the shape; a is coprime to M * N and neither 1 nor -1, so P is a bijection unlike row- or column-major order.
struct mcpu_coop_layout {
  uint32_t thread_in_scope, a, b;
};
MCPU_INLINE uint64_t mcpu_mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  return x ^ (x >> 33);
}
MCPU_INLINE uint32_t mcpu_gcd(uint32_t x, uint32_t y) {
  while (y) {
    const uint32_t t = x % y;
    x = y;
    y = t;
  }
  return x;
}
static MCPU_TRAMPOLINE void mcpu_thread_info(uint32_t* simdgroup, uint32_t* simdgroups, uint64_t* seed) {
  mcpu_runtime->thread_info(simdgroup, simdgroups, seed);
}
template <typename Scope>
MCPU_INLINE uint32_t mcpu_thread_in_scope() {
  if constexpr (Scope::simdgroups == 0) {
    return 0;
  } else {
    uint32_t sg, sgs;
    uint64_t seed;
    mcpu_thread_info(&sg, &sgs, &seed);
    if (sgs % Scope::simdgroups != 0)
      mcpu_fatal("execution_simdgroups<N>: the threadgroup's simdgroup count is not a multiple of N");
    return (sg % Scope::simdgroups) * 32 + mcpu_lane_id();
  }
}
MCPU_INLINE mcpu_coop_layout mcpu_make_layout(uint32_t thread_in_scope, uint32_t m, uint32_t n, uint32_t threads) {
  uint32_t sg, sgs;
  uint64_t seed;
  mcpu_thread_info(&sg, &sgs, &seed);
  const uint32_t total = m * n;
  uint64_t h = mcpu_mix(seed * 0x9e3779b97f4a7c15ull ^ ((uint64_t)m << 40 | (uint64_t)n << 20 | threads));
  uint32_t a = 1;
  if (total > 2) {
    for (a = (uint32_t)(h % total); a <= 1 || a == total - 1 || mcpu_gcd(a, total) != 1;) a = (a + 1) % total;
  }
  return {thread_in_scope, a, (uint32_t)(mcpu_mix(h) % (total ? total : 1))};
}

template <typename T, int M, int N, int Threads>
struct cooperative_tensor {
  static constexpr int capacity = (M * N + Threads - 1) / Threads;
  T v[capacity];
  mcpu_coop_layout layout;

  MCPU_INLINE static constexpr uint16_t get_capacity() { return capacity; }
  MCPU_INLINE thread T& operator[](uint16_t i) { return v[i]; }
  MCPU_INLINE const thread T& operator[](uint16_t i) const { return v[i]; }
  MCPU_INLINE bool is_valid_element(uint16_t i) const {
    return i < capacity && layout.thread_in_scope * capacity + i < (uint32_t)(M * N);
  }
  // Row-major element number of slot i (valid slots only).
  MCPU_INLINE uint32_t mcpu_element(uint16_t i) const {
    const uint64_t x = (uint64_t)layout.thread_in_scope * capacity + i;
    return (uint32_t)(((uint64_t)layout.a * x + layout.b) % (uint32_t)(M * N));
  }
  // [column, row]: dimension 0 first, as the tensors index.
  MCPU_INLINE array<int, 2> get_multidimensional_index(uint16_t i) const {
    const uint32_t e = mcpu_element(i);
    return array<int, 2>{{(int)(e % N), (int)(e / N)}};
  }

  // Iterates over the valid slots, in slot order.
  struct iterator {
    thread cooperative_tensor* t;
    uint16_t i;
    MCPU_INLINE thread T& operator*() const { return t->v[i]; }
    MCPU_INLINE iterator& operator++() {
      ++i;
      return *this;
    }
    MCPU_INLINE bool operator==(const iterator& o) const { return i == o.i; }
    MCPU_INLINE bool operator!=(const iterator& o) const { return i != o.i; }
    MCPU_INLINE array<int, 2> get_multidimensional_index() const { return t->get_multidimensional_index(i); }
    MCPU_INLINE uint16_t get_index() const { return i; }
  };
  MCPU_INLINE iterator begin() { return iterator{this, 0}; }
  MCPU_INLINE iterator end() {
    uint16_t n = 0;
    while (n < capacity && is_valid_element(n)) ++n;
    return iterator{this, n};
  }

  // Each thread moves its own elements; elements outside the tensor's extents load as 0 and are not stored.
  template <typename Tn>
  MCPU_INLINE void load(const thread Tn& src, MCPU_SITE) {
    mcpu_check_scope(MCPU_SITE_ARGS);
    for (uint16_t i = 0; i < capacity; ++i)
      if (is_valid_element(i)) {
        const uint32_t e = mcpu_element(i);
        v[i] = T(src.mcpu_read(e % N, e / N));
      }
  }
  template <typename Tn>
  MCPU_INLINE void store(const thread Tn& dst, MCPU_SITE) const {
    mcpu_check_scope(MCPU_SITE_ARGS);
    for (uint16_t i = 0; i < capacity; ++i)
      if (is_valid_element(i)) {
        const uint32_t e = mcpu_element(i);
        dst.mcpu_write(e % N, e / N, v[i]);
      }
  }
  // Every thread of the scope calls a cooperative operation, in convergent code: each simdgroup of the scope meets
  // at the call site with all 32 lanes; when the scope is the whole threadgroup, its simdgroups also meet there, at
  // a barrier that orders no memory (so it hides no race): a simdgroup that skips the call is a divergent or skipped
  // barrier at this line.
  MCPU_INLINE void mcpu_check_scope(MCPU_SITE) const {
    if (Threads == 1) return;
    mcpu_lanes<uint> l = mcpu_exchange(0u, MCPU_SITE_ARGS);
    if (l.mask != 0xffffffffu)
      mcpu_fatal("tensor operation called by part of its execution scope (divergent control flow?)");
    if (Threads > 32) {
      uint32_t sg, sgs;
      uint64_t seed;
      mcpu_thread_info(&sg, &sgs, &seed);
      if (sgs * 32 == Threads) mcpu_threadgroup_barrier(MCPU_MEM_NONE, MCPU_SITE_ARGS);
    }
  }
};

}  // namespace metal

// ---- MetalPerformancePrimitives: matmul2d -------------------------------------------------------------------------
namespace mpp {
namespace tensor_ops {

struct matmul2d_descriptor {
  enum class mode { multiply, multiply_accumulate };
  int m, n, k;
  bool transpose_left, transpose_right, relaxed_precision;
  mode matmul_mode;
  constexpr matmul2d_descriptor(int m_, int n_, int k_ = (int)metal::dynamic_extent, bool transpose_left_ = false,
                                bool transpose_right_ = false, bool relaxed_precision_ = false,
                                mode matmul_mode_ = mode::multiply)
      : m(m_),
        n(n_),
        k(k_),
        transpose_left(transpose_left_),
        transpose_right(transpose_right_),
        relaxed_precision(relaxed_precision_),
        matmul_mode(matmul_mode_) {}
};

// relaxed_precision lets the GPU multiply float operands at lower precision; the shim takes the loosest it assumes
// (10 explicit mantissa bits, rounded to nearest even), so a kernel that needs fp32 products finds out here.
MCPU_INLINE float mcpu_relaxed(float x) {
  uint32_t u = __builtin_bit_cast(uint32_t, x);
  if ((u & 0x7f800000u) == 0x7f800000u) return x;
  u = (u + 0xfffu + ((u >> 13) & 1u)) & ~0x1fffu;
  return __builtin_bit_cast(float, u);
}

template <matmul2d_descriptor D, typename Scope>
struct matmul2d {
  static_assert(D.m > 0 && D.n > 0, "matmul2d_descriptor: m and n are static");
  static constexpr int kThreads = Scope::threads;

  template <typename A, typename B, typename T>
  MCPU_INLINE metal::cooperative_tensor<T, D.m, D.n, kThreads> get_destination_cooperative_tensor() const {
    metal::cooperative_tensor<T, D.m, D.n, kThreads> c;
    c.layout = metal::mcpu_make_layout(metal::mcpu_thread_in_scope<Scope>(), D.m, D.n, kThreads);
    // Slots start as 0xff bytes (NaN), like uninitialised threadgroup memory: accumulating into them shows.
    __builtin_memset(c.v, 0xff, sizeof c.v);
    return c;
  }

  // One destination element: sum over k in fp32, rounded once to the destination type.
  template <typename A, typename B>
  MCPU_INLINE static float mcpu_dot(const thread A& a, const thread B& b, int row, int col, float acc) {
    const int k_len = D.k != (int)metal::dynamic_extent ? D.k : (int)a.get_extent(D.transpose_left ? 1 : 0);
    for (int k = 0; k < k_len; ++k) {
      float x = D.transpose_left ? a.mcpu_read(row, k) : a.mcpu_read(k, row);
      float y = D.transpose_right ? b.mcpu_read(k, col) : b.mcpu_read(col, k);
      if (D.relaxed_precision) x = mcpu_relaxed(x), y = mcpu_relaxed(y);
      acc += x * y;
    }
    return acc;
  }

  // C a cooperative tensor from this operation.
  template <typename A, typename B, typename T, int Threads>
  MCPU_INLINE void run(const thread A& a, const thread B& b, thread metal::cooperative_tensor<T, D.m, D.n, Threads>& c,
                       MCPU_SITE) const {
    static_assert(Threads == kThreads, "matmul2d::run: the destination belongs to another execution scope");
    c.mcpu_check_scope(MCPU_SITE_ARGS);
    constexpr bool accumulate = D.matmul_mode == matmul2d_descriptor::mode::multiply_accumulate;
    for (uint16_t i = 0; i < c.capacity; ++i)
      if (c.is_valid_element(i)) {
        const uint32_t e = c.mcpu_element(i);
        c.v[i] = T(mcpu_dot(a, b, e / D.n, e % D.n, accumulate ? (float)c.v[i] : 0.0f));
      }
  }

  // C a tensor in device or threadgroup memory: each thread computes and writes the elements it would own.
  template <typename A, typename B, typename E, typename X>
  MCPU_INLINE void run(const thread A& a, const thread B& b, metal::tensor<E, X, metal::tensor_inline> c,
                       MCPU_SITE) const {
    metal::cooperative_tensor<float, D.m, D.n, kThreads> slots;
    slots.layout = metal::mcpu_make_layout(metal::mcpu_thread_in_scope<Scope>(), D.m, D.n, kThreads);
    slots.mcpu_check_scope(MCPU_SITE_ARGS);
    constexpr bool accumulate = D.matmul_mode == matmul2d_descriptor::mode::multiply_accumulate;
    for (uint16_t i = 0; i < slots.capacity; ++i)
      if (slots.is_valid_element(i)) {
        const uint32_t e = slots.mcpu_element(i), row = e / D.n, col = e % D.n;
        if (!c.mcpu_inside(col, row)) continue;
        const float init = accumulate ? c.mcpu_read(col, row) : 0.0f;
        c.mcpu_write(col, row, mcpu_dot(a, b, row, col, init));
      }
  }
};

}  // namespace tensor_ops
}  // namespace mpp
