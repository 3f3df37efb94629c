// paged_decode_wide: the one-token decode of a short split, spread over the whole threadgroup.
//
// A split of one or two threadgroup steps (PagedDecodeParams::simdgroup_partials, decode_runs_wide) spends most of
// its time on one chain per simdgroup in paged_decode_attention: block-table entry, K/V round trip, partial dot
// products summed across lanes, a reduce-scatter of the R rows, softmax, lane-local P.V, then the merge of the lane
// groups, all on the few keys that simdgroup loaded. Here each thread loads CPT 16-byte chunks of one key's K or V
// row (the step's K and V rows side by side, every valid byte once per KV head), the threadgroup stages them in
// threadgroup memory behind one barrier, and then each simdgroup takes one (row, key part) pair of the step: a dot
// product per key over WL lanes (no reduce-scatter: its row is one row), one online-softmax step on the simdgroup,
// P.V with the lanes across D. Each simdgroup writes its own partial (KP per split: fewer than the lane-local path's
// 8), so nothing merges inside the threadgroup.
//
// Layout (WideLayout): the step covers KS keys, the planner's decode_step_keys, so that the split count and the keys of
// each split are the planner's for the other paths. Simdgroup s takes row s % R and key part s / R (KP = 8 / R parts
// of KPP keys) below R = 8, rows s and s + 8 at R = 16 (all keys). Lanes: WL lanes per key (DPL = D / WL elements of
// the dot each), 32 / WL keys side by side, KPL per lane; for P.V lane l holds elements l x OPL .. of its rows.
// Threadgroup memory: the K and V tiles (rows padded by 16 bytes, so that lanes reading one chunk of different keys
// hit different banks), q pre-scaled in fp32, the probabilities of each simdgroup and a flag per key (loaded: a valid
// block below the visible end); at most 24 KB.
#pragma once

#include "paged_decode_attention.h"

namespace flash_sdpa {
namespace paged {

template <typename T, int D, int R>
struct WideLayout {
  static constexpr int NSG = kDecodeSimdgroups;
  static constexpr int KS = decode_step_keys(D, int(sizeof(T)), R, 1);             // keys per threadgroup step
  static constexpr int CPT = KS * D * int(sizeof(T)) * 2 / (kDecodeThreads * 16);  // 16-byte chunks per thread
  static constexpr int TPR = D * int(sizeof(T)) / (16 * CPT);                      // threads per K (or V) row
  static constexpr int RW = D * int(sizeof(T)) / 4 + 4;  // words per tile row (16 bytes of pad)
  static constexpr int RPS = R > NSG ? R / NSG : 1;      // rows per simdgroup
  static constexpr int KP = R < NSG ? NSG / R : 1;       // key parts
  static constexpr int KPP = KS / KP;                    // keys per part
  static constexpr int WL = KPP >= 32 ? 1 : 32 / KPP;    // lanes per key
  static constexpr int KPL = KPP > 32 ? KPP / 32 : 1;    // keys per lane
  static constexpr int KG = 32 / WL;                     // keys side by side
  static constexpr int DPL = D / WL;                     // dot elements per lane
  static constexpr int OPL = D / 32;                     // P.V elements per lane
  static constexpr int EPC = 16 / int(sizeof(T));        // elements per chunk
  static_assert(sizeof(T) == 2 && decode_runs_wide(D, int(sizeof(T)), R, 1), "a wide configuration");
  static_assert(KS * 2 * TPR == kDecodeThreads && TPR * CPT * 16 == D * int(sizeof(T)), "a thread per row piece");
  static_assert((R < NSG ? KP * R : R / RPS) == NSG && KPP * KP == KS && KG * KPL == KPP && DPL % EPC == 0 &&
                    OPL % 2 == 0 && KPP % 4 == 0,
                "whole parts, keys and chunks");
  static constexpr int kTileWords = 2 * KS * RW;  // K, then V
  static_assert(kTileWords * 4 + R * D * 4 + NSG * RPS * KPP * 4 + KS * 4 <= 24576, "threadgroup memory over 24 KB");
};

// Lane l's P.V elements of a tile row (OPL elements as OPL / 2 packed words), as float.
template <typename T, int OPL>
inline void load_row_part(thread float (&x)[OPL], threadgroup const uint* row, int lane) {
  for (int w = 0; w < OPL / 2; ++w) {
    const vec<T, 2> pair = as_type<vec<T, 2>>(row[lane * (OPL / 2) + w]);
    x[2 * w] = float(pair[0]);
    x[2 * w + 1] = float(pair[1]);
  }
}

// This thread's CPT chunks of its key's K or V row, from chunk `first` (zeros for a masked key: block -1).
template <typename T, int CPT, int NC>
inline void load_piece(thread chunk16 (&x)[CPT], int2 loc, device const T* cache, long head, long stride_block,
                       long stride_slot, int first, bool aligned) {
  device const T* row = cache + long(max(loc.x, 0)) * stride_block + long(loc.y) * stride_slot + head;
  for (int c = 0; c < CPT; ++c) {
    x[c] = load_chunk<T, 4, NC>(row, first + c, loc.x >= 0, aligned);
  }
}

}  // namespace paged
}  // namespace flash_sdpa

