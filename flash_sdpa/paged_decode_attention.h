// paged_decode_attention + paged_decode_combine: flash-decoding straight from a paged KV cache.
//
// One threadgroup per (split, KV head x row block, request). A row is one (query head of the KV group, query token)
// pair; the threadgroup holds up to ROWS rows, so one pass over the KV head's keys serves the whole GQA group and
// all sq tokens (each K/V byte is loaded once per row block; one row block up to ROWS rows).
// Each of the 4 simdgroups owns every 4th tile of 32 keys in the split's key range:
//   scores: lane j computes q.k for key (tile + j) for every row (q rows staged in threadgroup memory, fp32);
//   online softmax per row in fp32 (simd_max / simd_sum over the 32 keys);
//   P.V: lanes split D (d = lane + 32 i), p broadcast with simd_shuffle, each V row read once per simdgroup.
// At the end the simdgroups' (max, sum, acc) are merged through threadgroup memory.
// Keys are read through block_table[b, t / block_size]: no gather, no copy.
#pragma once

#include <metal_stdlib>

#include "paged_params.h"

using namespace metal;

namespace flash_sdpa {
namespace paged {

// Fast math: never rely on inf arithmetic. Masked scores use a finite "minus infinity"; rows that saw no visible
// key are recognised by max <= kNegHalf and handled explicitly.
#define FLASH_SDPA_NEG_BIG (-1.0e30f)
#define FLASH_SDPA_NEG_HALF (-0.5e30f)

// The LSE buffers are bound as uint: -inf is stored as its bit pattern, so no inf value ever exists in the kernel
// (fast math may assume none does and fold it away).
#define FLASH_SDPA_NEG_INF_BITS 0xff800000u

// softcap * tanh(s / softcap), with the tanh argument clamped so that a fast-math tanh cannot produce inf / inf.
inline float apply_softcap(float s, float softcap) {
  return softcap * tanh(clamp(s / softcap, -15.0f, 15.0f));
}

}  // namespace paged
}  // namespace flash_sdpa

constant bool fc_decode_split [[function_constant(FLASH_SDPA_FC_DECODE_SPLIT)]];
constant bool fc_decode_write_lse [[function_constant(FLASH_SDPA_FC_DECODE_WRITE_LSE)]];
constant bool fc_decode_alibi [[function_constant(FLASH_SDPA_FC_DECODE_ALIBI)]];
constant bool fc_decode_sinks [[function_constant(FLASH_SDPA_FC_DECODE_SINKS)]];
constant bool fc_decode_softcap [[function_constant(FLASH_SDPA_FC_DECODE_SOFTCAP)]];
constant bool fc_combine_write_lse [[function_constant(FLASH_SDPA_FC_COMBINE_WRITE_LSE)]];
constant bool fc_combine_sinks [[function_constant(FLASH_SDPA_FC_COMBINE_SINKS)]];

