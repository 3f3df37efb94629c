// Metal 4 tensors and MetalPerformancePrimitives' matmul2d on NVPTX: included by metal_stdlib.h (C++20 builds only:
// matmul2d takes its descriptor as a class-type template parameter; compiler.py picks C++20 for sources that name
// mpp::). The API subset is the emulator's (msl/README.md "Tensor operations"; the views, execution scopes and
// descriptor are msl/shim/msl_tensors.h, shared with the CPU shim); the element ownership and the lowering are the
// proxy's own:
//   a destination cooperative tensor of matmul2d<(M, N, K), execution_simdgroups<S>> is a grid of 16 x 8 tiles (the
//   mma.sync m16n8 accumulator), ceil(M / 16) x ceil(N / 8) in row-major order, dealt to the S warps of the scope in
//   contiguous runs of ceil(tiles / S); slot 4 j + r of lane (g = lane / 4, t = lane % 4) of warp w holds element
//   row 16 tm + g + 8 (r / 2), column 8 tn + 2 t + r % 2 of tile w ceil(tiles / S) + j = (tm, tn): the mma.sync D
//   fragment, so run() accumulates straight into the slots. Slots past M, N or the tile count are invalid.
//   execution_thread: one thread holds all M x N elements, row-major.
// run() lowers by MCU_SIMDGROUP_MMA as simdgroup_matrix does: half x half and bfloat x bfloat on mma.sync m16n8k16
// (fp32 accumulators, exact products); float and mixed pairs on the three-bfloat split (six m16n8k16 per k step,
// ~fp32; four when relaxed_precision, whose operands are first rounded to 10 mantissa bits as the emulator does) in
// mode 1, in fp32 FMAs in mode 2; everything in fp32 FMAs in mode 0 (one sum per element in k order, each lane its
// own slots). Operand elements outside their tensor's extents read 0, destination elements outside are not written.
//
// Opt-in MSL_NAX_FRAGMENT_LAYOUT (peer builds only, e.g. MLX's NAX attention, which indexes cooperative tensor slots
// itself): the execution_simdgroup cooperative tensors of matmul2d<(16, N, 16)> (N a multiple of 16) take the
// element layout below instead of the mma.sync one, and left / right input cooperative tensors exist. Each 16 x 16
// block is dealt as follows: lane l (bits l4..l0) holds rows r0 and r0 + 8 and columns c0 .. c0 + 3, with
// r0 = 4 l4 + 2 l2 + l1 and c0 = 4 (2 l3 + l0); its slot 4 h + j is (r0 + 8 h, c0 + j). The destination (16 x N) and
// the right input are N / 16 such blocks along N, block f in slots 8 f .. 8 f + 7; the left input is one block over
// (row, k); the right input's blocks are over (k, n), or over (n, k) when transpose_right (the stored orientation).
// run() on these operands permutes them into mma.sync fragments with warp shuffles (rows kept, the k and n indices
// renumbered so that a lane's four columns land in one mma lane: no shuffle crosses a row pair for A, C and D) and
// back. Tensor-core lowering only (MCU_SIMDGROUP_MMA 1 or 2: a float left operand takes the bfloat split).
#pragma once

#if __cplusplus >= 202002L

#define MSL_TENSOR_ELEMENT(p) (*(p))
#include "../../shim/msl_tensors.h"

