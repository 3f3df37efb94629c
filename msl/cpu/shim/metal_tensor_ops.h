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
// which thread holds which element computes wrong results here, as it would on another GPU generation. The views,
// the execution scopes and the descriptor are msl/shim/msl_tensors.h, shared with the proxy; here the cooperative
// tensors and matmul2d.
//
// Opt-in MSL_NAX_FRAGMENT_LAYOUT (peer checks only): the execution_simdgroup cooperative tensors of
// matmul2d<(16, N, 16)> (N a multiple of 16) take the fixed layout of code written for Apple's M5 GPUs (MLX's NAX
// kernels) instead of the seeded one, and left / right input cooperative tensors exist; the layout is the proxy's
// opt-in (msl/cuda/shim/metal_tensor_ops.h, header comment): per 16 x 16 block, lane l holds rows r0, r0 + 8 and
// columns c0 .. c0 + 3 (r0 = 4 l4 + 2 l2 + l1, c0 = 4 (2 l3 + l0)), slot 4 h + j = (r0 + 8 h, c0 + j); blocks along N
// in slots 8 f ..; the right input over (k, n), or (n, k) when transpose_right.
#pragma once

// Elements move through volatile accesses: the optimiser cannot merge a row into one vector load wider than the 16
// bytes SanitizerCoverage hooks, which would escape the overrun and race checks.
#define MSL_TENSOR_ELEMENT(p) (*(volatile std::remove_pointer_t<decltype(p)>*)(p))
#include "../../shim/msl_tensors.h"

#ifdef MSL_NAX_FRAGMENT_LAYOUT
// Apple's compiler builtin for the lane index, which code written for the opt-in layout calls.
template <typename I>
MCPU_INLINE I __metal_get_thread_index_in_simdgroup(I) {
  return I(mcpu_lane_id());
}
#endif

