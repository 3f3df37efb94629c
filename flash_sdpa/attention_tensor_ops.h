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
// way, then O += P V with P rounded to the input's type (as the simdgroup forward and FlashAttention-2 round it) in a
// T destination of the same operation and converted into the left input (get_left_input_cooperative_tensor): a 16-bit
// x 16-bit product, the pair Apple's matrix units take natively, and half the registers of a float P. S and P never
// touch threadgroup memory; K and V do (side by side, staged once for the 4 simdgroups: a quarter of the device reads
// of per-simdgroup loads, and Metal 4 has no asynchronous copy to hide them), and Q does where it fits (read once per
// query tile). Two threadgroup barriers per key tile (paged: 3), against 4 (5) for the 32-row kernel. Where the API
// answers no (is_iterator_compatible, is_compatible_as_left_input: run-time queries in Apple's header; and whether S's
// float destination and P's share a layout, which Apple's header says may depend on the data type), per-row values go
// through 16 threadgroup words per simdgroup and P through a tile of the input's type. Why 64 rows: K/V staged once
// serve 64 query rows instead of 32 (half the staging loads and barriers per row), 16-row operations are the smallest
// MLX's NAX kernel (Apple's, for these GPUs) uses, and Q (64 x D) still fits 32 KB beside the key tiles up to D = 128
// (half / bfloat) and D = 64 (float); beyond, each simdgroup's operation reads its Q rows from device memory
// (tops_q_staged). At D = 256 in half / bfloat the same tile runs on flash_attn_varlen_tops_dsplit: 8 simdgroups, two
// per 16 rows, each with half of the head dim of O (its partial S exchanged with its partner through threadgroup
// memory), so that O is 64 floats a thread as at D = 128 rather than 128, and its Q half resident in a left input.
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

// Loops over a cooperative tensor's slots unroll fully, and the helpers that take cooperative tensors are always
// inlined (METAL_FUNC, Apple's metal_stdlib macro): the slots then stay in registers (Apple's MPP header: "it is
// imperative for performance to include unroll pragma so compiler fully unrolls the loop").
#define FLASH_SDPA_UNROLL _Pragma("clang loop unroll(full)")