namespace metal {

// The warp's index in the threadgroup (linear thread index / 32, x fastest, as the entry points form simdgroups).
MCU_INLINE uint mcu_warp_in_threadgroup() {
  const uint tx = __nvvm_read_ptx_sreg_tid_x(), ty = __nvvm_read_ptx_sreg_tid_y(), tz = __nvvm_read_ptx_sreg_tid_z();
  const uint nx = __nvvm_read_ptx_sreg_ntid_x(), ny = __nvvm_read_ptx_sreg_ntid_y();
  return (tx + nx * (ty + ny * tz)) / 32u;
}

// ---- the tile layout of a destination (Simdgroups >= 1): see the header comment -----------------------------------
template <int M, int N, int Simdgroups>
struct mcu_tiles {
  static constexpr int tiles_m = (M + 15) / 16, tiles_n = (N + 7) / 8, tiles = tiles_m * tiles_n;
  static constexpr int per_warp = (tiles + Simdgroups - 1) / Simdgroups;
  static constexpr int capacity = 4 * per_warp;
  // Slot i's row and column (may lie past M / N; the tile may lie past the tile count).
  MCU_INLINE static int tile(uint warp, int i) { return (int)warp * per_warp + i / 4; }
  MCU_INLINE static int row(uint warp, int i) {
    return tile(warp, i) / tiles_n * 16 + (int)(mcu_lane_id() >> 2) + 8 * ((i >> 1) & 1);
  }
  MCU_INLINE static int col(uint warp, int i) {
    return tile(warp, i) % tiles_n * 8 + 2 * (int)(mcu_lane_id() & 3u) + (i & 1);
  }
  MCU_INLINE static bool valid(uint warp, int i) {
    return tile(warp, i) < tiles && row(warp, i) < M && col(warp, i) < N;
  }
};

// ---- the opt-in 16 x 16 block layout (MSL_NAX_FRAGMENT_LAYOUT): see the header comment ---------------------------
#ifdef MSL_NAX_FRAGMENT_LAYOUT
template <int M, int N, int Simdgroups>
constexpr bool mcu_nax_shape = Simdgroups == 1 && M == 16 && N % 16 == 0;
#else
template <int M, int N, int Simdgroups>
constexpr bool mcu_nax_shape = false;
#endif

// The lane exchange of the opt-in layout's run() (its index functions: msl_nax, msl_tensors.h).
struct mcu_nax : msl_nax {
  MCU_INLINE static uint shfl(uint x, uint src) {
    return (uint)__nvvm_shfl_sync_idx_i32(0xffffffffu, (int)x, (int)src, 0x1f);
  }
  MCU_INLINE static float shfl(float x, uint src) { return __nvvm_shfl_sync_idx_f32(0xffffffffu, x, (int)src, 0x1f); }
};

#ifdef MSL_NAX_FRAGMENT_LAYOUT
// Apple's compiler builtin for the lane index, which code written for this layout calls.
template <typename I>
MCU_INLINE I __metal_get_thread_index_in_simdgroup(I) {
  return I(mcu_lane_id());
}
#endif

// ---- the slots of a cooperative tensor: iterator, begin, end, get_iterator (every cooperative tensor type, CRTP) ---
// Iterates over the valid slots, in slot order (invalid slots may sit between valid ones: ragged M or N). Tensor has
// v[], capacity, is_valid_element and get_multidimensional_index (of rank Rank).
template <typename Tensor, typename T, int Rank>
struct mcu_slots {
  struct iterator {
    thread Tensor* t;
    uint16_t i;
    MCU_INLINE thread T& operator*() const { return t->v[i]; }
    MCU_INLINE iterator& operator++() {
      do ++i;
      while (i < Tensor::capacity && !t->is_valid_element(i));
      return *this;
    }
    MCU_INLINE bool operator==(const iterator& o) const { return i == o.i; }
    MCU_INLINE bool operator!=(const iterator& o) const { return i != o.i; }
    MCU_INLINE array<int, Rank> get_multidimensional_index() const { return t->get_multidimensional_index(i); }
    MCU_INLINE uint16_t get_index() const { return i; }
  };
  MCU_INLINE iterator begin() {
    uint16_t i = 0;
    while (i < Tensor::capacity && !self()->is_valid_element(i)) ++i;
    return iterator{self(), i};
  }
  MCU_INLINE iterator end() { return iterator{self(), (uint16_t)Tensor::capacity}; }
  MCU_INLINE iterator get_iterator(uint16_t i) { return iterator{self(), i}; }
  MCU_INLINE thread Tensor* self() { return static_cast<thread Tensor*>(this); }
};

// ---- cooperative tensors (matmul2d destinations) ----------------------------------------------------------------
// Simdgroups = 0: execution_thread (all M x N elements in one thread, row-major).
template <typename T, int M, int N, int Simdgroups>
struct cooperative_tensor : mcu_slots<cooperative_tensor<T, M, N, Simdgroups>, T, 2> {
  using layout = mcu_tiles<M, N, Simdgroups == 0 ? 1 : Simdgroups>;
  static constexpr bool nax = mcu_nax_shape<M, N, Simdgroups>;
  static constexpr int capacity = Simdgroups == 0 ? M * N : nax ? M * N / 32 : layout::capacity;
  T v[capacity];
  uint warp;  // the warp's index in the scope

  MCU_INLINE static constexpr uint16_t get_capacity() { return capacity; }
  MCU_INLINE thread T& operator[](uint16_t i) { return v[i]; }
  MCU_INLINE const thread T& operator[](uint16_t i) const { return v[i]; }
  MCU_INLINE int mcu_row(int i) const {
    return Simdgroups == 0 ? i / N : nax ? mcu_nax::row(mcu_lane_id(), i) : layout::row(warp, i);
  }
  MCU_INLINE int mcu_col(int i) const {
    return Simdgroups == 0 ? i % N : nax ? mcu_nax::col(mcu_lane_id(), i) : layout::col(warp, i);
  }
  MCU_INLINE bool is_valid_element(uint16_t i) const {
    return i < capacity && (Simdgroups == 0 || nax || layout::valid(warp, i));
  }
  // [column, row]: dimension 0 first, as the tensors index.
  MCU_INLINE array<int, 2> get_multidimensional_index(uint16_t i) const {
    return array<int, 2>{{mcu_col(i), mcu_row(i)}};
  }

