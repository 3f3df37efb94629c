// Varlen / dense flash-attention forward: the kernel body, instantiated by attention_varlen.metal.
//
// Grid (query tiles, H, B): threadgroup x takes the 32-row query tiles x, x + grid.x, ... of its (head, sequence). Its 4
// simdgroups own 8 query rows each; Q (pre-scaled) and the output accumulator O live in 8x8 float
// simdgroup_matrix registers, K/V tiles are staged through threadgroup memory as float, softmax runs online in
// the log2 domain with fp32 statistics held by 4 lanes per row. Masking uses a finite large negative score
// (fast math: no inf arithmetic); a row with no visible key is written as 0 with LSE = -inf. A visible score that is
// NaN or inf makes its row NaN (FlashAttention-2's result) without entering the shared 8x8 tiles, where 0 x NaN
// would carry it into the other rows of the block.
#pragma once

#include <metal_stdlib>

#include "attention_device.h"
#include "varlen_params.h"

using namespace metal;

constant bool varlen_is_varlen [[function_constant(FLASH_SDPA_VARLEN_FC_IS_VARLEN)]];
constant bool varlen_has_softcap [[function_constant(FLASH_SDPA_VARLEN_FC_HAS_SOFTCAP)]];
constant bool varlen_has_alibi [[function_constant(FLASH_SDPA_VARLEN_FC_HAS_ALIBI)]];
constant bool varlen_has_sinks [[function_constant(FLASH_SDPA_VARLEN_FC_HAS_SINKS)]];
constant bool varlen_paged [[function_constant(FLASH_SDPA_VARLEN_FC_PAGED)]];

constant constexpr float kVarlenMasked = flash_sdpa::kMaskedScore;  // log2-domain score of an invisible key
constant constexpr float kVarlenLog2e = 1.4426950408889634f;
constant constexpr float kVarlenLn2 = 0.6931471805599453f;

// Writes diag(x_row) of this simdgroup's 8 rows into an 8x8 row-major scratch; x is held by lanes 4r..4r+3.
inline void varlen_write_diagonal(threadgroup float* diag, float x, uint lane) {
  // Entry e = lane is on row lane / 8 (0..3), entry e = lane + 32 on row lane / 8 + 4: both are shuffles every
  // lane executes.
  const float upper = simd_shuffle(x, ushort((lane / 8) * 4));
  const float lower = simd_shuffle(x, ushort((lane / 8 + 4) * 4));
  diag[lane] = (lane / 8 == lane % 8) ? upper : 0.0f;
  diag[lane + 32] = (lane / 8 + 4 == lane % 8) ? lower : 0.0f;
}

