// FlashAttention-2 backward of the varlen / dense attention: kernel bodies, instantiated by attention_backward.metal.
//
// With P = exp(s' - lse) recomputed from q, k and the forward's LSE (s' = the forward's transformed score: scale,
// softcap, ALiBi, mask), dP = dO V^T and delta = rowsum(dO * O):
//   dS = P * (dP - delta) * ds'/ds      (ds'/ds = 1 - tanh^2 with softcap, else 1; ALiBi and masks add constants)
//   dV = P^T dO,   dK = scale * dS^T Q,   dQ = scale * dS K,   d s_aux[h] = -sum_rows exp(s_aux[h] - lse) * delta.
// Pass 2 owns key rows (dK, dV in registers, summed over the query heads of the GQA group), pass 3 owns query rows
// (dQ in registers): each gradient element has one writer and a fixed summation order, so no atomics and the
// result is bit-identical on repeat. Accumulation is fp32 throughout. Fast math: masking is explicit (a masked
// pair contributes 0, never exp of a large negative), and a row whose LSE is not finite (no visible key: -inf) has
// P = 0. A masked pair's operands are selected away, never multiplied by its 0 (0 x NaN is NaN): a NaN in k, v, q or
// dO where a row cannot see it changes nothing of that row's gradients. Plain per-thread loops and shuffles; no
// simdgroup_matrix.
#pragma once

#include <metal_stdlib>

#include "attention_device.h"
#include "backward_params.h"

using namespace metal;

constant constexpr float kBwdLog2e = 1.4426950408889634f;

// Sequence b's rows: queries [start_q, start_q + sq), keys [start_k, start_k + sk), clamped to the tensors
// whatever cu_seqlens holds (as the forward).
struct BwdSequence {
  int start_q, sq, start_k, sk;
};

inline BwdSequence bwd_sequence(const device int* cu_q, const device int* cu_k, int b,
                                constant flash_sdpa::BackwardParams& p) {
  BwdSequence s;
  if (fc_varlen) {
    const int2 q_rows = flash_sdpa::packed_rows(cu_q, b, p.q_rows);
    const int2 k_rows = flash_sdpa::packed_rows(cu_k, b, p.k_rows);
    s.start_q = q_rows.x;
    s.sq = q_rows.y;
    s.start_k = k_rows.x;
    s.sk = k_rows.y;
  } else {
    s.start_q = 0;
    s.sq = min(p.seqlen_q, p.q_rows);
    s.start_k = 0;
    s.sk = min(p.seqlen_k, p.k_rows);
  }
  return s;
}

// Query rows [x, y] (y < x: none) of a sequence that see at least one key of [k_lo, k_hi] (0 <= k_lo <= k_hi < sk):
// row i sees [i + sk - sq - left, i + sk - sq + right]. 64-bit intermediates: no overflow whatever the window.
inline int2 bwd_visible_queries(int k_lo, int k_hi, int window_left, int window_right, int sq, int sk) {
  const long offset = long(sk) - long(sq);
  const long lo = window_right < 0 ? 0l : max(long(k_lo) - offset - long(window_right), 0l);
  const long hi = window_left < 0 ? long(sq) - 1 : min(long(k_hi) - offset + long(window_left), long(sq) - 1);
  return int2(int(min(lo, long(sq))), int(max(hi, -1l)));
}

// The forward's score transform of s = scale * q . k (softcap, then ALiBi at distance i + sk - sq - j), in the log2
// domain; *dsoft = ds'/ds.
inline float bwd_score_log2(float s, float softcap, float slope, int dist, thread float* dsoft) {
  *dsoft = 1.0f;
  if (fc_softcap) {
    s = flash_sdpa::apply_softcap(s, softcap);
    const float th = s / softcap;
    *dsoft = 1.0f - th * th;
  }
  if (fc_alibi) {
    s -= slope * abs(float(dist));
  }
  return flash_sdpa::clamp_score(s) * kBwdLog2e;  // as the forward
}

// (P, dS) of one (query, key) pair from s = scale q . k and dP = dO . v: P = exp(s' - lse) where visible, else 0
// (selected: s or dP may be NaN for a masked pair).
inline float2 bwd_p_ds(float2 s_dp, float softcap, float slope, int dist, bool visible, float lse2, float delta) {
  float dsoft;
  const float s2 = bwd_score_log2(s_dp.x, softcap, slope, dist, &dsoft);
  const float pr = visible ? exp2(s2 - lse2) : 0.0f;
  return visible ? float2(pr, pr * (s_dp.y - delta) * dsoft) : float2(0.0f);
}

