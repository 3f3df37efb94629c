// Metal 4 tensors and MetalPerformancePrimitives' matmul2d on the emulator: tests/msl_cpu/test_tensor_ops.py checks
// each kernel against a float64 torch matmul. One threadgroup of Simdgroups * 32 threads computes C (M x N) =
// A (M x K) * B (K x N) (+ C), with A stored K x M when TransposeLeft and B stored N x K when TransposeRight.
#include <MetalPerformancePrimitives/MetalPerformancePrimitives.h>

#include <metal_stdlib>
#include <metal_tensor>
using namespace metal;
using namespace mpp::tensor_ops;

// Operands read from device memory; the result kept in the destination cooperative tensor, stored twice: with
// store() into c, and element by element through begin() / end() into c_iter.
template <typename TA, typename TB, typename TC, int M, int N, int K, bool TransposeLeft, bool TransposeRight,
          int Simdgroups, bool Accumulate>
kernel void matmul_device(device TA* a [[buffer(0)]], device TB* b [[buffer(1)]], device TC* c [[buffer(2)]],
                          device TC* c_iter [[buffer(3)]]) {
  constexpr auto desc = matmul2d_descriptor(
      M, N, K, TransposeLeft, TransposeRight, false,
      Accumulate ? matmul2d_descriptor::mode::multiply_accumulate : matmul2d_descriptor::mode::multiply);
  matmul2d<desc, execution_simdgroups<Simdgroups>> op;
  // Dimension 0 is the innermost: a row-major R x C matrix has extents (C, R).
  auto ta = tensor(a, dextents<int, 2>(TransposeLeft ? M : K, TransposeLeft ? K : M));
  auto tb = tensor(b, dextents<int, 2>(TransposeRight ? K : N, TransposeRight ? N : K));
  auto tc = tensor(c, dextents<int, 2>(N, M));
  auto acc = op.template get_destination_cooperative_tensor<decltype(ta), decltype(tb), TC>();
  if (Accumulate) {
    acc.load(tc);
  }
  op.run(ta, tb, acc);
  acc.store(tc);
  for (auto it = acc.begin(); it != acc.end(); ++it) {
    const auto idx = it.get_multidimensional_index();
    c_iter[idx[1] * N + idx[0]] = *it;
  }
}

// Operands staged in threadgroup memory (row-major, padded rows), the result run straight into a device tensor with
// explicit strides, and a column slice of B.
template <typename T, typename TC, int M, int N, int K, int Simdgroups>
kernel void matmul_threadgroup(device const T* a [[buffer(0)]], device const T* b [[buffer(1)]],
                               device TC* c [[buffer(2)]], uint tid [[thread_index_in_threadgroup]]) {
  constexpr int kLda = K + 4, kLdb = 2 * N + 4, kThreads = Simdgroups * 32;
  threadgroup T sa[M * kLda];
  threadgroup T sb[K * kLdb];
  for (int i = tid; i < M * K; i += kThreads) sa[i / K * kLda + i % K] = a[i];
  // B is K x 2N in memory; the kernel multiplies by its right half.
  for (int i = tid; i < K * 2 * N; i += kThreads) sb[i / (2 * N) * kLdb + i % (2 * N)] = b[i];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  constexpr auto desc = matmul2d_descriptor(M, N, K);
  matmul2d<desc, execution_simdgroups<Simdgroups>> op;
  auto ta = tensor(sa, dextents<int, 2>(K, M), array<int, 2>{1, kLda});
  auto tb = tensor(sb, dextents<int, 2>(2 * N, K), array<int, 2>{1, kLdb}).slice(N, 0);
  auto tc = tensor(c, dextents<int, 2>(N, M), array<int, 2>{1, N});
  op.run(ta, tb, tc);
}

