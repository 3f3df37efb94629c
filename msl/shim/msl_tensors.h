// The target-independent part of the emulator's model of Metal 4 tensors and MetalPerformancePrimitives' matmul2d
// (msl/README.md, "Tensor operations"): rank-2 extents, tensor_inline views with slices and bounds-checked element
// access, the execution scopes, the matmul2d descriptor and relaxed_precision's rounding. Each target's
// metal_tensor_ops.h includes it and adds the cooperative tensors and matmul2d itself (the CPU: a seeded element
// ownership and instrumented sums; the proxy: mma.sync tiles). The including shim defines MSL_TENSOR_ELEMENT(p) first:
// the lvalue through which an element at pointer p is read and written (the CPU shim: volatile, so that the optimiser
// cannot merge a row into one load wider than the 16 bytes SanitizerCoverage hooks).
#pragma once

#ifndef MSL_TENSOR_ELEMENT
#error "msl_tensors.h: the including shim defines MSL_TENSOR_ELEMENT(p)"
#endif

namespace metal {

constexpr size_t dynamic_extent = ~size_t(0);

template <typename T, size_t N>
struct array {
  T v[N];
  MSL_INLINE thread T& operator[](size_t i) { return v[i]; }
  MSL_INLINE const thread T& operator[](size_t i) const { return v[i]; }
  static constexpr size_t size() { return N; }
};

// ---- extents (rank 2) -------------------------------------------------------------------------------------------
template <typename I, size_t E0, size_t E1>
struct extents {
  using index_type = I;
  I e[2];
  MSL_INLINE constexpr extents() : e{E0 == dynamic_extent ? I(0) : I(E0), E1 == dynamic_extent ? I(0) : I(E1)} {}
  MSL_INLINE constexpr extents(I e0, I e1) : e{e0, e1} {}
  static constexpr size_t rank() { return 2; }
  static constexpr size_t static_extent(size_t r) { return r == 0 ? E0 : E1; }
  MSL_INLINE constexpr I extent(size_t r) const { return e[r]; }
};
template <typename I, size_t R>
struct msl_dextents {
  static_assert(R == 2, "the emulator's shims model rank-2 tensors only");
  using type = extents<I, dynamic_extent, dynamic_extent>;
};
template <typename I, size_t R>
using dextents = typename msl_dextents<I, R>::type;

// ---- tensor -----------------------------------------------------------------------------------------------------
struct tensor_inline {};
struct tensor_handle {};
struct tensor_offset {};

template <typename ElementType, typename Extents, typename Kind = tensor_handle>
struct tensor {
  static_assert(sizeof(Kind) == 0, "the emulator's shims model tensor_inline tensors only (no MTLTensor bindings)");
};

template <typename E, typename I, size_t E0, size_t E1>
struct tensor<E, extents<I, E0, E1>, tensor_inline> {
  using element_type = E;
  using value_type = std::remove_cv_t<E>;
  using extents_type = extents<I, E0, E1>;
  using index_type = I;
  E* data_;
  extents_type ext_;
  I stride_[2];

  MSL_INLINE tensor(E* data, extents_type ext) : data_(data), ext_(ext), stride_{I(1), ext.extent(0)} {}
  MSL_INLINE tensor(E* data, extents_type ext, array<I, 2> strides)
      : data_(data), ext_(ext), stride_{strides[0], strides[1]} {}

  static constexpr size_t get_rank() { return 2; }
  MSL_INLINE I get_extent(size_t d) const { return ext_.extent(d); }
  MSL_INLINE I get_stride(size_t d) const { return stride_[d]; }
  MSL_INLINE E* get_data_pointer() const { return data_; }
  // Element access: t[i0, i1] needs C++23's multidimensional subscript, so the shims offer t[array{i0, i1}] too.
  MSL_INLINE E& operator[](array<I, 2> i) const { return data_[(long)i[0] * stride_[0] + (long)i[1] * stride_[1]]; }

  // A view starting at (o0, o1): a dynamic extent is what remains of this tensor (0 past its end), a static one is
  // taken as given (no predication, as on the GPU: reading past the memory is an overrun).
  template <size_t S0 = dynamic_extent, size_t S1 = dynamic_extent>
  MSL_INLINE tensor<E, extents<I, S0, S1>, tensor_inline> slice(I o0, I o1) const {
    const I r0 = ext_.extent(0) > o0 ? I(ext_.extent(0) - o0) : I(0);
    const I r1 = ext_.extent(1) > o1 ? I(ext_.extent(1) - o1) : I(0);
    extents<I, S0, S1> ext(S0 == dynamic_extent ? r0 : I(S0), S1 == dynamic_extent ? r1 : I(S1));
    return tensor<E, extents<I, S0, S1>, tensor_inline>(data_ + (long)o0 * stride_[0] + (long)o1 * stride_[1], ext,
                                                        array<I, 2>{{stride_[0], stride_[1]}});
  }