namespace flash_sdpa {

// One simdgroup's 16 rows of a query tile: rows [first, first + rows) of the sequence (rows < 16 at its end, 0 past
// it), r0 their first index in the tile (row_keys, bad_rows), and the keys its first and last rows see. lo and hi grow
// with the row (bottom-right aligned windows), so the first row's [lo, hi] and the last one's bound every row's.
struct TopsRows {
  int r0, first, rows;
  int2 keys_first, keys_last;
};

METAL_FUNC TopsRows tops_rows(int q0, int r0, const VarlenSequence s, constant VarlenParams& p) {
  TopsRows t;
  t.r0 = r0;
  t.first = q0 + r0;
  t.rows = metal::clamp(s.sq - t.first, 0, kTopsSimdgroupRows);
  t.keys_first = visible_keys(t.first + s.sk - s.sq, p.opt, s.sk);
  t.keys_last = visible_keys(t.first + metal::max(t.rows, 1) - 1 + s.sk - s.sq, p.opt, s.sk);
  return t;
}

// Whether some row sees a key of [k0, k0 + bk) (else the simdgroup skips the key tile), and whether every row sees
// every key of it (interior: no mask, no index arithmetic; paged tiles always mask, for their invalid blocks).
METAL_FUNC bool tops_sees(const TopsRows t, int k0, int bk) {
  return t.rows > 0 && k0 <= t.keys_last.y && k0 + bk - 1 >= t.keys_first.x;
}
METAL_FUNC bool tops_interior(const TopsRows t, int k0, int bk) {
  return !fc_varlen_paged && k0 >= t.keys_last.x && k0 + bk - 1 <= t.keys_first.y;
}

// The Q operand of a simdgroup's 16 rows of the query tile at q0 (rows [q0 + r0, q0 + r0 + 16)), columns [c0, c0 + DQ):
// the staged tile (QS: [64][DQ], c0 = 0), or the rows in device memory, those past the sequence outside the extents
// (read as 0). The planner keeps q's row stride within int where Q is read from device memory (varlen_planner.cpp).
template <bool QS, int DQ, typename T>
METAL_FUNC auto tops_q_rows(threadgroup T* q_tile, const device T* q_seq, long row_stride, int q0, int r0, int c0,
                            int sq) {
  if constexpr (QS) {
    return metal::tensor(q_tile + r0 * DQ, metal::extents<int, DQ, kTopsSimdgroupRows>());
  } else {
    const int rows = metal::clamp(sq - (q0 + r0), 0, kTopsSimdgroupRows);
    return metal::tensor(q_seq + long(q0 + r0) * row_stride + c0, metal::dextents<int, 2>(DQ, rows),
                         metal::array<int, 2>{1, int(row_stride)});
  }
}

// A row value of a simdgroup's 16 rows (a row reduction's slots) for destination element i of the same rows: through
// map_iterator where the layouts fit (`mapped`: is_iterator_compatible for the whole simdgroup), else by row index
// from `stage`, where tops_stage_rows put it.
template <typename Dst, typename Rows>
METAL_FUNC float tops_row_value(thread Dst& dst, ushort i, thread Rows& rows, bool mapped,
                                threadgroup atomic_float* stage) {
  return mapped ? float(*rows.map_iterator(dst.get_iterator(i)))
                : atomic_load_explicit(&stage[dst.get_multidimensional_index(i)[1]], metal::memory_order_relaxed);
}

// Stores each row's value into stage[row] from every thread that holds that row's reduction: the same value, hence
// atomic stores (no two plain writes race). A simdgroup barrier orders them before tops_row_value's loads.
template <typename Rows>
METAL_FUNC void tops_stage_rows(threadgroup atomic_float* stage, thread Rows& rows) {
  FLASH_SDPA_UNROLL
  for (ushort k = 0; k < rows.get_capacity(); ++k) {
    if (rows.is_valid_element(k)) {
      atomic_store_explicit(&stage[rows.get_multidimensional_index(k)[0]], float(rows[k]), metal::memory_order_relaxed);
    }
  }
}

// S (16 x BK, unscaled products) of key tile [k0, k0 + BK) in place into the log2 domain: scaled, softcap, ALiBi,
// clamped; keys a row does not see get kVarlenMasked. A visible NaN / inf score marks its row bad (bad_rows, atomic:
// several threads may hold the row) and counts as masked, so nothing non-finite enters the reductions or P V (a bad
// row's output is NaN anyway). Interior tiles read no index unless ALiBi needs it.
template <int BQ, typename S>
METAL_FUNC void tops_scores(thread S& s_acc, const TopsRows t, int k0, bool interior, threadgroup const int* row_keys,
                            threadgroup const long* key_offsets, threadgroup atomic_uint* bad_rows, float slope,
                            const VarlenSequence s, constant VarlenParams& p) {
  FLASH_SDPA_UNROLL
  for (ushort i = 0; i < s_acc.get_capacity(); ++i) {
    if (!s_acc.is_valid_element(i)) {
      continue;
    }
    float x = s_acc[i] * p.opt.scale;
    bool visible = true;
    int r = 0, j = k0;
    if (!interior || fc_alibi) {
      const auto idx = s_acc.get_multidimensional_index(i);
      r = idx[1];
      j = k0 + idx[0];
    }
    if (!interior) {
      visible =
          j >= row_keys[t.r0 + r] && j <= row_keys[BQ + t.r0 + r] && (!fc_varlen_paged || key_offsets[j - k0] >= 0);
    }
    if (visible && is_nonfinite(x)) {
      atomic_store_explicit(&bad_rows[t.r0 + s_acc.get_multidimensional_index(i)[1]], 1u, metal::memory_order_relaxed);
      visible = false;
    }
    if (fc_softcap) {
      x = apply_softcap(x, p.opt.softcap);
    }
    if (fc_alibi) {
      x -= slope * metal::abs(float(t.first + r + s.sk - s.sq - j));
    }
    s_acc[i] = visible ? clamp_score(x) * kVarlenLog2e : kVarlenMasked;
  }
}

// One online-softmax step over the tile's scores (log2 domain, in s_acc), P = exp2(S - m) left in s_acc. A row's max
// moves only when the tile's passes it by more than kVarlenRescaleSlack (probabilities stay <= 2^8), or when nothing
// was accumulated yet (O is 0: no rescale); alpha gets each row's factor for O. Returns whether some row of the
// simdgroup moved its max (uniform).
template <typename S, typename Rows>
METAL_FUNC bool tops_softmax(thread S& s_acc, thread Rows& row_max, thread Rows& row_sum, thread Rows& tile_max,
                             thread Rows& tile_sum, thread Rows& alpha, bool s_mapped,
                             threadgroup atomic_float* stage_m) {
  using namespace mpp::tensor_ops;
  reduce_rows(s_acc, tile_max, reduction_operation::max, kVarlenMasked);
  bool moved = false;
  FLASH_SDPA_UNROLL
  for (ushort k = 0; k < row_max.get_capacity(); ++k) {
    if (!row_max.is_valid_element(k)) {
      continue;
    }
    const float m = row_max[k], tm = tile_max[k];
    const bool fresh = !(m > kVarlenMasked);
    const float m_new = fresh || tm > m + kVarlenRescaleSlack ? metal::max(m, tm) : m;
    alpha[k] = !fresh && m_new != m ? metal::exp2(m - m_new) : 1.0f;
    moved = moved || alpha[k] != 1.0f;
    row_max[k] = m_new;
  }
  if (!s_mapped) {
    tops_stage_rows(stage_m, row_max);
    metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup);
  }
  FLASH_SDPA_UNROLL
  for (ushort i = 0; i < s_acc.get_capacity(); ++i) {
    if (s_acc.is_valid_element(i)) {
      const float x = s_acc[i];
      s_acc[i] = x > kVarlenMasked ? metal::exp2(x - tops_row_value(s_acc, i, row_max, s_mapped, stage_m)) : 0.0f;
    }
  }
  reduce_rows(s_acc, tile_sum, reduction_operation::sum, 0.0f);
  FLASH_SDPA_UNROLL
  for (ushort k = 0; k < row_sum.get_capacity(); ++k) {
    if (row_sum.is_valid_element(k)) {
      row_sum[k] = row_sum[k] * alpha[k] + tile_sum[k];
    }
  }
  return metal::simd_any(moved);
}

