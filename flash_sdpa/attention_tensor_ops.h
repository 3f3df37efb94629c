// Varlen / dense flash-attention forward on Metal 4 tensor operations (MetalPerformancePrimitives matmul2d): the path
// Apple's M5 GPUs (family 10) need, since their neural accelerators are reached only through tensor ops. The kernel
// bodies; tensor_ops_library.h instantiates them (a library the Mac glue compiles at run time) and the varlen planner
// plans for them where the package turned the path on (routing.h, tensor_ops_enabled).
//
// Contract: the varlen kernel's (attention_varlen.h). The same buffers (FLASH_SDPA_VARLEN_BUFFER_*), VarlenParams,
// function constants and grid order (H, B, query tiles, row_tile_slot with tile_offset / tile_stride); out and LSE
// mean the same: a row with no visible key is written as 0 with LSE = -inf; a visible score that is NaN or inf makes
// its row NaN; a non-finite V element makes NaN exactly the output elements of the rows that see it (staged as 0, a
// poison bit per (row, column)). Varlen, dense and paged K/V (fc_varlen_paged), causal and windows (bottom-right
// aligned), softcap, ALiBi, sinks, GQA, any strides. Which thread holds which element of a cooperative tensor is
// Apple's (it changes between GPU generations): the kernels reach elements only through the API.
//
// flash_attn_varlen_tops (routed; 64-row query tiles, kTopsBlockQ): simdgroup s owns rows [16 s, 16 s + 16) of the
// tile through its own execution_simdgroup operations (Apple's row reductions and left input cooperative tensors
// exist for one simdgroup only): S = Q K^T (16 x BK) into a float destination cooperative tensor, masked and scaled in
// place (interior key tiles, where every row of the simdgroup sees every key, without index arithmetic), its row max
// and sum by reduce_rows into row-reduction cooperative tensors (the running max and sum live in two more), P = exp2(S
// - m) in place with each element's row max through map_iterator, O (16 x D, float) rescaled in registers the same
// way, then O += P V with S's registers as the left input (get_left_input_cooperative_tensor). S and P never touch
// threadgroup memory; K and V do (side by side, staged once for the 4 simdgroups: a quarter of the device reads of
// per-simdgroup loads, and Metal 4 has no asynchronous copy to hide them), and Q does where it fits (read once per
// query tile). Two threadgroup barriers per key tile (paged: 3), against 4 (5) for the 32-row kernel. Where the API
// answers no (is_iterator_compatible, is_compatible_as_left_input: run-time queries in Apple's header), per-row values
// go through 16 threadgroup words per simdgroup and P through a float tile. Why 64 rows: K/V staged once serve 64
// query rows instead of 32 (half the staging loads and barriers per row), 16-row operations are the smallest MLX's NAX
// kernel (Apple's, for these GPUs) uses, and Q (64 x D) still fits 32 KB beside the key tiles up to D = 128 (half /
// bfloat) and D = 64 (float); beyond, each simdgroup's operation reads its Q rows from device memory (tops_q_staged).
//
// flash_attn_varlen_tops32 (kept to compare; the varlen plan's 32-row tiles and grid): one execution_simdgroups<4>
// scope for both products; S stored to threadgroup memory, the varlen kernel's softmax step there (4 lanes per row),
// P written back in the input's type, O rescaled element by element; 4 threadgroup barriers per key tile (paged: 5).
#pragma once

#include <MetalPerformancePrimitives/MetalPerformancePrimitives.h>

#include <metal_stdlib>
#include <metal_tensor>

#include "attention_varlen.h"  // the varlen kernel's sequence, head, staging, softmax-step and row-end helpers