template <typename T, int D>
[[max_total_threads_per_threadgroup(FLASH_SDPA_VARLEN_THREADS)]] kernel void flash_attn_varlen(
    const device T* q [[buffer(FLASH_SDPA_VARLEN_BUFFER_Q)]],
    const device T* k [[buffer(FLASH_SDPA_VARLEN_BUFFER_K)]],
    const device T* v [[buffer(FLASH_SDPA_VARLEN_BUFFER_V)]],
    device T* out [[buffer(FLASH_SDPA_VARLEN_BUFFER_OUT)]],
    device uint* lse [[buffer(FLASH_SDPA_VARLEN_BUFFER_LSE)]],  // float bits
    const device int* cu_seqlens_q [[buffer(FLASH_SDPA_VARLEN_BUFFER_CU_SEQLENS_Q)]],
    const device int* cu_seqlens_k [[buffer(FLASH_SDPA_VARLEN_BUFFER_CU_SEQLENS_K)]],
    const device float* alibi_slopes [[buffer(FLASH_SDPA_VARLEN_BUFFER_ALIBI)]],
    const device float* sinks [[buffer(FLASH_SDPA_VARLEN_BUFFER_SINKS)]],
    constant flash_sdpa::VarlenParams& p [[buffer(FLASH_SDPA_VARLEN_BUFFER_PARAMS)]],
    const device int* block_table [[buffer(FLASH_SDPA_VARLEN_BUFFER_BLOCK_TABLE)]],
    uint3 tg_pos [[threadgroup_position_in_grid]],
    uint3 tg_count [[threadgroups_per_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr int BQ = flash_sdpa::kVarlenBlockQ;
  constexpr int BK = flash_sdpa::varlen_block_k(D);
  constexpr int NT = flash_sdpa::kVarlenThreads;
  constexpr int DB = D / 8;  // 8-column blocks of the head dim
  constexpr int KB = BK / 8;  // 8-row blocks of a key tile
  constexpr int KV_FLOATS = 2 * BK * D;
  // Q is loaded and O written through the K/V tile, CHUNK head-dim columns of all 32 rows at a time.
  constexpr int CHUNK = BQ * D <= KV_FLOATS ? D : D / 2;
  static_assert(D % 8 == 0 && BK % 8 == 0, "whole 8x8 tiles");
  static_assert(BQ * CHUNK <= KV_FLOATS && D % CHUNK == 0 && CHUNK % 8 == 0, "Q/O staging fits the K/V tile");
  static_assert(BK % 4 == 0, "4 lanes share a score row");

  threadgroup float kv_tile[KV_FLOATS];  // K rows [0, BK) then V rows [BK, 2 BK), D floats each
  threadgroup float score_tile[BQ * BK];  // simdgroup s: rows [8s, 8s + 8) x BK probabilities
  threadgroup float diag_tile[flash_sdpa::kVarlenSimdgroups * 64];  // simdgroup s: an 8x8 diagonal
  threadgroup uint bad_tile[BQ];  // row r of the tile saw a non-finite visible score
  threadgroup long key_offsets[2 * BK];  // paged: offsets of key rows k0 + r in k ([r]) and v ([BK + r]); -1: masked

  const int b = int(tg_pos.z);
  const int h = int(tg_pos.y);

  // Sequence extents, clamped to the tensors whatever cu_seqlens holds.
  int start_q = 0, start_k = 0, sq, sk;
  if (varlen_is_varlen) {
    start_q = min(max(cu_seqlens_q[b], 0), p.q_rows);
    sq = min(max(cu_seqlens_q[b + 1], start_q), p.q_rows) - start_q;
    if (varlen_paged) {  // each sequence has its own block-table row: keys count from 0, up to the row's capacity
      const long capacity = long(p.max_blocks) * p.block_size;
      sk = int(clamp(long(cu_seqlens_k[b + 1]) - long(cu_seqlens_k[b]), 0l, capacity));
    } else {
      start_k = min(max(cu_seqlens_k[b], 0), p.k_rows);
      sk = min(max(cu_seqlens_k[b + 1], start_k), p.k_rows) - start_k;
    }
  } else {
    sq = min(p.seqlen_q, p.q_rows);
    sk = min(p.seqlen_k, p.k_rows);
  }

  const int kvh = h / (p.num_heads / p.num_kv_heads);
  const device T* q_seq = q + long(b) * p.q_batch_stride + long(start_q) * p.q_row_stride + long(h) * p.q_head_stride;
  const device T* k_seq = k + long(b) * p.k_batch_stride + long(start_k) * p.k_row_stride + long(kvh) * p.k_head_stride;
  const device T* v_seq = v + long(b) * p.v_batch_stride + long(start_k) * p.v_row_stride + long(kvh) * p.v_head_stride;
  device T* o_seq = out + long(b) * p.o_batch_stride + long(start_q) * p.o_row_stride + long(h) * p.o_head_stride;
  device uint* lse_seq = lse + long(b) * p.lse_batch_stride + long(h) * p.lse_head_stride + start_q;

  // Query tiles q0, q0 + grid x 32, ...: every row of every sequence is computed whatever max_seqlen_q (which only
  // sizes the grid) says. The loop bounds are uniform across the threadgroup, so every thread meets every barrier.
  for (int q0 = int(tg_pos.x) * BQ; q0 < sq; q0 += int(tg_count.x) * BQ) {
    // Keys any row of this tile can see (bottom-right aligned: row i sits at key position i + sk - sq).
    const int offset = sk - sq;
    const int last_row = min(q0 + BQ, sq) - 1;
    const int kv_begin = flash_sdpa::visible_keys(q0 + offset, p.window_left, p.window_right, sk).x;
    const int kv_end = flash_sdpa::visible_keys(last_row + offset, p.window_left, p.window_right, sk).y + 1;

    threadgroup float* k_tile = kv_tile;
    threadgroup float* v_tile = kv_tile + BK * D;
    threadgroup float* s_strip = score_tile + sg * 8 * BK;
    threadgroup float* diag = diag_tile + sg * 64;

    // Q rows of this simdgroup, times scale, as DB 8x8 blocks.
    simdgroup_matrix<float, 8, 8> q_frag[DB];
    for (int c0 = 0; c0 < D; c0 += CHUNK) {
      for (int idx = int(tid); idx < BQ * CHUNK; idx += NT) {
        const int r = idx / CHUNK, c = idx % CHUNK;
        const int i = q0 + r;
        kv_tile[idx] = i < sq ? float(q_seq[long(i) * p.q_row_stride + c0 + c]) * p.scale : 0.0f;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (int cb = 0; cb < CHUNK / 8; ++cb) {
        simdgroup_load(q_frag[c0 / 8 + cb], kv_tile + sg * 8 * CHUNK + cb * 8, CHUNK);
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    simdgroup_matrix<float, 8, 8> o_frag[DB];
    for (int db = 0; db < DB; ++db) {
      o_frag[db] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }

    // Softmax state of row `row` of this simdgroup, replicated in its 4 lanes.
    const int row = int(lane) / 4;
    const int sub = int(lane) % 4;
    const int i = q0 + int(sg) * 8 + row;
    const int2 keys_i = flash_sdpa::visible_keys(i + offset, p.window_left, p.window_right, sk);
    const int lo_i = keys_i.x;
    const int hi_i = i >= sq ? -1 : keys_i.y;
    bool bad = false;  // this lane saw a visible score that is NaN or inf
    const float slope = varlen_has_alibi ? alibi_slopes[long(b) * p.alibi_batch_stride + h] : 0.0f;
    float m = kVarlenMasked;  // running max, log2 domain
    float l = 0.0f;           // running sum of exp2(s - m)

    for (int k0 = kv_begin; k0 < kv_end; k0 += BK) {
      // Paged: where each key row of the tile lives (one block-table read per key; invalid ids are masked).
      if (varlen_paged) {
        for (int r = int(tid); r < BK; r += NT) {
          const int j = k0 + r;
          long k_off = -1, v_off = -1;
          if (j < kv_end) {
            const int id = block_table[long(b) * p.block_table_stride + j / p.block_size];
            if (id >= 0 && id < p.num_blocks) {
              const long slot = j % p.block_size;
              k_off = long(id) * p.k_block_stride + slot * p.k_row_stride;
              v_off = long(id) * p.v_block_stride + slot * p.v_row_stride;
            }
          }
          key_offsets[r] = k_off;
          key_offsets[BK + r] = v_off;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
      // Stage keys [k0, k0 + BK) as float; rows at or past kv_end (or masked) are zeros.
      for (int idx = int(tid); idx < BK * D; idx += NT) {
        const int r = idx / D, c = idx % D;
        const int j = k0 + r;
        long k_off = long(j) * p.k_row_stride, v_off = long(j) * p.v_row_stride;
        bool in = j < kv_end;
        if (varlen_paged) {
          k_off = key_offsets[r];
          v_off = key_offsets[BK + r];
          in = k_off >= 0;
        }
        k_tile[idx] = in ? float(k_seq[k_off + c]) : 0.0f;
        v_tile[idx] = in ? float(v_seq[v_off + c]) : 0.0f;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);

      // S (8 x BK) = Q K^T: K blocks loaded transposed.
      for (int kb = 0; kb < KB; ++kb) {
        simdgroup_matrix<float, 8, 8> s = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        for (int db = 0; db < DB; ++db) {
          simdgroup_matrix<float, 8, 8> kt;
          simdgroup_load(kt, k_tile + kb * 8 * D + db * 8, D, ulong2(0, 0), true);
          simdgroup_multiply_accumulate(s, q_frag[db], kt, s);
        }
        simdgroup_store(s, s_strip + kb * 8, BK);
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);

      // Online softmax over this lane's columns sub, sub + 4, ...
      float sv[BK / 4];
      float tile_max = kVarlenMasked;
      for (int t = 0; t < BK / 4; ++t) {
        const int c = sub + 4 * t;
        const int j = k0 + c;
        float s = s_strip[row * BK + c];
        bool visible = j >= lo_i && j <= hi_i && (!varlen_paged || key_offsets[c] >= 0);
        if (visible && flash_sdpa::is_nonfinite(s)) {  // before the softcap clamp could hide a NaN
          bad = true;
          visible = false;
        }
        if (varlen_has_softcap) {
          s = flash_sdpa::apply_softcap(s, p.softcap);
        }
        if (varlen_has_alibi) {
          s -= slope * abs(float(i + offset - j));
        }
        s = visible ? s * kVarlenLog2e : kVarlenMasked;
        sv[t] = s;
        tile_max = max(tile_max, s);
      }
      tile_max = max(tile_max, simd_shuffle_xor(tile_max, ushort(1)));
      tile_max = max(tile_max, simd_shuffle_xor(tile_max, ushort(2)));
      const float m_new = max(m, tile_max);
      const float alpha = exp2(m - m_new);
      float row_sum = 0.0f;
      for (int t = 0; t < BK / 4; ++t) {
        const float pr = sv[t] > kVarlenMasked ? exp2(sv[t] - m_new) : 0.0f;
        s_strip[row * BK + sub + 4 * t] = pr;
        row_sum += pr;
      }
      row_sum += simd_shuffle_xor(row_sum, ushort(1));
      row_sum += simd_shuffle_xor(row_sum, ushort(2));
      l = l * alpha + row_sum;
      m = m_new;
      varlen_write_diagonal(diag, alpha, lane);
      simdgroup_barrier(mem_flags::mem_threadgroup);

      // O = diag(alpha) O + P V.
      simdgroup_matrix<float, 8, 8> rescale;
      simdgroup_load(rescale, diag, 8);
      simdgroup_matrix<float, 8, 8> p_frag[KB];
      for (int kb = 0; kb < KB; ++kb) {
        simdgroup_load(p_frag[kb], s_strip + kb * 8, BK);
      }
      for (int db = 0; db < DB; ++db) {
        simdgroup_matrix<float, 8, 8> acc;
        simdgroup_multiply(acc, rescale, o_frag[db]);
        for (int kb = 0; kb < KB; ++kb) {
          simdgroup_matrix<float, 8, 8> vb;
          simdgroup_load(vb, v_tile + kb * 8 * D + db * 8, D);
          simdgroup_multiply_accumulate(acc, p_frag[kb], vb, acc);
        }
        o_frag[db] = acc;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    // Normalise: sinks join the denominator only; a row with no visible key gets 0 and LSE = -inf.
    float m_final = m, factor = 1.0f, denom = l;
    if (varlen_has_sinks) {
      const float sink = sinks[h] * kVarlenLog2e;
      m_final = max(m, sink);
      factor = exp2(m - m_final);
      denom = l * factor + exp2(sink - m_final);
    }
    const bool empty = !(l > 0.0f);
    uint bad_row = bad ? 1u : 0u;  // over the row's 4 lanes; every lane shuffles (no short-circuit)
    bad_row |= simd_shuffle_xor(bad_row, ushort(1));
    bad_row |= simd_shuffle_xor(bad_row, ushort(2));
    if (sub == 0) {
      bad_tile[int(sg) * 8 + row] = bad_row;
    }
    varlen_write_diagonal(diag, empty ? 0.0f : factor / denom, lane);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_matrix<float, 8, 8> normalise;
    simdgroup_load(normalise, diag, 8);

    for (int c0 = 0; c0 < D; c0 += CHUNK) {
      for (int cb = 0; cb < CHUNK / 8; ++cb) {
        simdgroup_matrix<float, 8, 8> ob;
        simdgroup_multiply(ob, normalise, o_frag[c0 / 8 + cb]);
        simdgroup_store(ob, kv_tile + sg * 8 * CHUNK + cb * 8, CHUNK);
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (int idx = int(tid); idx < BQ * CHUNK; idx += NT) {
        const int r = idx / CHUNK, c = idx % CHUNK;
        if (q0 + r < sq) {
          const float o = bad_tile[r] != 0 ? as_type<float>(flash_sdpa::kNanBits) : kv_tile[idx];
          o_seq[long(q0 + r) * p.o_row_stride + c0 + c] = T(o);
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    if (sub == 0 && i < sq) {
      lse_seq[i] = bad_row != 0 ? flash_sdpa::kNanBits
                   : empty        ? flash_sdpa::kNegInfBits
                                  : as_type<uint>((m_final + log2(denom)) * kVarlenLn2);
    }
  }
}