// Whether two destination cooperative tensors hold the same element in every slot (asked of one operation's float S and
// input-type P destinations: Apple's layouts may depend on the element type).
template <typename A, typename B>
METAL_FUNC bool tops_same_layout(thread A& a, thread B& b) {
  if (a.get_capacity() != b.get_capacity()) {
    return false;
  }
  bool same = true;
  FLASH_SDPA_UNROLL
  for (ushort i = 0; i < a.get_capacity(); ++i) {
    const bool valid = a.is_valid_element(i);
    if (valid != b.is_valid_element(i)) {
      same = false;
    } else if (valid) {
      const auto ia = a.get_multidimensional_index(i), ib = b.get_multidimensional_index(i);
      same = same && ia[0] == ib[0] && ia[1] == ib[1];
    }
  }
  return same;
}

// The start of a query tile at q0 in both 64-row kernels: no poison bits yet, each row's visible keys [row_keys[r],
// row_keys[BQ + r]] (none: hi < lo, rows past the sequence), no bad row. Read after the tile's first barrier.
template <int BQ, int W, int NT>
METAL_FUNC void tops_begin_query_tile(threadgroup uint* poison, threadgroup int* row_keys,
                                      threadgroup atomic_uint* bad_rows, int q0, const VarlenSequence s,
                                      constant VarlenParams& p, uint tid) {
  for (int idx = int(tid); idx < BQ * W; idx += NT) {
    poison[idx] = 0;
  }
  if (int(tid) < BQ) {
    const int i = q0 + int(tid);
    const int2 keys = i < s.sq ? visible_keys(i + s.sk - s.sq, p.opt, s.sk) : int2(0, -1);
    row_keys[tid] = keys.x;
    row_keys[BQ + tid] = keys.y;
    atomic_store_explicit(&bad_rows[tid], 0u, metal::memory_order_relaxed);
  }
}

// A simdgroup's accumulators at the start of a query tile: O = 0, nothing seen (the masked max, a zero sum).
template <typename O, typename Rows>
METAL_FUNC void tops_reset_rows(thread O& o_acc, thread Rows& row_max, thread Rows& row_sum) {
  FLASH_SDPA_UNROLL
  for (ushort i = 0; i < o_acc.get_capacity(); ++i) {
    o_acc[i] = 0.0f;
  }
  FLASH_SDPA_UNROLL
  for (ushort i = 0; i < row_max.get_capacity(); ++i) {
    row_max[i] = kVarlenMasked;
    row_sum[i] = 0.0f;
  }
}

// P in the input's type from S's float probabilities: slot by slot into `p` (a destination of the same operation in
// T, where tops_same_layout holds), or element by element into the simdgroup's row-major tile (BK columns).
template <typename T, typename S, typename P>
METAL_FUNC void tops_p_slots(thread P& p, thread S& s_acc) {
  FLASH_SDPA_UNROLL
  for (ushort i = 0; i < s_acc.get_capacity(); ++i) {
    if (s_acc.is_valid_element(i)) {
      p[i] = T(s_acc[i]);
    }
  }
}
template <typename T, int BK, typename S>
METAL_FUNC void tops_p_tile(threadgroup T* tile, thread S& s_acc) {
  FLASH_SDPA_UNROLL
  for (ushort i = 0; i < s_acc.get_capacity(); ++i) {
    if (s_acc.is_valid_element(i)) {
      const auto idx = s_acc.get_multidimensional_index(i);
      tile[idx[1] * BK + idx[0]] = T(s_acc[i]);
    }
  }
}

// O = diag(alpha) O, each element's factor through map_iterator or stage_x.
template <typename O, typename Rows>
METAL_FUNC void tops_rescale(thread O& o_acc, thread Rows& alpha, bool o_mapped, threadgroup atomic_float* stage_x) {
  if (!o_mapped) {
    tops_stage_rows(stage_x, alpha);
    metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup);
  }
  FLASH_SDPA_UNROLL
  for (ushort i = 0; i < o_acc.get_capacity(); ++i) {
    if (o_acc.is_valid_element(i)) {
      o_acc[i] *= tops_row_value(o_acc, i, alpha, o_mapped, stage_x);
    }
  }
}