namespace flash_sdpa {

// ---- flash_attn_varlen_tops32: 32-row query tiles, S and P through threadgroup memory ------------------------------

// Tile shape. The query tile is the varlen plan's (kVarlenBlockQ = 32 rows), so the grid is the same; 4 simdgroups of
// 32 threads give 4 lanes per query row for the softmax. Metal 4 has no asynchronous copy into threadgroup memory (the
// SIMD-group async copy is gone), so the threads stage every K/V tile with loads and stores between barriers; Q stays
// in threadgroup memory for the whole key loop (read once from device per query tile). What has to fit Apple's 32 KB
// of threadgroup memory: Q and the K/V tiles (the input's type), S (float), P (the input's type), three words per row,
// the poison bits and the paged key offsets. K and V side by side (kv_tiles = 2) are staged together, so their loads
// are in flight at once; where that leaves fewer than 16 keys, one tile holds K, then V (kv_tiles = 1), V staged
// while the softmax runs (after S is stored, so no extra barrier: 4 per key tile either way). Keys per tile: 32 where
// they fit, else 16 (shapes stay multiples of 16). half / bfloat: side by side, 32 keys at D <= 128 (31.4 KB at
// 128), one 16-key tile at 256; float: side by side, 32 keys at D = 32, 16 at 64 and 96, one 16-key tile at 128.
constexpr int tops32_threadgroup_bytes(int head_dim, int block_k, int elem_bytes, int kv_tiles) {
  return (kVarlenBlockQ + kv_tiles * block_k) * head_dim * elem_bytes +  // Q, K / V tiles
         kVarlenBlockQ * block_k * (4 + elem_bytes) +                    // S (float), P
         4 * (3 * kVarlenBlockQ + kVarlenBlockQ * varlen_poison_words(head_dim) + 2 * kVarlenSimdgroups) +
         16 * block_k;  // alpha, scale, bad flag per row; poison bits; simdgroup flags; paged key offsets
}

constexpr bool tops32_fits(int head_dim, int block_k, int elem_bytes, int kv_tiles) {
  return tops32_threadgroup_bytes(head_dim, block_k, elem_bytes, kv_tiles) <= kVarlenMaxThreadgroupBytes;
}

constexpr int tops32_kv_tiles(int head_dim, int elem_bytes) { return tops32_fits(head_dim, 16, elem_bytes, 2) ? 2 : 1; }

constexpr int tops32_block_k(int head_dim, int elem_bytes) {
  return tops32_fits(head_dim, 32, elem_bytes, tops32_kv_tiles(head_dim, elem_bytes)) ? 32 : 16;
}

// Head dims: multiples of 16 (Apple documents no shape granularity for matmul2d, so every product shape here is a
// multiple of 16) whose tiles fit 32 KB: 32 to 256 in half / bfloat, 32 to 128 in float (float Q
// alone is 32 KB at 256).
constexpr bool tops32_supports(int head_dim, int elem_bytes) {
  return head_dim % 16 == 0 && head_dim >= 32 && head_dim <= 256 &&
         tops32_fits(head_dim, tops32_block_k(head_dim, elem_bytes), elem_bytes, tops32_kv_tiles(head_dim, elem_bytes));
}

}  // namespace flash_sdpa