// The destination through get_capacity / is_valid_element / get_multidimensional_index, scaled on the way out, for a
// ragged M (the tensors' extents are smaller than the descriptor's tile: rows past them read 0 and are not written).
template <typename T, int M, int N, int K>
kernel void matmul_ragged(device const T* a [[buffer(0)]], device const T* b [[buffer(1)]],
                          device float* c [[buffer(2)]], constant int& rows [[buffer(3)]]) {
  constexpr auto desc = matmul2d_descriptor(M, N, static_cast<int>(dynamic_extent), false, true);
  matmul2d<desc, execution_simdgroup> op;
  auto ta = tensor(a, dextents<int, 2>(K, rows));
  auto tb = tensor(b, dextents<int, 2>(K, N));
  auto acc = op.template get_destination_cooperative_tensor<decltype(ta), decltype(tb), float>();
  op.run(ta, tb, acc);
  for (uint16_t i = 0; i < acc.get_capacity(); ++i) {
    if (!acc.is_valid_element(i)) continue;
    const auto idx = acc.get_multidimensional_index(i);
    if (idx[1] < rows) c[idx[1] * N + idx[0]] = 2.0f * acc[i];
  }
}

#define DEVICE_CASE(name, TA, TB, TC, M, N, K, TL, TR, SG, ACC)                                         \
  template [[host_name(name)]] [[kernel]] decltype(matmul_device<TA, TB, TC, M, N, K, TL, TR, SG, ACC>) \
      matmul_device<TA, TB, TC, M, N, K, TL, TR, SG, ACC>;
// clang-format off
DEVICE_CASE("device_half_float_64x32x16", half, half, float, 64, 32, 16, false, false, 4, false)
DEVICE_CASE("device_half_half_64x32x16", half, half, half, 64, 32, 16, false, false, 4, false)
DEVICE_CASE("device_bfloat_float_64x32x16", bfloat, bfloat, float, 64, 32, 16, false, false, 4, false)
DEVICE_CASE("device_float_float_64x32x16", float, float, float, 64, 32, 16, false, false, 4, false)
DEVICE_CASE("device_half_float_16x32x64_tl", half, half, float, 16, 32, 64, true, false, 1, false)
DEVICE_CASE("device_bfloat_float_32x16x64_tr", bfloat, bfloat, float, 32, 16, 64, false, true, 2, false)
DEVICE_CASE("device_float_float_32x32x8_tltr", float, float, float, 32, 32, 8, true, true, 2, false)
DEVICE_CASE("device_half_float_64x32x16_acc", half, half, float, 64, 32, 16, false, false, 4, true)
DEVICE_CASE("device_bfloat_half_24x40x8_acc", bfloat, bfloat, half, 24, 40, 8, false, true, 1, true)
// clang-format on
template
    [[host_name("threadgroup_half_float_32x16x32")]] [[kernel]] decltype(matmul_threadgroup<half, float, 32, 16, 32, 2>)
        matmul_threadgroup<half, float, 32, 16, 32, 2>;
template [[host_name(
    "threadgroup_bfloat_half_16x64x16")]] [[kernel]] decltype(matmul_threadgroup<bfloat, half, 16, 64, 16, 4>)
    matmul_threadgroup<bfloat, half, 16, 64, 16, 4>;
template [[host_name(
    "ragged_half_32x16x48")]] [[kernel]] decltype(matmul_ragged<half, 32, 16, 48>) matmul_ragged<half, 32, 16, 48>;

// Which element each slot of each thread holds (row-major number, -1 for an invalid slot): the shim's own layout.
kernel void coop_layout(device int* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  constexpr auto desc = matmul2d_descriptor(24, 40, 8);
  matmul2d<desc, execution_simdgroups<4>> op;
  using A = tensor<device half, dextents<int, 2>, tensor_inline>;
  auto acc = op.get_destination_cooperative_tensor<A, A, float>();
  for (uint16_t i = 0; i < acc.get_capacity(); ++i) {
    const auto idx = acc.get_multidimensional_index(i);
    out[tid * acc.get_capacity() + i] = acc.is_valid_element(i) ? idx[1] * 40 + idx[0] : -1;
  }
}

// execution_thread: each thread multiplies its own 8 x 8 pair, static extents.
kernel void matmul_per_thread(device const float* a [[buffer(0)]], device const float* b [[buffer(1)]],
                              device float* c [[buffer(2)]], uint tid [[thread_index_in_threadgroup]]) {
  constexpr auto desc = matmul2d_descriptor(8, 8, 8);
  matmul2d<desc, execution_thread> op;
  tensor<device const float, extents<int, 8, 8>, tensor_inline> ta(a + tid * 64, extents<int, 8, 8>());
  tensor<device const float, extents<int, 8, 8>, tensor_inline> tb(b + tid * 64, extents<int, 8, 8>());
  auto acc = op.get_destination_cooperative_tensor<decltype(ta), decltype(tb), float>();
  op.run(ta, tb, acc);
  acc.store(tensor(c + tid * 64, extents<int, 8, 8>()));
}