  // Each thread moves its own elements; elements outside the tensor's extents load as 0 and are not stored.
  template <typename Tn>
  MCU_INLINE void load(const thread Tn& src) {
    for (int i = 0; i < capacity; ++i)
      if (is_valid_element(i)) v[i] = T(src.msl_read(mcu_col(i), mcu_row(i)));
  }
  template <typename Tn>
  MCU_INLINE void store(const thread Tn& dst) const {
    for (int i = 0; i < capacity; ++i)
      if (is_valid_element(i)) dst.msl_write(mcu_col(i), mcu_row(i), v[i]);
  }
};

// ---- input cooperative tensors: the left operand (M x K) of matmul2d<(M, N, K), execution_simdgroup> --------------
// Laid out as a destination of M x K: 16 x 8 tiles, slot 4 j + r of tile j holds row 16 tm + g + 8 (r / 2), column
// 8 tk + 2 t + r % 2, so tiles (tm, 2 kk) and (tm, 2 kk + 1) are the m16n8k16 A fragment of rows tm, k step kk, and a
// destination of another operation converts slot by slot (the register reuse of FlashAttention-2's P). TR, TD: the
// right operand's and the destination's element types the tensor was declared for (run() checks them).
template <typename TL, typename TR, typename TD, int M, int K>
struct mcu_left_input {
  using layout = mcu_tiles<M, K, 1>;
  static constexpr int capacity = layout::capacity;
  TL v[capacity];

  MCU_INLINE static constexpr uint16_t get_capacity() { return capacity; }
  MCU_INLINE thread TL& operator[](uint16_t i) { return v[i]; }
  MCU_INLINE const thread TL& operator[](uint16_t i) const { return v[i]; }
  MCU_INLINE bool is_valid_element(uint16_t i) const { return i < capacity && layout::valid(0, i); }
  MCU_INLINE array<int, 2> get_multidimensional_index(uint16_t i) const {
    return array<int, 2>{{layout::col(0, i), layout::row(0, i)}};
  }
  template <typename Tn>
  MCU_INLINE void load(const thread Tn& src) {
    for (int i = 0; i < capacity; ++i)
      v[i] = is_valid_element(i) ? TL(src.msl_read(layout::col(0, i), layout::row(0, i))) : TL(0);
  }
};

// ---- row-reduction cooperative tensors: one value per row of an M x N destination (execution_simdgroup) ----------
// Lane (g = lane / 4, t = lane % 4) holds rows 16 tm + g and 16 tm + g + 8 of every row tile tm (slot 2 tm + h), the
// rows of its destination slots whatever N: every destination of M rows of a one-simdgroup operation maps onto it
// (is_iterator_compatible), the 4 lanes of a quad hold the same rows.
template <typename T, int M, int N>
struct mcu_row_reduction : mcu_slots<mcu_row_reduction<T, M, N>, T, 1> {
  static constexpr int tiles_m = (M + 15) / 16;
  static constexpr int capacity = 2 * tiles_m;
  T v[capacity];

  MCU_INLINE static constexpr uint16_t get_capacity() { return capacity; }
  MCU_INLINE thread T& operator[](uint16_t i) { return v[i]; }
  MCU_INLINE const thread T& operator[](uint16_t i) const { return v[i]; }
  MCU_INLINE static int mcu_row(int i) { return 16 * (i >> 1) + (int)(mcu_lane_id() >> 2) + 8 * (i & 1); }
  MCU_INLINE bool is_valid_element(uint16_t i) const { return i < capacity && mcu_row(i) < M; }
  MCU_INLINE array<int, 1> get_multidimensional_index(uint16_t i) const { return array<int, 1>{{mcu_row(i)}}; }

  using iterator = typename mcu_slots<mcu_row_reduction, T, 1>::iterator;
  // The slot holding the row of a destination element (a one-simdgroup destination of M rows, slot src.i): its tile
  // row and half, known at compile time where the slot loop is unrolled.
  template <typename SrcIterator>
  MCU_INLINE iterator map_iterator(const SrcIterator& src) {
    using Src = std::remove_reference_t<decltype(*src.t)>;
    static_assert(!Src::nax, "map_iterator: the opt-in layout has no row reductions here");
    const int tile = src.i / 4;
    return iterator{this, (uint16_t)(2 * (tile / Src::layout::tiles_n) + ((src.i >> 1) & 1))};
  }
};

}  // namespace metal

// ---- MetalPerformancePrimitives: matmul2d -------------------------------------------------------------------------
namespace mpp {
namespace tensor_ops {

// d += A x B on one m16n8k16, f16 or bf16 operands (registers in PTX order), fp32 accumulators.
template <typename T>
MCU_INLINE void mcu_mma_k16(float (&d)[4], const uint (&a)[4], const uint (&b)[2]) {
  if constexpr (std::is_same_v<T, half>)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    metal::mcu_mma_bf16_k16(d, a[0], a[1], a[2], a[3], b[0], b[1]);
}

// d += A x B for float operands on m16n8k16, each split in three bfloats (hi + mid + lo ~ fp32): the six products
// whose terms reach fp32, smallest first; relaxed (operands of 11 significant bits, lo = 0): the four without lo.
template <bool Relaxed>
MCU_INLINE void mcu_mma_split3(float (&d)[4], const mcu_sgm::split3 (&sa)[4], const mcu_sgm::split3 (&sb)[2]) {
  const uint a_hi[4] = {sa[0].hi, sa[1].hi, sa[2].hi, sa[3].hi};
  const uint a_mid[4] = {sa[0].mid, sa[1].mid, sa[2].mid, sa[3].mid};
  const uint b_hi[2] = {sb[0].hi, sb[1].hi}, b_mid[2] = {sb[0].mid, sb[1].mid};
  if constexpr (!Relaxed) {
    const uint a_lo[4] = {sa[0].lo, sa[1].lo, sa[2].lo, sa[3].lo};
    const uint b_lo[2] = {sb[0].lo, sb[1].lo};
    mcu_mma_k16<bfloat>(d, a_lo, b_hi);
    mcu_mma_k16<bfloat>(d, a_hi, b_lo);
  }
  mcu_mma_k16<bfloat>(d, a_mid, b_mid);
  mcu_mma_k16<bfloat>(d, a_mid, b_hi);
  mcu_mma_k16<bfloat>(d, a_hi, b_mid);
  mcu_mma_k16<bfloat>(d, a_hi, b_hi);
}

template <matmul2d_descriptor D, typename Scope>
struct matmul2d {
  static_assert(D.m > 0 && D.n > 0, "matmul2d_descriptor: m and n are static");
  static constexpr int kSimdgroups = Scope::simdgroups;
  static constexpr bool kAccumulate = D.matmul_mode == matmul2d_descriptor::mode::multiply_accumulate;
  template <typename T>
  using destination = metal::cooperative_tensor<T, D.m, D.n, kSimdgroups>;