template <typename T, int D>
[[max_total_threads_per_threadgroup(FLASH_SDPA_VARLEN_THREADS)]] kernel void flash_attn_varlen_tops32(
    FLASH_SDPA_VARLEN_KERNEL_BUFFERS, uint3 tg_pos [[threadgroup_position_in_grid]],
    uint3 tg_count [[threadgroups_per_grid]], uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
  using namespace mpp::tensor_ops;
  constexpr int NSG = flash_sdpa::kVarlenSimdgroups;
  constexpr int BQ = flash_sdpa::kVarlenBlockQ;
  constexpr int BK = flash_sdpa::tops32_block_k(D, sizeof(T));
  constexpr int NT = flash_sdpa::kVarlenThreads;
  constexpr int W = flash_sdpa::varlen_poison_words(D);
  constexpr bool SHARED_KV = flash_sdpa::tops32_kv_tiles(D, sizeof(T)) == 1;  // one tile: K, then V
  static_assert(flash_sdpa::tops32_supports(D, sizeof(T)), "head dim: a multiple of 16 whose tiles fit 32 KB");
  static_assert(NT == 4 * BQ && NT == 32 * NSG, "4 lanes per query row (varlen_softmax_step), one scope of 4 SGs");
  static_assert(BK % 16 == 0 && D % 16 == 0, "matmul2d shapes in multiples of 16");

  threadgroup T q_tile[BQ * D];                          // [BQ][D], rows past the sequence 0
  threadgroup T kv_tiles[(SHARED_KV ? 1 : 2) * BK * D];  // K [BK][D], then V (keys past the range 0; V: non-finite 0)
  threadgroup float s_tile[BQ * BK];                     // S = Q K^T (unscaled), row-major
  threadgroup T p_tile[BQ * BK];                         // probabilities, row-major
  threadgroup float alpha_tile[BQ];                      // row r's correction of O this key tile
  threadgroup float row_scale[BQ];                       // row r's output factor (1 / denominator, 0 for an empty row)
  threadgroup uint bad_tile[BQ];                         // row r saw a non-finite visible score
  threadgroup uint poison[BQ * W];       // (row, column) bits: the row sees a non-finite V element there
  threadgroup uint dropped_sg[NSG];      // simdgroup s staged a non-finite V element as 0
  threadgroup uint rescale_sg[NSG];      // a row of simdgroup s moved its max this key tile
  threadgroup long key_offsets[2 * BK];  // paged: offsets of key rows k0 + r in k ([r]) and v ([BK + r]); -1: masked

  threadgroup T* k_tile = kv_tiles;
  threadgroup T* v_tile = kv_tiles + (SHARED_KV ? 0 : BK * D);
  // Tensor views of the tiles (dimension 0 innermost: a row-major R x C tile has extents (C, R)).
  auto tq = tensor(q_tile, extents<int, D, BQ>());
  auto tk = tensor(k_tile, extents<int, D, BK>());
  auto tv = tensor(v_tile, extents<int, D, BK>());
  auto ts = tensor(s_tile, extents<int, BK, BQ>());
  auto tp = tensor(p_tile, extents<int, BK, BQ>());
  // S (BQ x BK) = Q K^T, K read transposed; O (BQ x D) += P V. Both over the whole threadgroup, fp32 destinations,
  // relaxed_precision off (float inputs keep fp32 products).
  constexpr auto qk_desc = matmul2d_descriptor(BQ, BK, D, false, true, false, matmul2d_descriptor::mode::multiply);
  constexpr auto pv_desc =
      matmul2d_descriptor(BQ, D, BK, false, false, false, matmul2d_descriptor::mode::multiply_accumulate);
  matmul2d<qk_desc, execution_simdgroups<NSG>> qk_op;
  matmul2d<pv_desc, execution_simdgroups<NSG>> pv_op;

  const flash_sdpa::RowTileSlot slot = flash_sdpa::row_tile_slot(tg_pos, tg_count, true, p.tile_offset, p.tile_stride);
  const int b = slot.b;
  const int h = slot.head;
  const VarlenSequence seq = varlen_sequence(b, cu_seqlens_q, cu_seqlens_k, p);
  const VarlenHead<T> head = varlen_head(q, k, v, out, lse, alibi_slopes, b, h, seq, p);
  const bool aligned_q = (p.aligned_rows & FLASH_SDPA_ALIGNED_Q) != 0;
  const bool aligned_k = (p.aligned_rows & FLASH_SDPA_ALIGNED_K) != 0;
  const bool aligned_v = (p.aligned_rows & FLASH_SDPA_ALIGNED_V) != 0;
  const int sub = int(lane) % 4;
  const int my_row = int(tid) / 4;  // the query row of the tile whose softmax this lane shares (sg * 8 + lane / 4)

  // This threadgroup's query tiles, longest first across the batch; bounds uniform over the threadgroup, so every
  // thread meets every barrier and every tensor operation.
  for (int q0 = slot.first_tile * BQ; q0 < seq.sq; q0 += slot.step * BQ) {
    const int2 tile_keys = varlen_tile_keys(q0, BQ, seq, p);  // keys any row of this tile sees
    const int kv_begin = tile_keys.x, kv_end = tile_keys.y;

    for (int idx = int(tid); idx < BQ * W; idx += NT) {
      poison[idx] = 0;
    }
    varlen_stage_q<T, BQ, D, NT>(q_tile, head.q, p.q_row_stride, q0, 0, seq.sq, aligned_q, tid);
    auto o_acc = pv_op.template get_destination_cooperative_tensor<decltype(tp), decltype(tv), float>();
    for (ushort i = 0; i < o_acc.get_capacity(); ++i) {
      o_acc[i] = 0.0f;
    }
    VarlenRow row = varlen_row(q0 + my_row, seq, head.slope, p);

    for (int k0 = kv_begin; k0 < kv_end; k0 += BK) {
      if (fc_varlen_paged) {
        varlen_paged_offsets<BK, NT>(key_offsets, block_table, b, k0, kv_end, p, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
      // K and V (side by side) or K alone; dropped_sg is read after the third barrier below.
      varlen_stage_rows<T, BK, D, NT, false>(k_tile, head.k, p.k_row_stride, key_offsets, k0, kv_end, aligned_k, tid);
      if (!SHARED_KV) {
        const bool dropped = simd_any(varlen_stage_rows<T, BK, D, NT, true>(
            v_tile, head.v, p.v_row_stride, key_offsets + BK, k0, kv_end, aligned_v, tid));
        if (lane == 0) {
          dropped_sg[sg] = dropped ? 1u : 0u;
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);

      // S = Q K^T into a cooperative tensor, stored where the softmax owns the layout. Each element is its own dot
      // product: a non-finite Q or K element reaches only its row or column of S, which the softmax flags or masks.
      auto s_acc = qk_op.template get_destination_cooperative_tensor<decltype(tq), decltype(tk), float>();
      qk_op.run(tq, tk, s_acc);
      s_acc.store(ts);
      threadgroup_barrier(mem_flags::mem_threadgroup);

      if (SHARED_KV) {  // every product has read K: V replaces it while the softmax runs
        const bool dropped = simd_any(varlen_stage_rows<T, BK, D, NT, true>(
            v_tile, head.v, p.v_row_stride, key_offsets + BK, k0, kv_end, aligned_v, tid));
        if (lane == 0) {
          dropped_sg[sg] = dropped ? 1u : 0u;
        }
      }
      const float alpha =
          varlen_softmax_step<BK>(s_tile + my_row * BK, p_tile + my_row * BK, key_offsets, row, sub, k0, p);
      const bool moved = simd_any(alpha != 1.0f);
      if (sub == 0) {
        alpha_tile[my_row] = alpha;
      }
      if (lane == 0) {
        rescale_sg[sg] = moved ? 1u : 0u;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);

      if (varlen_any_dropped(dropped_sg)) {  // uniform (any flag set); poison is read after the query tile's barriers
        varlen_poison_rows<T, BQ, BK, D, NT>(poison, head.v, p.v_row_stride, key_offsets + BK, q0, k0, kv_end, seq, p,
                                             tid);
      }
      // O = diag(alpha) O where some row moved its max (uniform), element by element through the API's indices.
      if (varlen_any_dropped(rescale_sg)) {
        for (ushort i = 0; i < o_acc.get_capacity(); ++i) {
          if (o_acc.is_valid_element(i)) {
            o_acc[i] *= alpha_tile[o_acc.get_multidimensional_index(i)[1]];
          }
        }
      }
      pv_op.run(tp, tv, o_acc);
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    varlen_finish_row(row, sub, seq.sq, fc_sinks ? sinks[h] : 0.0f, &bad_tile[my_row], &row_scale[my_row], head.lse);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // Each thread writes the O elements it holds: bad rows and poisoned (row, column) elements get NaN; rows past the
    // sequence are not written.
    for (ushort i = 0; i < o_acc.get_capacity(); ++i) {
      if (!o_acc.is_valid_element(i)) {
        continue;
      }
      const auto idx = o_acc.get_multidimensional_index(i);
      const int r = idx[1], d = idx[0];
      if (q0 + r < seq.sq) {
        const bool nan = bad_tile[r] != 0 || ((poison[r * W + d / 32] >> (d % 32)) & 1u) != 0;
        const float o = nan ? as_type<float>(flash_sdpa::kNanBits) : o_acc[i] * row_scale[r];
        head.out[long(q0 + r) * p.o_row_stride + d] = T(o);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

// ---- flash_attn_varlen_tops: 64-row query tiles, S and P in cooperative tensors ----------------------------------

// Loops over a cooperative tensor's slots unroll fully: the slots then stay in registers (Apple's MPP header: "it is
// imperative for performance to include unroll pragma so compiler fully unrolls the loop").
#define FLASH_SDPA_UNROLL _Pragma("clang loop unroll(full)")

namespace flash_sdpa {

// The Q operand of a simdgroup's 16 rows of the query tile at q0 (rows [q0 + r0, q0 + r0 + 16)): the staged tile
// (QS), or the rows in device memory, those past the sequence outside the extents (read as 0). The planner keeps q's
// row stride within int where Q is read from device memory (varlen_planner.cpp).
template <bool QS, int D, typename T>
inline auto tops_q_rows(threadgroup T* q_tile, const device T* q_seq, long row_stride, int q0, int r0, int sq) {
  if constexpr (QS) {
    return metal::tensor(q_tile + r0 * D, metal::extents<int, D, kTopsSimdgroupRows>());
  } else {
    const int rows = metal::clamp(sq - (q0 + r0), 0, kTopsSimdgroupRows);
    return metal::tensor(q_seq + long(q0 + r0) * row_stride, metal::dextents<int, 2>(D, rows),
                         metal::array<int, 2>{1, int(row_stride)});
  }
}

// A row value of a simdgroup's 16 rows (a row reduction's slots) for destination element i of the same rows: through
// map_iterator where the layouts fit (`mapped`: is_iterator_compatible for the whole simdgroup), else by row index
// from `stage`, where tops_stage_rows put it.
template <typename Dst, typename Rows>
inline float tops_row_value(thread Dst& dst, ushort i, thread Rows& rows, bool mapped,
                            threadgroup atomic_float* stage) {
  return mapped ? float(*rows.map_iterator(dst.get_iterator(i)))
                : atomic_load_explicit(&stage[dst.get_multidimensional_index(i)[1]], memory_order_relaxed);
}

// Stores each row's value into stage[row] from every thread that holds that row's reduction: the same value, hence
// atomic stores (no two plain writes race). A simdgroup barrier orders them before tops_row_value's loads.
template <typename Rows>
inline void tops_stage_rows(threadgroup atomic_float* stage, thread Rows& rows) {
  for (ushort k = 0; k < rows.get_capacity(); ++k) {
    if (rows.is_valid_element(k)) {
      atomic_store_explicit(&stage[rows.get_multidimensional_index(k)[0]], float(rows[k]), memory_order_relaxed);
    }
  }
}

// End of a row (lane r < 16 of its simdgroup): the LSE (natural log; -inf for a row with no visible key, NaN for a bad
// row) written where the row exists, and the factor of its accumulator (1 / denominator, 0 when empty, NaN bits when
// bad). Sinks join the denominator only.
inline float tops_finish_row(float m, float l, bool bad, int i, int sq, float sink_logit, device uint* lse_seq) {
  const bool empty = !(l > 0.0f);
  float m_final = m, factor = 1.0f, denom = l;
  if (fc_sinks && !empty) {
    const float sink = clamp_score(sink_logit) * kVarlenLog2e;
    m_final = metal::max(m, sink);
    factor = metal::exp2(m - m_final);
    denom = l * factor + metal::exp2(sink - m_final);
  }
  if (i < sq) {
    lse_seq[i] = bad     ? kNanBits
                 : empty ? kNegInfBits
                         : metal::as_type<uint>((m_final + metal::log2(denom)) * kVarlenLn2);
  }
  return bad ? metal::as_type<float>(kNanBits) : empty ? 0.0f : factor / denom;
}

}  // namespace flash_sdpa

template <typename T, int D>
[[max_total_threads_per_threadgroup(FLASH_SDPA_VARLEN_THREADS)]] kernel void flash_attn_varlen_tops(
    FLASH_SDPA_VARLEN_KERNEL_BUFFERS, uint3 tg_pos [[threadgroup_position_in_grid]],
    uint3 tg_count [[threadgroups_per_grid]], uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
  using namespace mpp::tensor_ops;
  constexpr int BQ = flash_sdpa::kTopsBlockQ;        // 64 query rows per tile
  constexpr int R = flash_sdpa::kTopsSimdgroupRows;  // 16 of them per simdgroup
  constexpr int BK = flash_sdpa::tops_block_k(D, sizeof(T));
  constexpr bool QS = flash_sdpa::tops_q_staged(D, sizeof(T));
  constexpr int NT = flash_sdpa::kVarlenThreads;
  constexpr int W = flash_sdpa::varlen_poison_words(D);
  static_assert(flash_sdpa::tops_supports(D, sizeof(T)), "head dim: a multiple of 16 whose tiles fit 32 KB");
  static_assert(NT == 32 * BQ / R, "one simdgroup per 16 query rows");

  threadgroup T q_tile[QS ? BQ * D : 1];  // [BQ][D], rows past the sequence 0 (QS: Q staged once per query tile)
  threadgroup T kv_tiles[2 * BK * D];     // K [BK][D], V [BK][D] (keys past the range 0; V: non-finite 0)
  threadgroup float p_tile[BQ * BK];      // P of simdgroup s at rows [16 s, 16 s + 16): the path without a left input
  threadgroup int row_keys[2 * BQ];       // row r's visible keys [row_keys[r], row_keys[BQ + r]] (none: hi < lo)
  threadgroup float row_scale[BQ];        // row r's output factor (NaN bits: a bad row)
  threadgroup atomic_uint bad_rows[BQ];   // row r saw a visible score that is NaN or inf
  threadgroup atomic_float row_stage[2 * BQ];  // per-row values broadcast where map_iterator is not available
  threadgroup uint poison[BQ * W];             // (row, column) bits: the row sees a non-finite V element there
  threadgroup uint dropped_sg[flash_sdpa::kVarlenSimdgroups];  // simdgroup s staged a non-finite V element as 0
  threadgroup long key_offsets[2 * BK];  // paged: offsets of key rows k0 + r in k ([r]) and v ([BK + r]); -1: masked

  threadgroup T* k_tile = kv_tiles;
  threadgroup T* v_tile = kv_tiles + BK * D;
  auto tk = tensor(k_tile, extents<int, D, BK>());
  auto tv = tensor(v_tile, extents<int, D, BK>());
  auto tp = tensor(p_tile + int(sg) * R * BK, extents<int, BK, R>());
  // S (16 x BK) = Q K^T, K read transposed; O (16 x D) += P V, P the S operation's destination as a float left input.
  // relaxed_precision on P V for 16-bit inputs (as MLX's NAX attention, Apple's kernel for these GPUs): P may be
  // multiplied at the input's precision, which the simdgroup forward rounds it to anyway; float inputs keep fp32.
  constexpr auto qk_desc = matmul2d_descriptor(R, BK, D, false, true, false, matmul2d_descriptor::mode::multiply);
  constexpr auto pv_desc =
      matmul2d_descriptor(R, D, BK, false, false, sizeof(T) == 2, matmul2d_descriptor::mode::multiply_accumulate);
  matmul2d<qk_desc, execution_simdgroup> qk_op;
  matmul2d<pv_desc, execution_simdgroup> pv_op;

  const flash_sdpa::RowTileSlot slot = flash_sdpa::row_tile_slot(tg_pos, tg_count, true, p.tile_offset, p.tile_stride);
  const int b = slot.b;
  const int h = slot.head;
  const VarlenSequence seq = varlen_sequence(b, cu_seqlens_q, cu_seqlens_k, p);
  const VarlenHead<T> head = varlen_head(q, k, v, out, lse, alibi_slopes, b, h, seq, p);
  const bool aligned_q = (p.aligned_rows & FLASH_SDPA_ALIGNED_Q) != 0;
  const bool aligned_k = (p.aligned_rows & FLASH_SDPA_ALIGNED_K) != 0;
  const bool aligned_v = (p.aligned_rows & FLASH_SDPA_ALIGNED_V) != 0;
  const int r0 = int(sg) * R;  // this simdgroup's first row in the tile
  threadgroup atomic_float* stage_m = row_stage + r0;
  threadgroup atomic_float* stage_x = row_stage + BQ + r0;

  using QTensor = decltype(flash_sdpa::tops_q_rows<QS, D>(q_tile, head.q, p.q_row_stride, 0, r0, seq.sq));

  // The API's answers, asked once and made uniform over the simdgroup: whether this simdgroup's row reductions map
  // onto S's and O's elements (else per-row values go through row_stage) and whether S converts into P V's left input
  // (else P goes through p_tile). Apple's implementation decides; the emulator varies them with the seed.
  auto row_max = qk_op.template get_row_reduction_destination_cooperative_tensor<QTensor, decltype(tk), float>();
  auto row_sum = qk_op.template get_row_reduction_destination_cooperative_tensor<QTensor, decltype(tk), float>();
  auto tile_max = qk_op.template get_row_reduction_destination_cooperative_tensor<QTensor, decltype(tk), float>();
  auto tile_sum = qk_op.template get_row_reduction_destination_cooperative_tensor<QTensor, decltype(tk), float>();
  auto alpha = qk_op.template get_row_reduction_destination_cooperative_tensor<QTensor, decltype(tk), float>();
  auto o_acc = pv_op.template get_destination_cooperative_tensor<decltype(tp), decltype(tv), float>();
  bool s_mapped, o_mapped, p_left;
  {
    auto s_probe = qk_op.template get_destination_cooperative_tensor<QTensor, decltype(tk), float>();
    s_mapped = simd_all(is_iterator_compatible(s_probe, row_max));
    o_mapped = simd_all(is_iterator_compatible(o_acc, row_max));
    p_left = simd_all(pv_op.template is_compatible_as_left_input<float, T, float>(s_probe));
  }

  // This threadgroup's query tiles, longest first across the batch; bounds uniform over the threadgroup, so every
  // thread meets every threadgroup barrier.
  for (int q0 = slot.first_tile * BQ; q0 < seq.sq; q0 += slot.step * BQ) {
    const int2 tile_keys = varlen_tile_keys(q0, BQ, seq, p);  // keys any row of this tile sees
    const int kv_begin = tile_keys.x, kv_end = tile_keys.y;

    for (int idx = int(tid); idx < BQ * W; idx += NT) {
      poison[idx] = 0;
    }
    if (int(tid) < BQ) {
      const int i = q0 + int(tid);
      const int2 keys = i < seq.sq ? flash_sdpa::visible_keys(i + seq.sk - seq.sq, p.opt, seq.sk) : int2(0, -1);
      row_keys[tid] = keys.x;
      row_keys[BQ + tid] = keys.y;
      atomic_store_explicit(&bad_rows[tid], 0u, memory_order_relaxed);
    }
    if (QS) {
      varlen_stage_q<T, BQ, D, NT>(q_tile, head.q, p.q_row_stride, q0, 0, seq.sq, aligned_q, tid);
    }
    // This simdgroup's rows [first, first + rows) and the keys they see: lo and hi grow with the row (bottom-right
    // aligned windows), so the first row bounds lo from below and hi from below, the last one from above. A key tile
    // outside [lo_min, hi_max] is skipped; one inside [lo_max, hi_min] needs no mask (interior).
    const int first = q0 + r0;
    const int rows = clamp(seq.sq - first, 0, R);
    const int2 keys_first = flash_sdpa::visible_keys(first + seq.sk - seq.sq, p.opt, seq.sk);
    const int2 keys_last = flash_sdpa::visible_keys(first + max(rows, 1) - 1 + seq.sk - seq.sq, p.opt, seq.sk);
    const QTensor tq = flash_sdpa::tops_q_rows<QS, D>(q_tile, head.q, p.q_row_stride, q0, r0, seq.sq);
    FLASH_SDPA_UNROLL
    for (ushort i = 0; i < o_acc.get_capacity(); ++i) {
      o_acc[i] = 0.0f;
    }
    FLASH_SDPA_UNROLL
    for (ushort i = 0; i < row_max.get_capacity(); ++i) {
      row_max[i] = kVarlenMasked;
      row_sum[i] = 0.0f;
    }

    for (int k0 = kv_begin; k0 < kv_end; k0 += BK) {
      if (fc_varlen_paged) {
        varlen_paged_offsets<BK, NT>(key_offsets, block_table, b, k0, kv_end, p, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
      // K and V side by side: their loads in flight together (Metal 4 has no asynchronous copy to overlap them).
      varlen_stage_rows<T, BK, D, NT, false>(k_tile, head.k, p.k_row_stride, key_offsets, k0, kv_end, aligned_k, tid);
      const bool dropped = simd_any(varlen_stage_rows<T, BK, D, NT, true>(
          v_tile, head.v, p.v_row_stride, key_offsets + BK, k0, kv_end, aligned_v, tid));
      if (lane == 0) {
        dropped_sg[sg] = dropped ? 1u : 0u;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (varlen_any_dropped(dropped_sg)) {  // uniform (any flag set); poison is read after the query tile's barriers
        varlen_poison_rows<T, BQ, BK, D, NT>(poison, head.v, p.v_row_stride, key_offsets + BK, q0, k0, kv_end, seq, p,
                                             tid);
      }

      // This simdgroup's rows see a key of the tile (uniform over the simdgroup: no threadgroup barrier inside).
      if (rows > 0 && k0 <= keys_last.y && k0 + BK - 1 >= keys_first.x) {
        const bool interior = !fc_varlen_paged && k0 >= keys_last.x && k0 + BK - 1 <= keys_first.y;
        auto s_acc = qk_op.template get_destination_cooperative_tensor<QTensor, decltype(tk), float>();
        qk_op.run(tq, tk, s_acc);

        // Scores in the log2 domain; a visible NaN / inf score marks its row bad and counts as masked, so nothing
        // non-finite enters the reductions or P V (a bad row's output is NaN anyway).
        FLASH_SDPA_UNROLL
        for (ushort i = 0; i < s_acc.get_capacity(); ++i) {
          if (!s_acc.is_valid_element(i)) {
            continue;
          }
          float s = s_acc[i] * p.opt.scale;
          bool visible = true;
          int r = 0, j = k0;
          if (!interior || fc_alibi) {
            const auto idx = s_acc.get_multidimensional_index(i);
            r = idx[1];
            j = k0 + idx[0];
          }
          if (!interior) {
            visible =
                j >= row_keys[r0 + r] && j <= row_keys[BQ + r0 + r] && (!fc_varlen_paged || key_offsets[j - k0] >= 0);
          }
          if (visible && flash_sdpa::is_nonfinite(s)) {
            atomic_store_explicit(&bad_rows[r0 + s_acc.get_multidimensional_index(i)[1]], 1u, memory_order_relaxed);
            visible = false;
          }
          if (fc_softcap) {
            s = flash_sdpa::apply_softcap(s, p.opt.softcap);
          }
          if (fc_alibi) {
            s -= head.slope * abs(float(first + r + seq.sk - seq.sq - j));
          }
          s_acc[i] = visible ? flash_sdpa::clamp_score(s) * kVarlenLog2e : kVarlenMasked;
        }

        // Online softmax over the tile. A row's max moves only when the tile's passes it by more than
        // kVarlenRescaleSlack (probabilities stay <= 2^8), or when nothing was accumulated yet (O is 0: no rescale).
        reduce_rows(s_acc, tile_max, reduction_operation::max, kVarlenMasked);
        bool moved = false;
        FLASH_SDPA_UNROLL
        for (ushort k = 0; k < row_max.get_capacity(); ++k) {
          if (!row_max.is_valid_element(k)) {
            continue;
          }
          const float m = row_max[k], t = tile_max[k];
          const bool fresh = !(m > kVarlenMasked);
          const float m_new = fresh || t > m + kVarlenRescaleSlack ? max(m, t) : m;
          alpha[k] = !fresh && m_new != m ? exp2(m - m_new) : 1.0f;
          moved = moved || alpha[k] != 1.0f;
          row_max[k] = m_new;
        }
        moved = simd_any(moved);
        if (!s_mapped) {
          flash_sdpa::tops_stage_rows(stage_m, row_max);
          simdgroup_barrier(mem_flags::mem_threadgroup);
        }
        FLASH_SDPA_UNROLL
        for (ushort i = 0; i < s_acc.get_capacity(); ++i) {
          if (s_acc.is_valid_element(i)) {
            const float x = s_acc[i];
            s_acc[i] =
                x > kVarlenMasked ? exp2(x - flash_sdpa::tops_row_value(s_acc, i, row_max, s_mapped, stage_m)) : 0.0f;
          }
        }
        reduce_rows(s_acc, tile_sum, reduction_operation::sum, 0.0f);
        FLASH_SDPA_UNROLL
        for (ushort k = 0; k < row_sum.get_capacity(); ++k) {
          if (row_sum.is_valid_element(k)) {
            row_sum[k] = row_sum[k] * alpha[k] + tile_sum[k];
          }
        }
        // O = diag(alpha) O where some row moved its max (uniform over the simdgroup).
        if (moved) {
          if (!o_mapped) {
            flash_sdpa::tops_stage_rows(stage_x, alpha);
            simdgroup_barrier(mem_flags::mem_threadgroup);
          }
          FLASH_SDPA_UNROLL
          for (ushort i = 0; i < o_acc.get_capacity(); ++i) {
            if (o_acc.is_valid_element(i)) {
              o_acc[i] *= flash_sdpa::tops_row_value(o_acc, i, alpha, o_mapped, stage_x);
            }
          }
        }
        // O += P V: P straight from S's registers where the implementation converts it, else through p_tile.
        if (p_left) {
          auto p_in = pv_op.template get_left_input_cooperative_tensor<float, T, float>(s_acc);
          pv_op.run(p_in, tv, o_acc);
        } else {
          s_acc.store(tp);
          simdgroup_barrier(mem_flags::mem_threadgroup);
          pv_op.run(tp, tv, o_acc);
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    // Every thread's poison bits, bad flags and row keys of this query tile are written (also with no key tile).
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (rows > 0) {
      flash_sdpa::tops_stage_rows(stage_m, row_max);
      flash_sdpa::tops_stage_rows(stage_x, row_sum);
      simdgroup_barrier(mem_flags::mem_threadgroup);
      if (int(lane) < R) {
        const int r = r0 + int(lane);
        row_scale[r] = flash_sdpa::tops_finish_row(atomic_load_explicit(&stage_m[lane], memory_order_relaxed),
                                                   atomic_load_explicit(&stage_x[lane], memory_order_relaxed),
                                                   atomic_load_explicit(&bad_rows[r], memory_order_relaxed) != 0,
                                                   q0 + r, seq.sq, fc_sinks ? sinks[h] : 0.0f, head.lse);
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);
      // Each thread writes the O elements it holds: bad rows and poisoned (row, column) elements NaN; rows past the
      // sequence are not written.
      FLASH_SDPA_UNROLL
      for (ushort i = 0; i < o_acc.get_capacity(); ++i) {
        if (!o_acc.is_valid_element(i)) {
          continue;
        }
        const auto idx = o_acc.get_multidimensional_index(i);
        const int r = r0 + idx[1], d = idx[0];
        if (q0 + r < seq.sq) {
          const float scale = row_scale[r];
          const bool nan = flash_sdpa::is_nonfinite(scale) || ((poison[r * W + d / 32] >> (d % 32)) & 1u) != 0;
          head.out[long(q0 + r) * p.o_row_stride + d] =
              T(nan ? as_type<float>(flash_sdpa::kNanBits) : o_acc[i] * scale);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}