template <typename T, int D, int R>
[[max_total_threads_per_threadgroup(FLASH_SDPA_PAGED_DECODE_THREADS)]] kernel void paged_decode_wide(
    device const T* q [[buffer(FLASH_SDPA_DECODE_BUF_Q)]],
    device const T* k_cache [[buffer(FLASH_SDPA_DECODE_BUF_K_CACHE)]],
    device const T* v_cache [[buffer(FLASH_SDPA_DECODE_BUF_V_CACHE)]],
    device const int* block_table [[buffer(FLASH_SDPA_DECODE_BUF_BLOCK_TABLE)]],
    device const int* cache_seqlens [[buffer(FLASH_SDPA_DECODE_BUF_CACHE_SEQLENS)]],
    device const float* alibi [[buffer(FLASH_SDPA_DECODE_BUF_ALIBI)]],
    device float* o_partial [[buffer(FLASH_SDPA_DECODE_BUF_O_PARTIAL)]],
    device float* ml_partial [[buffer(FLASH_SDPA_DECODE_BUF_ML_PARTIAL)]],
    constant flash_sdpa::paged::PagedDecodeParams& p [[buffer(FLASH_SDPA_DECODE_BUF_PARAMS)]],
    device const int* cu_seqlens_q [[buffer(FLASH_SDPA_DECODE_BUF_CU_SEQLENS_Q)]],
    device const int* cu_seqlens_k [[buffer(FLASH_SDPA_DECODE_BUF_CU_SEQLENS_K)]],
    device const int* cache_leftpad [[buffer(FLASH_SDPA_DECODE_BUF_CACHE_LEFTPAD)]],
    uint3 tgid [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
  using namespace flash_sdpa;
  using namespace flash_sdpa::paged;
  using Layout = WideLayout<T, D, R>;
  constexpr int NSG = Layout::NSG;
  constexpr int KS = Layout::KS;
  constexpr int CPT = Layout::CPT;
  constexpr int TPR = Layout::TPR;
  constexpr int RW = Layout::RW;
  constexpr int RPS = Layout::RPS;
  constexpr int KP = Layout::KP;
  constexpr int KPP = Layout::KPP;
  constexpr int WL = Layout::WL;
  constexpr int KPL = Layout::KPL;
  constexpr int KG = Layout::KG;
  constexpr int DPL = Layout::DPL;
  constexpr int OPL = Layout::OPL;
  constexpr int EPC = Layout::EPC;

  threadgroup chunk16 tile_tg4[Layout::kTileWords / 4];  // K rows [KS][RW], then V rows [KS][RW] (words)
  threadgroup uint* k_tile = reinterpret_cast<threadgroup uint*>(tile_tg4);
  threadgroup uint* v_tile = k_tile + KS * RW;
  threadgroup float4 q_tg4[R * D / 4];            // the rows' q, pre-scaled
  threadgroup float4 p_tg4[NSG * RPS * KPP / 4];  // per simdgroup and row: the step's probabilities
  threadgroup uint key_ok_tg[KS];                 // per key of the step: loaded (valid block, below the visible end)
  threadgroup const float* q_tg = reinterpret_cast<threadgroup const float*>(q_tg4);

  // The grid is the other paths' (one-token calls: the row tile covers the KV head's group, row_blocks 1).
  const int split = int(tgid.x);
  const int hkv = p.row_blocks == 1 ? int(tgid.y) : int(tgid.y) / p.row_blocks;
  const int row0 = (int(tgid.y) - hkv * p.row_blocks) * R;
  const int b = int(tgid.z);
  if ((b >= p.batch) | (hkv >= p.num_kv_heads) | (split >= p.num_splits)) {
    return;  // whole threadgroup
  }
  const int group = p.num_heads / p.num_kv_heads;
  const int nrows = min(R, group - row0);

  // This thread's piece of the step: key kk, its K (kv = 0) or V row, chunks piece x CPT ...
  const int kk = int(tid) / (2 * TPR);
  const int kv = (int(tid) / TPR) % 2;
  const int piece = int(tid) % TPR;
  const int stride = p.num_splits * KS;
  const TableRow bt_row = table_row(b, p);
  int2 loc[1];
  int2 loc_next[1] = {int2(-1, 0)};
  TableCursor cursor;
  RequestKeys rk;
  if (!request_keys<1, 1>(rk, loc, cursor, split * KS + kk, stride, b, bt_row, p, block_table, cache_seqlens,
                          cu_seqlens_q, cu_seqlens_k, cache_leftpad)) {
    return;  // varlen: not a one-query sequence (uniform per threadgroup)
  }
  const int sk = rk.sk;
  const int pos = sk - 1;
  const int2 keys = visible_keys(pos, p.opt, sk);
  const int hi = keys.y + 1;
  const int first = keys.x + split * KS;
  first_step_locs<1, 1>(loc, cursor, keys.x, first + kk, hi, stride, rk, bt_row, p, block_table);
  device const T* cache = kv == 0 ? k_cache : v_cache;
  const long head = long(hkv) * (kv == 0 ? p.k_stride_h : p.v_stride_h);
  const long stride_block = kv == 0 ? p.k_stride_block : p.v_stride_block;
  const long stride_slot = kv == 0 ? p.k_stride_slot : p.v_stride_slot;
  constexpr int NCR = D * int(sizeof(T)) / 16;  // chunks per row
  const bool aligned = fc_decode_kv_aligned;
  chunk16 x[CPT];
  load_piece<T, CPT, NCR>(x, loc[0], cache, head, stride_block, stride_slot, piece * CPT, aligned);

  // q rows (while the first K/V bytes are in flight): row r is head hkv x group + row0 + r.
  threadgroup float* q_stage = reinterpret_cast<threadgroup float*>(q_tg4);
  for (int idx = int(tid); idx < R * D; idx += kDecodeThreads) {
    const int r = idx / D;
    const int d = idx - r * D;
    const long qoff = fc_varlen ? long(rk.q_row) * p.q_stride_s : long(b) * p.q_stride_b;
    q_stage[idx] = r < nrows ? float(q[qoff + long(hkv * group + row0 + r) * p.q_stride_h + d]) * p.opt.scale : 0.0f;
  }

  // This simdgroup's rows (rows[i]) and key part; lane: dot slice wl of key kg (+ j KG) of the part.
  const int part = R < NSG ? int(sg) / R : 0;
  const int wl = int(lane) % WL;
  const int kg = int(lane) / WL;
  int rows[RPS];
  bool row_ok[RPS];
  float slope[RPS];
  float m[RPS];
  float l[RPS];
  float o[RPS][OPL];
  for (int i = 0; i < RPS; ++i) {
    rows[i] = R < NSG ? int(sg) % R : int(sg) + i * NSG;
    row_ok[i] = rows[i] < nrows;
    slope[i] = fc_alibi ? alibi_slope(alibi, p.opt, b, hkv * group + row0 + min(rows[i], nrows - 1)) : 0.0f;
    m[i] = kNoScore;
    l[i] = 0.0f;
    for (int e = 0; e < OPL; ++e) {
      o[i][e] = 0.0f;
    }
  }
  const bool any_row = row_ok[0];  // rows[0] is the simdgroup's smallest
  uint bad_rows = 0;
  threadgroup float* p_sg = reinterpret_cast<threadgroup float*>(p_tg4) + int(sg) * RPS * KPP;

  for (int t0 = first; t0 < hi; t0 += stride) {  // uniform
    // 1. The step's rows into the tiles; the next step's table entries and rows in flight during the math.
    threadgroup uint* dst = (kv == 0 ? k_tile : v_tile) + kk * RW + piece * CPT * 4;
    for (int c = 0; c < CPT; ++c) {
      *reinterpret_cast<threadgroup chunk16*>(dst + c * 4) = x[c];
    }
    if (kv == 0 && piece == 0) {
      key_ok_tg[kk] = loc[0].x >= 0 ? 1u : 0u;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (t0 + stride < hi) {  // uniform
      step_locs<1, 1>(loc_next, t0 + stride + kk, hi, fc_varlen, rk.k_start, cursor, block_table, bt_row, p.block_size,
                      p.max_blocks_per_seq, p.num_blocks);
      load_piece<T, CPT, NCR>(x, loc_next[0], cache, head, stride_block, stride_slot, piece * CPT, aligned);
    }

    if (any_row) {  // uniform per simdgroup
      // 2. Scores of this lane's keys: its DPL elements of each row's q.k, summed over the key's WL lanes.
      float s[RPS][KPL];
      int2 key_loc[KPL];  // mask_scores' view of a key: loaded or not
      for (int j = 0; j < KPL; ++j) {
        const int key = part * KPP + kg + j * KG;
        key_loc[j] = int2(key_ok_tg[key] != 0u ? 0 : -1, 0);
        threadgroup const uint* krow = k_tile + key * RW + wl * DPL / 2;
        float acc[RPS];
        for (int i = 0; i < RPS; ++i) {
          acc[i] = 0.0f;
        }
        for (int c = 0; c < DPL / EPC; ++c) {
          const chunk16 kc = *reinterpret_cast<threadgroup const chunk16*>(krow + c * 4);
          for (int i = 0; i < RPS; ++i) {
            threadgroup const float* qr = q_tg + rows[i] * D + wl * DPL + c * EPC;
            for (int e = 0; e < EPC; ++e) {
              acc[i] += qr[e] * chunk_elem<T>(kc, e);
            }
          }
        }
        for (int i = 0; i < RPS; ++i) {
          for (int off = WL / 2; off >= 1; off /= 2) {
            acc[i] += simd_shuffle_xor(acc[i], ushort(off));
          }
          s[i][j] = acc[i];
        }
      }
      // 3. Online softmax of each row over the part's keys (key t0 + part x KPP + kg + j KG), on the simdgroup.
      float corr[RPS];
      for (int i = 0; i < RPS; ++i) {
        float mx = mask_scores<KPL, KG>(s[i], bad_rows, rows[i], row_ok[i], key_loc, t0 + part * KPP + kg, keys, pos,
                                        slope[i], p.opt);
        mx = simd_max(mx);
        const float m_new = max(m[i], mx);
        corr[i] = m[i] > kNoScore ? exp(m[i] - m_new) : 0.0f;
        float sum = 0.0f;
        for (int j = 0; j < KPL; ++j) {
          const float pr = s[i][j] > kNoScore ? exp(s[i][j] - m_new) : 0.0f;
          sum += pr;
          if (wl == 0) {
            p_sg[i * KPP + kg + j * KG] = pr;
          }
        }
        l[i] = l[i] * corr[i] + simd_sum(wl == 0 ? sum : 0.0f);
        m[i] = m_new;
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);
      // 4. P.V: lane l's OPL elements of each row, over the part's keys.
      for (int i = 0; i < RPS; ++i) {
        for (int e = 0; e < OPL; ++e) {
          o[i][e] *= corr[i];
        }
      }
      for (int i = 0; i < RPS; ++i) {  // row by row: both rows' probabilities and V in flight cost registers
        for (int k4 = 0; k4 < KPP; k4 += 4) {
          const float4 pr = *reinterpret_cast<threadgroup const float4*>(p_sg + i * KPP + k4);
          for (int u = 0; u < 4; ++u) {
            float v[OPL];
            load_row_part<T, OPL>(v, v_tile + (part * KPP + k4 + u) * RW, int(lane));
            for (int e = 0; e < OPL; ++e) {
              o[i][e] += pr[u] * v[e];
            }
          }
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the tiles and probabilities are free for the next step
    loc[0] = loc_next[0];
  }

  // 5. This simdgroup's partial (split x KP + part) of each of its rows: (partials, B, H, sq = 1).
  const long pidx = long(split) * KP + part;
  for (int i = 0; i < RPS; ++i) {
    if (simd_any(((bad_rows >> rows[i]) & 1u) != 0)) {
      bad_rows |= 1u << rows[i];
    }
    if (row_ok[i]) {
      const long prow = pidx * p.batch * p.num_heads + long(b) * p.num_heads + hkv * group + row0 + rows[i];
      device float* dst = o_partial + prow * D + int(lane) * OPL;
      for (int e = 0; e < OPL; e += 2) {
        *reinterpret_cast<device float2*>(dst + e) = float2(o[i][e], o[i][e + 1]);
      }
      if (lane == 0) {
        ml_partial[prow * 2] = ((bad_rows >> rows[i]) & 1u) != 0 ? as_type<float>(kNanBits) : m[i];
        ml_partial[prow * 2 + 1] = l[i];
      }
    }
  }
}