  template <typename A, typename B, typename T>
  MCU_INLINE destination<T> get_destination_cooperative_tensor() const {
    destination<T> c;
    c.warp = kSimdgroups == 0 ? 0u : metal::mcu_warp_in_threadgroup() % (uint)kSimdgroups;
    return c;
  }

  // ---- row reductions and left input cooperative tensors (execution_simdgroup, as Apple's header requires) --------
  template <typename A, typename B, typename T>
  MCU_INLINE metal::mcu_row_reduction<T, D.m, D.n> get_row_reduction_destination_cooperative_tensor() const {
    static_assert(kSimdgroups == 1, "row reductions: an execution_simdgroup operation (reduce_rows: one SIMD group)");
    return {};
  }

  template <typename TL, typename TR, typename TD>
  using left_input = metal::mcu_left_input<TL, TR, TD, D.m, D.k>;

  template <typename TL, typename TR, typename TD>
  MCU_INLINE left_input<TL, TR, TD> mcu_left_input() const {
    static_assert(kSimdgroups == 1, "Input cooperative tensors require a single SIMD group");
    static_assert(D.k != (int)metal::dynamic_extent,
                  "Inner dimension cannot be dynamic with input cooperative tensors");
    static_assert(!D.transpose_left, "Input cooperative tensor cannot be transposed");
    return {};
  }

  // A destination of another one-simdgroup operation, M x K, converts slot by slot (the same tile layout): always.
  template <typename TL, typename TR, typename TD, typename TS, int SM, int SN, int SS>
  MCU_INLINE bool is_compatible_as_left_input(const thread metal::cooperative_tensor<TS, SM, SN, SS>&) const {
    static_assert(kSimdgroups == 1 && SS == 1, "Input cooperative tensors require a single SIMD group");
    static_assert(std::is_same_v<TS, TL>,
                  "Source cooperative tensor element type must match matmul2d left input element type");
    static_assert(SM == D.m && SN == D.k && !D.transpose_left,
                  "the source must be M x K of this operation (not transposed)");
    return true;
  }

  template <typename TL, typename TR, typename TD, typename TS, int SM, int SN, int SS>
  MCU_INLINE left_input<TL, TR, TD> get_left_input_cooperative_tensor(
      const thread metal::cooperative_tensor<TS, SM, SN, SS>& src) const {
    static_assert(!metal::cooperative_tensor<TS, SM, SN, SS>::nax, "the opt-in layout converts no left input here");
    (void)is_compatible_as_left_input<TL, TR, TD>(src);
    left_input<TL, TR, TD> a = mcu_left_input<TL, TR, TD>();
#pragma unroll
    for (int i = 0; i < a.capacity; ++i) a.v[i] = a.is_valid_element(i) ? TL(src.v[i]) : TL(0);
    return a;
  }

#ifdef MSL_NAX_FRAGMENT_LAYOUT
  // The opt-in layout's inputs (header comment): M x K and K x N in 16 x 16 blocks.
  static constexpr bool kNax = metal::mcu_nax_shape<D.m, D.n, kSimdgroups> && D.k == 16;
  template <typename A, typename B, typename T>
  MCU_INLINE auto get_left_input_cooperative_tensor() const {
    if constexpr (kNax) {
      static_assert(!D.transpose_left, "input cooperative tensors: matmul2d<(16, 16 n, 16)>, execution_simdgroup");
      return metal::msl_nax_operand<A, 1>{};
    } else {
      return mcu_left_input<A, B, T>();
    }
  }
  template <typename A, typename B, typename T>
  MCU_INLINE metal::msl_nax_operand<B, D.n / 16> get_right_input_cooperative_tensor() const {
    static_assert(kNax, "input cooperative tensors: matmul2d<(16, 16 n, 16)>, execution_simdgroup");
    return {};
  }