// relaxed_precision with float operands: the shim multiplies them at 10 mantissa bits.
kernel void matmul_relaxed(device const float* a [[buffer(0)]], device const float* b [[buffer(1)]],
                           device float* c [[buffer(2)]]) {
  constexpr auto desc = matmul2d_descriptor(32, 32, 64, false, false, true);
  matmul2d<desc, execution_simdgroup> op;
  auto ta = tensor(a, dextents<int, 2>(64, 32));
  auto tb = tensor(b, dextents<int, 2>(32, 64));
  op.run(ta, tb, tensor(c, dextents<int, 2>(32, 32)));
}

// ---- row reductions and input cooperative tensors (one simdgroup per operation) ----------------------------------
// S (16 x 32) = A (16 x 16) B (16 x 32), A and B half, S float. Row reductions of S (max, min, sum from identities)
// written per row by every slot that holds one (the same value: the test reads each row's), the layout of the row
// reduction (row of each slot, -1 invalid: rows[lane * 16 + slot]) and the API's answers (flags[lane]: bit 0
// is_iterator_compatible(S, max), bit 1 with a destination of another operation of 16 rows).
kernel void row_reductions(device const half* a [[buffer(0)]], device const half* b [[buffer(1)]],
                           device float* out [[buffer(2)]], device int* rows [[buffer(3)]],
                           device int* flags [[buffer(4)]], uint lane [[thread_index_in_simdgroup]]) {
  constexpr auto desc = matmul2d_descriptor(16, 32, 16);
  matmul2d<desc, execution_simdgroup> op;
  auto ta = tensor(a, dextents<int, 2>(16, 16));
  auto tb = tensor(b, dextents<int, 2>(32, 16));
  auto s = op.get_destination_cooperative_tensor<decltype(ta), decltype(tb), float>();
  op.run(ta, tb, s);
  auto mx = op.get_row_reduction_destination_cooperative_tensor<decltype(ta), decltype(tb), float>();
  auto mn = op.get_row_reduction_destination_cooperative_tensor<decltype(ta), decltype(tb), float>();
  auto sum = op.get_row_reduction_destination_cooperative_tensor<decltype(ta), decltype(tb), float>();
  reduce_rows(s, mx, reduction_operation::max, reduction_operation_identity<float>::max_identity);
  reduce_rows(s, mn, reduction_operation::min, reduction_operation_identity<float>::min_identity);
  reduce_rows(s, sum, reduction_operation::sum, 100.0f);  // from 100, not 0: the identity is where a reduction starts
  for (uint16_t i = 0; i < mx.get_capacity(); ++i) {
    const int r = mx.is_valid_element(i) ? mx.get_multidimensional_index(i)[0] : -1;
    rows[lane * mx.get_capacity() + i] = r;
    if (r >= 0) {
      out[r] = mx[i];
      out[16 + r] = mn[i];
      out[32 + r] = sum[i];
    }
  }
  constexpr auto other_desc = matmul2d_descriptor(16, 48, 16);
  matmul2d<other_desc, execution_simdgroup> other;
  auto tb48 = tensor(b, dextents<int, 2>(48, 16));
  auto o = other.get_destination_cooperative_tensor<decltype(ta), decltype(tb48), float>();
  flags[lane] = (is_iterator_compatible(s, mx) ? 1 : 0) | (is_iterator_compatible(o, mx) ? 2 : 0);
}