// The forward's LSE of a row in the log2 domain; false when it is not finite (no visible key, or a NaN row).
inline bool bwd_row_lse2(uint bits, thread float* lse2) {
  *lse2 = as_type<float>(bits) * kBwdLog2e;
  return !flash_sdpa::is_nonfinite(as_type<float>(bits));
}

// Sums a value over the R lanes of a row (R consecutive lanes, R a power of two <= 32). Two (score, dP) pairs per
// call: the collectives are the emulator's (and a simdgroup's) fixed cost per step.
template <int R>
inline float4 bwd_row_sum(float4 x) {
  for (ushort m = 1; m < ushort(R); m <<= 1) {
    x += simd_shuffle_xor(x, m);
  }
  return x;
}

// ---- pass 1: delta = rowsum(dO * O) ---------------------------------------------------------------------------------
// Grid (row tiles, H, B); threadgroup x takes tiles x, x + grid.x, ... of 32 rows; each simdgroup 8 rows, lanes
// over the head dim.
template <typename T>
[[max_total_threads_per_threadgroup(FLASH_SDPA_BWD_THREADS)]] kernel void flash_attn_bwd_delta(
    const device T* out [[buffer(FLASH_SDPA_BWD_BUFFER_OUT)]],
    const device T* dout [[buffer(FLASH_SDPA_BWD_BUFFER_DOUT)]],
    device float* delta [[buffer(FLASH_SDPA_BWD_BUFFER_DELTA)]],
    const device int* cu_seqlens_q [[buffer(FLASH_SDPA_BWD_BUFFER_CU_SEQLENS_Q)]],
    const device int* cu_seqlens_k [[buffer(FLASH_SDPA_BWD_BUFFER_CU_SEQLENS_K)]],
    constant flash_sdpa::BackwardParams& p [[buffer(FLASH_SDPA_BWD_BUFFER_PARAMS)]],
    uint3 tg_pos [[threadgroup_position_in_grid]], uint3 tg_count [[threadgroups_per_grid]],
    uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
  constexpr int ROWS = flash_sdpa::kBwdDeltaRows;
  constexpr int PER_SG = ROWS / flash_sdpa::kBwdSimdgroups;
  const int b = int(tg_pos.z), h = int(tg_pos.y);
  const BwdSequence seq = bwd_sequence(cu_seqlens_q, cu_seqlens_k, b, p);
  const device T* o_seq =
      out + long(b) * p.o_batch_stride + long(seq.start_q) * p.o_row_stride + long(h) * p.o_head_stride;
  const device T* do_seq =
      dout + long(b) * p.do_batch_stride + long(seq.start_q) * p.do_row_stride + long(h) * p.do_head_stride;
  device float* delta_seq = delta + long(b) * p.delta_batch_stride + long(h) * p.delta_head_stride + seq.start_q;

  for (int q0 = int(tg_pos.x) * ROWS; q0 < seq.sq; q0 += int(tg_count.x) * ROWS) {
    for (int r = 0; r < PER_SG; ++r) {
      const int i = q0 + int(sg) * PER_SG + r;  // uniform across the simdgroup
      if (i >= seq.sq) {
        break;
      }
      float acc = 0.0f;
      for (int c = int(lane); c < p.head_dim; c += 32) {
        acc += float(do_seq[long(i) * p.do_row_stride + c]) * float(o_seq[long(i) * p.o_row_stride + c]);
      }
      acc = simd_sum(acc);
      if (lane == 0) {
        delta_seq[i] = acc;
      }
    }
  }
}

