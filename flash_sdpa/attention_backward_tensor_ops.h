// The FlashAttention-2 backward's two heavy passes on Metal 4 tensor operations (MetalPerformancePrimitives matmul2d):
// the path of Apple's M5 GPUs (family 10), whose neural accelerators are reached only through tensor ops. The kernel
// bodies; tensor_ops_library.h instantiates them (flash_attn_bwd_<dkdv|dq>_tops_<dtype>_d<D>, a library the Mac glue
// compiles at run time) and backward_planner.cpp plans them where the package turned tensor ops on (routing.h,
// tensor_ops_enabled) and backward_tops_serves the dtype and head dim; the delta pre-pass stays the metallib's.
//
// Contract: the simdgroup passes' (attention_backward.h). The same buffers (FLASH_SDPA_BWD_BUFFER_*), BackwardParams,
// function constants, threads (128) and grid order (row_tile_slot); the same math and NaN rules: P and dS from
// bwd_p_ds per (query, key) pair in fp32 (a masked pair's P and dS selected to 0, a row without a finite LSE has P =
// 0), P^T and dS rounded to T before their products (as FlashAttention-2), the operands a product sums over rows (Q
// and dO in dK/dV, K in dQ) staged with non-finite elements as 0; each gradient element one writer, a fixed summation
// order, no atomics: bit-identical on repeat.
//
// Layout (backward_params.h, bwd_tops_*): the pass's tile (dK/dV: BT keys, K and V; dQ: BT queries, Q and dO) is
// staged once in threadgroup memory as T, and the other two operands are staged BS rows at a time; all 4 simdgroups
// run each product as one execution_simdgroups<4> operation (the tops32 forward's scope): S (S^T) and dP (dP^T) into
// float destination cooperative tensors, stored to fp32 strips, where the elementwise step runs per element (the
// simdgroup backward's, whatever thread holds what); P^T and dS^T (dS) written as T tiles; dV += P^T dO, dK += dS^T Q,
// dQ += dS K into float destination cooperative tensors (mode::multiply_accumulate) that live across the loop and are
// written at the end through get_multidimensional_index (dK, dQ times scale). The transposed operands of S^T = K Q^T
// and S = Q K^T are read through transpose_right, never copied transposed. Why: Metal 4 has no asynchronous copy, so
// an operand shared by the 4 simdgroups is staged once by all 128 threads (a quarter of the device reads of
// per-simdgroup loads), and one threadgroup's 32 KB holds the tile, a staged block and the strips at every served head
// dim; the accumulators are cooperative tensors (registers, at most 64 floats a thread), so nothing of dK / dV / dQ
// makes a round trip through threadgroup memory per block. Which thread holds which element of a cooperative tensor
// is Apple's (it changes between GPU generations): the kernels reach elements only through the API.
#pragma once

#include <MetalPerformancePrimitives/MetalPerformancePrimitives.h>

#include <metal_stdlib>
#include <metal_tensor>

#include "attention_backward.h"  // the simdgroup passes' sequence, staging, (P, dS) and d s_aux helpers

// Loops over a cooperative tensor's slots unroll fully (Apple's MPP header: the slots then stay in registers), as in
// attention_tensor_ops.h.
#ifndef FLASH_SDPA_UNROLL
#define FLASH_SDPA_UNROLL _Pragma("clang loop unroll(full)")
#endif

namespace flash_sdpa {

// A float destination cooperative tensor set to 0 (slots start undefined).
template <typename C>
METAL_FUNC void bwd_tops_zero(thread C& c) {
  FLASH_SDPA_UNROLL
  for (ushort i = 0; i < c.get_capacity(); ++i) {
    c[i] = 0.0f;
  }
}

// Writes a gradient tile held in a float destination cooperative tensor (rows x D, [column, row] indices): rows
// [r0, r0 + n) of one head, times scale, each element by the thread that holds it (rows past n are not written).
template <typename T, typename C>
METAL_FUNC void bwd_tops_write(device T* dst, long row_stride, thread C& acc, int r0, int n, float scale) {
  FLASH_SDPA_UNROLL
  for (ushort i = 0; i < acc.get_capacity(); ++i) {
    if (acc.is_valid_element(i)) {
      const auto idx = acc.get_multidimensional_index(i);
      if (idx[1] < n) {
        dst[long(r0 + idx[1]) * row_stride + idx[0]] = T(acc[i] * scale);
      }
    }
  }
}

}  // namespace flash_sdpa