  template <typename X>
  MCU_INLINE static metal::vec<float, 2> unpack16(uint w) {
    const metal::vec<X, 2> p = __builtin_bit_cast(metal::vec<X, 2>, w);
    return metal::vec<float, 2>{(float)p.x, (float)p.y};
  }

  // D = A B (+ C) on input cooperative tensors: each 16-column block of C is two m16n8 tiles. Physical k index
  // 8 q + 2 t + e holds logical k 4 t + 2 q + e, physical column 8 s + 2 t + e of a block logical column
  // 4 t + 2 s + e: lane (g, t) of the mma then holds exactly the block lane (row0 g, quad t)'s slots.
  template <typename TA, typename TB, typename T, int S>
  MCU_INLINE void run(const thread metal::msl_nax_operand<TA, 1>& a,
                      const thread metal::msl_nax_operand<TB, D.n / 16>& b,
                      thread metal::cooperative_tensor<T, D.m, D.n, S>& c) const {
    static_assert(kNax && S == 1 && !D.transpose_left, "matmul2d::run on input cooperative tensors");
    static_assert(MCU_SIMDGROUP_MMA != 0, "the opt-in layout lowers on tensor cores only (MCU_SIMDGROUP_MMA 1, 2)");
    static_assert(!std::is_same_v<TB, float>, "the opt-in layout: a 16-bit right operand");
    constexpr bool same16 = std::is_same_v<TA, TB>;
    static_assert(same16 || std::is_same_v<TA, float>, "the opt-in layout: left and right alike, or a float left");
    metal::mcu_require_full_warp();
    using NX = metal::mcu_nax;
    const uint l = mcu_lane_id(), g = l >> 2, t = l & 3u;
    const uint owner = NX::lane(g, t);  // the block lane whose rows and quad this mma lane holds
    // A: a[2 q + h] = rows g + 8 h, logical k 4 t + 2 q + {0, 1}: slots 4 h + 2 q + {0, 1} of `owner`.
    uint ar[4];
    metal::vec<float, 2> af[4];
#pragma unroll
    for (int q = 0; q < 2; ++q)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int s0 = 4 * h + 2 * q;
        if constexpr (same16)
          ar[2 * q + h] = NX::shfl(pack16(a.v[s0], a.v[s0 + 1]), owner);
        else
          af[2 * q + h] = metal::vec<float, 2>{NX::shfl((float)a.v[s0], owner), NX::shfl((float)a.v[s0 + 1], owner)};
      }
#pragma unroll
    for (int f = 0; f < D.n / 16; ++f) {
      float acc[2][4];
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int r = 0; r < 4; ++r)
          acc[s][r] = kAccumulate ? NX::shfl((float)c.v[8 * f + 4 * (r >> 1) + 2 * s + (r & 1)], owner) : 0.0f;
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        // B: br[q] = logical k 4 t + 2 q + {0, 1}, logical column n = 4 (g >> 1) + 2 s + (g & 1) of block f.
        uint br[2];
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          if constexpr (D.transpose_right) {
            // Blocks over (n, k): row n (its row0 n & 7, its half n >> 3 = g >> 2), quad t, slots 4 h + 2 q + {0, 1}.
            const uint src = NX::lane(4u * ((g >> 1) & 1u) + 2u * s + (g & 1u), t);
            const int s0 = 8 * f + 2 * q;
            const uint w0 = NX::shfl(pack16(b.v[s0], b.v[s0 + 1]), src);
            const uint w1 = NX::shfl(pack16(b.v[s0 + 4], b.v[s0 + 5]), src);
            br[q] = (g >> 2) ? w1 : w0;
          } else {
            // Blocks over (k, n): row k (row0 k & 7, half t >> 1), quad g >> 1, slot 4 h + 2 s + (g & 1).
            const int s0 = 8 * f + 2 * s;
            const uint pw0 = pack16(b.v[s0], b.v[s0 + 1]), pw1 = pack16(b.v[s0 + 4], b.v[s0 + 5]);
            uint half_[2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const uint src = NX::lane((4u * t + 2u * q + e) & 7u, g >> 1);
              const uint w0 = NX::shfl(pw0, src), w1 = NX::shfl(pw1, src);
              const uint w = (t >> 1) ? w1 : w0;
              half_[e] = (g & 1u) ? w >> 16 : w & 0xffffu;
            }
            br[q] = half_[0] | half_[1] << 16;
          }
        }
        if constexpr (same16) {
          mcu_mma_k16<TA>(acc[s], ar, br);
        } else {
          // A float, B 16-bit: the three-bfloat split as run_tiles does (relaxed_precision: hi and mid only).
          mcu_sgm::split3 sa[4], sb[2];
#pragma unroll
          for (int r = 0; r < 4; ++r) sa[r] = mcu_sgm::split_pair(operand(af[r].x), operand(af[r].y));
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const metal::vec<float, 2> bf = unpack16<TB>(br[q]);
            sb[q] = mcu_sgm::split_pair(bf.x, bf.y);
          }
          mcu_mma_split3<D.relaxed_precision>(acc[s], sa, sb);
        }
      }
      // Back: block lane l's slot 4 h + 2 s + e is mma lane (row0 l, quad l)'s acc[s][2 h + e].
      const uint from = 4u * (uint)NX::row0(l) + (uint)NX::quad(l);
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int r = 0; r < 4; ++r) c.v[8 * f + 4 * (r >> 1) + 2 * s + (r & 1)] = T(NX::shfl(acc[s][r], from));
    }
  }