namespace metal {

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
// a^-1 mod m (a coprime to m, m >= 1): the inverse permutation of a layout.
MCPU_INLINE uint32_t mcpu_inverse(uint32_t a, uint32_t m) {
  int64_t t = 0, nt = 1, r = m, nr = a % m;
  while (nr != 0) {
    const int64_t q = r / nr, t2 = t - q * nt, r2 = r - q * nr;
    t = nt, nt = t2, r = nr, nr = r2;
  }
  return (uint32_t)((t % (int64_t)m + (int64_t)m) % (int64_t)m);
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
MCPU_INLINE uint64_t mcpu_dispatch_seed() {
  uint32_t sg, sgs;
  uint64_t seed;
  mcpu_thread_info(&sg, &sgs, &seed);
  return seed;
}
// salt: 0 for a destination (2-5 by its element type under some seeds: mcpu_type_salt), 1 for a left input.
MCPU_INLINE mcpu_coop_layout mcpu_make_layout(uint32_t thread_in_scope, uint32_t m, uint32_t n, uint32_t threads,
                                              uint64_t salt = 0) {
  const uint64_t seed = mcpu_dispatch_seed();
  const uint32_t total = m * n;
  uint64_t h = mcpu_mix(seed * 0x9e3779b97f4a7c15ull ^ ((uint64_t)m << 40 | (uint64_t)n << 20 | threads) ^
                        salt * 0xd6e8feb86659fd93ull);
  uint32_t a = 1;
  if (total > 2) {
    for (a = (uint32_t)(h % total); a <= 1 || a == total - 1 || mcpu_gcd(a, total) != 1;) a = (a + 1) % total;
  }
  return {thread_in_scope, a, (uint32_t)(mcpu_mix(h) % (total ? total : 1))};
}

// A destination's layout salt by element type: Apple's header says a cooperative tensor's layout depends on the
// operation, the data type and the threads, so for one seed and shape in three the destinations of one operation with
// different element types are laid out differently here (a kernel that copies slot i of a float destination into slot
// i of a half one must compare their indices first); otherwise they share the layout (salt 0).
template <typename T>
MCPU_INLINE uint64_t mcpu_type_salt(uint32_t m, uint32_t n, uint32_t threads) {
  const uint64_t h = mcpu_mix(mcpu_dispatch_seed() * 0x9e3779b97f4a7c15ull ^
                              ((uint64_t)m << 40 | (uint64_t)n << 20 | threads) ^ 0x7f4a7c15u);
  if (h % 3 != 0) return 0;
  return std::is_same_v<T, float> ? 2 : std::is_same_v<T, half> ? 3 : std::is_same_v<T, bfloat> ? 4 : 5;
}

// ---- the opt-in layout (MSL_NAX_FRAGMENT_LAYOUT) ----------------------------------------------------------------
#ifdef MSL_NAX_FRAGMENT_LAYOUT
template <int M, int N, int Threads>
constexpr bool mcpu_nax_shape = Threads == 32 && M == 16 && N % 16 == 0;
#else
template <int M, int N, int Threads>
constexpr bool mcpu_nax_shape = false;
#endif

// ---- the slots of a cooperative tensor: iterator, begin, end, get_iterator (every cooperative tensor type, CRTP) ---
// Iterates over the valid slots, in slot order (here the valid slots come first). Tensor has v[], capacity,
// is_valid_element and get_multidimensional_index (of rank Rank).
template <typename Tensor, typename T, int Rank>
struct mcpu_slots {
  struct iterator {
    thread Tensor* t;
    uint16_t i;
    MCPU_INLINE thread T& operator*() const { return t->v[i]; }
    MCPU_INLINE iterator& operator++() {
      ++i;
      return *this;
    }
    MCPU_INLINE bool operator==(const iterator& o) const { return i == o.i; }
    MCPU_INLINE bool operator!=(const iterator& o) const { return i != o.i; }
    MCPU_INLINE array<int, Rank> get_multidimensional_index() const { return t->get_multidimensional_index(i); }
    MCPU_INLINE uint16_t get_index() const { return i; }
  };
  MCPU_INLINE iterator begin() { return iterator{self(), 0}; }
  MCPU_INLINE iterator end() {
    uint16_t n = 0;
    while (n < Tensor::capacity && self()->is_valid_element(n)) ++n;
    return iterator{self(), n};
  }
  MCPU_INLINE iterator get_iterator(uint16_t i) { return iterator{self(), i}; }
  MCPU_INLINE thread Tensor* self() { return static_cast<thread Tensor*>(this); }
};

// Kind 0: a matmul2d destination; 1: a left input (mcpu_left_input), the same seeded model under another salt.
template <typename T, int M, int N, int Threads, int Kind = 0>
struct cooperative_tensor : mcpu_slots<cooperative_tensor<T, M, N, Threads, Kind>, T, 2> {
  static constexpr bool nax = Kind == 0 && mcpu_nax_shape<M, N, Threads>;
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
    if constexpr (nax) return msl_nax::row(layout.thread_in_scope, i) * N + msl_nax::col(layout.thread_in_scope, i);
    const uint64_t x = (uint64_t)layout.thread_in_scope * capacity + i;
    return mcpu_element_of(x);
  }
  // Row-major element number held at scope-wide slot number x = thread * capacity + slot (any thread's).
  MCPU_INLINE uint32_t mcpu_element_of(uint64_t x) const {
    return (uint32_t)(((uint64_t)layout.a * x + layout.b) % (uint32_t)(M * N));
  }
  // [column, row]: dimension 0 first, as the tensors index.
  MCPU_INLINE array<int, 2> get_multidimensional_index(uint16_t i) const {
    const uint32_t e = mcpu_element(i);
    return array<int, 2>{{(int)(e % N), (int)(e / N)}};
  }
  // Where row-major element e lives: scope thread * capacity + slot (the inverse of mcpu_element; seeded layout).
  MCPU_INLINE uint32_t mcpu_owner_slot(uint32_t e) const {
    static_assert(!nax, "the opt-in layout has no inverse here");
    const uint32_t total = (uint32_t)(M * N);
    return (uint32_t)((uint64_t)mcpu_inverse(layout.a, total) * ((e + total - layout.b % total) % total) % total);
  }

  // Each thread moves its own elements; elements outside the tensor's extents load as 0 and are not stored.
  template <typename Tn>
  MCPU_INLINE void load(const thread Tn& src, MCPU_SITE) {
    mcpu_check_scope(MCPU_SITE_ARGS);
    for (uint16_t i = 0; i < capacity; ++i)
      if (is_valid_element(i)) {
        const uint32_t e = mcpu_element(i);
        v[i] = T(float(src.msl_read(e % N, e / N)));
      }
  }
  template <typename Tn>
  MCPU_INLINE void store(const thread Tn& dst, MCPU_SITE) const {
    mcpu_check_scope(MCPU_SITE_ARGS);
    for (uint16_t i = 0; i < capacity; ++i)
      if (is_valid_element(i)) {
        const uint32_t e = mcpu_element(i);
        dst.msl_write(e % N, e / N, v[i]);
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

  // Every thread's slots, gathered by one collective of the simdgroup (the scope's 32 lanes): all[x] is slot x %
  // capacity of lane x / capacity.
  MCPU_INLINE void mcpu_gather(thread float (&all)[32 * capacity], MCPU_SITE) const {
    static_assert(Threads == 32, "a single simdgroup's cooperative tensor");
    for (int i = 0; i < capacity; ++i) {
      const mcpu_lanes<T> l = mcpu_exchange(v[i], MCPU_SITE_ARGS);
      for (int x = 0; x < 32; ++x) all[x * capacity + i] = (float)l.v[x];
    }
  }
};

// ---- input cooperative tensors (the left operand of matmul2d<(M, N, K), execution_simdgroup>, M x K) -------------
// The destination's seeded model over M x K under its own salt; TR, TD are the right operand's and the destination's
// element types the tensor was declared for (run() checks them, as Apple's does).
template <typename TL, typename TR, typename TD, int M, int K>
struct mcpu_left_input : cooperative_tensor<TL, M, K, 32, 1> {
  using right_element_t = TR;
  using destination_element_t = TD;
};

// ---- row-reduction cooperative tensors (reduce_rows) --------------------------------------------------------------
// One value per row of an M x N destination of matmul2d<(M, N, K), execution_simdgroup>. Which thread holds which row
// is seeded as well, among three models whose differences the API exposes (is_iterator_compatible, map_iterator):
// every thread holds every row (compatible with any destination of M rows); a thread holds the rows of its own slots
// of the operation's destination (compatible with that destination only); one thread holds each row (compatible with
// none). Valid slots come first, in a seeded row order.
enum mcpu_rows_model : uint32_t { mcpu_rows_replicated = 0, mcpu_rows_own = 1, mcpu_rows_dealt = 2 };

template <typename T, int M, int N>
struct mcpu_row_reduction : mcpu_slots<mcpu_row_reduction<T, M, N>, T, 1> {
  static constexpr int capacity = M;
  T v[capacity];
  int16_t row[capacity];  // the row slot i holds; -1: invalid
  uint32_t model;

  MCPU_INLINE static constexpr uint16_t get_capacity() { return capacity; }
  MCPU_INLINE thread T& operator[](uint16_t i) { return v[i]; }
  MCPU_INLINE const thread T& operator[](uint16_t i) const { return v[i]; }
  MCPU_INLINE bool is_valid_element(uint16_t i) const { return i < capacity && row[i] >= 0; }
  // [row]: the rank-1 index.
  MCPU_INLINE array<int, 1> get_multidimensional_index(uint16_t i) const { return array<int, 1>{{(int)row[i]}}; }
  MCPU_INLINE int mcpu_slot_of_row(int r) const {
    for (int i = 0; i < capacity; ++i)
      if (row[i] == r) return i;
    return -1;
  }

  using iterator = typename mcpu_slots<mcpu_row_reduction, T, 1>::iterator;
  // The slot of this tensor that holds the row of the source element at `src` (an iterator of a destination
  // cooperative tensor). Defined only where is_iterator_compatible(source, *this): elsewhere an error.
  template <typename SrcIterator>
  MCPU_INLINE iterator map_iterator(const SrcIterator& src) {
    const int slot = mcpu_slot_of_row(src.get_multidimensional_index()[1]);
    if (slot < 0)
      mcpu_fatal(
          "map_iterator: this thread holds no reduction of the source element's row "
          "(is_iterator_compatible(source, destination) is false)");
    return iterator{this, (uint16_t)slot};
  }
};

// The seeded model of the row reductions of matmul2d<(M, N, K), execution_simdgroup> on lane `lane`.
template <typename T, int M, int N>
MCPU_INLINE void mcpu_make_row_layout(thread mcpu_row_reduction<T, M, N>& r, uint32_t lane) {
  const uint64_t h =
      mcpu_mix(mcpu_dispatch_seed() * 0x9e3779b97f4a7c15ull ^ ((uint64_t)M << 40 | (uint64_t)N << 20) ^ 0x5bd1e995u);
  r.model = (uint32_t)(h % 3);
  uint32_t a = 1;
  if (M > 2) {
    for (a = (uint32_t)(mcpu_mix(h) % M); a == 0 || mcpu_gcd(a, M) != 1;) a = (a + 1) % M;
  }
  const uint32_t b = (uint32_t)(mcpu_mix(h ^ 1) % M), a_inv = mcpu_inverse(a, M);
  // The rows of this lane's slots of the operation's destination (the "own" model).
  bool own[M] = {};
  const mcpu_coop_layout dl = mcpu_make_layout(lane, M, N, 32, mcpu_type_salt<T>(M, N, 32));
  constexpr uint32_t cap = (M * N + 31) / 32;
  for (uint32_t i = 0; i < cap; ++i) {
    const uint64_t x = (uint64_t)lane * cap + i;
    if (x < (uint64_t)M * N) own[((uint64_t)dl.a * x + dl.b) % (uint32_t)(M * N) / N] = true;
  }
  int n = 0;
  for (uint32_t k = 0; k < (uint32_t)M; ++k) {  // rows in the seeded order: row(k) = a^-1 (k - b) mod M
    const int rr = (int)((uint64_t)a_inv * ((k + M - b) % M) % M);
    const bool held = r.model == mcpu_rows_replicated || (r.model == mcpu_rows_own && own[rr]) ||
                      (r.model == mcpu_rows_dealt && k % 32 == lane);
    if (held) r.row[n++] = (int16_t)rr;
  }
  for (; n < M; ++n) r.row[n] = -1;
}

}  // namespace metal

// ---- MetalPerformancePrimitives: matmul2d -------------------------------------------------------------------------
namespace mpp {
namespace tensor_ops {

template <matmul2d_descriptor D, typename Scope>
struct matmul2d {
  static_assert(D.m > 0 && D.n > 0, "matmul2d_descriptor: m and n are static");
  static constexpr int kThreads = Scope::threads;

  template <typename A, typename B, typename T>
  MCPU_INLINE metal::cooperative_tensor<T, D.m, D.n, kThreads> get_destination_cooperative_tensor() const {
    metal::cooperative_tensor<T, D.m, D.n, kThreads> c;
    c.layout = metal::mcpu_make_layout(metal::mcpu_thread_in_scope<Scope>(), D.m, D.n, kThreads,
                                       metal::mcpu_type_salt<T>(D.m, D.n, kThreads));
    // Slots start as 0xff bytes (NaN), like uninitialised threadgroup memory: accumulating into them shows.
    __builtin_memset(c.v, 0xff, sizeof c.v);
    return c;
  }

  // ---- row reductions and input cooperative tensors (execution_simdgroup only, as Apple's header requires) --------
  static constexpr bool kSimdgroup = Scope::simdgroups == 1;

  // One value per row of this operation's destination (reduce_rows' destination); the seeded model above.
  template <typename A, typename B, typename T>
  MCPU_INLINE metal::mcpu_row_reduction<T, D.m, D.n> get_row_reduction_destination_cooperative_tensor() const {
    static_assert(kSimdgroup, "row reductions: an execution_simdgroup operation (reduce_rows requires one SIMD group)");
    metal::mcpu_row_reduction<T, D.m, D.n> r;
    metal::mcpu_make_row_layout(r, mcpu_lane_id());
    __builtin_memset(r.v, 0xff, sizeof r.v);
    return r;
  }

  // An empty left input (M x K): slots start as NaN bytes.
  template <typename TL, typename TR, typename TD>
  MCPU_INLINE metal::mcpu_left_input<TL, TR, TD, D.m, D.k> mcpu_left_input() const {
    static_assert(kSimdgroup, "Input cooperative tensors require a single SIMD group");
    static_assert(D.k != (int)metal::dynamic_extent,
                  "Inner dimension cannot be dynamic with input cooperative tensors");
    static_assert(!D.transpose_left, "Input cooperative tensor cannot be transposed");
    metal::mcpu_left_input<TL, TR, TD, D.m, D.k> t;
    t.layout = metal::mcpu_make_layout(mcpu_lane_id(), D.m, D.k, 32, 1);
    __builtin_memset(t.v, 0xff, sizeof t.v);
    return t;
  }

  // Whether a destination of another operation (M x K, element type TL) converts into this operation's left input.
  // Apple's header makes it a run-time query; the emulator answers no for some seeds and shapes (one in three), so that
  // a kernel keeps a path for it. Uniform over the simdgroup.
  template <typename TL, typename TR, typename TD, typename TS, int SM, int SN, int ST>
  MCPU_INLINE bool is_compatible_as_left_input(const thread metal::cooperative_tensor<TS, SM, SN, ST>& src) const {
    static_assert(kSimdgroup && ST == 32, "Input cooperative tensors require a single SIMD group");
    static_assert(std::is_same_v<TS, TL>,
                  "Source cooperative tensor element type must match matmul2d left input element type");
    static_assert(SM == D.m && SN == D.k && !D.transpose_left,
                  "the source must be M x K of this operation (not transposed)");
    (void)src;
    const uint64_t h = metal::mcpu_mix(metal::mcpu_dispatch_seed() * 0x9e3779b97f4a7c15ull ^
                                       ((uint64_t)D.m << 40 | (uint64_t)D.k << 20 | (uint64_t)D.n) ^ 0x2545f491u);
    return h % 3 != 0;
  }

  // The left input holding the elements of `src` (a destination cooperative tensor of another operation, M x K):
  // a collective of the simdgroup. Where is_compatible_as_left_input(src) is false, an error.
  template <typename TL, typename TR, typename TD, typename TS, int SM, int SN, int ST>
  MCPU_INLINE metal::mcpu_left_input<TL, TR, TD, D.m, D.k> get_left_input_cooperative_tensor(
      const thread metal::cooperative_tensor<TS, SM, SN, ST>& src, MCPU_SITE) const {
    const bool compatible = is_compatible_as_left_input<TL, TR, TD>(src);
    metal::mcpu_left_input<TL, TR, TD, D.m, D.k> t = mcpu_left_input<TL, TR, TD>();
    src.mcpu_check_scope(MCPU_SITE_ARGS);
    if (!compatible)
      mcpu_fatal(
          "get_left_input_cooperative_tensor(source): this source does not convert into the left input "
          "(is_compatible_as_left_input(source) is false)");
    float all[32 * metal::cooperative_tensor<TS, SM, SN, ST>::capacity];
    src.mcpu_gather(all, MCPU_SITE_ARGS);
    for (uint16_t i = 0; i < t.capacity; ++i)
      if (t.is_valid_element(i)) t.v[i] = TL(all[src.mcpu_owner_slot(t.mcpu_element(i))]);
    return t;
  }

  // C = A B (+ C), A a left input of this operation: each destination element summed over k in fp32 as mcpu_dot does.
  template <typename TL, typename TR, typename TD, int LM, int LK, typename B, typename T, int Threads>
  MCPU_INLINE void run(const thread metal::mcpu_left_input<TL, TR, TD, LM, LK>& a, const thread B& b,
                       thread metal::cooperative_tensor<T, D.m, D.n, Threads>& c, MCPU_SITE) const {
    static_assert(kSimdgroup && Threads == 32, "Input cooperative tensors require a single SIMD group");
    static_assert(LM == D.m && LK == D.k, "matmul2d::run: the left input belongs to another operation");
    static_assert(std::is_same_v<TR, std::remove_cv_t<metal::remove_addrspace_t<typename B::value_type>>> &&
                      std::is_same_v<TD, T>,
                  "Input types must match cooperative tensor types");
    c.mcpu_check_scope(MCPU_SITE_ARGS);
    float all[32 * metal::mcpu_left_input<TL, TR, TD, LM, LK>::capacity], am[LM * LK];  // every lane's slots; A
    a.mcpu_gather(all, MCPU_SITE_ARGS);
    for (uint32_t x = 0; x < (uint32_t)(LM * LK); ++x) am[a.mcpu_element_of(x)] = all[x];
    constexpr bool accumulate = D.matmul_mode == matmul2d_descriptor::mode::multiply_accumulate;
    for (uint16_t i = 0; i < c.capacity; ++i)
      if (c.is_valid_element(i)) {
        const uint32_t e = c.mcpu_element(i), row = e / D.n, col = e % D.n;
        float acc = accumulate ? (float)c.v[i] : 0.0f;
        for (int k = 0; k < LK; ++k) {
          float x = am[row * LK + k], y = D.transpose_right ? b.msl_read(k, col) : b.msl_read(col, k);
          if (D.relaxed_precision) x = msl_relaxed(x), y = msl_relaxed(y);
          acc += x * y;
        }
        c.v[i] = T(acc);
      }
  }

#ifdef MSL_NAX_FRAGMENT_LAYOUT
  static constexpr bool kNax = metal::mcpu_nax_shape<D.m, D.n, kThreads> && D.k == 16;
  // The opt-in layout's inputs where the shape takes it, else the seeded left input.
  template <typename A, typename B, typename T>
  MCPU_INLINE auto get_left_input_cooperative_tensor() const {
    if constexpr (kNax) {
      static_assert(!D.transpose_left, "input cooperative tensors: matmul2d<(16, 16 n, 16)>, execution_simdgroup");
      metal::msl_nax_operand<A, 1> t;
      __builtin_memset(t.v, 0xff, sizeof t.v);
      return t;
    } else {
      return mcpu_left_input<A, B, T>();
    }
  }
  template <typename A, typename B, typename T>
  MCPU_INLINE metal::msl_nax_operand<B, D.n / 16> get_right_input_cooperative_tensor() const {
    static_assert(kNax, "input cooperative tensors: matmul2d<(16, 16 n, 16)>, execution_simdgroup");
    metal::msl_nax_operand<B, D.n / 16> t;
    __builtin_memset(t.v, 0xff, sizeof t.v);
    return t;
  }

  // C = A B (+ C) on input cooperative tensors: the simdgroup's slots gathered, each destination element summed over
  // k in fp32 as mcpu_dot does.
  template <typename TA, typename TB, typename T, int Threads>
  MCPU_INLINE void run(const thread metal::msl_nax_operand<TA, 1>& a,
                       const thread metal::msl_nax_operand<TB, D.n / 16>& b,
                       thread metal::cooperative_tensor<T, D.m, D.n, Threads>& c, MCPU_SITE) const {
    static_assert(kNax && Threads == kThreads && !D.transpose_left, "matmul2d::run on input cooperative tensors");
    c.mcpu_check_scope(MCPU_SITE_ARGS);
    using NX = metal::msl_nax;
    float am[16][16], bm[16][D.n];  // A (row, k), B (k, n)
    for (uint32_t i = 0; i < 8; ++i) {
      const metal::mcpu_lanes<TA> l = metal::mcpu_exchange(a.v[i], MCPU_SITE_ARGS);
      for (uint32_t x = 0; x < 32; ++x) am[NX::row(x, i)][NX::col(x, i)] = (float)l.v[x];
    }
    for (uint32_t i = 0; i < 8 * (D.n / 16); ++i) {
      const metal::mcpu_lanes<TB> l = metal::mcpu_exchange(b.v[i], MCPU_SITE_ARGS);
      for (uint32_t x = 0; x < 32; ++x) {
        const uint32_t f = i >> 3, r = NX::row(x, i), q = NX::col(x, i) - 16 * f;
        if (D.transpose_right)
          bm[q][16 * f + r] = (float)l.v[x];
        else
          bm[r][16 * f + q] = (float)l.v[x];
      }
    }
    constexpr bool accumulate = D.matmul_mode == matmul2d_descriptor::mode::multiply_accumulate;
    for (uint16_t i = 0; i < c.capacity; ++i) {
      const uint32_t e = c.mcpu_element(i), row = e / D.n, col = e % D.n;
      float acc = accumulate ? (float)c.v[i] : 0.0f;
      for (int k = 0; k < 16; ++k) {
        float x = am[row][k], y = bm[k][col];
        if (D.relaxed_precision) x = msl_relaxed(x), y = msl_relaxed(y);
        acc += x * y;
      }
      c.v[i] = T(acc);
    }
  }
#else
  template <typename TL, typename TR, typename TD>
  MCPU_INLINE metal::mcpu_left_input<TL, TR, TD, D.m, D.k> get_left_input_cooperative_tensor() const {
    return mcpu_left_input<TL, TR, TD>();
  }
#endif

  // One destination element: sum over k in fp32, rounded once to the destination type.
  template <typename A, typename B>
  MCPU_INLINE static float mcpu_dot(const thread A& a, const thread B& b, int row, int col, float acc) {
    const int k_len = D.k != (int)metal::dynamic_extent ? D.k : (int)a.get_extent(D.transpose_left ? 1 : 0);
    for (int k = 0; k < k_len; ++k) {
      float x = D.transpose_left ? a.msl_read(row, k) : a.msl_read(k, row);
      float y = D.transpose_right ? b.msl_read(k, col) : b.msl_read(col, k);
      if (D.relaxed_precision) x = msl_relaxed(x), y = msl_relaxed(y);
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
        if (!c.msl_inside(col, row)) continue;
        const float init = accumulate ? c.msl_read(col, row) : 0.0f;
        c.msl_write(col, row, mcpu_dot(a, b, row, col, init));
      }
  }
};

// Each valid slot of `destination` (a row reduction of the operation whose destination `source` is) gets the reduction
// of its row of `source` over the N columns in order, from `identity`, in fp32, rounded to T: a collective of the
// simdgroup (every lane reads the others' slots), as Apple's, whose header requires one SIMD group.
template <typename T, int M, int N, int Threads, int RM, int RN>
MCPU_INLINE void reduce_rows(thread metal::cooperative_tensor<T, M, N, Threads>& source,
                             thread metal::mcpu_row_reduction<T, RM, RN>& destination,
                             reduction_operation op = reduction_operation::sum,
                             T identity = reduction_operation_identity<T>::sum_identity, MCPU_SITE) {
  static_assert(Threads == 32, "reduce_rows requires a single SIMD group");
  static_assert(RM == M && RN == N, "Source and destination matmul2d descriptor must match");
  source.mcpu_check_scope(MCPU_SITE_ARGS);
  float all[32 * metal::cooperative_tensor<T, M, N, Threads>::capacity];
  source.mcpu_gather(all, MCPU_SITE_ARGS);
  for (uint16_t i = 0; i < destination.capacity; ++i)
    if (destination.is_valid_element(i)) {
      const uint32_t r = (uint32_t)destination.row[i];
      float acc = (float)identity;
      for (uint32_t c = 0; c < (uint32_t)N; ++c) acc = msl_reduce(op, acc, all[source.mcpu_owner_slot(r * N + c)]);
      destination.v[i] = T(acc);
    }
}

// Whether this thread holds, in `destination`, the row of every element it holds of `source` (map_iterator is then
// defined for each of them). Per thread, as Apple's; a kernel branches on it uniformly (simd_all).
template <typename TS, typename TD, int M, int N, int Threads, int RM, int RN>
MCPU_INLINE bool is_iterator_compatible(const thread metal::cooperative_tensor<TS, M, N, Threads>& source,
                                        const thread metal::mcpu_row_reduction<TD, RM, RN>& destination) {
  if constexpr (!std::is_same_v<TS, TD> || RM != M || Threads != 32) {
    return false;
  } else {
    for (uint16_t i = 0; i < source.capacity; ++i)
      if (source.is_valid_element(i) && destination.mcpu_slot_of_row(source.get_multidimensional_index(i)[1]) < 0)
        return false;
    return true;
  }
}

}  // namespace tensor_ops
}  // namespace mpp