// End of a row (lane r < 16 of its simdgroup): the LSE (natural log; -inf for a row with no visible key, NaN for a bad
// row) written where the row exists and write_lse, and the factor of its accumulator (1 / denominator, 0 when
// empty, NaN bits when bad). Sinks join the denominator only.
METAL_FUNC float tops_finish_row(float m, float l, bool bad, int i, int sq, float sink_logit, device uint* lse_seq,
                                 bool write_lse) {
  const bool empty = !(l > 0.0f);
  float m_final = m, factor = 1.0f, denom = l;
  if (fc_sinks && !empty) {
    const float sink = clamp_score(sink_logit) * kVarlenLog2e;
    m_final = metal::max(m, sink);
    factor = metal::exp2(m - m_final);
    denom = l * factor + metal::exp2(sink - m_final);
  }
  if (i < sq && write_lse) {
    lse_seq[i] = bad     ? kNanBits
                 : empty ? kNegInfBits
                         : metal::as_type<uint>((m_final + metal::log2(denom)) * kVarlenLn2);
  }
  return bad ? metal::as_type<float>(kNanBits) : empty ? 0.0f : factor / denom;
}

// The end of a simdgroup's rows of the query tile at q0: each row's factor (tops_finish_row, by lane r through
// row_scale, the simdgroup's 16 words), then each thread writes the O elements it holds (columns c0 + its index) to
// out: bad rows and poisoned (row, column) elements NaN, rows past the sequence not written. The LSE is written where
// write_lse (one simdgroup per row).
template <typename T, int BQ, int W, typename O, typename Rows>
METAL_FUNC void tops_finish(thread O& o_acc, thread Rows& row_max, thread Rows& row_sum, const TopsRows t, int q0,
                            int c0, bool write_lse, uint lane, threadgroup atomic_float* stage_m,
                            threadgroup atomic_float* stage_x, threadgroup atomic_uint* bad_rows,
                            threadgroup float* row_scale, threadgroup const uint* poison, const VarlenHead<T> head,
                            float sink_logit, const VarlenSequence s, constant VarlenParams& p) {
  tops_stage_rows(stage_m, row_max);
  tops_stage_rows(stage_x, row_sum);
  metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup);
  if (int(lane) < kTopsSimdgroupRows) {
    row_scale[lane] =
        tops_finish_row(atomic_load_explicit(&stage_m[lane], metal::memory_order_relaxed),
                        atomic_load_explicit(&stage_x[lane], metal::memory_order_relaxed),
                        atomic_load_explicit(&bad_rows[t.r0 + int(lane)], metal::memory_order_relaxed) != 0,
                        t.first + int(lane), s.sq, sink_logit, head.lse, write_lse);
  }
  metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup);
  FLASH_SDPA_UNROLL
  for (ushort i = 0; i < o_acc.get_capacity(); ++i) {
    if (!o_acc.is_valid_element(i)) {
      continue;
    }
    const auto idx = o_acc.get_multidimensional_index(i);
    const int r = idx[1], d = c0 + idx[0];
    if (t.first + r < s.sq) {
      const float scale = row_scale[r];
      const bool nan = is_nonfinite(scale) || ((poison[(t.r0 + r) * W + d / 32] >> (d % 32)) & 1u) != 0;
      head.out[long(t.first + r) * p.o_row_stride + d] = T(nan ? metal::as_type<float>(kNanBits) : o_acc[i] * scale);
    }
  }
}

// One key tile [k0, k0 + BK) of both 64-row kernels into threadgroup memory: the paged key offsets, then K and V side
// by side (their loads in flight together: Metal 4 has no asynchronous copy to overlap them); each of the NSG
// simdgroups flags in dropped_sg whether it staged a non-finite V element as 0, and where any did, the tile's rows get
// their poison bits (read after the query tile's barriers). Ends past a threadgroup barrier: the tiles are staged.
template <typename T, int BQ, int BK, int D, int NT, int NSG>
METAL_FUNC void tops_stage_keys(threadgroup T* k_tile, threadgroup T* v_tile, threadgroup long* key_offsets,
                                threadgroup uint* dropped_sg, threadgroup uint* poison, const device int* block_table,
                                const VarlenHead<T> head, bool aligned_k, bool aligned_v, int b, int q0, int k0,
                                int kv_end, const VarlenSequence seq, constant VarlenParams& p, uint tid, uint sg,
                                uint lane) {
  if (fc_varlen_paged) {
    varlen_paged_offsets<BK, NT>(key_offsets, block_table, b, k0, kv_end, p, tid);
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  }
  varlen_stage_rows<T, BK, D, NT, false>(k_tile, head.k, p.k_row_stride, key_offsets, k0, kv_end, aligned_k, tid);
  const bool dropped = metal::simd_any(varlen_stage_rows<T, BK, D, NT, true>(
      v_tile, head.v, p.v_row_stride, key_offsets + BK, k0, kv_end, aligned_v, tid));
  if (lane == 0) {
    dropped_sg[sg] = dropped ? 1u : 0u;
  }
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  uint any_dropped = 0;
  for (int s = 0; s < NSG; ++s) {
    any_dropped |= dropped_sg[s];
  }
  if (any_dropped != 0) {  // uniform
    varlen_poison_rows<T, BQ, BK, D, NT>(poison, head.v, p.v_row_stride, key_offsets + BK, q0, k0, kv_end, seq, p, tid);
  }
}

}  // namespace flash_sdpa

