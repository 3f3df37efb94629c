// Kernels with one planted bug each (and a correct twin where useful): the emulator must report every bug, with
// the .metal line. tests/msl_cpu/test_bug_detection.py relies on the line numbers marked BUG.
#include <MetalPerformancePrimitives/MetalPerformancePrimitives.h>

#include <metal_stdlib>
#include <metal_tensor>
using namespace metal;

kernel void missing_barrier(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                            uint tid [[thread_index_in_threadgroup]], uint n [[threads_per_threadgroup]]) {
  threadgroup float tile[256];
  tile[tid] = in[tid];
  out[tid] = tile[n - 1 - tid];  // BUG: missing_barrier
}

kernel void barrier_ok(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                       uint tid [[thread_index_in_threadgroup]], uint n [[threads_per_threadgroup]]) {
  threadgroup float tile[256];
  tile[tid] = in[tid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = tile[n - 1 - tid];
}

// A barrier without mem_threadgroup does not order threadgroup memory.
kernel void barrier_without_memory_flag(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                                        uint tid [[thread_index_in_threadgroup]], uint n [[threads_per_threadgroup]]) {
  threadgroup float tile[256];
  tile[tid] = in[tid];
  threadgroup_barrier(mem_flags::mem_none);
  out[tid] = tile[n - 1 - tid];  // BUG: barrier_without_memory_flag
}

// Write-after-read: the tile is overwritten while other threads may still read it.
kernel void missing_second_barrier(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                                   uint tid [[thread_index_in_threadgroup]], uint n [[threads_per_threadgroup]]) {
  threadgroup float tile[256];
  float acc = 0.0f;
  for (uint step = 0; step < 2; ++step) {
    tile[tid] = in[step * n + tid];  // BUG: missing_second_barrier
    threadgroup_barrier(mem_flags::mem_threadgroup);
    acc += tile[(tid + 1) % n];
  }
  out[tid] = acc;
}

kernel void simd_lanes_race(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                            uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float buf[32];
  buf[lane] = in[lane];
  out[lane] = buf[lane ^ 1];  // BUG: simd_lanes_race
}

kernel void uninitialised_read(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float tile[64];
  if (tid < 32) tile[tid] = 1.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = tile[63 - tid];  // BUG: uninitialised_read
}

kernel void overrun_read(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                         uint gid [[thread_position_in_grid]]) {
  out[gid] = in[gid + 1];  // BUG: overrun_read
}

kernel void overrun_write(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                          uint gid [[thread_position_in_grid]]) {
  out[gid + 3] = in[gid];  // BUG: overrun_write
}

kernel void underrun_read(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                          uint gid [[thread_position_in_grid]]) {
  out[gid] = in[int(gid) - 2];  // BUG: underrun_read
}

// An index taken from the data (like a garbage block id) that lands far outside every buffer.
kernel void wild_index(device const int* index [[buffer(0)]], device const float* in [[buffer(1)]],
                       device float* out [[buffer(2)]], uint gid [[thread_position_in_grid]]) {
  out[gid] = in[index[gid] * 1000003];  // BUG: wild_index
}

kernel void barrier_skipped(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float tile[64];
  if (tid >= 48) return;  // BUG: barrier_skipped (these threads never reach the barrier below)
  tile[tid] = 1.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = tile[tid];
}

kernel void divergent_barrier(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float tile[64];
  tile[tid] = float(tid);
  if (tid % 2 == 0) {
    threadgroup_barrier(mem_flags::mem_threadgroup);  // BUG: divergent_barrier
    out[tid] = tile[tid ^ 1];
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = tile[tid ^ 1];
  }
}

kernel void deadlock(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup atomic_int flag;
  if (tid == 0) atomic_store_explicit(&flag, 0, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    while (atomic_load_explicit(&flag, memory_order_relaxed) == 0) {  // BUG: deadlock (set after a barrier)
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 1) atomic_store_explicit(&flag, 1, memory_order_relaxed);
  out[tid] = 1.0f;
}

kernel void too_much_threadgroup_memory(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float big[6000];
  threadgroup float more[4000];  // BUG: too_much_threadgroup_memory (40 KB > 32 KB)
  big[tid] = 1.0f;
  more[tid] = 2.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = big[tid] + more[tid];
}

[[max_total_threads_per_threadgroup(64)]] kernel void limited_threads(device float* out [[buffer(0)]],
                                                                      uint tid [[thread_index_in_threadgroup]]) {
  out[tid] = 1.0f;
}

kernel void divergent_matrix(device const float* a [[buffer(0)]], device float* c [[buffer(1)]],
                             uint lane [[thread_index_in_simdgroup]]) {
  simdgroup_float8x8 m;
  if (lane < 16) simdgroup_load(m, a);  // BUG: divergent_matrix
  simdgroup_store(m, c);
}

// A thread-local array copied out element by element, which clang turns into memcpy: its stores are checked like any
// other (a memcpy slipped past the checks: no race, no overrun, and its bytes never counted as initialised).
kernel void copy_loop_ok(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                         uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float tile[64];
  float local[4];
  for (int i = 0; i < 4; ++i) local[i] = in[(tid * 4 + i) % 64];
  if (tid < 16) {
    for (int i = 0; i < 4; ++i) tile[tid * 4 + i] = local[i];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = tile[63 - tid];
}

kernel void copy_loop_overrun(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                              uint tid [[thread_index_in_threadgroup]]) {
  float local[4];
  for (int i = 0; i < 4; ++i) local[i] = in[i];
  if (tid == 0) {
    for (int i = 0; i < 4; ++i) out[62 + i] = local[i];  // BUG: copy_loop_overrun
  }
}

// ---- tensor operations (Metal 4 tensors, MetalPerformancePrimitives matmul2d) -----------------------------------
using mpp::tensor_ops::matmul2d;
using mpp::tensor_ops::matmul2d_descriptor;

// A is 40 x 16 in memory; the 64-row tile is a static-extent slice (taken as given, so it reads past the buffer)
// in the bug, a dynamic one (rows past the tensor read 0) in the twin.
template <bool StaticSlice>
kernel void tensor_slice(device const half* a [[buffer(0)]], device const half* b [[buffer(1)]],
                         device float* c [[buffer(2)]]) {
  constexpr auto desc = matmul2d_descriptor(64, 16, 16);
  matmul2d<desc, execution_simdgroup> op;
  auto ta = tensor(a, dextents<int, 2>(16, 40));
  auto tb = tensor(b, dextents<int, 2>(16, 16));
  auto tile = ta.slice<16, StaticSlice ? 64 : dynamic_extent>(0, 0);
  auto acc = op.get_destination_cooperative_tensor<decltype(tile), decltype(tb), float>();
  op.run(tile, tb, acc);  // BUG: tensor_slice_overrun
  acc.store(tensor(c, dextents<int, 2>(16, 64)));
}
template [[host_name("tensor_slice_overrun")]] [[kernel]] decltype(tensor_slice<true>) tensor_slice<true>;
template [[host_name("tensor_slice_ok")]] [[kernel]] decltype(tensor_slice<false>) tensor_slice<false>;

// Operands staged in threadgroup memory and read by run() with no barrier in between.
kernel void tensor_missing_barrier(device const half* a [[buffer(0)]], device const half* b [[buffer(1)]],
                                   device float* c [[buffer(2)]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup half sa[32 * 16];
  threadgroup half sb[16 * 16];
  for (uint i = tid; i < 32 * 16; i += 64) sa[i] = a[i];
  for (uint i = tid; i < 16 * 16; i += 64) sb[i] = b[i];
  constexpr auto desc = matmul2d_descriptor(32, 16, 16);
  matmul2d<desc, execution_simdgroups<2>> op;
  auto ta = tensor(sa, dextents<int, 2>(16, 32));
  auto tb = tensor(sb, dextents<int, 2>(16, 16));
  op.run(ta, tb, tensor(c, dextents<int, 2>(16, 32)));  // BUG: tensor_missing_barrier
}

// Slot i of lane l taken as row-major element l * capacity + i: the layout is the implementation's (and the
// shim's), not the kernel's to assume.
kernel void tensor_assumed_layout(device const half* a [[buffer(0)]], device const half* b [[buffer(1)]],
                                  device float* c [[buffer(2)]], uint lane [[thread_index_in_simdgroup]]) {
  constexpr auto desc = matmul2d_descriptor(32, 16, 16);
  matmul2d<desc, execution_simdgroup> op;
  auto ta = tensor(a, dextents<int, 2>(16, 32));
  auto tb = tensor(b, dextents<int, 2>(16, 16));
  auto acc = op.get_destination_cooperative_tensor<decltype(ta), decltype(tb), float>();
  op.run(ta, tb, acc);
  for (uint16_t i = 0; i < acc.get_capacity(); ++i) c[lane * acc.get_capacity() + i] = acc[i];  // BUG: assumed_layout
}

// run() called by half of the simdgroup.
kernel void tensor_divergent_run(device const half* a [[buffer(0)]], device const half* b [[buffer(1)]],
                                 device float* c [[buffer(2)]], uint lane [[thread_index_in_simdgroup]]) {
  constexpr auto desc = matmul2d_descriptor(32, 16, 16);
  matmul2d<desc, execution_simdgroup> op;
  auto ta = tensor(a, dextents<int, 2>(16, 32));
  auto tb = tensor(b, dextents<int, 2>(16, 16));
  auto acc = op.get_destination_cooperative_tensor<decltype(ta), decltype(tb), float>();
  if (lane < 16) op.run(ta, tb, acc);  // BUG: tensor_divergent_run
  acc.store(tensor(c, dextents<int, 2>(16, 32)));
}

// run() skipped by one of the scope's two simdgroups.
kernel void tensor_simdgroup_skips_run(device const half* a [[buffer(0)]], device const half* b [[buffer(1)]],
                                       device float* c [[buffer(2)]], uint sgid [[simdgroup_index_in_threadgroup]]) {
  constexpr auto desc = matmul2d_descriptor(32, 16, 16);
  matmul2d<desc, execution_simdgroups<2>> op;
  auto ta = tensor(a, dextents<int, 2>(16, 32));
  auto tb = tensor(b, dextents<int, 2>(16, 16));
  auto acc = op.get_destination_cooperative_tensor<decltype(ta), decltype(tb), float>();
  if (sgid == 0) op.run(ta, tb, acc);  // BUG: tensor_simdgroup_skips_run
  acc.store(tensor(c, dextents<int, 2>(16, 32)));
}

// S (16 x 16) = A B minus each row's max, the max taken from slot 0 of the row reduction as if that slot held the
// thread's own row (it holds whichever row the implementation put there): wrong for most elements.
kernel void tensor_row_owner_assumed(device const half* a [[buffer(0)]], device const half* b [[buffer(1)]],
                                     device float* c [[buffer(2)]]) {
  constexpr auto desc = matmul2d_descriptor(16, 16, 16);
  matmul2d<desc, execution_simdgroup> op;
  auto ta = tensor(a, dextents<int, 2>(16, 16));
  auto tb = tensor(b, dextents<int, 2>(16, 16));
  auto s = op.get_destination_cooperative_tensor<decltype(ta), decltype(tb), float>();
  op.run(ta, tb, s);
  auto mx = op.get_row_reduction_destination_cooperative_tensor<decltype(ta), decltype(tb), float>();
  mpp::tensor_ops::reduce_rows(s, mx, mpp::tensor_ops::reduction_operation::max, -1.0e30f);
  for (uint16_t i = 0; i < s.get_capacity(); ++i) {
    if (s.is_valid_element(i)) {
      const auto idx = s.get_multidimensional_index(i);
      c[idx[1] * 16 + idx[0]] = s[i] - mx[0];  // BUG: tensor_row_owner_assumed
    }
  }
}

// The same through map_iterator, but from a destination of another operation (16 x 32) without asking
// is_iterator_compatible: where the row reduction's layout does not cover that destination's rows, an error.
kernel void tensor_unchecked_map(device const half* a [[buffer(0)]], device const half* b [[buffer(1)]],
                                 device float* c [[buffer(2)]]) {
  constexpr auto desc = matmul2d_descriptor(16, 16, 16);
  constexpr auto wide_desc = matmul2d_descriptor(16, 32, 16);
  matmul2d<desc, execution_simdgroup> op;
  matmul2d<wide_desc, execution_simdgroup> wide;
  auto ta = tensor(a, dextents<int, 2>(16, 16));
  auto tb = tensor(b, dextents<int, 2>(16, 16));
  auto tw = tensor(b, dextents<int, 2>(32, 16));
  auto s = op.get_destination_cooperative_tensor<decltype(ta), decltype(tb), float>();
  op.run(ta, tb, s);
  auto mx = op.get_row_reduction_destination_cooperative_tensor<decltype(ta), decltype(tb), float>();
  mpp::tensor_ops::reduce_rows(s, mx, mpp::tensor_ops::reduction_operation::max, -1.0e30f);
  auto o = wide.get_destination_cooperative_tensor<decltype(ta), decltype(tw), float>();
  wide.run(ta, tw, o);
  for (uint16_t i = 0; i < o.get_capacity(); ++i) {
    if (o.is_valid_element(i)) {
      const auto idx = o.get_multidimensional_index(i);
      c[idx[1] * 32 + idx[0]] = o[i] - *mx.map_iterator(o.get_iterator(i));  // BUG: tensor_unchecked_map
    }
  }
}

// A destination converted into the left input of the next operation without asking is_compatible_as_left_input:
// where the implementation cannot convert it, an error.
kernel void tensor_unchecked_left_input(device const half* a [[buffer(0)]], device const half* b [[buffer(1)]],
                                        device float* c [[buffer(2)]]) {
  constexpr auto desc = matmul2d_descriptor(16, 16, 16);
  constexpr auto next_desc = matmul2d_descriptor(16, 16, 16, false, false, true);
  matmul2d<desc, execution_simdgroup> op;
  matmul2d<next_desc, execution_simdgroup> next;
  auto ta = tensor(a, dextents<int, 2>(16, 16));
  auto tb = tensor(b, dextents<int, 2>(16, 16));
  auto s = op.get_destination_cooperative_tensor<decltype(ta), decltype(tb), float>();
  op.run(ta, tb, s);
  auto p = next.get_left_input_cooperative_tensor<float, half, float>(s);  // BUG: tensor_unchecked_left_input
  auto o = next.get_destination_cooperative_tensor<decltype(ta), decltype(tb), float>();
  next.run(p, tb, o);
  o.store(tensor(c, dextents<int, 2>(16, 16)));
}

// A fast-math sum over a row of 16 halves, one row past the end: the vectorizers make it one 32-byte load, too wide
// for the hooks (a known gap, test_row_sum_overrun is xfail).
kernel void overrun_row_sum(device const half* a [[buffer(0)]], device float* out [[buffer(1)]],
                            uint tid [[thread_position_in_grid]]) {
  float s = 0.0f;
  for (int k = 0; k < 16; ++k) s += float(a[tid * 16 + k]);  // BUG: overrun_row_sum
  out[tid] = s;
}

// A vector read through a pointer cast at an element offset that is not a multiple of 4: the alignment of half4
// (8 bytes) does not hold for odd `offset`.
kernel void misaligned_vector_read(device const half* in [[buffer(0)]], device half* out [[buffer(1)]],
                                   constant int& offset [[buffer(2)]], uint tid [[thread_position_in_grid]]) {
  const half4 x = *reinterpret_cast<device const half4*>(in + offset + 4 * tid);  // BUG: misaligned_vector_read
  out[tid] = x.x + x.y + x.z + x.w;
}
