// Varlen / dense flash-attention forward on Metal 4 tensor operations (MetalPerformancePrimitives matmul2d): the
// path Apple's M5 GPUs (family 10) need, since their neural accelerators are reached only through tensor ops. The
// kernel body; tensor_ops_library.h instantiates it (a library the Mac glue compiles at run time) and the host's
// routing moves varlen forward dispatches onto it where the package turned the path on (routing.h, use_tensor_ops).
//
// Contract: the varlen kernel's (attention_varlen.h). The same buffers (FLASH_SDPA_VARLEN_BUFFER_*), VarlenParams,
// function constants and grid (H, B, 32-row query tiles, row_tile_slot with tile_offset / tile_stride), so that the
// host can launch it by name with the varlen plan; out and LSE mean the same: a row with no visible key is written as
// 0 with LSE = -inf; a visible score that is NaN or inf makes its row NaN; a non-finite V element makes NaN exactly the
// output elements of the rows that see it (staged as 0, a poison bit per (row, column)). Varlen, dense and paged K/V
// (fc_varlen_paged), causal and windows (bottom-right aligned), softcap, ALiBi, sinks, GQA, any strides.
//
// Per 32-row query tile (4 simdgroups, one execution_simdgroups<4> scope for both products): Q is staged once in the
// input's type; per key tile K and V are staged (side by side, or K then V through one tile: tops_kv_tiles), S = Q K^T
// runs into a float destination cooperative tensor, which is stored to threadgroup memory; the online softmax (the
// varlen kernel's step: 4 lanes per query row, fp32 statistics, log2 domain, a running max that moves only past
// kVarlenRescaleSlack) reads S there and writes P in the input's type and each row's correction alpha; the O
// cooperative tensor (float, 32 x D) is rescaled element by element through get_multidimensional_index (only on tiles
// where some row's max moved), then O += P V. At the end each thread writes its own O elements scaled by 1 / l (0 for
// an empty row). 4 threadgroup barriers per key tile (paged: 5). Which thread holds which element of a cooperative
// tensor is Apple's (it changes between GPU generations): the kernel reaches elements only through the API, and every
// row-wise step runs on threadgroup tiles whose layout it owns. Speed is not measured yet: the S round trip through
// threadgroup memory, the per-element rescale and the scattered output stores are the first suspects.
#pragma once

#include <MetalPerformancePrimitives/MetalPerformancePrimitives.h>

#include <metal_stdlib>
#include <metal_tensor>

#include "attention_varlen.h"  // the varlen kernel's sequence, head, staging, softmax-step and row-end helpers

namespace flash_sdpa {

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
constexpr int tops_threadgroup_bytes(int head_dim, int block_k, int elem_bytes, int kv_tiles) {
  return (kVarlenBlockQ + kv_tiles * block_k) * head_dim * elem_bytes +  // Q, K / V tiles
         kVarlenBlockQ * block_k * (4 + elem_bytes) +                    // S (float), P
         4 * (3 * kVarlenBlockQ + kVarlenBlockQ * varlen_poison_words(head_dim) + 2 * kVarlenSimdgroups) +
         16 * block_k;  // alpha, scale, bad flag per row; poison bits; simdgroup flags; paged key offsets
}

constexpr bool tops_fits(int head_dim, int block_k, int elem_bytes, int kv_tiles) {
  return tops_threadgroup_bytes(head_dim, block_k, elem_bytes, kv_tiles) <= kVarlenMaxThreadgroupBytes;
}

constexpr int tops_kv_tiles(int head_dim, int elem_bytes) { return tops_fits(head_dim, 16, elem_bytes, 2) ? 2 : 1; }

constexpr int tops_block_k(int head_dim, int elem_bytes) {
  return tops_fits(head_dim, 32, elem_bytes, tops_kv_tiles(head_dim, elem_bytes)) ? 32 : 16;
}

// Head dims: multiples of 16 (Apple documents no shape granularity for matmul2d, so every product shape here is a
// multiple of 16) whose tiles fit 32 KB: 32 to 256 in half / bfloat, 32 to 128 in float (float Q
// alone is 32 KB at 256).
constexpr bool tops_supports(int head_dim, int elem_bytes) {
  return head_dim % 16 == 0 && head_dim >= 32 && head_dim <= 256 &&
         tops_fits(head_dim, tops_block_k(head_dim, elem_bytes), elem_bytes, tops_kv_tiles(head_dim, elem_bytes));
}

}  // namespace flash_sdpa

template <typename T, int D>
[[max_total_threads_per_threadgroup(FLASH_SDPA_VARLEN_THREADS)]] kernel void flash_attn_varlen_tops(
    FLASH_SDPA_VARLEN_KERNEL_BUFFERS, uint3 tg_pos [[threadgroup_position_in_grid]],
    uint3 tg_count [[threadgroups_per_grid]], uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
  using namespace mpp::tensor_ops;
  constexpr int NSG = flash_sdpa::kVarlenSimdgroups;
  constexpr int BQ = flash_sdpa::kVarlenBlockQ;
  constexpr int BK = flash_sdpa::tops_block_k(D, sizeof(T));
  constexpr int NT = flash_sdpa::kVarlenThreads;
  constexpr int W = flash_sdpa::varlen_poison_words(D);
  constexpr bool SHARED_KV = flash_sdpa::tops_kv_tiles(D, sizeof(T)) == 1;  // one tile: K, then V
  static_assert(flash_sdpa::tops_supports(D, sizeof(T)), "head dim: a multiple of 16 whose tiles fit 32 KB");
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