#else
  template <typename TL, typename TR, typename TD>
  MCU_INLINE left_input<TL, TR, TD> get_left_input_cooperative_tensor() const {
    return mcu_left_input<TL, TR, TD>();
  }
#endif

  template <typename A>
  MCU_INLINE static int k_length(const thread A& a) {
    return D.k != (int)metal::dynamic_extent ? D.k : (int)a.get_extent(D.transpose_left ? 1 : 0);
  }
  // A(row, k) and B(k, col) in their element types, 0 outside the tensors.
  template <typename A>
  MCU_INLINE static auto left(const thread A& a, int row, int k) {
    return D.transpose_left ? a.msl_read(row, k) : a.msl_read(k, row);
  }
  template <typename B>
  MCU_INLINE static auto right(const thread B& b, int k, int col) {
    return D.transpose_right ? b.msl_read(k, col) : b.msl_read(col, k);
  }
  template <typename X>
  MCU_INLINE static float operand(X x) {
    return D.relaxed_precision && std::is_same_v<X, float> ? msl_relaxed((float)x) : (float)x;
  }

  // A pair of 16-bit operands as one mma register, the first in the low half.
  template <typename X>
  MCU_INLINE static uint pack16(X x0, X x1) {
    return __builtin_bit_cast(uint, metal::vec<X, 2>{x0, x1});
  }

  // The slots of a warp's tiles on tensor cores: d (capacity floats) holds C on entry, D on exit.
  template <typename A, typename B, int Capacity>
  MCU_INLINE static void run_tiles(const thread A& a, const thread B& b, float (&d)[Capacity], uint warp) {
    using L = metal::mcu_tiles<D.m, D.n, kSimdgroups>;
    using TA = typename A::value_type;
    using TB = typename B::value_type;
    constexpr bool same16 = std::is_same_v<TA, TB> && (std::is_same_v<TA, half> || std::is_same_v<TA, bfloat>);
    const int k_len = k_length(a), g = (int)(mcu_lane_id() >> 2), t = (int)(mcu_lane_id() & 3u);
#pragma unroll
    for (int j = 0; j < L::per_warp; ++j) {
      const int tile = (int)warp * L::per_warp + j;
      if (tile >= L::tiles) break;  // warp-uniform: mma.sync sees the whole warp
      const int r0 = tile / L::tiles_n * 16 + g, c0 = tile % L::tiles_n * 8 + g, k0 = 2 * t;
      float(&acc)[4] = *reinterpret_cast<float(*)[4]>(&d[4 * j]);
      for (int k = 0; k < k_len; k += 16) {
        if constexpr (same16) {
          const uint ar[4] = {pack16(left(a, r0, k + k0), left(a, r0, k + k0 + 1)),
                              pack16(left(a, r0 + 8, k + k0), left(a, r0 + 8, k + k0 + 1)),
                              pack16(left(a, r0, k + k0 + 8), left(a, r0, k + k0 + 9)),
                              pack16(left(a, r0 + 8, k + k0 + 8), left(a, r0 + 8, k + k0 + 9))};
          const uint br[2] = {pack16(right(b, k + k0, c0), right(b, k + k0 + 1, c0)),
                              pack16(right(b, k + k0 + 8, c0), right(b, k + k0 + 9, c0))};
          mcu_mma_k16<TA>(acc, ar, br);
        } else {
          // Three bfloat parts each (exact for normal floats); the six partial products above 2^-26 |a b|, smallest
          // first. relaxed_precision operands have 11 significant bits: hi + mid, lo = 0 (four products).
          const mcu_sgm::split3 sa[4] = {
              mcu_sgm::split_pair(operand(left(a, r0, k + k0)), operand(left(a, r0, k + k0 + 1))),
              mcu_sgm::split_pair(operand(left(a, r0 + 8, k + k0)), operand(left(a, r0 + 8, k + k0 + 1))),
              mcu_sgm::split_pair(operand(left(a, r0, k + k0 + 8)), operand(left(a, r0, k + k0 + 9))),
              mcu_sgm::split_pair(operand(left(a, r0 + 8, k + k0 + 8)), operand(left(a, r0 + 8, k + k0 + 9)))};
          const mcu_sgm::split3 sb[2] = {
              mcu_sgm::split_pair(operand(right(b, k + k0, c0)), operand(right(b, k + k0 + 1, c0))),
              mcu_sgm::split_pair(operand(right(b, k + k0 + 8, c0)), operand(right(b, k + k0 + 9, c0)))};
          mcu_mma_split3<D.relaxed_precision>(acc, sa, sb);
        }
      }
    }
  }

  // d = A B (+ d) over this thread's slots of a destination laid out as destination<T>.
  template <typename A, typename B, typename C, int Capacity>
  MCU_INLINE static void compute(const thread A& a, const thread B& b, const thread C& layout, float (&d)[Capacity]) {
    using TA = typename A::value_type;
    using TB = typename B::value_type;
    constexpr bool same16 = std::is_same_v<TA, TB> && (std::is_same_v<TA, half> || std::is_same_v<TA, bfloat>);
    constexpr bool on_tensor_cores = kSimdgroups > 0 && MCU_SIMDGROUP_MMA != 0 && (same16 || MCU_SIMDGROUP_MMA == 1) &&
                                     !C::nax;  // the opt-in layout: FMAs over its own slots
    if constexpr (on_tensor_cores) {
      metal::mcu_require_full_warp();
      run_tiles(a, b, d, layout.warp);
    } else {
      // k outermost (each element still sums k in order): the slots' accumulators stay in registers.
      const int k_len = k_length(a);
      for (int k = 0; k < k_len; ++k)
#pragma unroll
        for (int i = 0; i < Capacity; ++i)
          if (layout.is_valid_element(i))
            d[i] =
                __builtin_fmaf(operand(left(a, layout.mcu_row(i), k)), operand(right(b, k, layout.mcu_col(i))), d[i]);
    }
  }

  // C a cooperative tensor from this operation.
  template <typename A, typename B, typename T, int S>
  MCU_INLINE void run(const thread A& a, const thread B& b, thread metal::cooperative_tensor<T, D.m, D.n, S>& c) const {
    static_assert(S == kSimdgroups, "matmul2d::run: the destination belongs to another execution scope");
    constexpr int cap = destination<T>::capacity;
    float d[cap];
#pragma unroll
    for (int i = 0; i < cap; ++i) d[i] = kAccumulate ? (float)c.v[i] : 0.0f;
    compute(a, b, c, d);
#pragma unroll
    for (int i = 0; i < cap; ++i) c.v[i] = T(d[i]);
  }

  // C = A B (+ C), A a left input of this operation (in registers): per destination tile and k step of 16 its A
  // fragment is 4 slots of two left tiles (mcu_left_input); B read from its tensor as run_tiles does. On tensor cores
  // (16-bit pairs, or a float left input split in three bfloats) or, in the FMA lowerings, with A's elements shuffled
  // from the lanes that hold them (k in order).
  template <typename TL, typename TR, typename TD, int LM, int LK, typename B, typename T, int S>
  MCU_INLINE void run(const thread metal::mcu_left_input<TL, TR, TD, LM, LK>& a, const thread B& b,
                      thread metal::cooperative_tensor<T, D.m, D.n, S>& c) const {
    static_assert(kSimdgroups == 1 && S == 1, "Input cooperative tensors require a single SIMD group");
    static_assert(LM == D.m && LK == D.k, "matmul2d::run: the left input belongs to another operation");
    static_assert(std::is_same_v<TR, std::remove_cv_t<metal::remove_addrspace_t<typename B::value_type>>> &&
                      std::is_same_v<TD, T>,
                  "Input types must match cooperative tensor types");
    using L = metal::mcu_tiles<D.m, D.n, 1>;
    using LA = metal::mcu_tiles<LM, LK, 1>;
    constexpr bool same16 = std::is_same_v<TL, TR> && (std::is_same_v<TL, half> || std::is_same_v<TL, bfloat>);
    constexpr bool on_tensor_cores = MCU_SIMDGROUP_MMA != 0 && (same16 || MCU_SIMDGROUP_MMA == 1);
    constexpr int cap = destination<T>::capacity;
    float d[cap];
#pragma unroll
    for (int i = 0; i < cap; ++i) d[i] = kAccumulate ? (float)c.v[i] : 0.0f;
    const int g = (int)(mcu_lane_id() >> 2), t = (int)(mcu_lane_id() & 3u);
    if constexpr (on_tensor_cores) {
      metal::mcu_require_full_warp();
#pragma unroll
      for (int j = 0; j < L::tiles; ++j) {
        const int tm = j / L::tiles_n, c0 = j % L::tiles_n * 8 + g;
        float(&acc)[4] = *reinterpret_cast<float(*)[4]>(&d[4 * j]);
#pragma unroll
        for (int kk = 0; kk < (LK + 15) / 16; ++kk) {
          const int k = 16 * kk + 2 * t;
          const int s0 = 4 * (tm * LA::tiles_n + 2 * kk), s1 = s0 + 4;  // the k step's two left tiles
          const bool hi = 2 * kk + 1 < LA::tiles_n;                     // K a multiple of 8, not of 16: zeros
          const TL x[8] = {a.v[s0],
                           a.v[s0 + 1],
                           a.v[s0 + 2],
                           a.v[s0 + 3],
                           hi ? a.v[s1] : TL(0),
                           hi ? a.v[s1 + 1] : TL(0),
                           hi ? a.v[s1 + 2] : TL(0),
                           hi ? a.v[s1 + 3] : TL(0)};
          if constexpr (same16) {
            const uint ar[4] = {pack16(x[0], x[1]), pack16(x[2], x[3]), pack16(x[4], x[5]), pack16(x[6], x[7])};
            const uint br[2] = {pack16(right(b, k, c0), right(b, k + 1, c0)),
                                pack16(right(b, k + 8, c0), right(b, k + 9, c0))};
            mcu_mma_k16<TL>(acc, ar, br);
          } else {
            const mcu_sgm::split3 sa[4] = {
                mcu_sgm::split_pair(operand(x[0]), operand(x[1])), mcu_sgm::split_pair(operand(x[2]), operand(x[3])),
                mcu_sgm::split_pair(operand(x[4]), operand(x[5])), mcu_sgm::split_pair(operand(x[6]), operand(x[7]))};
            const mcu_sgm::split3 sb[2] = {
                mcu_sgm::split_pair(operand(right(b, k, c0)), operand(right(b, k + 1, c0))),
                mcu_sgm::split_pair(operand(right(b, k + 8, c0)), operand(right(b, k + 9, c0)))};
            mcu_mma_split3<D.relaxed_precision>(acc, sa, sb);
          }
        }
      }
    } else {
      // A(row, k) of this lane's rows 16 tm + g + 8 h: slot 4 (tm * tiles_k + k / 8) + 2 h + k % 2 of lane
      // 4 g + (k % 8) / 2.
#pragma unroll
      for (int k = 0; k < LK; ++k)
#pragma unroll
        for (int tm = 0; tm < L::tiles_m; ++tm)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int slot = 4 * (tm * LA::tiles_n + k / 8) + 2 * h + (k & 1);
            const float x = __nvvm_shfl_sync_idx_f32(0xffffffffu, (float)a.v[slot], 4 * g + ((k & 7) >> 1), 0x1f);
#pragma unroll
            for (int tn = 0; tn < L::tiles_n; ++tn)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int i = 4 * (tm * L::tiles_n + tn) + 2 * h + e;
                if (c.is_valid_element(i)) d[i] = __builtin_fmaf(operand(x), operand(right(b, k, c.mcu_col(i))), d[i]);
              }
          }
    }