// ---- pass 2: dK, dV -------------------------------------------------------------------------------------------------
// Grid (Hkv, B, key tiles), as flash_attn_bwd_dkdv: threadgroup z takes the key tiles z, z + grid.z, ... of BT keys;
// K and V of the tile stay staged while the query rows that see it are staged BS at a time, for each query head of
// the GQA group in turn. Per staged block: S^T = K Q^T and dP^T = V dO^T (fp32 strips), P^T and dS^T per element (T
// tiles), dV += P^T dO and dK += dS^T Q (scale at the store).
template <typename T, int D>
[[max_total_threads_per_threadgroup(FLASH_SDPA_BWD_THREADS)]] kernel void flash_attn_bwd_dkdv_tops(
    FLASH_SDPA_BWD_DKDV_KERNEL_BUFFERS, uint3 tg_pos [[threadgroup_position_in_grid]],
    uint3 tg_count [[threadgroups_per_grid]], uint tid [[thread_index_in_threadgroup]]) {
  using namespace mpp::tensor_ops;
  constexpr int NT = flash_sdpa::kBwdThreads;
  constexpr int NSG = flash_sdpa::kBwdSimdgroups;
  constexpr int E = sizeof(T);
  constexpr int BT = flash_sdpa::bwd_tops_tile_rows(D, E);        // keys of the tile
  constexpr int BS = flash_sdpa::bwd_tops_stage_rows(D, E);       // query rows of a staged block
  constexpr int NBUF = flash_sdpa::bwd_tops_stage_buffers(D, E);  // 1: Q, then dO, then Q again in one buffer
  static_assert(flash_sdpa::bwd_tops_supports(D, E), "head dim: a multiple of 16 whose tiles fit 32 KB");
  static_assert(flash_sdpa::bwd_tops_threadgroup_bytes(D, E, BT, BS, NBUF) <= flash_sdpa::kBwdMaxThreadgroupBytes,
                "Apple GPUs give a threadgroup 32 KB");
  static_assert(BT % 16 == 0 && BS % 16 == 0 && D % 16 == 0, "matmul2d shapes in multiples of 16");

  threadgroup T kv_tile[2 * BT * D];    // K [BT][D], V [BT][D] (keys past the sequence 0)
  threadgroup T stage[NBUF * BS * D];   // Q [BS][D], dO [BS][D] (non-finite elements 0; rows past the block 0)
  threadgroup float s_strip[BT * BS];   // S^T = K Q^T (unscaled), [BT][BS]; float T: then P^T in place
  threadgroup float dp_strip[BT * BS];  // dP^T = V dO^T, [BT][BS]; float T: then dS^T in place
  threadgroup T pds_own[bwd_t_strip_elems<T>(2, BT, BS)];  // 2-byte T: P^T, then dS^T, [BT][BS] each
  threadgroup float row_lse2[BS];                          // LSE * log2(e) of the staged rows
  threadgroup float row_delta[BS];
  threadgroup int row_lo[BS];  // visible keys [lo, hi]; hi = -1 for a row with no finite LSE or past the block
  threadgroup int row_hi[BS];

  threadgroup T* k_tile = kv_tile;
  threadgroup T* v_tile = kv_tile + BT * D;
  threadgroup T* q_tile = stage;
  threadgroup T* do_tile = stage + (NBUF - 1) * BS * D;
  threadgroup T* pt_tile = bwd_t_strip<T>(s_strip, pds_own);
  threadgroup T* dst_tile = bwd_t_strip<T>(dp_strip, pds_own + BT * BS);
  // Tensor views (dimension 0 innermost: a row-major R x C tile has extents (C, R)).
  auto tk = tensor(k_tile, extents<int, D, BT>());
  auto tv = tensor(v_tile, extents<int, D, BT>());
  auto tq = tensor(q_tile, extents<int, D, BS>());
  auto tdo = tensor(do_tile, extents<int, D, BS>());
  auto ts = tensor(s_strip, extents<int, BS, BT>());
  auto tdp = tensor(dp_strip, extents<int, BS, BT>());
  auto tpt = tensor(pt_tile, extents<int, BS, BT>());
  auto tdst = tensor(dst_tile, extents<int, BS, BT>());
  // S^T, dP^T (BT x BS) = K Q^T, V dO^T: the staged rows read transposed. dV, dK (BT x D) += P^T dO, dS^T Q. fp32
  // destinations; relaxed_precision off (float inputs keep fp32 products).
  constexpr auto st_desc = matmul2d_descriptor(BT, BS, D, false, true, false, matmul2d_descriptor::mode::multiply);
  constexpr auto acc_desc =
      matmul2d_descriptor(BT, D, BS, false, false, false, matmul2d_descriptor::mode::multiply_accumulate);
  matmul2d<st_desc, execution_simdgroups<NSG>> st_op;
  matmul2d<acc_desc, execution_simdgroups<NSG>> acc_op;

  const flash_sdpa::RowTileSlot slot = flash_sdpa::row_tile_slot(tg_pos, tg_count, false, p.tile_offset, p.tile_stride);
  const int b = slot.b, kvh = slot.head;
  const BwdSequence seq = bwd_sequence(cu_seqlens_q, cu_seqlens_k, b, p);
  const BwdAligned aligned = bwd_aligned(p);
  const int sq = seq.sq, sk = seq.sk, offset = sk - sq;
  const int group = p.num_heads / p.num_kv_heads;
  const BwdKeyHead<T> kv = bwd_key_head(k, v, b, kvh, seq, p);
  device T* dk_seq =
      dk + long(b) * p.dk_batch_stride + long(seq.start_k) * p.dk_row_stride + long(kvh) * p.dk_head_stride;
  device T* dv_seq =
      dv + long(b) * p.dv_batch_stride + long(seq.start_k) * p.dv_row_stride + long(kvh) * p.dv_head_stride;

  // This threadgroup's key tiles of this dispatch; bounds uniform over the threadgroup, so every thread meets every
  // barrier and every tensor operation.
  for (int k0 = slot.first_tile * BT; k0 < sk; k0 += slot.step * BT) {
    const int nk = min(BT, sk - k0);
    auto dv_acc = acc_op.template get_destination_cooperative_tensor<decltype(tpt), decltype(tdo), float>();
    auto dk_acc = acc_op.template get_destination_cooperative_tensor<decltype(tdst), decltype(tq), float>();
    flash_sdpa::bwd_tops_zero(dv_acc);
    flash_sdpa::bwd_tops_zero(dk_acc);
    // K and V are read per (key, query) pair only (S^T, dP^T): staged as they are. The first barrier of the block
    // loop orders them before the products; the last one of the previous tile's loop, after its readers.
    bwd_stage<T, BT, D, false>(k_tile, kv.k, p.k_row_stride, k0, nk, aligned.k, tid);
    bwd_stage<T, BT, D, false>(v_tile, kv.v, p.v_row_stride, k0, nk, aligned.v, tid);
    const int2 rows = bwd_visible_queries(k0, k0 + nk - 1, p.opt.window_left, p.opt.window_right, sq, sk);

    for (int g = 0; g < group; ++g) {
      const BwdQueryHead<T> head = bwd_query_head(q, dout, lse, delta, alibi_slopes, b, kvh * group + g, seq, p);

      for (int i0 = rows.x; i0 <= rows.y; i0 += BS) {
        const int n = min(BS, rows.y + 1 - i0);  // uniform
        bwd_stage<T, BS, D, true>(q_tile, head.q, p.q_row_stride, i0, n, aligned.q, tid);
        if (NBUF == 2) {
          bwd_stage<T, BS, D, true>(do_tile, head.dout, p.do_row_stride, i0, n, aligned.dout, tid);
        }
        bwd_row_scalars<T, BS>(row_lse2, row_delta, row_lo, row_hi, head, i0, n, offset, sk, p, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);

        {
          auto st = st_op.template get_destination_cooperative_tensor<decltype(tk), decltype(tq), float>();
          st_op.run(tk, tq, st);
          st.store(ts);
        }
        if (NBUF == 1) {  // dO replaces Q in the buffer
          threadgroup_barrier(mem_flags::mem_threadgroup);
          bwd_stage<T, BS, D, true>(do_tile, head.dout, p.do_row_stride, i0, n, aligned.dout, tid);
          threadgroup_barrier(mem_flags::mem_threadgroup);
        }
        {
          auto dpt = st_op.template get_destination_cooperative_tensor<decltype(tv), decltype(tdo), float>();
          st_op.run(tv, tdo, dpt);
          dpt.store(tdp);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        // Per element (key row, staged query c): P^T and dS^T (fp32, stored as T at the same place; float T: each
        // element read, then rewritten, by one thread).
        for (int e = int(tid); e < BT * BS; e += NT) {
          const int row = e / BS, c = e % BS;
          const int j = k0 + row;
          const bool vis = j >= row_lo[c] && j <= row_hi[c];
          const float2 pds = bwd_p_ds(float2(s_strip[e], dp_strip[e]), p.opt.scale, p.opt.softcap, head.slope,
                                      i0 + c + offset - j, vis, row_lse2[c], row_delta[c]);
          pt_tile[e] = T(pds.x);
          dst_tile[e] = T(pds.y);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        acc_op.run(tpt, tdo, dv_acc);
        if (NBUF == 1) {  // Q again, in place of dO
          threadgroup_barrier(mem_flags::mem_threadgroup);
          bwd_stage<T, BS, D, true>(q_tile, head.q, p.q_row_stride, i0, n, aligned.q, tid);
          threadgroup_barrier(mem_flags::mem_threadgroup);
        }
        acc_op.run(tdst, tq, dk_acc);
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
    }

    flash_sdpa::bwd_tops_write(dk_seq, p.dk_row_stride, dk_acc, k0, nk, p.opt.scale);
    flash_sdpa::bwd_tops_write(dv_seq, p.dv_row_stride, dv_acc, k0, nk, 1.0f);
  }
}

// ---- pass 3: dQ (and d s_aux) ---------------------------------------------------------------------------------------
// Grid (H, B, query tiles), as flash_attn_bwd_dq: threadgroup z takes the query tiles grid.z - 1 - z, + grid.z, ...
// of BT queries (row_tile_slot); Q and dO of the tile stay staged while the keys the tile sees are staged BS at a
// time. Per staged block: S = Q K^T and dP = dO V^T (fp32 strips), dS per element (a T tile), dQ += dS K (scale at
// the store). The threadgroups of tile 0 of sequence 0 also reduce d s_aux[h] (bwd_sink_gradient).
template <typename T, int D>
[[max_total_threads_per_threadgroup(FLASH_SDPA_BWD_THREADS)]] kernel void flash_attn_bwd_dq_tops(
    FLASH_SDPA_BWD_DQ_KERNEL_BUFFERS, uint3 tg_pos [[threadgroup_position_in_grid]],
    uint3 tg_count [[threadgroups_per_grid]], uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
  using namespace mpp::tensor_ops;
  constexpr int NT = flash_sdpa::kBwdThreads;
  constexpr int NSG = flash_sdpa::kBwdSimdgroups;
  constexpr int E = sizeof(T);
  constexpr int BT = flash_sdpa::bwd_tops_tile_rows(D, E);        // queries of the tile
  constexpr int BS = flash_sdpa::bwd_tops_stage_rows(D, E);       // keys of a staged block
  constexpr int NBUF = flash_sdpa::bwd_tops_stage_buffers(D, E);  // 1: V, then K in one buffer
  static_assert(flash_sdpa::bwd_tops_supports(D, E), "head dim: a multiple of 16 whose tiles fit 32 KB");
  static_assert(flash_sdpa::bwd_tops_threadgroup_bytes(D, E, BT, BS, NBUF) <= flash_sdpa::kBwdMaxThreadgroupBytes,
                "Apple GPUs give a threadgroup 32 KB");
  static_assert(BT % 16 == 0 && BS % 16 == 0 && D % 16 == 0, "matmul2d shapes in multiples of 16");

  threadgroup T qdo_tile[2 * BT * D];   // Q [BT][D], dO [BT][D] (rows past the sequence 0)
  threadgroup T stage[NBUF * BS * D];   // K [BS][D] (non-finite elements 0), V [BS][D]; keys past the block 0
  threadgroup float s_strip[BT * BS];   // S = Q K^T (unscaled), [BT][BS]
  threadgroup float dp_strip[BT * BS];  // dP = dO V^T, [BT][BS]; float T: then dS in place
  threadgroup T ds_own[bwd_t_strip_elems<T>(1, BT, BS)];  // 2-byte T: dS, [BT][BS]
  threadgroup float tile_lse2[BT];                        // per query row of the tile
  threadgroup float tile_delta[BT];
  threadgroup int tile_lo[BT];
  threadgroup int tile_hi[BT];  // -1: no finite LSE or past the rows
  threadgroup float sink_partial[NSG];

  threadgroup T* q_tile = qdo_tile;
  threadgroup T* do_tile = qdo_tile + BT * D;
  threadgroup T* k_tile = stage;
  threadgroup T* v_tile = stage + (NBUF - 1) * BS * D;
  threadgroup T* ds_tile = bwd_t_strip<T>(dp_strip, ds_own);
  auto tq = tensor(q_tile, extents<int, D, BT>());
  auto tdo = tensor(do_tile, extents<int, D, BT>());
  auto tk = tensor(k_tile, extents<int, D, BS>());
  auto tv = tensor(v_tile, extents<int, D, BS>());
  auto ts = tensor(s_strip, extents<int, BS, BT>());
  auto tdp = tensor(dp_strip, extents<int, BS, BT>());
  auto tds = tensor(ds_tile, extents<int, BS, BT>());
  // S, dP (BT x BS) = Q K^T, dO V^T: the staged keys read transposed. dQ (BT x D) += dS K.
  constexpr auto s_desc = matmul2d_descriptor(BT, BS, D, false, true, false, matmul2d_descriptor::mode::multiply);
  constexpr auto dq_desc =
      matmul2d_descriptor(BT, D, BS, false, false, false, matmul2d_descriptor::mode::multiply_accumulate);
  matmul2d<s_desc, execution_simdgroups<NSG>> s_op;
  matmul2d<dq_desc, execution_simdgroups<NSG>> dq_op;

  const flash_sdpa::RowTileSlot slot = flash_sdpa::row_tile_slot(tg_pos, tg_count, true, p.tile_offset, p.tile_stride);
  const int b = slot.b, h = slot.head;
  const BwdSequence seq = bwd_sequence(cu_seqlens_q, cu_seqlens_k, b, p);
  const BwdAligned aligned = bwd_aligned(p);
  const int sq = seq.sq, sk = seq.sk, offset = sk - sq;
  const int kvh = h / (p.num_heads / p.num_kv_heads);
  const BwdQueryHead<T> head = bwd_query_head(q, dout, lse, delta, alibi_slopes, b, h, seq, p);
  device T* dq_seq =
      dq + long(b) * p.dq_batch_stride + long(seq.start_q) * p.dq_row_stride + long(h) * p.dq_head_stride;
  const BwdKeyHead<T> kv = bwd_key_head(k, v, b, kvh, seq, p);

  // This threadgroup's query tiles of this dispatch (bounds uniform over the threadgroup).
  for (int q0 = slot.first_tile * BT; q0 < sq; q0 += slot.step * BT) {
    const int nq = min(BT, sq - q0);
    auto dq_acc = dq_op.template get_destination_cooperative_tensor<decltype(tds), decltype(tk), float>();
    flash_sdpa::bwd_tops_zero(dq_acc);
    // Q and dO are read per (query, key) pair only (S, dP): staged as they are, with the tile's row scalars. The
    // first barrier of the key loop orders them before their readers; the last one of the previous tile's loop,
    // after its readers.
    bwd_stage<T, BT, D, false>(q_tile, head.q, p.q_row_stride, q0, nq, aligned.q, tid);
    bwd_stage<T, BT, D, false>(do_tile, head.dout, p.do_row_stride, q0, nq, aligned.dout, tid);
    bwd_row_scalars<T, BT>(tile_lse2, tile_delta, tile_lo, tile_hi, head, q0, nq, offset, sk, p, tid);

    // Keys any row of the tile sees (uniform bounds: every thread meets every barrier).
    const int kv_begin = flash_sdpa::visible_keys(q0 + offset, p.opt, sk).x;
    const int kv_end = flash_sdpa::visible_keys(q0 + nq - 1 + offset, p.opt, sk).y + 1;
    for (int j0 = kv_begin; j0 < kv_end; j0 += BS) {
      const int n = min(BS, kv_end - j0);
      // V is only read per (row, key) pair (dP); K is summed over keys by dS K: its non-finite elements are dropped.
      bwd_stage<T, BS, D, false>(v_tile, kv.v, p.v_row_stride, j0, n, aligned.v, tid);
      if (NBUF == 1) {  // dP first, then K replaces V
        threadgroup_barrier(mem_flags::mem_threadgroup);
        auto dp = s_op.template get_destination_cooperative_tensor<decltype(tdo), decltype(tv), float>();
        s_op.run(tdo, tv, dp);
        dp.store(tdp);
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
      bwd_stage<T, BS, D, true>(k_tile, kv.k, p.k_row_stride, j0, n, aligned.k, tid);
      threadgroup_barrier(mem_flags::mem_threadgroup);

      {
        auto s = s_op.template get_destination_cooperative_tensor<decltype(tq), decltype(tk), float>();
        s_op.run(tq, tk, s);
        s.store(ts);
      }
      if (NBUF == 2) {
        auto dp = s_op.template get_destination_cooperative_tensor<decltype(tdo), decltype(tv), float>();
        s_op.run(tdo, tv, dp);
        dp.store(tdp);
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);

      // Per element (query row, staged key c): dS (fp32, stored as T at the same place).
      for (int e = int(tid); e < BT * BS; e += NT) {
        const int row = e / BS, c = e % BS;
        const int j = j0 + c;
        const bool vis = j >= tile_lo[row] && j <= tile_hi[row];
        ds_tile[e] = T(bwd_p_ds(float2(s_strip[e], dp_strip[e]), p.opt.scale, p.opt.softcap, head.slope,
                                q0 + row + offset - j, vis, tile_lse2[row], tile_delta[row])
                           .y);
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);

      dq_op.run(tds, tk, dq_acc);
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    flash_sdpa::bwd_tops_write(dq_seq, p.dq_row_stride, dq_acc, q0, nq, p.opt.scale);
  }

  if (fc_sinks && slot.first_tile == 0 && slot.b == 0) {  // the threadgroup of tile 0 (in dispatch 0)
    bwd_sink_gradient(lse, delta, cu_seqlens_q, cu_seqlens_k, sinks, dsinks, sink_partial, h, p, tid, sg, lane);
  }
}