  // What matmul2d and the cooperative tensors read and write: outside the extents reads 0 and writes nothing.
  MSL_INLINE bool msl_inside(int i0, int i1) const {
    return i0 >= 0 && i1 >= 0 && i0 < (int)ext_.extent(0) && i1 < (int)ext_.extent(1);
  }
  MSL_INLINE value_type msl_read(int i0, int i1) const {
    return msl_inside(i0, i1) ? value_type(MSL_TENSOR_ELEMENT(data_ + (long)i0 * stride_[0] + (long)i1 * stride_[1]))
                              : value_type(0);
  }
  template <typename T>
  MSL_INLINE void msl_write(int i0, int i1, T v) const {
    if (msl_inside(i0, i1)) MSL_TENSOR_ELEMENT(data_ + (long)i0 * stride_[0] + (long)i1 * stride_[1]) = value_type(v);
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
  static_assert(N == 1, "the emulator's shims model execution_threads<1> (execution_thread) only");
  static constexpr int simdgroups = 0;
  static constexpr int threads = 1;
};
using execution_thread = execution_threads<1>;

// ---- the opt-in cooperative-tensor layout of peer builds (MSL_NAX_FRAGMENT_LAYOUT; each shim's header says which
// matmul2d shapes take it): in each 16 x 16 block, lane l holds rows row0(l) and row0(l) + 8 and the four columns of
// its quad; slot 4 h + j of a block is (row0 + 8 h, 4 quad + j), block f in slots 8 f .. 8 f + 7.
struct msl_nax {
  MSL_INLINE static uint row0(uint l) { return (l >> 4 & 1u) << 2 | (l >> 1 & 3u); }
  MSL_INLINE static uint quad(uint l) { return (l >> 3 & 1u) << 1 | (l & 1u); }
  MSL_INLINE static uint lane(uint r0, uint q) { return (r0 >> 2) << 4 | (q >> 1) << 3 | (r0 & 3u) << 1 | (q & 1u); }
  // Slot i of lane l: row and column in the blocks' orientation.
  MSL_INLINE static int row(uint l, int i) { return (int)row0(l) + 8 * ((i >> 2) & 1); }
  MSL_INLINE static int col(uint l, int i) { return 16 * (i >> 3) + 4 * (int)quad(l) + (i & 3); }
};

// A matmul2d input cooperative tensor in that layout: Blocks 16 x 16 blocks of T.
template <typename T, int Blocks>
struct msl_nax_operand {
  static constexpr int capacity = 8 * Blocks;
  T v[capacity];
  MSL_INLINE static constexpr uint16_t get_capacity() { return capacity; }
  MSL_INLINE thread T& operator[](uint16_t i) { return v[i]; }
  MSL_INLINE const thread T& operator[](uint16_t i) const { return v[i]; }
};

}  // namespace metal

// ---- MetalPerformancePrimitives: the matmul2d descriptor ----------------------------------------------------------
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

// relaxed_precision lets the GPU multiply float operands at lower precision; the shims take the loosest they assume
// (10 explicit mantissa bits, rounded to nearest even), so a kernel that needs fp32 products finds out.
MSL_INLINE float msl_relaxed(float x) {
  uint32_t u = __builtin_bit_cast(uint32_t, x);
  if ((u & 0x7f800000u) == 0x7f800000u) return x;
  u = (u + 0xfffu + ((u >> 13) & 1u)) & ~0x1fffu;
  return __builtin_bit_cast(float, u);
}

// ---- row reductions of a destination cooperative tensor (reduce_rows) ---------------------------------------------
// Apple's MPPTensorOpsMatMul2d.h: the operation, and each one's identity (the value reduce_rows starts from by default:
// sum, or the one passed).
enum class reduction_operation { sum, max, min };

template <typename T>
struct reduction_operation_identity {
  static constexpr T sum_identity = T(0);
  static constexpr T max_identity = metal::numeric_limits<T>::lowest();
  static constexpr T min_identity = metal::numeric_limits<T>::max();
};

// One step of a reduction, in fp32 (max / min return one of their operands).
MSL_INLINE float msl_reduce(reduction_operation op, float acc, float x) {
  return op == reduction_operation::sum   ? acc + x
         : op == reduction_operation::max ? (x > acc ? x : acc)
                                          : (x < acc ? x : acc);
}

}  // namespace tensor_ops
}  // namespace mpp
