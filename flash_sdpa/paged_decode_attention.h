// paged_decode_attention + paged_decode_combine: flash-decoding straight from a paged KV cache.
//
// One threadgroup per (split, KV head x row block, request). A row is one (query head of the KV group, query token)
// pair; the threadgroup holds R rows (a template parameter: the planner picks the smallest R >= group x sq, extra row
// blocks past the largest), so one pass over the KV head's keys serves the whole GQA group and all sq tokens.
// Each of the 4 simdgroups owns every 4th tile of 32 keys in the split's key range:
//   stage: the tile's K rows go to threadgroup memory in chunks of 128 bytes per key, lanes across D, 16-byte
//          loads (8 lanes read 128 contiguous bytes of one key);
//   scores: lane j computes q.k of key j for the R rows (q rows in threadgroup memory, fp32, read as float4);
//   online softmax per row in fp32, one max / rescale per tile (simd_max / simd_sum over the 32 keys);
//   P.V: lanes across D (D / 32 contiguous dims per lane, vector loads), 4 V rows in flight, p read from
//        threadgroup memory as float4 (4 keys per read instead of a shuffle per key and row).
// At the end the simdgroups' (max, sum, acc) are merged through threadgroup memory.
// Keys are read through block_table[b, t / block_size]: no gather, no copy.
#pragma once

#include <metal_stdlib>

#include "attention_device.h"
#include "paged_params.h"

using namespace metal;

constant bool fc_decode_split [[function_constant(FLASH_SDPA_FC_DECODE_SPLIT)]];
constant bool fc_decode_write_lse [[function_constant(FLASH_SDPA_FC_DECODE_WRITE_LSE)]];
constant bool fc_decode_alibi [[function_constant(FLASH_SDPA_FC_DECODE_ALIBI)]];
constant bool fc_decode_sinks [[function_constant(FLASH_SDPA_FC_DECODE_SINKS)]];
constant bool fc_decode_softcap [[function_constant(FLASH_SDPA_FC_DECODE_SOFTCAP)]];
constant bool fc_decode_kv_aligned [[function_constant(FLASH_SDPA_FC_DECODE_KV_ALIGNED)]];
constant bool fc_combine_write_lse [[function_constant(FLASH_SDPA_FC_COMBINE_WRITE_LSE)]];
constant bool fc_combine_sinks [[function_constant(FLASH_SDPA_FC_COMBINE_SINKS)]];