// ---- pass 2: dK, dV -------------------------------------------------------------------------------------------------
// Grid (key tiles, Hkv, B); threadgroup x takes the key tiles x, x + grid.x, ... (max_seqlen_k only sizes the grid).
// Lanes R t .. R t + R - 1 own key row t of the tile (K, V, dK, dV columns in registers); the query rows that see
// the tile are staged STAGE at a time, for each query head of the group in turn.
template <typename T, int D>
[[max_total_threads_per_threadgroup(FLASH_SDPA_BWD_THREADS)]] kernel void flash_attn_bwd_dkdv(
    const device T* q [[buffer(FLASH_SDPA_BWD_BUFFER_Q)]], const device T* k [[buffer(FLASH_SDPA_BWD_BUFFER_K)]],
    const device T* v [[buffer(FLASH_SDPA_BWD_BUFFER_V)]], const device T* dout [[buffer(FLASH_SDPA_BWD_BUFFER_DOUT)]],
    const device uint* lse [[buffer(FLASH_SDPA_BWD_BUFFER_LSE)]],  // float bits
    const device float* delta [[buffer(FLASH_SDPA_BWD_BUFFER_DELTA)]],
    device T* dk [[buffer(FLASH_SDPA_BWD_BUFFER_DK)]], device T* dv [[buffer(FLASH_SDPA_BWD_BUFFER_DV)]],
    const device int* cu_seqlens_q [[buffer(FLASH_SDPA_BWD_BUFFER_CU_SEQLENS_Q)]],
    const device int* cu_seqlens_k [[buffer(FLASH_SDPA_BWD_BUFFER_CU_SEQLENS_K)]],
    const device float* alibi_slopes [[buffer(FLASH_SDPA_BWD_BUFFER_ALIBI)]],
    constant flash_sdpa::BackwardParams& p [[buffer(FLASH_SDPA_BWD_BUFFER_PARAMS)]],
    uint3 tg_pos [[threadgroup_position_in_grid]], uint3 tg_count [[threadgroups_per_grid]],
    uint tid [[thread_index_in_threadgroup]]) {
  constexpr int NT = flash_sdpa::kBwdThreads;
  constexpr int R = flash_sdpa::bwd_lanes_per_row(D);
  constexpr int CPT = D / R;  // columns per lane
  constexpr int BK = flash_sdpa::bwd_tile_rows(D);
  constexpr int STAGE = flash_sdpa::bwd_stage_rows(D);

  threadgroup float q_stage[STAGE * D];   // scale * q rows
  threadgroup float do_stage[STAGE * D];  // dO rows
  threadgroup float row_lse2[STAGE];      // LSE * log2(e)
  threadgroup float row_delta[STAGE];
  threadgroup int row_lo[STAGE];  // visible keys [lo, hi]; hi = -1 for a row with no finite LSE
  threadgroup int row_hi[STAGE];

  const int b = int(tg_pos.z), kvh = int(tg_pos.y);
  const BwdSequence seq = bwd_sequence(cu_seqlens_q, cu_seqlens_k, b, p);
  const int sq = seq.sq, sk = seq.sk, offset = sk - sq;
  const int group = p.num_heads / p.num_kv_heads;
  const int slice = int(tid) % R;

  const device T* k_seq =
      k + long(b) * p.k_batch_stride + long(seq.start_k) * p.k_row_stride + long(kvh) * p.k_head_stride;
  const device T* v_seq =
      v + long(b) * p.v_batch_stride + long(seq.start_k) * p.v_row_stride + long(kvh) * p.v_head_stride;
  device T* dk_seq =
      dk + long(b) * p.dk_batch_stride + long(seq.start_k) * p.dk_row_stride + long(kvh) * p.dk_head_stride;
  device T* dv_seq =
      dv + long(b) * p.dv_batch_stride + long(seq.start_k) * p.dv_row_stride + long(kvh) * p.dv_head_stride;

  for (int k0 = int(tg_pos.x) * BK; k0 < sk; k0 += int(tg_count.x) * BK) {
    const int j = k0 + int(tid) / R;
    const bool j_in = j < sk;
    float kr[CPT], vr[CPT], dkr[CPT], dvr[CPT];
    for (int t = 0; t < CPT; ++t) {
      const int c = slice + R * t;
      kr[t] = j_in ? float(k_seq[long(j) * p.k_row_stride + c]) : 0.0f;
      vr[t] = j_in ? float(v_seq[long(j) * p.v_row_stride + c]) : 0.0f;
      dkr[t] = 0.0f;
      dvr[t] = 0.0f;
    }
    const int2 rows = bwd_visible_queries(k0, min(k0 + BK, sk) - 1, p.opt.window_left, p.opt.window_right, sq, sk);

    for (int g = 0; g < group; ++g) {
      const int h = kvh * group + g;
      const device T* q_seq =
          q + long(b) * p.q_batch_stride + long(seq.start_q) * p.q_row_stride + long(h) * p.q_head_stride;
      const device T* do_seq =
          dout + long(b) * p.do_batch_stride + long(seq.start_q) * p.do_row_stride + long(h) * p.do_head_stride;
      const device uint* lse_seq = lse + long(b) * p.lse_batch_stride + long(h) * p.lse_head_stride + seq.start_q;
      const device float* delta_seq =
          delta + long(b) * p.delta_batch_stride + long(h) * p.delta_head_stride + seq.start_q;
      const float slope = fc_alibi ? flash_sdpa::alibi_slope(alibi_slopes, p.opt, b, h) : 0.0f;

      for (int i0 = rows.x; i0 <= rows.y; i0 += STAGE) {
        const int n = min(STAGE, rows.y + 1 - i0);  // uniform
        for (int idx = int(tid); idx < n * D; idx += NT) {
          const int r = idx / D, c = idx % D;
          q_stage[idx] = float(q_seq[long(i0 + r) * p.q_row_stride + c]) * p.opt.scale;
          do_stage[idx] = float(do_seq[long(i0 + r) * p.do_row_stride + c]);
        }
        for (int r = int(tid); r < n; r += NT) {
          const int i = i0 + r;
          float lse2;
          const bool active = bwd_row_lse2(lse_seq[i], &lse2);
          const int2 keys = flash_sdpa::visible_keys(i + offset, p.opt, sk);
          row_lse2[r] = active ? lse2 : 0.0f;
          row_delta[r] = active ? delta_seq[i] : 0.0f;
          row_lo[r] = keys.x;
          row_hi[r] = active ? keys.y : -1;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        for (int r = 0; r < n; r += 2) {  // staged rows r and r1 = r + 1 (r1 = r, weight 0, past the end)
          const bool two = r + 1 < n;     // uniform
          const int r1 = two ? r + 1 : r;
          float4 acc = float4(0.0f);  // (s, dP) of row r, then of row r1
          for (int t = 0; t < CPT; ++t) {
            const int c = slice + R * t;
            acc += float4(q_stage[r * D + c] * kr[t], do_stage[r * D + c] * vr[t], q_stage[r1 * D + c] * kr[t],
                          do_stage[r1 * D + c] * vr[t]);
          }
          acc = bwd_row_sum<R>(acc);
          const bool vis = j >= row_lo[r] && j <= row_hi[r];
          const bool vis1 = two && j >= row_lo[r1] && j <= row_hi[r1];
          const float2 a = bwd_p_ds(acc.xy, p.opt.softcap, slope, i0 + r + offset - j, vis, row_lse2[r], row_delta[r]);
          const float2 b1 =
              bwd_p_ds(acc.zw, p.opt.softcap, slope, i0 + r1 + offset - j, vis1, row_lse2[r1], row_delta[r1]);
          for (int t = 0; t < CPT; ++t) {
            const int c = slice + R * t;
            const float do0 = vis ? do_stage[r * D + c] : 0.0f, do1 = vis1 ? do_stage[r1 * D + c] : 0.0f;
            const float q0v = vis ? q_stage[r * D + c] : 0.0f, q1v = vis1 ? q_stage[r1 * D + c] : 0.0f;
            dvr[t] += a.x * do0 + b1.x * do1;
            dkr[t] += a.y * q0v + b1.y * q1v;  // q carries the scale: dK = scale dS^T Q
          }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
    }

    if (j_in) {
      for (int t = 0; t < CPT; ++t) {
        const int c = slice + R * t;
        dk_seq[long(j) * p.dk_row_stride + c] = T(dkr[t]);
        dv_seq[long(j) * p.dv_row_stride + c] = T(dvr[t]);
      }
    }
  }
}

// ---- pass 3: dQ (and d s_aux) ---------------------------------------------------------------------------------------
// Grid (query tiles, H, B); threadgroup x takes the query tiles x, x + grid.x, ... Lanes R t .. R t + R - 1 own
// query row t of the tile (q, dO, dQ columns in registers); the keys the tile sees are staged STAGE at a time.
template <typename T, int D>
[[max_total_threads_per_threadgroup(FLASH_SDPA_BWD_THREADS)]] kernel void flash_attn_bwd_dq(
    const device T* q [[buffer(FLASH_SDPA_BWD_BUFFER_Q)]], const device T* k [[buffer(FLASH_SDPA_BWD_BUFFER_K)]],
    const device T* v [[buffer(FLASH_SDPA_BWD_BUFFER_V)]], const device T* dout [[buffer(FLASH_SDPA_BWD_BUFFER_DOUT)]],
    const device uint* lse [[buffer(FLASH_SDPA_BWD_BUFFER_LSE)]],  // float bits
    const device float* delta [[buffer(FLASH_SDPA_BWD_BUFFER_DELTA)]],
    device T* dq [[buffer(FLASH_SDPA_BWD_BUFFER_DQ)]],
    const device int* cu_seqlens_q [[buffer(FLASH_SDPA_BWD_BUFFER_CU_SEQLENS_Q)]],
    const device int* cu_seqlens_k [[buffer(FLASH_SDPA_BWD_BUFFER_CU_SEQLENS_K)]],
    const device float* alibi_slopes [[buffer(FLASH_SDPA_BWD_BUFFER_ALIBI)]],
    const device float* sinks [[buffer(FLASH_SDPA_BWD_BUFFER_SINKS)]],
    device float* dsinks [[buffer(FLASH_SDPA_BWD_BUFFER_DSINKS)]],
    constant flash_sdpa::BackwardParams& p [[buffer(FLASH_SDPA_BWD_BUFFER_PARAMS)]],
    uint3 tg_pos [[threadgroup_position_in_grid]], uint3 tg_count [[threadgroups_per_grid]],
    uint tid [[thread_index_in_threadgroup]], uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr int NT = flash_sdpa::kBwdThreads;
  constexpr int R = flash_sdpa::bwd_lanes_per_row(D);
  constexpr int CPT = D / R;
  constexpr int BQ = flash_sdpa::bwd_tile_rows(D);
  constexpr int STAGE = flash_sdpa::bwd_stage_rows(D);

  threadgroup float k_stage[STAGE * D];
  threadgroup float v_stage[STAGE * D];
  threadgroup float sink_partial[flash_sdpa::kBwdSimdgroups];

  const int b = int(tg_pos.z), h = int(tg_pos.y);
  const BwdSequence seq = bwd_sequence(cu_seqlens_q, cu_seqlens_k, b, p);
  const int sq = seq.sq, sk = seq.sk, offset = sk - sq;
  const int kvh = h / (p.num_heads / p.num_kv_heads);
  const int slice = int(tid) % R;

  const device T* q_seq =
      q + long(b) * p.q_batch_stride + long(seq.start_q) * p.q_row_stride + long(h) * p.q_head_stride;
  const device T* do_seq =
      dout + long(b) * p.do_batch_stride + long(seq.start_q) * p.do_row_stride + long(h) * p.do_head_stride;
  device T* dq_seq =
      dq + long(b) * p.dq_batch_stride + long(seq.start_q) * p.dq_row_stride + long(h) * p.dq_head_stride;
  const device T* k_seq =
      k + long(b) * p.k_batch_stride + long(seq.start_k) * p.k_row_stride + long(kvh) * p.k_head_stride;
  const device T* v_seq =
      v + long(b) * p.v_batch_stride + long(seq.start_k) * p.v_row_stride + long(kvh) * p.v_head_stride;
  const device uint* lse_seq = lse + long(b) * p.lse_batch_stride + long(h) * p.lse_head_stride + seq.start_q;
  const device float* delta_seq = delta + long(b) * p.delta_batch_stride + long(h) * p.delta_head_stride + seq.start_q;
  const float slope = fc_alibi ? flash_sdpa::alibi_slope(alibi_slopes, p.opt, b, h) : 0.0f;

  for (int q0 = int(tg_pos.x) * BQ; q0 < sq; q0 += int(tg_count.x) * BQ) {
    const int i = q0 + int(tid) / R;
    const bool i_in = i < sq;
    float lse2 = 0.0f;
    const bool active = i_in && bwd_row_lse2(lse_seq[i], &lse2);
    const float row_delta = active ? delta_seq[i] : 0.0f;
    const int2 keys_i = flash_sdpa::visible_keys(i + offset, p.opt, sk);
    const int lo_i = keys_i.x, hi_i = active ? keys_i.y : -1;
    float qr[CPT], dor[CPT], dqr[CPT];
    for (int t = 0; t < CPT; ++t) {
      const int c = slice + R * t;
      qr[t] = i_in ? float(q_seq[long(i) * p.q_row_stride + c]) * p.opt.scale : 0.0f;
      dor[t] = i_in ? float(do_seq[long(i) * p.do_row_stride + c]) : 0.0f;
      dqr[t] = 0.0f;
    }

    // Keys any row of the tile sees (uniform bounds: every thread meets every barrier).
    const int last_row = min(q0 + BQ, sq) - 1;
    const int kv_begin = flash_sdpa::visible_keys(q0 + offset, p.opt, sk).x;
    const int kv_end = flash_sdpa::visible_keys(last_row + offset, p.opt, sk).y + 1;
    for (int j0 = kv_begin; j0 < kv_end; j0 += STAGE) {
      const int n = min(STAGE, kv_end - j0);
      for (int idx = int(tid); idx < n * D; idx += NT) {
        const int r = idx / D, c = idx % D;
        k_stage[idx] = float(k_seq[long(j0 + r) * p.k_row_stride + c]);
        v_stage[idx] = float(v_seq[long(j0 + r) * p.v_row_stride + c]);
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);

      for (int r = 0; r < n; r += 2) {  // staged keys r and r1 = r + 1 (r1 = r, weight 0, past the end)
        const bool two = r + 1 < n;     // uniform
        const int r1 = two ? r + 1 : r;
        const int j = j0 + r, j1 = j0 + r1;
        float4 acc = float4(0.0f);  // (s, dP) of key r, then of key r1
        for (int t = 0; t < CPT; ++t) {
          const int c = slice + R * t;
          acc += float4(qr[t] * k_stage[r * D + c], dor[t] * v_stage[r * D + c], qr[t] * k_stage[r1 * D + c],
                        dor[t] * v_stage[r1 * D + c]);
        }
        acc = bwd_row_sum<R>(acc);
        const bool vis = j >= lo_i && j <= hi_i, vis1 = two && j1 >= lo_i && j1 <= hi_i;
        const float ds = bwd_p_ds(acc.xy, p.opt.softcap, slope, i + offset - j, vis, lse2, row_delta).y;
        const float ds1 = bwd_p_ds(acc.zw, p.opt.softcap, slope, i + offset - j1, vis1, lse2, row_delta).y;
        for (int t = 0; t < CPT; ++t) {
          const int c = slice + R * t;
          const float k0v = vis ? k_stage[r * D + c] : 0.0f, k1v = vis1 ? k_stage[r1 * D + c] : 0.0f;
          dqr[t] += ds * k0v + ds1 * k1v;  // dQ = scale dS K (scale at the store)
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    if (i_in) {
      for (int t = 0; t < CPT; ++t) {
        dq_seq[long(i) * p.dq_row_stride + slice + R * t] = T(dqr[t] * p.opt.scale);
      }
    }
  }

  // d s_aux[h] = -sum over the rows of every sequence of P_sink * delta, P_sink = exp(s_aux[h] - lse) (<= 1): one
  // threadgroup per head, a fixed order (strided per thread, then simd_sum, then simdgroups in order).
  if (fc_sinks && tg_pos.x == 0 && tg_pos.z == 0) {
    const float sink2 = flash_sdpa::clamp_score(sinks[h]) * kBwdLog2e;  // as the forward
    float acc = 0.0f;
    for (int bb = 0; bb < p.batch; ++bb) {
      const BwdSequence s = bwd_sequence(cu_seqlens_q, cu_seqlens_k, bb, p);
      const device uint* lse_b = lse + long(bb) * p.lse_batch_stride + long(h) * p.lse_head_stride + s.start_q;
      const device float* delta_b = delta + long(bb) * p.delta_batch_stride + long(h) * p.delta_head_stride + s.start_q;
      for (int r = int(tid); r < s.sq; r += NT) {
        float row_lse2;
        if (bwd_row_lse2(lse_b[r], &row_lse2)) {
          acc += exp2(min(sink2 - row_lse2, 0.0f)) * delta_b[r];
        }
      }
    }
    acc = simd_sum(acc);
    if (lane == 0) {
      sink_partial[sg] = acc;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) {
      float total = 0.0f;
      for (int s = 0; s < flash_sdpa::kBwdSimdgroups; ++s) {
        total += sink_partial[s];
      }
      dsinks[h] = -total;
    }
  }
}