// Per simdgroup: 16 query rows, the whole head dim (D <= 128, and float: every tops head dim but 256).
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
  static_assert(flash_sdpa::tops_supports(D, sizeof(T)) && !flash_sdpa::tops_split_d(D, sizeof(T)),
                "head dim: a multiple of 16 whose tiles fit 32 KB (D-split head dims: flash_attn_varlen_tops_dsplit)");
  static_assert(NT == 32 * BQ / R, "one simdgroup per 16 query rows");

  threadgroup T q_tile[QS ? BQ * D : 1];  // [BQ][D], rows past the sequence 0 (QS: Q staged once per query tile)
  threadgroup T kv_tiles[2 * BK * D];     // K [BK][D], V [BK][D] (keys past the range 0; V: non-finite 0)
  threadgroup T p_tile[BQ * BK];          // P of simdgroup s at rows [16 s, 16 s + 16): the path without a left input
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
  // S (16 x BK) = Q K^T, K read transposed; O (16 x D) += P V, P in the input's type (as the simdgroup forward and
  // FlashAttention-2 round it) as the left input: a 16-bit x 16-bit product, the pair Apple's matrix units take
  // natively, and half the registers of a float left operand; float inputs keep fp32 throughout.
  constexpr auto qk_desc = matmul2d_descriptor(R, BK, D, false, true, false, matmul2d_descriptor::mode::multiply);
  constexpr auto pv_desc =
      matmul2d_descriptor(R, D, BK, false, false, false, matmul2d_descriptor::mode::multiply_accumulate);
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
  using QTensor = decltype(flash_sdpa::tops_q_rows<QS, D>(q_tile, head.q, p.q_row_stride, 0, r0, 0, seq.sq));

  // The API's answers, asked once and made uniform over the simdgroup: whether this simdgroup's row reductions map
  // onto S's and O's elements (else per-row values go through row_stage), and whether S's float destination and a T
  // destination of the same operation share a layout and the latter converts into P V's left input (else P goes
  // through p_tile). Apple's implementation decides; the emulator varies them with the seed.
  auto row_max = qk_op.template get_row_reduction_destination_cooperative_tensor<QTensor, decltype(tk), float>();
  auto row_sum = qk_op.template get_row_reduction_destination_cooperative_tensor<QTensor, decltype(tk), float>();
  auto tile_max = qk_op.template get_row_reduction_destination_cooperative_tensor<QTensor, decltype(tk), float>();
  auto tile_sum = qk_op.template get_row_reduction_destination_cooperative_tensor<QTensor, decltype(tk), float>();
  auto alpha = qk_op.template get_row_reduction_destination_cooperative_tensor<QTensor, decltype(tk), float>();
  auto o_acc = pv_op.template get_destination_cooperative_tensor<decltype(tp), decltype(tv), float>();
  bool s_mapped, o_mapped, p_left;
  {
    auto s_probe = qk_op.template get_destination_cooperative_tensor<QTensor, decltype(tk), float>();
    auto p_probe = qk_op.template get_destination_cooperative_tensor<QTensor, decltype(tk), T>();
    s_mapped = simd_all(is_iterator_compatible(s_probe, row_max));
    o_mapped = simd_all(is_iterator_compatible(o_acc, row_max));
    p_left = simd_all(flash_sdpa::tops_same_layout(s_probe, p_probe) &&
                      pv_op.template is_compatible_as_left_input<T, T, float>(p_probe));
  }

  // This threadgroup's query tiles, longest first across the batch; bounds uniform over the threadgroup, so every
  // thread meets every threadgroup barrier.
  for (int q0 = slot.first_tile * BQ; q0 < seq.sq; q0 += slot.step * BQ) {
    const int2 tile_keys = varlen_tile_keys(q0, BQ, seq, p);  // keys any row of this tile sees
    const int kv_begin = tile_keys.x, kv_end = tile_keys.y;

    flash_sdpa::tops_begin_query_tile<BQ, W, NT>(poison, row_keys, bad_rows, q0, seq, p, tid);
    if (QS) {
      varlen_stage_q<T, BQ, D, NT>(q_tile, head.q, p.q_row_stride, q0, 0, seq.sq, aligned_q, tid);
    }
    const flash_sdpa::TopsRows rows = flash_sdpa::tops_rows(q0, r0, seq, p);
    const QTensor tq = flash_sdpa::tops_q_rows<QS, D>(q_tile, head.q, p.q_row_stride, q0, r0, 0, seq.sq);
    flash_sdpa::tops_reset_rows(o_acc, row_max, row_sum);

    for (int k0 = kv_begin; k0 < kv_end; k0 += BK) {
      flash_sdpa::tops_stage_keys<T, BQ, BK, D, NT, flash_sdpa::kVarlenSimdgroups>(
          k_tile, v_tile, key_offsets, dropped_sg, poison, block_table, head, aligned_k, aligned_v, b, q0, k0, kv_end,
          seq, p, tid, sg, lane);

      // This simdgroup's rows see a key of the tile (uniform over the simdgroup: no threadgroup barrier inside).
      if (flash_sdpa::tops_sees(rows, k0, BK)) {
        auto s_acc = qk_op.template get_destination_cooperative_tensor<QTensor, decltype(tk), float>();
        qk_op.run(tq, tk, s_acc);
        flash_sdpa::tops_scores<BQ>(s_acc, rows, k0, flash_sdpa::tops_interior(rows, k0, BK), row_keys, key_offsets,
                                    bad_rows, head.slope, seq, p);
        if (flash_sdpa::tops_softmax(s_acc, row_max, row_sum, tile_max, tile_sum, alpha, s_mapped, stage_m)) {
          flash_sdpa::tops_rescale(o_acc, alpha, o_mapped, stage_x);
        }
        // O += P V: P from S's registers where the implementation converts it, else through p_tile.
        if (p_left) {
          auto p_acc = qk_op.template get_destination_cooperative_tensor<QTensor, decltype(tk), T>();
          flash_sdpa::tops_p_slots<T>(p_acc, s_acc);
          auto p_in = pv_op.template get_left_input_cooperative_tensor<T, T, float>(p_acc);
          pv_op.run(p_in, tv, o_acc);
        } else {
          flash_sdpa::tops_p_tile<T, BK>(p_tile + r0 * BK, s_acc);
          simdgroup_barrier(mem_flags::mem_threadgroup);
          pv_op.run(tp, tv, o_acc);
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    // Every thread's poison bits, bad flags and row keys of this query tile are written (also with no key tile).
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (rows.rows > 0) {
      flash_sdpa::tops_finish<T, BQ, W>(o_acc, row_max, row_sum, rows, q0, 0, true, lane, stage_m, stage_x, bad_rows,
                                        row_scale + r0, poison, head, fc_sinks ? sinks[h] : 0.0f, seq, p);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

// D-split (half / bfloat at D = 256, tops_split_d): 8 simdgroups (256 threads), simdgroup s owns rows [16 (s / 2),
// 16 (s / 2) + 16) of the 64-row tile and head-dim columns [c DH, c DH + DH) of Q and O, c = s % 2, DH = D / 2. Its
// operation's partial S over its columns goes to its partner through threadgroup memory (store, barrier, load: the
// MPP header's own pattern for adding a destination of the same operation), both add the two in the same order
// (bit-identical S) and run the same softmax, and each accumulates its half of O. O is then 16 x 128 floats per
// simdgroup (64 a thread), as at D = 128; 16 x 256 would be 128 a thread, which an Apple GPU would spill (MLX's NAX
// kernel splits D = 256 the same way, for that reason; the proxy spilled 240 B a thread). Q (64 x 256 does not fit 32
// KB beside the key tiles) is read from device memory once per query tile into each simdgroup's left input cooperative
// tensor (16 x 128: 64 halves a thread) and stays there for the key loop, as MLX's NAX kernel keeps its Q fragments;
// 16-key K / V tiles. 2 threadgroup barriers per key tile (paged too): a tile's V is staged after its S, before the
// exchange barrier, and the next tile's K after that barrier (every S of the tile is done), so the tile's closing
// barrier serves both (paged offsets of two tiles, by parity, for the same reason).
template <typename T, int D>
[[max_total_threads_per_threadgroup(FLASH_SDPA_TOPS_SPLIT_THREADS)]] kernel void flash_attn_varlen_tops_dsplit(
    FLASH_SDPA_VARLEN_KERNEL_BUFFERS, uint3 tg_pos [[threadgroup_position_in_grid]],
    uint3 tg_count [[threadgroups_per_grid]], uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
  using namespace mpp::tensor_ops;
  constexpr int BQ = flash_sdpa::kTopsBlockQ;
  constexpr int R = flash_sdpa::kTopsSimdgroupRows;
  constexpr int DH = D / 2;  // head-dim columns per simdgroup
  constexpr int BK = flash_sdpa::kTopsSplitBlockK;
  constexpr int NT = FLASH_SDPA_TOPS_SPLIT_THREADS;
  constexpr int NSG = NT / 32;
  constexpr int W = flash_sdpa::varlen_poison_words(D);
  static_assert(flash_sdpa::tops_split_d(D, sizeof(T)) && NSG == 2 * BQ / R, "two simdgroups per 16 query rows");
  static_assert(flash_sdpa::tops_split_threadgroup_bytes(D, sizeof(T)) <= flash_sdpa::kVarlenMaxThreadgroupBytes,
                "32 KB");

  threadgroup T kv_tiles[2 * BK * D];               // K [BK][D], V [BK][D]
  threadgroup float s_xchg[NSG * R * BK];           // simdgroup s's partial S (or its P: the path without a left input)
  threadgroup int row_keys[2 * BQ];                 // row r's visible keys [row_keys[r], row_keys[BQ + r]]
  threadgroup float row_scale[NSG * R];             // simdgroup s's rows' output factors
  threadgroup atomic_uint bad_rows[BQ];             // row r saw a visible score that is NaN or inf
  threadgroup atomic_float row_stage[2 * NSG * R];  // per-row values broadcast where map_iterator is not available
  threadgroup uint poison[BQ * W];                  // (row, column) bits: the row sees a non-finite V element there
  threadgroup uint sg_flags[NSG];                   // simdgroup s staged a non-finite V element as 0 / its answer
  threadgroup long key_offsets[2 * 2 * BK];  // paged: two key tiles' offsets (by tile parity), K [r] and V [BK + r]

  const int c = int(sg) % 2;  // this simdgroup's column half
  threadgroup T* k_tile = kv_tiles;
  threadgroup T* v_tile = kv_tiles + BK * D;
  auto tk = tensor(k_tile + c * DH, extents<int, DH, BK>(), array<int, 2>{1, D});
  auto tv = tensor(v_tile + c * DH, extents<int, DH, BK>(), array<int, 2>{1, D});
  auto t_own = tensor(s_xchg + int(sg) * R * BK, extents<int, BK, R>());
  auto t_partner = tensor(s_xchg + (int(sg) ^ 1) * R * BK, extents<int, BK, R>());
  threadgroup T* p_own = reinterpret_cast<threadgroup T*>(s_xchg + int(sg) * R * BK);  // P over the partial S, in T
  auto tp = tensor(p_own, extents<int, BK, R>());
  constexpr auto qk_desc = matmul2d_descriptor(R, BK, DH, false, true, false, matmul2d_descriptor::mode::multiply);
  constexpr auto pv_desc =
      matmul2d_descriptor(R, DH, BK, false, false, false, matmul2d_descriptor::mode::multiply_accumulate);
  matmul2d<qk_desc, execution_simdgroup> qk_op;
  matmul2d<pv_desc, execution_simdgroup> pv_op;

  const flash_sdpa::RowTileSlot slot = flash_sdpa::row_tile_slot(tg_pos, tg_count, true, p.tile_offset, p.tile_stride);
  const int b = slot.b;
  const int h = slot.head;
  const VarlenSequence seq = varlen_sequence(b, cu_seqlens_q, cu_seqlens_k, p);
  const VarlenHead<T> head = varlen_head(q, k, v, out, lse, alibi_slopes, b, h, seq, p);
  const bool aligned_k = (p.aligned_rows & FLASH_SDPA_ALIGNED_K) != 0;
  const bool aligned_v = (p.aligned_rows & FLASH_SDPA_ALIGNED_V) != 0;
  const int r0 = (int(sg) / 2) * R;  // this simdgroup's first row in the tile
  threadgroup atomic_float* stage_m = row_stage + int(sg) * R;
  threadgroup atomic_float* stage_x = row_stage + (NSG + int(sg)) * R;
  // This simdgroup's Q (16 x DH) stays in a left input cooperative tensor for the whole key loop, loaded once per query
  // tile: per 16-key tile the operation then reads K alone, not 4x K's bytes of Q again from device memory.
  auto q_left = qk_op.template get_left_input_cooperative_tensor<T, T, float>();
  using QLeft = decltype(q_left);

  auto row_max = qk_op.template get_row_reduction_destination_cooperative_tensor<QLeft, decltype(tk), float>();
  auto row_sum = qk_op.template get_row_reduction_destination_cooperative_tensor<QLeft, decltype(tk), float>();
  auto tile_max = qk_op.template get_row_reduction_destination_cooperative_tensor<QLeft, decltype(tk), float>();
  auto tile_sum = qk_op.template get_row_reduction_destination_cooperative_tensor<QLeft, decltype(tk), float>();
  auto alpha = qk_op.template get_row_reduction_destination_cooperative_tensor<QLeft, decltype(tk), float>();
  auto o_acc = pv_op.template get_destination_cooperative_tensor<decltype(tp), decltype(tv), float>();
  // The API's answers (as in flash_attn_varlen_tops); the left-input one over the whole threadgroup, since its other
  // path reuses the exchange tile behind a threadgroup barrier.
  bool s_mapped, o_mapped, p_left;
  {
    auto s_probe = qk_op.template get_destination_cooperative_tensor<QLeft, decltype(tk), float>();
    auto p_probe = qk_op.template get_destination_cooperative_tensor<QLeft, decltype(tk), T>();
    s_mapped = simd_all(is_iterator_compatible(s_probe, row_max));
    o_mapped = simd_all(is_iterator_compatible(o_acc, row_max));
    const bool converts = simd_all(flash_sdpa::tops_same_layout(s_probe, p_probe) &&
                                   pv_op.template is_compatible_as_left_input<T, T, float>(p_probe));
    if (lane == 0) {
      sg_flags[sg] = converts ? 1u : 0u;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    p_left = true;
    for (int s = 0; s < NSG; ++s) {
      p_left = p_left && sg_flags[s] != 0;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  for (int q0 = slot.first_tile * BQ; q0 < seq.sq; q0 += slot.step * BQ) {
    const int2 tile_keys = varlen_tile_keys(q0, BQ, seq, p);
    const int kv_begin = tile_keys.x, kv_end = tile_keys.y;

    flash_sdpa::tops_begin_query_tile<BQ, W, NT>(poison, row_keys, bad_rows, q0, seq, p, tid);
    const flash_sdpa::TopsRows rows = flash_sdpa::tops_rows(q0, r0, seq, p);
    q_left.load(flash_sdpa::tops_q_rows<false, DH>(kv_tiles, head.q, p.q_row_stride, q0, r0, c * DH, seq.sq));
    flash_sdpa::tops_reset_rows(o_acc, row_max, row_sum);

    // K of the first key tile; then each key tile stages its own V and the next tile's K between its two barriers.
    if (kv_begin < kv_end) {
      if (fc_varlen_paged) {
        varlen_paged_offsets<BK, NT>(key_offsets, block_table, b, kv_begin, kv_end, p, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
      varlen_stage_rows<T, BK, D, NT, false>(k_tile, head.k, p.k_row_stride, key_offsets, kv_begin, kv_end, aligned_k,
                                             tid);
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    for (int k0 = kv_begin; k0 < kv_end; k0 += BK) {
      const int tile = (k0 - kv_begin) / BK;
      threadgroup long* offsets = key_offsets + (tile % 2) * 2 * BK;  // this tile's (paged)
      threadgroup long* next_offsets = key_offsets + (1 - tile % 2) * 2 * BK;
      const bool next = k0 + BK < kv_end;

      // The partial S of this simdgroup's columns, to its partner (both members of a pair decide alike: same rows).
      const bool sees = flash_sdpa::tops_sees(rows, k0, BK);
      auto s_acc = qk_op.template get_destination_cooperative_tensor<QLeft, decltype(tk), float>();
      if (sees) {
        qk_op.run(q_left, tk, s_acc);
        s_acc.store(t_own);
      }
      // V of this tile (the last tile's P V ended before its closing barrier), the next tile's paged offsets.
      const bool dropped = simd_any(varlen_stage_rows<T, BK, D, NT, true>(v_tile, head.v, p.v_row_stride, offsets + BK,
                                                                          k0, kv_end, aligned_v, tid));
      if (lane == 0) {
        sg_flags[sg] = dropped ? 1u : 0u;
      }
      if (fc_varlen_paged && next) {
        varlen_paged_offsets<BK, NT>(next_offsets, block_table, b, k0 + BK, kv_end, p, tid);
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      // Every S of this tile is done: K of the next tile replaces it. Poison bits where a simdgroup dropped a V
      // element.
      if (next) {
        varlen_stage_rows<T, BK, D, NT, false>(k_tile, head.k, p.k_row_stride, next_offsets, k0 + BK, kv_end, aligned_k,
                                               tid);
      }
      uint any_dropped = 0;
      for (int s = 0; s < NSG; ++s) {
        any_dropped |= sg_flags[s];
      }
      if (any_dropped != 0) {  // uniform
        varlen_poison_rows<T, BQ, BK, D, NT>(poison, head.v, p.v_row_stride, offsets + BK, q0, k0, kv_end, seq, p, tid);
      }
      if (sees) {
        auto s_partner = qk_op.template get_destination_cooperative_tensor<QLeft, decltype(tk), float>();
        s_partner.load(t_partner);
        FLASH_SDPA_UNROLL
        for (ushort i = 0; i < s_acc.get_capacity(); ++i) {
          if (s_acc.is_valid_element(i)) {
            s_acc[i] += s_partner[i];  // a + b == b + a: both members hold the same S
          }
        }
        flash_sdpa::tops_scores<BQ>(s_acc, rows, k0, flash_sdpa::tops_interior(rows, k0, BK), row_keys, offsets,
                                    bad_rows, head.slope, seq, p);
        if (flash_sdpa::tops_softmax(s_acc, row_max, row_sum, tile_max, tile_sum, alpha, s_mapped, stage_m)) {
          flash_sdpa::tops_rescale(o_acc, alpha, o_mapped, stage_x);
        }
      }
      if (!p_left) {  // uniform over the threadgroup: the partner has read this simdgroup's partial S
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
      if (sees) {
        if (p_left) {
          auto p_acc = qk_op.template get_destination_cooperative_tensor<QLeft, decltype(tk), T>();
          flash_sdpa::tops_p_slots<T>(p_acc, s_acc);
          auto p_in = pv_op.template get_left_input_cooperative_tensor<T, T, float>(p_acc);
          pv_op.run(p_in, tv, o_acc);
        } else {
          flash_sdpa::tops_p_tile<T, BK>(p_own, s_acc);
          simdgroup_barrier(mem_flags::mem_threadgroup);
          pv_op.run(tp, tv, o_acc);
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (rows.rows > 0) {
      flash_sdpa::tops_finish<T, BQ, W>(o_acc, row_max, row_sum, rows, q0, c * DH, c == 0, lane, stage_m, stage_x,
                                        bad_rows, row_scale + int(sg) * R, poison, head, fc_sinks ? sinks[h] : 0.0f,
                                        seq, p);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}