template <typename T, int D, int R>
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
  using namespace flash_sdpa;
  using namespace flash_sdpa::paged;
  constexpr int NSG = kDecodeSimdgroups;
  constexpr int KT = kKeysPerTile;           // keys per tile: one per lane in the score pass
  constexpr int VK = 16 / int(sizeof(T));    // K elements per lane per staging load: 16 bytes
  constexpr int KC = 8 * VK;                 // dims per staged chunk: 8 lanes x 16 B = 128 contiguous bytes of a key
  constexpr int LPK = KC / VK;               // lanes per key row while staging
  constexpr int KPI = KT / LPK;              // key rows per staging step
  constexpr int NIT = KT / KPI;              // staging steps per chunk
  constexpr int KP = KC + VK;                // tile pitch (elements): rows stay 16-byte aligned, banks shift per row
  constexpr int NCH = (D + KC - 1) / KC;     // chunks per key row
  constexpr bool CONTIG = D % KT == 0;       // P.V: D / 32 contiguous dims per lane (vector loads), else strided
  constexpr int EPL = (D + KT - 1) / KT;     // P.V dims per lane
  constexpr int VV = CONTIG ? (EPL % 4 == 0 ? 4 : (EPL % 2 == 0 ? 2 : 1)) : 1;  // P.V vector width
  constexpr int VVT = VV > 1 ? VV : 2;       // the vector type's width (unused when VV == 1)
  constexpr int KTILE_BYTES = KT * KP * int(sizeof(T));
  constexpr int SCR = (KTILE_BYTES > R * KT * 4 ? KTILE_BYTES : R * KT * 4) / 16;  // float4 per simdgroup scratch
  static_assert(D % 8 == 0, "head dims are multiples of 8: 16-byte K loads, float4 q reads");
  static_assert(KT % LPK == 0 && KTILE_BYTES % 16 == 0, "staging layout");
  static_assert(R * D * 4 + NSG * SCR * 16 + NSG * KT * 8 + 2 * NSG * R * 4 <= 32768, "threadgroup memory over 32 KB");

  // One array: the scaled q rows (fp32; after the key loop, the merged accumulator), then per simdgroup the staged
  // K chunk (T) / the tile's p (fp32 [R][32]). Shared so that a compiler cannot easily hoist all R x D q values out
  // of the key loop into registers (the K stores may alias them). On the proxy this alone did not change ptxas's
  // registers or spills; the proxy's unroll settings did (tests/metal_cuda/RESULTS.md).
  threadgroup float4 qs_tg[R * D / 4 + NSG * SCR];
  threadgroup float4* q_tg = qs_tg;
  threadgroup float4* scratch_tg = qs_tg + R * D / 4;
  threadgroup int2 loc_tg[NSG * KT];         // per simdgroup: (block id, slot) of the tile's keys; block -1: skip
  threadgroup float m_tg[NSG * R];           // per simdgroup running max
  threadgroup float l_tg[NSG * R];           // per simdgroup sum of exp
  threadgroup uint bad_tg[NSG];              // per simdgroup rows with a non-finite visible score (bit r)
  threadgroup float* acc_tg = reinterpret_cast<threadgroup float*>(q_tg);

  const int split = int(tgid.x);
  const int hkv = int(tgid.y) / p.row_blocks;
  const int row0 = (int(tgid.y) % p.row_blocks) * R;
  const int b = int(tgid.z);
  if (b >= p.batch || hkv >= p.num_kv_heads || split >= p.num_splits) {
    return;  // whole threadgroup: grid larger than the problem
  }
  const int sq = p.seqlen_q;
  const int group = p.num_heads / p.num_kv_heads;
  const int nrows = min(R, group * sq - row0);

  // Keys of request b: sk = cache_seqlens[b] + seqlen_new, clamped to the block table's capacity; padding rows
  // (cache_seqlens < 0) have none and output zeros.
  const int capacity = p.max_blocks_per_seq * p.block_size;
  const int seqlen = cache_seqlens[b];
  const int sk = seqlen < 0 ? 0 : int(min(long(seqlen) + p.seqlen_new, long(capacity)));
  const int diag = sk - sq;  // query i sits at key position i + diag (bottom-right alignment)

  // Keys any row of this request can see: [lo, hi) spans the first row's window to the last row's.
  const int lo = visible_keys(diag, p.window_left, p.window_right, sk).x;
  const int hi = visible_keys(sq - 1 + diag, p.window_left, p.window_right, sk).y + 1;
  // This split's share, in whole tiles of 32 keys.
  const int span = max(hi - lo, 0);
  const int per_split =
      ((span + p.num_splits - 1) / p.num_splits + kKeysPerTile - 1) / kKeysPerTile * kKeysPerTile;
  const int begin = lo + split * per_split;
  const int end = min(hi, begin + per_split);

  // Stage the rows' q, pre-scaled, in fp32. Row r -> (head hg of the group, token i): r = hg * sq + i.
  for (int idx = int(tid); idx < R * D; idx += kDecodeThreads) {
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

  // Per-row constants: query position, visible keys [first, last], ALiBi slope.
  int row_pos[R];
  int2 row_keys[R];
  float row_slope[R];
  for (int r = 0; r < R; ++r) {
    const int g = row0 + min(r, nrows - 1);
    const int h = hkv * group + g / sq;
    row_pos[r] = g % sq + diag;
    row_keys[r] = visible_keys(row_pos[r], p.window_left, p.window_right, sk);
    row_slope[r] = fc_decode_alibi ? alibi[long(b) * p.alibi_stride_b + h] : 0.0f;
  }
  // Bit r: this lane saw a visible key whose score is NaN or inf (the row's output becomes NaN, as in
  // FlashAttention-2; the score itself is dropped so that nothing non-finite reaches the accumulators).
  uint bad_rows = 0;

  float m[R];
  float l[R];
  float o[R][EPL];
  for (int r = 0; r < R; ++r) {
    m[r] = kMaskedScore;
    l[r] = 0.0f;
    for (int c = 0; c < EPL; ++c) {
      o[r][c] = 0.0f;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  threadgroup T* kt = reinterpret_cast<threadgroup T*>(scratch_tg + sg * SCR);
  threadgroup float* pt = reinterpret_cast<threadgroup float*>(scratch_tg + sg * SCR);
  threadgroup int2* loc = loc_tg + sg * KT;
  const long k_head = long(hkv) * p.k_stride_h;
  const long v_head = long(hkv) * p.v_stride_h;
  const int ld_key = int(lane) / LPK;  // staging: key row within a step and first element of this lane
  const int ld_e = (int(lane) % LPK) * VK;

  for (int t0 = begin + int(sg) * KT; t0 < end; t0 += NSG * KT) {
    // Where lane j's key lives: one block-table read per key.
    const int key = t0 + int(lane);
    int block = -1;
    int slot = 0;
    if (key < end) {
      const int bi = key / p.block_size;
      const int id = block_table[long(b) * p.block_table_stride_b + bi];
      block = (id >= 0 && id < p.num_blocks) ? id : -1;  // invalid ids: the key is masked
      slot = key - bi * p.block_size;
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);  // the previous tile's P.V is done with loc and p
    loc[lane] = int2(block, slot);
    simdgroup_barrier(mem_flags::mem_threadgroup);

    float s[R];
    for (int r = 0; r < R; ++r) {
      s[r] = 0.0f;
    }
    for (int ch = 0; ch < NCH; ++ch) {
      const int c0 = ch * KC;
      const int w = min(KC, D - c0);
      // Stage: all loads first (up to NIT x 16 B in flight per lane), then the threadgroup stores.
      if (ld_e < w) {
        vec<T, 4> kreg[NIT][VK / 4];
        for (int it = 0; it < NIT; ++it) {
          const int2 lk = loc[it * KPI + ld_key];
          // k_cache (num_blocks, block_size, Hkv, D = 1)
          device const T* src =
              k_cache + long(max(lk.x, 0)) * p.k_stride_block + long(lk.y) * p.k_stride_slot + k_head + c0 + ld_e;
          for (int u = 0; u < VK / 4; ++u) {
            vec<T, 4> v = vec<T, 4>(T(0.0f));
            if (lk.x >= 0) {
              if (fc_decode_kv_aligned) {
                v = *reinterpret_cast<device const vec<T, 4>*>(src + 4 * u);
              } else {
                for (int e = 0; e < 4; ++e) {
                  v[e] = src[4 * u + e];
                }
              }
            }
            kreg[it][u] = v;
          }
        }
        for (int it = 0; it < NIT; ++it) {
          threadgroup T* dst = kt + (it * KPI + ld_key) * KP + ld_e;
          for (int u = 0; u < VK / 4; ++u) {
            *reinterpret_cast<threadgroup vec<T, 4>*>(dst + 4 * u) = kreg[it][u];
          }
        }
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);
      // Scores: lane j's key row against the R q rows (q read as float4, the same address on every lane).
      threadgroup const T* krow = kt + int(lane) * KP;
      for (int d = 0; d < KC; d += 4) {
        if (d < w) {
          const float4 k4 = float4(*reinterpret_cast<threadgroup const vec<T, 4>*>(krow + d));
          for (int r = 0; r < R; ++r) {
            s[r] += dot(q_tg[(r * D + c0 + d) / 4], k4);
          }
        }
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);  // the chunk is consumed before the next one (or p) lands
    }

    // Online softmax, one max / rescale per row and tile (branches on r < nrows and tile_max are uniform).
    float pr[R];
    bool seen_any = false;
    for (int r = 0; r < R; ++r) {
      pr[r] = 0.0f;
      if (r < nrows) {
        float sc = s[r];
        bool visible = block >= 0 && key >= row_keys[r].x && key <= row_keys[r].y;
        seen_any = seen_any || visible;
        if (visible && is_nonfinite(sc)) {  // before the softcap clamp could hide a NaN
          bad_rows |= 1u << r;
          visible = false;
        }
        if (fc_decode_softcap) {
          sc = apply_softcap(sc, p.softcap);
        }
        if (fc_decode_alibi) {
          sc -= row_slope[r] * float(abs(row_pos[r] - key));
        }
        const float tile_max = simd_max(visible ? sc : kMaskedScore);
        if (tile_max > kNegHalf) {
          const float m_new = max(m[r], tile_max);
          const float corr = m[r] > kNegHalf ? exp(m[r] - m_new) : 0.0f;
          pr[r] = visible ? exp(sc - m_new) : 0.0f;
          l[r] = l[r] * corr + simd_sum(pr[r]);
          m[r] = m_new;
          for (int c = 0; c < EPL; ++c) {
            o[r][c] *= corr;
          }
        }
      }
    }
    // p as [R][32] fp32 over the consumed K chunk; keys no row sees are dropped from the P.V pass (no V load).
    for (int r = 0; r < R; ++r) {
      pt[r * KT + int(lane)] = pr[r];
    }
    loc[lane] = int2(seen_any ? block : -1, slot);
    simdgroup_barrier(mem_flags::mem_threadgroup);

    // P.V: lanes over D, 4 V rows in flight, p of 4 keys per float4 read.
    const int tile_keys = min(int(KT), end - t0);
    for (int j0 = 0; j0 < tile_keys; j0 += 4) {  // run-time trip count: a rolled loop, 4 V rows per iteration
      float vv[4][EPL];
      for (int u = 0; u < 4; ++u) {
        const int2 lk = loc[j0 + u];
        for (int c = 0; c < EPL; ++c) {
          vv[u][c] = 0.0f;
        }
        if (lk.x >= 0) {
          // v_cache (num_blocks, block_size, Hkv, D = 1)
          device const T* vrow = v_cache + long(lk.x) * p.v_stride_block + long(lk.y) * p.v_stride_slot + v_head;
          if (CONTIG) {
            device const T* src = vrow + int(lane) * EPL;
            if (VV > 1 && fc_decode_kv_aligned) {
              for (int c = 0; c < EPL; c += VVT) {
                const vec<T, VVT> x = *reinterpret_cast<device const vec<T, VVT>*>(src + c);
                for (int e = 0; e < VVT; ++e) {
                  vv[u][c + e] = float(x[e]);
                }
              }
            } else {
              for (int c = 0; c < EPL; ++c) {
                vv[u][c] = float(src[c]);
              }
            }
          } else {
            for (int c = 0; c < EPL; ++c) {
              const int d = int(lane) + c * KT;
              if (d < D) {
                vv[u][c] = float(vrow[d]);
              }
            }
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const float4 p4 = *reinterpret_cast<threadgroup const float4*>(pt + r * KT + j0);
        for (int c = 0; c < EPL; ++c) {
          o[r][c] += p4.x * vv[0][c] + p4.y * vv[1][c] + p4.z * vv[2][c] + p4.w * vv[3][c];
        }
      }
    }
  }

  // Merge the simdgroups: global max per row, each simdgroup's share rescaled, summed in simdgroup order.
  for (int r = 0; r < R; ++r) {
    if (simd_any(((bad_rows >> r) & 1u) != 0)) {
      bad_rows |= 1u << r;
    }
  }
  if (lane == 0) {
    for (int r = 0; r < R; ++r) {
      m_tg[sg * R + r] = m[r];
      l_tg[sg * R + r] = l[r];
    }
    bad_tg[sg] = bad_rows;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float share[R];
  for (int r = 0; r < R; ++r) {
    float mx = kMaskedScore;
    for (int w = 0; w < NSG; ++w) {
      mx = max(mx, m_tg[w * R + r]);
    }
    share[r] = m[r] > kNegHalf ? exp(m[r] - mx) : 0.0f;
  }
  for (int w = 0; w < NSG; ++w) {
    if (int(sg) == w) {
      for (int r = 0; r < R; ++r) {
        if (r < nrows) {
          for (int c = 0; c < EPL; ++c) {
            const int d = CONTIG ? int(lane) * EPL + c : int(lane) + c * KT;
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
    float mx = kMaskedScore;
    for (int w = 0; w < NSG; ++w) {
      mx = max(mx, m_tg[w * R + r]);
    }
    float sum = 0.0f;
    bool bad = false;
    for (int w = 0; w < NSG; ++w) {
      const float mw = m_tg[w * R + r];
      sum += mw > kNegHalf ? l_tg[w * R + r] * exp(mw - mx) : 0.0f;
      bad = bad || ((bad_tg[w] >> r) & 1u) != 0;
    }
    const long row = (long(b) * p.num_heads + h) * sq + i;  // (B, H, sq)
    if (fc_decode_split) {
      const long prow = long(split) * p.batch * p.num_heads * sq + row;  // (splits, B, H, sq)
      o_partial[prow * D + d] = acc_tg[idx];
      if (d == 0) {
        ml_partial[prow * 2] = bad ? as_type<float>(kNanBits) : mx;  // the combine tests the bits
        ml_partial[prow * 2 + 1] = sum;
      }
    } else if (bad) {
      out[((long(b) * sq + i) * p.num_heads + h) * D + d] = T(as_type<float>(kNanBits));
      if (fc_decode_write_lse && d == 0) {
        lse[row] = kNanBits;
      }
    } else {
      const bool seen = mx > kNegHalf;
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
        lse[row] = seen ? as_type<uint>(mx + log(sum)) : kNegInfBits;
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
  using namespace flash_sdpa;
  using namespace flash_sdpa::paged;
  const long rows = long(p.batch) * p.num_heads * p.seqlen_q;
  const long row = long(tgid) * kCombineSimdgroups + sg;  // (B, H, sq)
  if (row >= rows) {
    return;  // no barriers below
  }
  const int splits = min(p.num_splits, int(kMaxSplits));
  const long b = row / (long(p.num_heads) * p.seqlen_q);
  const long i = row % p.seqlen_q;
  const int h = int((row / p.seqlen_q) % p.num_heads);
  const int D = p.head_dim;
  float mx = kMaskedScore;
  bool bad = false;  // a split saw a non-finite visible score (its max is NaN bits): the row is NaN
  for (int s = 0; s < splits; ++s) {
    const float ms = ml_partial[(s * rows + row) * 2];
    bad = bad || is_nonfinite(ms);
    mx = max(mx, bad ? kMaskedScore : ms);
  }
  if (bad) {
    for (int d = int(lane); d < D; d += kSimdWidth) {
      out[((b * p.seqlen_q + i) * p.num_heads + h) * D + d] = T(as_type<float>(kNanBits));
    }
    if (fc_combine_write_lse && lane == 0) {
      lse[row] = kNanBits;
    }
    return;
  }
  float sum = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float ms = ml_partial[(s * rows + row) * 2];
    sum += ms > kNegHalf ? ml_partial[(s * rows + row) * 2 + 1] * exp(ms - mx) : 0.0f;
  }
  const bool seen = mx > kNegHalf;
  const float m_splits = mx;  // the partials are rescaled to this max
  float scale_o = 1.0f;
  if (fc_combine_sinks && seen) {
    const float sink = sinks[h];
    const float mn = max(mx, sink);
    scale_o = exp(mx - mn);
    sum = sum * scale_o + exp(sink - mn);
    mx = mn;
  }
  for (int d = int(lane); d < D; d += kSimdWidth) {
    float acc = 0.0f;
    if (seen) {
      for (int s = 0; s < splits; ++s) {
        const float ms = ml_partial[(s * rows + row) * 2];
        if (ms > kNegHalf) {
          acc += o_partial[(s * rows + row) * D + d] * exp(ms - m_splits);
        }
      }
    }
    // out (B, sq, H, D = 1), contiguous
    out[((b * p.seqlen_q + i) * p.num_heads + h) * D + d] = seen ? T(acc * scale_o / sum) : T(0.0f);
  }
  if (fc_combine_write_lse && lane == 0) {
    lse[row] = seen ? as_type<uint>(mx + log(sum)) : kNegInfBits;
  }
}