template <typename T, int D>
[[max_total_threads_per_threadgroup(FLASH_SDPA_PAGED_DECODE_THREADS)]] kernel void paged_decode_attention(
    device const T* q [[buffer(FLASH_SDPA_DECODE_BUF_Q)]],
    device const T* k_cache [[buffer(FLASH_SDPA_DECODE_BUF_K_CACHE)]],
    device const T* v_cache [[buffer(FLASH_SDPA_DECODE_BUF_V_CACHE)]],
    device const int* block_table [[buffer(FLASH_SDPA_DECODE_BUF_BLOCK_TABLE)]],
    device const int* cache_seqlens [[buffer(FLASH_SDPA_DECODE_BUF_CACHE_SEQLENS)]],
    device T* out [[buffer(FLASH_SDPA_DECODE_BUF_OUT)]],
    device uint* lse [[buffer(FLASH_SDPA_DECODE_BUF_LSE)]],  // float bits
    device const float* alibi [[buffer(FLASH_SDPA_DECODE_BUF_ALIBI)]],
    device const float* sinks [[buffer(FLASH_SDPA_DECODE_BUF_SINKS)]],
    device float* o_partial [[buffer(FLASH_SDPA_DECODE_BUF_O_PARTIAL)]],
    device float* ml_partial [[buffer(FLASH_SDPA_DECODE_BUF_ML_PARTIAL)]],
    constant flash_sdpa::paged::PagedDecodeParams& p [[buffer(FLASH_SDPA_DECODE_BUF_PARAMS)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  using namespace flash_sdpa::paged;
  constexpr int ROWS = FLASH_SDPA_PAGED_ROWS(D);
  constexpr int DPL = (D + kSimdWidth - 1) / kSimdWidth;  // P.V dims per lane
  constexpr int NSG = kDecodeSimdgroups;
  static_assert(ROWS * D * 4 + 2 * NSG * ROWS * 4 <= 32768, "threadgroup memory over 32 KB");

  threadgroup float acc_tg[ROWS * D];     // scaled q rows (fp32); after the key loop, the merged accumulator
  threadgroup float m_tg[NSG * ROWS];     // per simdgroup running max
  threadgroup float l_tg[NSG * ROWS];     // per simdgroup sum of exp

  const int split = int(tgid.x);
  const int hkv = int(tgid.y) / p.row_blocks;
  const int row0 = (int(tgid.y) % p.row_blocks) * ROWS;
  const int b = int(tgid.z);
  if (b >= p.batch || hkv >= p.num_kv_heads || split >= p.num_splits) {
    return;  // whole threadgroup: grid larger than the problem
  }
  const int sq = p.seqlen_q;
  const int group = p.num_heads / p.num_kv_heads;
  const int nrows = min(ROWS, group * sq - row0);

  // Keys of request b: sk = cache_seqlens[b] + seqlen_new, clamped to the block table's capacity; padding rows
  // (cache_seqlens < 0) have none and output zeros.
  const int capacity = p.max_blocks_per_seq * p.block_size;
  const int seqlen = cache_seqlens[b];
  const int sk = seqlen < 0 ? 0 : min(min(seqlen, capacity) + p.seqlen_new, capacity);
  const int diag = sk - sq;  // query i sits at key position i + diag (bottom-right alignment)

  // Keys any row of this request can see: [lo, hi).
  int lo = 0;
  int hi = sk;
  if (p.window_left >= 0) {
    lo = max(0, diag - p.window_left);
  }
  if (p.window_right >= 0) {
    hi = min(sk, sq - 1 + diag + p.window_right + 1);
  }
  // This split's share, in whole tiles of 32 keys.
  const int span = max(hi - lo, 0);
  const int per_split =
      ((span + p.num_splits - 1) / p.num_splits + kKeysPerTile - 1) / kKeysPerTile * kKeysPerTile;
  const int begin = lo + split * per_split;
  const int end = min(hi, begin + per_split);

  // Stage the rows' q, pre-scaled, in fp32. Row r -> (head hg of the group, token i): r = hg * sq + i.
  for (int idx = int(tid); idx < ROWS * D; idx += kDecodeThreads) {
    const int r = idx / D;
    const int d = idx - r * D;
    float v = 0.0f;
    if (r < nrows) {
      const int g = row0 + r;
      const int h = hkv * group + g / sq;
      const int i = g % sq;
      // q (B, sq, H, D = 1)
      v = float(q[long(b) * p.q_stride_b + long(i) * p.q_stride_s + long(h) * p.q_stride_h + d]) * p.scale;
    }
    acc_tg[idx] = v;
  }

  // Per-row constants: query position (visible keys: [pos - left, pos + right]), ALiBi slope.
  int row_pos[ROWS];
  float row_slope[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    const int g = row0 + min(r, nrows - 1);
    const int h = hkv * group + g / sq;
    const int pos = g % sq + diag;
    row_pos[r] = pos;
    row_slope[r] = fc_decode_alibi ? alibi[long(b) * p.alibi_stride_b + h] : 0.0f;
  }

  float m[ROWS];
  float l[ROWS];
  float o[ROWS][DPL];
  for (int r = 0; r < ROWS; ++r) {
    m[r] = FLASH_SDPA_NEG_BIG;
    l[r] = 0.0f;
    for (int c = 0; c < DPL; ++c) {
      o[r][c] = 0.0f;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  for (int t0 = begin + int(sg) * kKeysPerTile; t0 < end; t0 += NSG * kKeysPerTile) {
    // Scores: this lane's key against every row.
    const int key = t0 + int(lane);
    int block = -1;
    if (key < end) {
      const int id = block_table[long(b) * p.block_table_stride_b + key / p.block_size];
      block = (id >= 0 && id < p.num_blocks) ? id : -1;  // invalid ids: the key is masked
    }
    float s[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      s[r] = 0.0f;
    }
    if (block >= 0) {
      // k_cache (num_blocks, block_size, Hkv, D = 1)
      device const T* krow = k_cache + long(block) * p.k_stride_block + long(key % p.block_size) * p.k_stride_slot +
                             long(hkv) * p.k_stride_h;
      for (int d = 0; d < D; ++d) {
        const float kd = float(krow[d]);
        for (int r = 0; r < ROWS; ++r) {
          if (r < nrows) {
            s[r] += acc_tg[r * D + d] * kd;
          }
        }
      }
    }

    // Online softmax, one row at a time (branches on r < nrows and on tile_max are uniform per simdgroup).
    float pr[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      pr[r] = 0.0f;
      if (r < nrows) {
        float sc = s[r];
        if (fc_decode_softcap) {
          sc = apply_softcap(sc, p.softcap);
        }
        if (fc_decode_alibi) {
          sc -= row_slope[r] * float(abs(row_pos[r] - key));
        }
        const bool visible = block >= 0 && (p.window_left < 0 || key >= row_pos[r] - p.window_left) &&
                             (p.window_right < 0 || key <= row_pos[r] + p.window_right);
        const float tile_max = simd_max(visible ? sc : FLASH_SDPA_NEG_BIG);
        if (tile_max > FLASH_SDPA_NEG_HALF) {
          const float m_new = max(m[r], tile_max);
          const float corr = m[r] > FLASH_SDPA_NEG_HALF ? exp(m[r] - m_new) : 0.0f;
          pr[r] = visible ? exp(sc - m_new) : 0.0f;
          l[r] = l[r] * corr + simd_sum(pr[r]);
          m[r] = m_new;
          for (int c = 0; c < DPL; ++c) {
            o[r][c] *= corr;
          }
        }
      }
    }

    // P.V: key by key, lanes over D.
    const int tile_keys = min(int(kKeysPerTile), end - t0);
    for (int j = 0; j < tile_keys; ++j) {
      const int bj = simd_shuffle(block, ushort(j));
      if (bj < 0) {
        continue;
      }
      float pj[ROWS];
      bool any = false;
      for (int r = 0; r < ROWS; ++r) {
        pj[r] = 0.0f;
        if (r < nrows) {
          pj[r] = simd_shuffle(pr[r], ushort(j));
          any = any || pj[r] > 0.0f;
        }
      }
      if (!any) {
        continue;  // masked for every row: do not load the V row
      }
      // v_cache (num_blocks, block_size, Hkv, D = 1)
      device const T* vrow = v_cache + long(bj) * p.v_stride_block + long((t0 + j) % p.block_size) * p.v_stride_slot +
                             long(hkv) * p.v_stride_h;
      for (int c = 0; c < DPL; ++c) {
        const int d = int(lane) + c * kSimdWidth;
        if (d < D) {
          const float vd = float(vrow[d]);
          for (int r = 0; r < ROWS; ++r) {
            o[r][c] += pj[r] * vd;
          }
        }
      }
    }
  }

  // Merge the simdgroups: global max per row, each simdgroup's share rescaled, summed in simdgroup order.
  if (lane == 0) {
    for (int r = 0; r < ROWS; ++r) {
      m_tg[sg * ROWS + r] = m[r];
      l_tg[sg * ROWS + r] = l[r];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float share[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    float mx = FLASH_SDPA_NEG_BIG;
    for (int w = 0; w < NSG; ++w) {
      mx = max(mx, m_tg[w * ROWS + r]);
    }
    share[r] = m[r] > FLASH_SDPA_NEG_HALF ? exp(m[r] - mx) : 0.0f;
  }
  for (int w = 0; w < NSG; ++w) {
    if (int(sg) == w) {
      for (int r = 0; r < ROWS; ++r) {
        if (r < nrows) {
          for (int c = 0; c < DPL; ++c) {
            const int d = int(lane) + c * kSimdWidth;
            if (d < D) {
              const float prev = w == 0 ? 0.0f : acc_tg[r * D + d];
              acc_tg[r * D + d] = prev + o[r][c] * share[r];
            }
          }
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  // Write: split partials (unnormalised, relative to the row max) or the final row.
  for (int idx = int(tid); idx < nrows * D; idx += kDecodeThreads) {
    const int r = idx / D;
    const int d = idx - r * D;
    const int g = row0 + r;
    const int h = hkv * group + g / sq;
    const int i = g % sq;
    float mx = FLASH_SDPA_NEG_BIG;
    for (int w = 0; w < NSG; ++w) {
      mx = max(mx, m_tg[w * ROWS + r]);
    }
    float sum = 0.0f;
    for (int w = 0; w < NSG; ++w) {
      const float mw = m_tg[w * ROWS + r];
      sum += mw > FLASH_SDPA_NEG_HALF ? l_tg[w * ROWS + r] * exp(mw - mx) : 0.0f;
    }
    const long row = (long(b) * p.num_heads + h) * sq + i;  // (B, H, sq)
    if (fc_decode_split) {
      const long prow = long(split) * p.batch * p.num_heads * sq + row;  // (splits, B, H, sq)
      o_partial[prow * D + d] = acc_tg[idx];
      if (d == 0) {
        ml_partial[prow * 2] = mx;
        ml_partial[prow * 2 + 1] = sum;
      }
    } else {
      const bool seen = mx > FLASH_SDPA_NEG_HALF;
      float scale_o = 1.0f;
      if (fc_decode_sinks && seen) {
        const float sink = sinks[h];
        const float mn = max(mx, sink);
        scale_o = exp(mx - mn);
        sum = sum * scale_o + exp(sink - mn);
        mx = mn;
      }
      // out (B, sq, H, D = 1), contiguous
      out[((long(b) * sq + i) * p.num_heads + h) * D + d] = seen ? T(acc_tg[idx] * scale_o / sum) : T(0.0f);
      if (fc_decode_write_lse && d == 0) {
        lse[row] = seen ? as_type<uint>(mx + log(sum)) : FLASH_SDPA_NEG_INF_BITS;
      }
    }
  }
}

// Combines split-K partials: one simdgroup per output row (b, h, i), lanes over D.
template <typename T>
[[max_total_threads_per_threadgroup(FLASH_SDPA_PAGED_COMBINE_THREADS)]] kernel void paged_decode_combine(
    device const float* o_partial [[buffer(FLASH_SDPA_COMBINE_BUF_O_PARTIAL)]],
    device const float* ml_partial [[buffer(FLASH_SDPA_COMBINE_BUF_ML_PARTIAL)]],
    device const float* sinks [[buffer(FLASH_SDPA_COMBINE_BUF_SINKS)]],
    device T* out [[buffer(FLASH_SDPA_COMBINE_BUF_OUT)]],
    device uint* lse [[buffer(FLASH_SDPA_COMBINE_BUF_LSE)]],  // float bits
    constant flash_sdpa::paged::PagedCombineParams& p [[buffer(FLASH_SDPA_COMBINE_BUF_PARAMS)]],
    uint tgid [[threadgroup_position_in_grid]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  using namespace flash_sdpa::paged;
  const long rows = long(p.batch) * p.num_heads * p.seqlen_q;
  const long row = long(tgid) * kCombineSimdgroups + sg;  // (B, H, sq)
  if (row >= rows) {
    return;  // no barriers below
  }
  const int splits = min(p.num_splits, int(kMaxSplits));
  float mx = FLASH_SDPA_NEG_BIG;
  for (int s = 0; s < splits; ++s) {
    mx = max(mx, ml_partial[(s * rows + row) * 2]);
  }
  float sum = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float ms = ml_partial[(s * rows + row) * 2];
    sum += ms > FLASH_SDPA_NEG_HALF ? ml_partial[(s * rows + row) * 2 + 1] * exp(ms - mx) : 0.0f;
  }
  const bool seen = mx > FLASH_SDPA_NEG_HALF;
  const int h = int((row / p.seqlen_q) % p.num_heads);
  const float m_splits = mx;  // the partials are rescaled to this max
  float scale_o = 1.0f;
  if (fc_combine_sinks && seen) {
    const float sink = sinks[h];
    const float mn = max(mx, sink);
    scale_o = exp(mx - mn);
    sum = sum * scale_o + exp(sink - mn);
    mx = mn;
  }
  const long b = row / (long(p.num_heads) * p.seqlen_q);
  const long i = row % p.seqlen_q;
  const int D = p.head_dim;
  for (int d = int(lane); d < D; d += kSimdWidth) {
    float acc = 0.0f;
    if (seen) {
      for (int s = 0; s < splits; ++s) {
        const float ms = ml_partial[(s * rows + row) * 2];
        if (ms > FLASH_SDPA_NEG_HALF) {
          acc += o_partial[(s * rows + row) * D + d] * exp(ms - m_splits);
        }
      }
    }
    // out (B, sq, H, D = 1), contiguous
    out[((b * p.seqlen_q + i) * p.num_heads + h) * D + d] = seen ? T(acc * scale_o / sum) : T(0.0f);
  }
  if (fc_combine_write_lse && lane == 0) {
    lse[row] = seen ? as_type<uint>(mx + log(sum)) : FLASH_SDPA_NEG_INF_BITS;
  }
}