#pragma unroll
    for (int i = 0; i < cap; ++i) c.v[i] = T(d[i]);
  }

  // C a tensor in device or threadgroup memory: each thread computes and writes the elements it would own.
  template <typename A, typename B, typename E, typename X>
  MCU_INLINE void run(const thread A& a, const thread B& b, metal::tensor<E, X, metal::tensor_inline> c) const {
    destination<float> slots = get_destination_cooperative_tensor<A, B, float>();
#pragma unroll
    for (int i = 0; i < slots.capacity; ++i) slots.v[i] = 0.0f;
    if constexpr (kAccumulate) slots.load(c);
    compute(a, b, slots, slots.v);
    slots.store(c);
  }
};

// Row reductions of a one-simdgroup destination (mcu_row_reduction's layout): each lane reduces its own elements of
// its rows, the quad's 4 lanes combine them (two shuffles), and the identity joins once. fp32, rounded to T.
template <typename T, int M, int N, int S, int RM, int RN>
MCU_INLINE void reduce_rows(thread metal::cooperative_tensor<T, M, N, S>& source,
                            thread metal::mcu_row_reduction<T, RM, RN>& destination,
                            reduction_operation op = reduction_operation::sum,
                            T identity = reduction_operation_identity<T>::sum_identity) {
  using Src = metal::cooperative_tensor<T, M, N, S>;
  using L = typename Src::layout;
  static_assert(S == 1 && !Src::nax, "reduce_rows requires a single SIMD group");
  static_assert(RM == M && RN == N, "Source and destination matmul2d descriptor must match");
  const float neutral = op == reduction_operation::sum   ? 0.0f
                        : op == reduction_operation::max ? -__FLT_MAX__
                                                         : __FLT_MAX__;
#pragma unroll
  for (int slot = 0; slot < destination.capacity; ++slot) {
    const int tm = slot >> 1, h = slot & 1;
    float acc = neutral;
#pragma unroll
    for (int tn = 0; tn < L::tiles_n; ++tn)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int i = 4 * (tm * L::tiles_n + tn) + 2 * h + e;
        if (source.is_valid_element(i)) acc = msl_reduce(op, acc, (float)source.v[i]);
      }
    acc = msl_reduce(op, acc, __nvvm_shfl_sync_bfly_f32(0xffffffffu, acc, 1, 0x1f));
    acc = msl_reduce(op, acc, __nvvm_shfl_sync_bfly_f32(0xffffffffu, acc, 2, 0x1f));
    destination.v[slot] = T(msl_reduce(op, (float)identity, acc));
  }
}

// A one-simdgroup destination of M rows always maps onto a row reduction of M rows (the same rows per lane).
template <typename TS, typename TD, int M, int N, int S, int RM, int RN>
MCU_INLINE constexpr bool is_iterator_compatible(const thread metal::cooperative_tensor<TS, M, N, S>&,
                                                 const thread metal::mcu_row_reduction<TD, RM, RN>&) {
  return std::is_same_v<TS, TD> && RM == M && S == 1 && !metal::cooperative_tensor<TS, M, N, S>::nax;
}

}  // namespace tensor_ops
}  // namespace mpp

#endif  // __cplusplus >= 202002L