// Softmax of S = A B^T (16 x 32, A 16 x 64, B 32 x 64), then O = P V (16 x 24, V 32 x 24), all without threadgroup
// memory where the API allows: each row's max reaches its elements through map_iterator when is_iterator_compatible
// says so (else through threadgroup memory, indexed by the reductions' rows), P becomes the left input of the second
// operation when is_compatible_as_left_input says so (else it goes through threadgroup memory). out: O / row sum;
// path[lane]: bit 0 the mapped path, bit 1 the converted left input.
template <typename T>
kernel void softmax_pv(device const T* a [[buffer(0)]], device const T* b [[buffer(1)]],
                       device const T* v [[buffer(2)]], device float* out [[buffer(3)]], device int* path [[buffer(4)]],
                       uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float stage[16];  // a row's value, for the unmapped path (every holder writes it, atomically)
  threadgroup float p_tile[16 * 32];
  constexpr auto qk = matmul2d_descriptor(16, 32, 64, false, true);
  constexpr auto pv = matmul2d_descriptor(16, 24, 32, false, false, true);  // relaxed: P is float, V is T
  matmul2d<qk, execution_simdgroup> qk_op;
  matmul2d<pv, execution_simdgroup> pv_op;
  auto ta = tensor(a, dextents<int, 2>(64, 16));
  auto tb = tensor(b, dextents<int, 2>(64, 32));
  auto tv = tensor(v, dextents<int, 2>(24, 32));
  auto s = qk_op.template get_destination_cooperative_tensor<decltype(ta), decltype(tb), float>();
  qk_op.run(ta, tb, s);
  auto mx = qk_op.template get_row_reduction_destination_cooperative_tensor<decltype(ta), decltype(tb), float>();
  auto sum = qk_op.template get_row_reduction_destination_cooperative_tensor<decltype(ta), decltype(tb), float>();
  reduce_rows(s, mx, reduction_operation::max, reduction_operation_identity<float>::max_identity);
  const bool mapped = simd_all(is_iterator_compatible(s, mx));
  if (!mapped) {
    for (uint16_t i = 0; i < mx.get_capacity(); ++i) {
      if (mx.is_valid_element(i)) {
        atomic_store_explicit(reinterpret_cast<threadgroup atomic_float*>(&stage[mx.get_multidimensional_index(i)[0]]),
                              mx[i], memory_order_relaxed);
      }
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (uint16_t i = 0; i < s.get_capacity(); ++i) {
    if (!s.is_valid_element(i)) continue;
    const float m = mapped
                        ? *mx.map_iterator(s.get_iterator(i))
                        : atomic_load_explicit(
                              reinterpret_cast<threadgroup atomic_float*>(&stage[s.get_multidimensional_index(i)[1]]),
                              memory_order_relaxed);
    s[i] = exp(s[i] - m);
  }
  reduce_rows(s, sum, reduction_operation::sum, 0.0f);
  auto o = pv_op.template get_destination_cooperative_tensor<decltype(ta), decltype(tv), float>();
  for (uint16_t i = 0; i < o.get_capacity(); ++i) o[i] = 0.0f;
  const bool converted = pv_op.template is_compatible_as_left_input<float, T, float>(s);
  if (converted) {
    auto p = pv_op.template get_left_input_cooperative_tensor<float, T, float>(s);
    pv_op.run(p, tv, o);
  } else {
    auto tp = tensor(p_tile, extents<int, 32, 16>());
    s.store(tp);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    pv_op.run(tp, tv, o);
  }
  // O / the row sums, row by row through threadgroup memory (whatever the layouts).
  simdgroup_barrier(mem_flags::mem_threadgroup);
  for (uint16_t i = 0; i < sum.get_capacity(); ++i) {
    if (sum.is_valid_element(i)) {
      atomic_store_explicit(reinterpret_cast<threadgroup atomic_float*>(&stage[sum.get_multidimensional_index(i)[0]]),
                            sum[i], memory_order_relaxed);
    }
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);
  for (uint16_t i = 0; i < o.get_capacity(); ++i) {
    if (!o.is_valid_element(i)) continue;
    const auto idx = o.get_multidimensional_index(i);
    out[idx[1] * 24 + idx[0]] =
        o[i] / atomic_load_explicit(reinterpret_cast<threadgroup atomic_float*>(&stage[idx[1]]), memory_order_relaxed);
  }
  path[lane] = (mapped ? 1 : 0) | (converted ? 2 : 0);
}
template [[host_name("softmax_pv_half")]] [[kernel]] decltype(softmax_pv<half>) softmax_pv<half>;
template [[host_name("softmax_pv_bfloat")]] [[kernel]] decltype(softmax_pv<bfloat>) softmax_pv<bfloat>;
