// paged_decode_attention + paged_decode_combine: flash-decoding straight from a paged KV cache (or packed varlen K/V).
//
// One threadgroup per (split, KV head x row block, request). A row is one (query head of the KV group, query token)
// pair; the threadgroup holds R rows (a template parameter: the planner picks the smallest R >= group x sq, extra row
// blocks past the largest), so one pass over the KV head's keys serves the whole GQA group and all sq tokens.
//
// Lanes across D, keys across lane groups: a simdgroup is G groups of L = 32 / G lanes; each group streams its own
// keys, a key row read by its L lanes with one vector load each (two at R <= 2; 16 bytes when R <= 4, 8 above; lane
// li takes chunks li, li + L: DecodeLayout). Per step a simdgroup issues the K and the V loads of U keys per group
// at once (~32 bytes of each per lane in flight: one memory round trip per step), with the next step's block ids
// loaded meanwhile. q.k is summed over the L lanes of a key: at R = 1 a butterfly (every lane gets the score); at
// R >= 2 a reduce-scatter, after which each lane holds its own rows' scores, runs their online softmax alone and
// shares the probabilities with the group through threadgroup memory (DecodeLayout, "scattered rows"). P.V is
// lane-local (each group keeps R x EPL accumulators), so nothing waits on other groups until the end, when the
// groups and then the 8 simdgroups merge (threadgroup memory, in one round while their accumulators fit 8 KB), or, for
// a short split (PagedDecodeParams::simdgroup_partials), each simdgroup writes its own partial for the combine.
// Threadgroup memory: the scaled q rows (R x D fp32), then the merge slots, <= 9 KB, plus the scattered scores'
// buffers (<= 8 KB). No K/V staging: each valid K/V byte goes from memory to the registers that use it, once per KV
// head.
//
// The matrix path (decode_matrix_rows: R = 8 or 16, 2-byte types, D = 64 or 128, one query token, so the rows are
// the query heads of a GQA group at one position): both products run on 8x8 simdgroup_matrix tiles, as in the varlen
// forward. A key step is 8 keys: each lane loads one 16-byte chunk of K and of V per key it covers (each key's row
// address from the block table, so a step may straddle pages), the K rows go through the simdgroup's 8-key tile in
// threadgroup memory into S = Q K^T, then V replaces K there for O += P V. A simdgroup holds R / 8 row tiles of
// 64 / (R / 8) columns of Q and O (8 fragments of each at R = 8 and 16: its registers do not grow with R); the
// simdgroups that split D among them share each key step and add their parts of S through threadgroup memory (one
// threadgroup barrier per step): 2 at R = 8, D = 128 and at R = 16, D = 64; 4 at R = 16, D = 128. Apple GPUs have no
// asynchronous copy into threadgroup memory and fragments are built only by simdgroup_load (which lane holds which
// element is undocumented), so the rows pass through the registers either way; a simdgroup_load straight from device
// memory needs the 8 rows at one stride, which pages of any size break. K and V share a simdgroup's tile (8 keys x its
// columns; 8 KB for the threadgroup at R = 8, 4 KB at R = 16). Several query tokens (sq > 1) keep the lane-local path:
// their rows see different keys, and a shared P V would carry a non-finite V element to rows that cannot see it. The
// matrix path is its own kernel instance (M = true: "paged_decode_matrix_*"), so that each path's pipeline gets the
// registers it needs: in one function the lane-local branch's would set both (168 at R = 16, D = 128 on the proxy,
// against 128 for the matrix path alone), and an Apple core spills or keeps fewer simdgroups resident for them.
//
// Short one-token splits in 2-byte types at D = 64 and 128 (simdgroup partials, decode_runs_wide) run neither path but
// paged_decode_wide (paged_decode_wide.h), which spreads each threadgroup step over the whole threadgroup.
#pragma once

#include <metal_stdlib>

#include "attention_device.h"
#include "paged_params.h"

using namespace metal;

constant bool fc_decode_write_lse [[function_constant(FLASH_SDPA_FC_DECODE_WRITE_LSE)]];
constant bool fc_decode_kv_aligned [[function_constant(FLASH_SDPA_FC_DECODE_KV_ALIGNED)]];
constant bool fc_decode_leftpad [[function_constant(FLASH_SDPA_FC_DECODE_LEFTPAD)]];

namespace flash_sdpa {
namespace paged {

// The lane layout of paged_decode_attention<T, D, R> (compile-time; its formulas are paged_params.h's decode_*
// functions, which the planner reads too). A key row is NC chunks of kChunkBytes; L lanes read one row, lane li
// chunks li, li + L, ...; G = 32 / L keys are read side by side, U per lane group and step. Lanes past NC (head dims
// that are not powers of two) idle.
template <typename T, int D, int R, bool M>
struct DecodeLayout {
  static constexpr int NSG = kDecodeSimdgroups;
  static constexpr int kChunkBytes = decode_chunk_bytes(R);
  static constexpr int CW = kChunkBytes / 4;                // 32-bit words per chunk (K/V stay packed)
  static constexpr int EPC = kChunkBytes / int(sizeof(T));  // elements per chunk
  static constexpr int NC = D * int(sizeof(T)) / kChunkBytes;
  static constexpr int L = decode_row_lanes(D, int(sizeof(T)), R);
  static constexpr int G = 32 / L;
  static constexpr int CPL = (NC + L - 1) / L;  // chunks per lane
  static constexpr int EPL = CPL * EPC;         // elements (accumulators) per lane and row
  static constexpr int U = decode_group_keys(D, int(sizeof(T)), R);
  static constexpr int kStepKeys = G * U;  // keys per simdgroup step
  // Merge slots: the simdgroups' accumulators meet in kMergeSlots x R x D floats, at most kMergeBytes (or one
  // slot); a power of two that divides NSG.
  static constexpr int kMergeBytes = 8192;
  static constexpr int halve_to_fit(int slots) {
    return slots > 1 && slots * R * D * 4 > kMergeBytes ? halve_to_fit(slots / 2) : slots;
  }
  static constexpr int kMergeSlots = halve_to_fit(NSG);
  // Scattered rows (R >= kScatterMinRows): a key's R partial scores are summed over the L lanes by a
  // reduce-scatter (each butterfly stage halves the values a lane carries: R - 1 shuffles per key and lane, against
  // R x log2 L for an all-reduce), so lane li ends with the scores of RPL rows (DUP lanes hold each row). The online
  // softmax of those rows is then lane-local (no shuffle, 1/DUP-th of the exponentials each lane did before), and
  // the probabilities reach every lane through threadgroup memory (one simdgroup_barrier per step). At R = 1 every
  // lane already holds the one row's scores after the butterfly: nothing to scatter.
  static constexpr int kScatterMinRows = 2;
  static constexpr bool kScatter = R >= kScatterMinRows;
  static constexpr int RPL = R >= L ? R / L : 1;  // rows per lane
  static constexpr int DUP = R >= L ? 1 : L / R;  // lanes per row
  static constexpr int kScoreFloats = R * U + R;  // per lane group and step: probabilities [R][U], corrections [R]
  static constexpr int kScatterFloats = kScatter && !M ? NSG * G * 2 * kScoreFloats : 1;  // double-buffered
  static_assert((D * int(sizeof(T))) % kChunkBytes == 0, "rows are whole chunks (D % 8 == 0)");
  static_assert(L * G == 32 && CPL * L >= NC, "lane layout");

  // The matrix path (decode_matrix_rows, one query token): a key step is kDecodeMatrixKeys = 8 keys, RT = R / 8 score
  // tiles of 8x8, shared by MC simdgroups (decode_column_simdgroups), each with MD = 64 / RT columns of Q and O (a key
  // unit), so that a simdgroup holds RT x MD / 8 = 8 fragments of Q and 8 of O at R = 8 and 16 alike. A simdgroup
  // reads its columns of the step's K rows as 16-byte chunks, ML lanes per row (one chunk each), MG rows side by side,
  // MU per lane: key g + u MG of the step (lane group g, as above). Threadgroup memory (floats, in stage_tg): per
  // simdgroup an 8-key tile of T [8][MD] (K, then V); past those and the merge slots, per simdgroup kStrips strips of
  // RT 8x8 floats (its scores; double-buffered by step parity when MC > 1, so that a partner still reading one step's
  // strip is not overwritten by the next; O's blocks when rows are scaled or read out), an [RT][8][8] T tile
  // (probabilities) and 8 key flags; then Q (T [R][D], loaded once into RT x MD / 8 fragments per simdgroup).
  static constexpr bool kMatrix = M;
  static_assert(!M || decode_matrix_rows(D, int(sizeof(T)), R), "a matrix instance of a matrix configuration");
  static constexpr int MK = kDecodeMatrixKeys;
  static constexpr int RT = kMatrix ? R / 8 : 1;  // row tiles
  static constexpr int MC = decode_column_simdgroups(D, int(sizeof(T)), R);
  static constexpr int MD = D / MC;
  static constexpr int NU = NSG / MC;  // key units
  static constexpr int ML = kMatrix ? MD * int(sizeof(T)) / 16 : 1;
  static constexpr int MG = 32 / ML;
  static constexpr int MU = kMatrix ? MK / MG : 1;
  static constexpr int MEPC = 16 / int(sizeof(T));  // elements per 16-byte chunk
  static constexpr int kStrips = MC > 1 ? 2 : 1;    // strips per simdgroup
  static constexpr int kStripFloats = RT * 64;      // one strip: RT 8x8 float blocks
  static constexpr int kTileFloats = MK * MD * int(sizeof(T)) / 4;
  // The merge (after the key loop) writes its slots over the tiles while reading fragments out through the strips.
  static constexpr int kStripAt = NSG * kTileFloats > kMergeSlots* R* D ? NSG* kTileFloats
                                                                        : (kMergeSlots* R* D + 3) / 4 * 4;
  static constexpr int kProbAt = kStripAt + NSG * kStrips * kStripFloats;
  static constexpr int kKeyOkAt = kProbAt + NSG * RT * 64 * int(sizeof(T)) / 4;
  static constexpr int kQAt = kKeyOkAt + NSG * MK;
  static constexpr int kMatrixFloats = kMatrix ? kQAt + R * D * int(sizeof(T)) / 4 : 0;
  // stage_tg: the q rows / merge slots, or the matrix path's tiles; whole float4s (16-byte chunk stores).
  static constexpr int kStageFloats =
      (kMergeSlots * R * D > kMatrixFloats ? kMergeSlots * R * D : kMatrixFloats + 3) / 4 * 4;
  static_assert(!kMatrix || (R == 8 * RT && MD * RT == kDecodeMatrixColumns && ML * MG == 32 && MU * MG == MK &&
                             NU * MC == NSG && NU % kMergeSlots == 0 && kStripAt >= kMergeSlots * R * D &&
                             kStripAt % 4 == 0 && kProbAt % 4 == 0 && kKeyOkAt % 4 == 0 && kQAt % 4 == 0),
                "matrix path: 8-row tiles, 64 / RT columns per simdgroup, whole lane groups and units, strips past "
                "the merge slots, float4-aligned offsets");
};

// Online-softmax headroom of the matrix path: a row's running max moves only when a step's max passes it by more
// than this (natural log), so probabilities stay <= e^5.5 ~ 245 (inside half's and bfloat's range) and O's rescale
// (scale_rows) is skipped on nearly every step (as in the varlen forward, attention_varlen.h).
constant constexpr float kDecodeRescaleSlack = 5.5f;

typedef vec<uint, 4> chunk16;

// Element e of a chunk (packed words) as float.
template <typename T>
inline float chunk_elem(vec<uint, 4> c, int e) {
  return float(as_type<vec<T, 2>>(c[e / 2])[e % 2]);
}
template <>
inline float chunk_elem<float>(vec<uint, 4> c, int e) {
  return as_type<float>(c[e]);
}

// Packs two elements read one by one (unaligned rows) into a word.
template <typename T>
inline uint pack_word(device const T* src) {
  return as_type<uint>(vec<T, 2>(src[0], src[1]));
}
template <>
inline uint pack_word<float>(device const float* src) {
  return as_type<uint>(src[0]);
}

// Loads chunk `ci` of a key row (nothing when !ok or the chunk is past the row: zeros). CW words.
template <typename T, int CW, int NC>
inline vec<uint, 4> load_chunk(device const T* row, int ci, bool ok, bool aligned) {
  vec<uint, 4> c = vec<uint, 4>(0u);
  if (ok && ci < NC) {
    device const T* src = row + ci * (CW * 4 / int(sizeof(T)));
    if (aligned) {
      if (CW == 4) {
        c = *reinterpret_cast<device const vec<uint, 4>*>(src);
      } else {
        const vec<uint, 2> x = *reinterpret_cast<device const vec<uint, 2>*>(src);
        c = vec<uint, 4>(x.x, x.y, 0u, 0u);
      }
    } else {
      for (int w = 0; w < CW; ++w) {
        c[w] = pack_word<T>(src + w * (4 / int(sizeof(T))));
      }
    }
  }
  return c;
}

// The K and V chunks of a step's U keys for this lane (zeros for masked keys: block -1), all loads issued together.
template <typename T, int U, int CPL, int CW, int NC, int L>
inline void load_step(thread vec<uint, 4> (&kr)[U][CPL], thread vec<uint, 4> (&vr)[U][CPL], thread const int2 (&loc)[U],
                      device const T* k_cache, device const T* v_cache, long k_head, long v_head,
                      constant PagedDecodeParams& p, int li, bool aligned) {
  for (int u = 0; u < U; ++u) {
    const bool ok = loc[u].x >= 0;
    // k_cache (num_blocks, block_size, Hkv, D = 1); varlen: k (total_k, Hkv, D = 1) with block = row, slot = 0
    const long kb = long(max(loc[u].x, 0)) * p.k_stride_block + long(loc[u].y) * p.k_stride_slot + k_head;
    const long vb = long(max(loc[u].x, 0)) * p.v_stride_block + long(loc[u].y) * p.v_stride_slot + v_head;
    for (int j = 0; j < CPL; ++j) {
      kr[u][j] = load_chunk<T, CW, NC>(k_cache + kb, li + j * L, ok, aligned);
      vr[u][j] = load_chunk<T, CW, NC>(v_cache + vb, li + j * L, ok, aligned);
    }
  }
}

// One tensor's chunks (K or V) of a step's U keys for this lane (the matrix path: one chunk per key, CPL = 1).
template <typename T, int U, int CW, int NC>
inline void load_rows(thread vec<uint, 4> (&x)[U], thread const int2 (&loc)[U], device const T* cache, long head,
                      long stride_block, long stride_slot, int li, bool aligned) {
  for (int u = 0; u < U; ++u) {
    const long base = long(max(loc[u].x, 0)) * stride_block + long(loc[u].y) * stride_slot + head;
    x[u] = load_chunk<T, CW, NC>(cache + base, li, loc[u].x >= 0, aligned);
  }
}

// This lane's share of q.k for one key row: its chunks li, li + L, ... of the pre-scaled q row (fp32, threadgroup
// memory) against the key's chunks.
template <typename T, int D, int L, int CPL, int EPC, int NC>
inline float partial_dot(threadgroup const float* q_row, thread const vec<uint, 4> (&k)[CPL], int li) {
  float acc = 0.0f;
  for (int j = 0; j < CPL; ++j) {
    const int ci = li + j * L;
    if (ci < NC) {
      for (int e = 0; e < EPC; ++e) {
        acc += q_row[ci * EPC + e] * chunk_elem<T>(k[j], e);
      }
    }
  }
  return acc;
}

// o[r] = o[r] x correction[r] + sum_u p[r][u] x V[u] for this lane's chunks, from a step's probabilities [R][U] and
// corrections [R] in threadgroup memory. kMaskUnseen: a row skips the keys it does not see (probability +0) by
// masking their V to +0 with integer bit masks, so that a NaN or inf in a stale or poisoned slot cannot reach it
// through 0 x NaN (a float select would be folded back into 0 x V under fast math).
template <typename T, int R, int U, int CPL, int EPC, int EPL, bool kMaskUnseen>
inline void pv_update(thread float (&o)[R][EPL], thread const vec<uint, 4> (&vr)[U][CPL], threadgroup const float* buf,
                      int nrows) {
  for (int r = 0; r < R; ++r) {
    if (r < nrows) {  // uniform
      float pr[U];
      uint keep[U];
      for (int u = 0; u < U; ++u) {
        pr[u] = buf[r * U + u];
        keep[u] = kMaskUnseen && as_type<uint>(pr[u]) == 0u ? 0u : ~0u;
      }
      const float corr = buf[R * U + r];
      for (int j = 0; j < CPL; ++j) {
        for (int e = 0; e < EPC; ++e) {
          float acc = o[r][j * EPC + e] * corr;
          for (int u = 0; u < U; ++u) {
            const float v = chunk_elem<T>(vr[u][j], e);
            acc += pr[u] * (kMaskUnseen ? as_type<float>(as_type<uint>(v) & keep[u]) : v);
          }
          o[r][j * EPC + e] = acc;
        }
      }
    }
  }
}

// The matrix path's row scaling x(r, :) *= a_r of an 8x8 float fragment, through the simdgroup's 8x8 strip (lane
// (mr, mc), (mr, mc + 1) scales its own row's elements; no product with diag(a), which costs a float x float multiply).
inline void scale_rows(thread simdgroup_matrix<float, 8, 8>& x, threadgroup float* strip, float a, int mr, int mc) {
  simdgroup_barrier(mem_flags::mem_threadgroup);  // the strip's last readers are done
  simdgroup_store(x, strip, 8);
  simdgroup_barrier(mem_flags::mem_threadgroup);
  strip[mr * 8 + mc] *= a;
  strip[mr * 8 + mc + 1] *= a;
  simdgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_load(x, strip, 8);
}

// mask_scores: the masking and transform of softmax_step, returning the scores' max (kNoScore when none is visible).
template <int U, int G>
inline float mask_scores(thread float (&s)[U], thread uint& bad_rows, int r, bool row_ok, thread const int2 (&loc)[U],
                         int t, int2 keys, int pos, float slope, constant OptionParams& opt) {
  float mx = kNoScore;
  for (int u = 0; u < U; ++u) {
    const int key = t + u * G;
    float sc = s[u];
    bool visible = row_ok && loc[u].x >= 0 && key >= keys.x && key <= keys.y;
    if (visible && is_nonfinite(sc)) {
      bad_rows |= 1u << r;
      visible = false;
    }
    if (fc_softcap) {
      sc = apply_softcap(sc, opt.softcap);
    }
    if (fc_alibi) {
      sc -= slope * float(abs(pos - key));
    }
    sc = visible ? clamp_score(sc) : kNoScore;
    s[u] = sc;
    mx = max(mx, sc);
  }
  return mx;
}

// One row's online-softmax step over its U keys of the step (key t + u * G): a key is visible when its block is valid
// and it lies in the row's window `keys`; a visible non-finite score sets the row's bit in bad_rows (the row becomes
// NaN) and is dropped, before the softcap clamp could hide it; then softcap, ALiBi (row position pos, slope) and the
// clamp to +-kScoreLimit. The scores become probabilities relative to the new running max m (l accumulates their
// sum); returns the correction of the row's earlier accumulator.
template <int U, int G>
inline float softmax_step(thread float (&s)[U], thread float& m, thread float& l, thread uint& bad_rows, int r,
                          bool row_ok, thread const int2 (&loc)[U], int t, int2 keys, int pos, float slope,
                          constant OptionParams& opt) {
  const float mx = mask_scores<U, G>(s, bad_rows, r, row_ok, loc, t, keys, pos, slope, opt);
  const float m_new = max(m, mx);
  const float corr = m > kNoScore ? exp(m - m_new) : 0.0f;
  float sum = 0.0f;
  for (int u = 0; u < U; ++u) {
    const float pr = s[u] > kNoScore ? exp(s[u] - m_new) : 0.0f;
    s[u] = pr;
    sum += pr;
  }
  l = l * corr + sum;
  m = m_new;
  return corr;
}

// Row gr of a threadgroup's rows -> (query head of the KV group, query token): gr = head * sq + token. A decode step
// has one token (sq = 1): no division then (a run-time integer division is a long instruction sequence on Apple's
// GPUs, as on NVIDIA's, and a short split runs this per staged element and per written row).
inline int2 row_head_token(int gr, int sq) { return sq == 1 ? int2(gr, 0) : int2(gr / sq, gr % sq); }

// The block-table position (block index, slot) of a lane group's next key in paged mode. One integer division at
// the start and one for the stride; then each step advances by adds (an integer division is a long instruction
// sequence on Apple's GPUs as on NVIDIA's, and it was once per step).
struct TableCursor {
  int block;
  int slot;
  int stride_blocks;  // the simdgroup's stride between steps (NSG x kStepKeys keys) in whole blocks ...
  int stride_slots;   // ... and remaining slots
};

inline TableCursor table_cursor(int key, int stride, int block_size) {
  TableCursor c;
  c.block = key / block_size;
  c.slot = key - c.block * block_size;
  c.stride_blocks = stride / block_size;
  c.stride_slots = stride - c.stride_blocks * block_size;
  return c;
}

inline void advance(thread TableCursor& c, int block_size) {
  c.block += c.stride_blocks;
  c.slot += c.stride_slots;
  if (c.slot >= block_size) {
    c.slot -= block_size;
    ++c.block;
  }
}

// A request's row of the block table: where its entries are read, or, for a contiguous cache whose row b is request
// b's (PagedDecodeParams::cache_row_is_request), that block id itself: no table read before the first K/V load.
struct TableRow {
  long offset;    // elements of block_table before the row
  int own_block;  // >= 0: every entry of the row (one block: block_size covers the cache row); -1: read the table
};

inline TableRow table_row(int b, constant PagedDecodeParams& p) {
  return TableRow{long(b) * p.block_table_stride_b, p.cache_row_is_request != 0 ? b : -1};
}

// Where the keys t, t + G, ..., t + (U - 1) G live, in paged mode: (block id, slot) through the block table (the
// cursor is at slot k_start + t and moves on to the next step's); block -1 for slots past the table row and invalid
// block ids. Reads only the table row, whatever the key count: a split's first entries are read while cache_seqlens
// still is (mask_past applies the count). The L lanes of a key group read the same table entry (one address, served
// once by the GPU's cache; on the proxy 4-17% faster than one read per key shared by simd_shuffle).
template <int U, int G>
inline void step_entries(thread int2 (&loc)[U], thread TableCursor& cursor, device const int* block_table,
                         TableRow bt_row, int block_size, int max_blocks, int num_blocks) {
  int bi = cursor.block;
  int slot = cursor.slot;
  for (int u = 0; u < U; ++u) {
    int id = -1;
    if (bi < max_blocks) {
      const int raw = bt_row.own_block >= 0 ? bt_row.own_block : block_table[bt_row.offset + bi];
      id = raw >= 0 && raw < num_blocks ? raw : -1;
    }
    loc[u] = int2(id, slot);
    slot += G;
    while (slot >= block_size) {  // G <= 8: one pass unless block_size < G
      slot -= block_size;
      ++bi;
    }
  }
  advance(cursor, block_size);
}

// Masks the keys t + u G >= limit (block -1: nothing is loaded for them); varlen mode: (k row, 0) = (k_start + key, 0)
// for the others.
template <int U, int G>
inline void mask_past(thread int2 (&loc)[U], int t, int limit, bool varlen, int k_start) {
  for (int u = 0; u < U; ++u) {
    const int key = t + u * G;
    if (varlen) {
      loc[u] = int2(key < limit ? k_start + key : -1, 0);
    } else if (key >= limit) {
      loc[u].x = -1;
    }
  }
}

// Both: where the keys of a step live, masked past `limit`.
template <int U, int G>
inline void step_locs(thread int2 (&loc)[U], int t, int limit, bool varlen, int k_start, thread TableCursor& cursor,
                      device const int* block_table, TableRow bt_row, int block_size, int max_blocks, int num_blocks) {
  if (!varlen) {
    step_entries<U, G>(loc, cursor, block_table, bt_row, block_size, max_blocks, num_blocks);
  }
  mask_past<U, G>(loc, t, limit, varlen, k_start);
}

// The keys of request b. Paged: slots [k_start, k_start + sk) of its block-table row, sk = cache_seqlens[b] +
// seqlen_new clamped to the table's capacity (padding rows, cache_seqlens < 0, have none and output zeros) and
// k_start its cache_leftpad (contiguous caches: key t is slot leftpad + t). Varlen: rows [k_start, k_start + sk) of
// k, clamped to total_k; only a sequence with exactly one query row (clamped as every varlen kernel clamps cu_seqlens)
// is this kernel's: false for the others (the router's varlen dispatch that follows computes those, whatever
// max_seqlen_q said). In paged mode the block-table entries of this lane's first step (key `first_key`, counted from
// a window starting at 0) are read while cache_seqlens still is: one dependent memory round trip less before the
// first K/V byte. A call that gives every request the same length (PagedDecodeParams::fixed_seqlen) on a contiguous
// cache row per request (cache_row_is_request: flash_attn_func's decode) reads neither: its first K/V loads wait on
// nothing but the parameters, as a decode of a dense cache does.
struct RequestKeys {
  int sk = 0;
  int k_start = 0;
  int q_row = 0;  // varlen: the row of q / out
};

template <int U, int G>
inline bool request_keys(thread RequestKeys& rk, thread int2 (&loc)[U], thread TableCursor& cursor, int first_key,
                         int stride, int b, TableRow bt_row, constant PagedDecodeParams& p,
                         device const int* block_table, device const int* cache_seqlens, device const int* cu_seqlens_q,
                         device const int* cu_seqlens_k, device const int* cache_leftpad) {
  if (fc_varlen) {
    const int2 q_rows = packed_rows(cu_seqlens_q, b, p.total_q);
    if (q_rows.y != 1) {
      return false;
    }
    rk.q_row = q_rows.x;
    const int2 k_rows = packed_rows(cu_seqlens_k, b, p.total_k);
    rk.k_start = k_rows.x;
    rk.sk = k_rows.y;
  } else {
    const int capacity = p.max_blocks_per_seq * p.block_size;
    rk.k_start = fc_decode_leftpad ? clamp(cache_leftpad[b], 0, capacity) : 0;
    cursor = table_cursor(rk.k_start + first_key, stride, p.block_size);
    step_entries<U, G>(loc, cursor, block_table, bt_row, p.block_size, p.max_blocks_per_seq, p.num_blocks);
    const int seqlen = p.fixed_seqlen >= 0 ? p.fixed_seqlen : cache_seqlens[b];
    rk.sk = seqlen < 0 ? 0 : int(clamp(long(seqlen) + p.seqlen_new - rk.k_start, 0l, long(capacity - rk.k_start)));
  }
  return true;
}

// Where this lane's first step (keys t = first + g, first + g + G, ...) lives, once the visible keys [lo, hi) are
// known: read again from the table (varlen: the k rows) where a window moved lo off 0, else request_keys' entries
// masked past hi.
template <int U, int G>
inline void first_step_locs(thread int2 (&loc)[U], thread TableCursor& cursor, int lo, int t, int hi, int stride,
                            const thread RequestKeys& rk, TableRow bt_row, constant PagedDecodeParams& p,
                            device const int* block_table) {
  if (fc_varlen || lo != 0) {  // uniform
    cursor = table_cursor(rk.k_start + t, stride, fc_varlen ? 1 : p.block_size);
    step_locs<U, G>(loc, t, hi, fc_varlen, rk.k_start, cursor, block_table, bt_row, p.block_size, p.max_blocks_per_seq,
                    p.num_blocks);
  } else {
    mask_past<U, G>(loc, t, hi, false, rk.k_start);
  }
}

// The combine's loads in flight per thread: splits s0, s0 + NS, ..., s0 + (kCombineLoads - 1) NS of one float4
// column (zeros past `splits`).
constant constexpr int kCombineLoads = 8;
inline void load_partials(thread float4 (&x)[kCombineLoads], device const float4* src, long split_stride, int s0,
                          int NS, int splits) {
  for (int k = 0; k < kCombineLoads; ++k) {
    const int s = s0 + k * NS;
    x[k] = s < splits ? src[s * split_stride] : float4(0.0f);
  }
}

// Each row's max, sum and bad flag over the simdgroups' (m_tg, l_tg: [NSG][R], bad_tg: [NSG] bits), once (thread r),
// for write_rows (visible after the merge's barriers): not once per written element.
template <int R, int NSG>
inline void row_stats(threadgroup const float* m_tg, threadgroup const float* l_tg, threadgroup const uint* bad_tg,
                      threadgroup float* row_max_tg, threadgroup float* row_sum_tg, threadgroup uint* row_bad_tg,
                      uint tid) {
  if (int(tid) < R) {
    const int r = int(tid);
    float mx = kNoScore;
    for (int w = 0; w < NSG; ++w) {
      mx = max(mx, m_tg[w * R + r]);
    }
    float sum = 0.0f;
    uint bad = 0u;
    for (int w = 0; w < NSG; ++w) {
      const float mw = m_tg[w * R + r];
      sum += mw > kNoScore ? l_tg[w * R + r] * exp(mw - mx) : 0.0f;
      bad |= (bad_tg[w] >> r) & 1u;
    }
    row_max_tg[r] = mx;
    row_sum_tg[r] = sum;
    row_bad_tg[r] = bad;
  }
}

// The threadgroup's rows from the merge slots (acc_tg: MS x [R][D] floats, summed) and row_stats: split partials
// (unnormalised, relative to the row max) or the final rows (sinks, LSE, NaN rows, rows with no visible key).
template <typename T, int D, int R, int MS>
inline void write_rows(device T* out, device uint* lse, device float* o_partial, device float* ml_partial,
                       device const float* sinks, constant PagedDecodeParams& p, threadgroup const float* acc_tg,
                       threadgroup const float* row_max_tg, threadgroup const float* row_sum_tg,
                       threadgroup const uint* row_bad_tg, int nrows, int row0, int sq, int hkv, int group, int b,
                       int q_row, int split, bool split_mode, uint tid) {
  for (int idx = int(tid); idx < nrows * D; idx += kDecodeThreads) {
    const int r = idx / D;
    const int d = idx - r * D;
    const int gr = row0 + r;
    const int2 ht = row_head_token(gr, sq);
    const int h = hkv * group + ht.x;
    const int i = ht.y;
    float mx = row_max_tg[r];
    float sum = row_sum_tg[r];
    const bool bad = row_bad_tg[r] != 0u;
    float acc = 0.0f;
    for (int k = 0; k < MS; ++k) {
      acc += acc_tg[k * R * D + idx];
    }
    const long row = (long(b) * p.num_heads + h) * sq + i;  // (B, H, sq)
    // out (B, sq, H, D = 1) contiguous, LSE (B, H, sq); varlen: out (total_q, H, D = 1), LSE (H, total_q)
    const long out_at =
        fc_varlen ? (long(q_row) * p.num_heads + h) * D + d : ((long(b) * sq + i) * p.num_heads + h) * D + d;
    const long lse_at = fc_varlen ? long(h) * p.total_q + q_row : row;
    if (split_mode) {
      const long prow = long(split) * p.batch * p.num_heads * sq + row;  // (splits, B, H, sq)
      o_partial[prow * D + d] = acc;
      if (d == 0) {
        ml_partial[prow * 2] = bad ? as_type<float>(kNanBits) : mx;  // the combine tests the bits
        ml_partial[prow * 2 + 1] = sum;
      }
    } else if (bad) {
      out[out_at] = T(as_type<float>(kNanBits));
      if (fc_decode_write_lse && d == 0) {
        lse[lse_at] = kNanBits;
      }
    } else {
      const bool seen = mx > kNoScore;
      float scale_o = 1.0f;
      if (fc_sinks && seen) {
        const float sink = clamp_score(sinks[h]);
        const float mn = max(mx, sink);
        scale_o = exp(mx - mn);
        sum = sum * scale_o + exp(sink - mn);
        mx = mn;
      }
      out[out_at] = seen ? T(acc * scale_o / sum) : T(0.0f);
      if (fc_decode_write_lse && d == 0) {
        lse[lse_at] = seen ? as_type<uint>(mx + log(sum)) : kNegInfBits;
      }
    }
  }
}

}  // namespace paged
}  // namespace flash_sdpa

// M: the one-token matrix path (FLASH_SDPA_PAGED_MATRIX_INSTANCES) or the lane-local path (any sq).
template <typename T, int D, int R, bool M>
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
    device const int* cu_seqlens_q [[buffer(FLASH_SDPA_DECODE_BUF_CU_SEQLENS_Q)]],
    device const int* cu_seqlens_k [[buffer(FLASH_SDPA_DECODE_BUF_CU_SEQLENS_K)]],
    device const int* cache_leftpad [[buffer(FLASH_SDPA_DECODE_BUF_CACHE_LEFTPAD)]],
    uint3 tgid [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
  using namespace flash_sdpa;
  using namespace flash_sdpa::paged;
  using Layout = DecodeLayout<T, D, R, M>;
  constexpr int NSG = Layout::NSG;
  constexpr int L = Layout::L;
  constexpr int G = Layout::G;
  constexpr int CW = Layout::CW;
  constexpr int EPC = Layout::EPC;
  constexpr int NC = Layout::NC;
  constexpr int CPL = Layout::CPL;
  constexpr int EPL = Layout::EPL;
  constexpr int U = Layout::U;
  constexpr int KS = Layout::kStepKeys;
  static_assert(D % 8 == 0, "head dims are multiples of 8");
  constexpr int MS = Layout::kMergeSlots;
  constexpr bool kScatter = Layout::kScatter;
  constexpr int DUP = Layout::DUP;
  constexpr int RPL = Layout::RPL;
  constexpr int SF = Layout::kScoreFloats;
  static_assert(Layout::kStageFloats * 4 + 2 * NSG * R * 4 + NSG * 4 + 3 * R * 4 + Layout::kScatterFloats * 4 <= 32768,
                "threadgroup memory over 32 KB");

  // The scaled q rows (fp32 [R][D]); after the key loop, the merge slots (MS x [R][D]).
  // The matrix path: the staging tiles, strips and flags (DecodeLayout), then the merge slots.
  threadgroup float4 stage_tg4[Layout::kStageFloats / 4];
  threadgroup float* stage_tg = reinterpret_cast<threadgroup float*>(stage_tg4);
  threadgroup float* q_tg = stage_tg;
  threadgroup float m_tg[NSG * R];  // per simdgroup running max
  threadgroup float l_tg[NSG * R];  // per simdgroup sum of exp
  threadgroup uint bad_tg[NSG];     // per simdgroup rows with a non-finite visible score (bit r)
  threadgroup float row_max_tg[R];  // per row, over the simdgroups: max, sum of exp, bad flag
  threadgroup float row_sum_tg[R];
  threadgroup uint row_bad_tg[R];
  // Scattered scores: per (simdgroup, lane group), two buffers of SF floats, used by alternate steps.
  threadgroup float score_tg[Layout::kScatterFloats];

  // A one-token call's row tile covers its KV head's group (row_blocks 1): no division then (an integer division is
  // a long instruction sequence on Apple's GPUs, and these indices lead to the first K/V address). The guard reads
  // its three counts together: one branch, not a chain of parameter reads and branches before any other work.
  const int split = int(tgid.x);
  const int hkv = p.row_blocks == 1 ? int(tgid.y) : int(tgid.y) / p.row_blocks;
  const int row0 = (int(tgid.y) - hkv * p.row_blocks) * R;
  const int b = int(tgid.z);
  if ((b >= p.batch) | (hkv >= p.num_kv_heads) | (split >= p.num_splits)) {
    return;  // whole threadgroup: grid larger than the problem
  }
  const bool split_mode = p.num_splits > 1;  // a run-time choice: the same pipeline serves every split count
  const int sq = fc_varlen ? 1 : p.seqlen_q;
  const int group = p.num_heads / p.num_kv_heads;
  const int nrows = min(R, group * sq - row0);

  if constexpr (Layout::kMatrix) {
    // The matrix path (a matrix instance: the planner gives it one-token calls only, decode_runs_matrix; every path
    // through this block returns, so the lane-local code below is not part of its pipeline). Row r is head row0 + r
    // of the KV group (DecodeLayout). Per key step of 8
    // keys: each simdgroup of the step's unit puts its lanes' 16-byte chunks of its MD columns of the K rows into
    // its tile, S_rt = Q_rt K^T for each 8-row tile rt on 8x8 fragments over those columns (Q in T, unscaled: the
    // scale applies to S in fp32); at MC > 1 the unit's simdgroups add their parts of S through their strips (one
    // threadgroup barrier), then all run the same online softmax: row rt x 8 + lane / 4 of each row tile on its 4
    // lanes (2 scores each); V replaces K in the tile, P (T) goes through a small tile, O_rt += P_rt V on RT x MD / 8
    // float fragments. With one token every loaded key lies in every row's window (the same position), so no row
    // meets a V row it does not see: a non-finite V reaches exactly the rows that FlashAttention-2 gives it to, as
    // in the lane-local P.V of the path below at sq = 1.
    constexpr int MK = Layout::MK;
    constexpr int RT = Layout::RT;
    constexpr int MC = Layout::MC;
    constexpr int MD = Layout::MD;
    constexpr int NU = Layout::NU;
    constexpr int MLn = Layout::ML;
    constexpr int MG = Layout::MG;
    constexpr int MU = Layout::MU;
    constexpr int MEPC = Layout::MEPC;
    constexpr int NST = Layout::kStrips;
    constexpr int SPF = Layout::kStripFloats;
    constexpr int NCM = D * int(sizeof(T)) / 16;
    constexpr int DB = MD / 8;
    constexpr int kTgStep = NU * MK;
    const int unit = int(sg) / MC;
    const int col0 = (int(sg) % MC) * MD;  // this simdgroup's columns col0 .. col0 + MD - 1
    threadgroup T* tile = reinterpret_cast<threadgroup T*>(stage_tg + int(sg) * Layout::kTileFloats);
    threadgroup float* strips = stage_tg + Layout::kStripAt;  // [NSG][NST][RT][64]
    threadgroup T* p_tile = reinterpret_cast<threadgroup T*>(stage_tg + Layout::kProbAt) + int(sg) * RT * 64;
    threadgroup uint* key_ok = reinterpret_cast<threadgroup uint*>(stage_tg + Layout::kKeyOkAt) + int(sg) * MK;

    const int stride = p.num_splits * kTgStep;
    const int g = int(lane) / MLn;                      // key group of this lane: keys g, g + MG, ... of a step
    const int li = int(lane) % MLn;                     // its 16-byte chunk of the simdgroup's columns
    const int chunk = col0 * int(sizeof(T)) / 16 + li;  // ... in the key row
    const TableRow bt_row = table_row(b, p);
    int2 loc[MU];
    int2 loc_next[MU];
    TableCursor cursor;
    RequestKeys rk;  // the keys of request b (request_keys)
    if (!request_keys<MU, MG>(rk, loc, cursor, split * kTgStep + unit * MK + g, stride, b, bt_row, p, block_table,
                              cache_seqlens, cu_seqlens_q, cu_seqlens_k, cache_leftpad)) {
      return;
    }
    const int sk = rk.sk;
    const int k_start = rk.k_start;
    const int q_row = rk.q_row;
    const int pos = sk - 1;  // the token's key position
    const int2 keys = visible_keys(pos, p.opt, sk);
    const int hi = keys.y + 1;
    const int first = keys.x + split * kTgStep + unit * MK;
    // The units of a threadgroup meet at a barrier every step when MC > 1, so they all run the first unit's steps
    // (a unit past hi loads nothing: its keys are masked).
    const int lead = MC > 1 ? unit * MK : 0;
    first_step_locs<MU, MG>(loc, cursor, keys.x, first + g, hi, stride, rk, bt_row, p, block_table);
    const long k_head = long(hkv) * p.k_stride_h;
    const long v_head = long(hkv) * p.v_stride_h;
    const bool aligned = fc_decode_kv_aligned;
    chunk16 kr[MU];
    chunk16 vr[MU];
    // K and V of a step are loaded together: one memory round trip per step.
    load_rows<T, MU, 4, NCM>(kr, loc, k_cache, k_head, p.k_stride_block, p.k_stride_slot, chunk, aligned);
    load_rows<T, MU, 4, NCM>(vr, loc, v_cache, v_head, p.v_stride_block, p.v_stride_slot, chunk, aligned);

    // Q rows (T [R][D], rows past nrows 0: no Q read past the group), loaded by each simdgroup's columns into
    // RT x DB fragments once.
    threadgroup T* q_stage = reinterpret_cast<threadgroup T*>(stage_tg + Layout::kQAt);
    for (int idx = int(tid); idx < R * D; idx += kDecodeThreads) {
      const int r = idx / D;
      const int d = idx - r * D;
      // q (B, sq, H, D = 1); varlen: q (total_q, H, D = 1)
      const long qoff = fc_varlen ? long(q_row) * p.q_stride_s : long(b) * p.q_stride_b;
      q_stage[idx] = r < nrows ? q[qoff + long(hkv * group + row0 + r) * p.q_stride_h + d] : T(0.0f);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_matrix<T, 8, 8> qf[RT][DB];
    simdgroup_matrix<float, 8, 8> of[RT][DB];
    for (int rt = 0; rt < RT; ++rt) {
      for (int db = 0; db < DB; ++db) {
        simdgroup_load(qf[rt][db], q_stage + rt * 8 * D + col0 + db * 8, D);
        of[rt][db] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      }
    }

    // Row mr = lane / 4 of each row tile, on its 4 lanes: columns mc, mc + 1 of a step's scores; per row tile the
    // running max mm (the same on the 4 lanes, and on the unit's simdgroups) and this lane's share ml of the sum.
    const int mr = int(lane) / 4;
    const int mc = 2 * (int(lane) % 4);
    bool row_ok[RT];
    float slope[RT];
    float mm[RT];
    float ml[RT];
    for (int rt = 0; rt < RT; ++rt) {
      row_ok[rt] = rt * 8 + mr < nrows;
      slope[rt] =
          fc_alibi ? flash_sdpa::alibi_slope(alibi, p.opt, b, hkv * group + row0 + min(rt * 8 + mr, nrows - 1)) : 0.0f;
    }
    for (int rt = 0; rt < RT; ++rt) {
      mm[rt] = kNoScore;
      ml[rt] = 0.0f;
    }
    uint bad_rows = 0;
    int parity = 0;
    for (int t0 = first; t0 - lead < hi; t0 += stride) {
      if (t0 != first) {  // uniform per threadgroup
        load_rows<T, MU, 4, NCM>(kr, loc, k_cache, k_head, p.k_stride_block, p.k_stride_slot, chunk, aligned);
        load_rows<T, MU, 4, NCM>(vr, loc, v_cache, v_head, p.v_stride_block, p.v_stride_slot, chunk, aligned);
      }
      step_locs<MU, MG>(loc_next, t0 + stride + g, hi, fc_varlen, k_start, cursor, block_table, bt_row, p.block_size,
                        p.max_blocks_per_seq, p.num_blocks);
      // K rows into the tile (key g + u MG: T [8][MD]), with whether each key is loaded (block valid, below hi).
      for (int u = 0; u < MU; ++u) {
        *reinterpret_cast<threadgroup chunk16*>(tile + (g + u * MG) * MD + li * MEPC) = kr[u];
        if (li == 0) {
          key_ok[g + u * MG] = loc[u].x >= 0 ? 1u : 0u;
        }
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);
      // S_rt (8 rows x 8 keys) = Q_rt K^T over this simdgroup's columns: the tile's 8x8 blocks loaded transposed,
      // each once for the RT row tiles.
      simdgroup_matrix<float, 8, 8> sf[RT];
      for (int rt = 0; rt < RT; ++rt) {
        sf[rt] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      }
      for (int db = 0; db < DB; ++db) {
        simdgroup_matrix<T, 8, 8> kt;
        simdgroup_load(kt, tile + db * 8, MD, ulong2(0, 0), true);
        for (int rt = 0; rt < RT; ++rt) {
          simdgroup_multiply_accumulate(sf[rt], qf[rt][db], kt, sf[rt]);
        }
      }
      threadgroup float* strip = strips + (int(sg) * NST + parity) * SPF;
      for (int rt = 0; rt < RT; ++rt) {
        simdgroup_store(sf[rt], strip + rt * 64, 8);
      }
      if (MC > 1) {
        threadgroup_barrier(mem_flags::mem_threadgroup);  // the unit's parts of S are stored
      } else {
        simdgroup_barrier(mem_flags::mem_threadgroup);  // every lane has read K
      }
      for (int u = 0; u < MU; ++u) {
        *reinterpret_cast<threadgroup chunk16*>(tile + (g + u * MG) * MD + li * MEPC) = vr[u];
      }
      // Online softmax of row rt x 8 + mr over keys t0 + mc, t0 + mc + 1 (the row's max over its 4 lanes). The
      // unit's simdgroups sum the same strips in the same order, so they hold the same scores and statistics.
      float alpha[RT];
      for (int rt = 0; rt < RT; ++rt) {
        float sc[2];
        int2 kl[2];
        for (int e = 0; e < 2; ++e) {
          float s = 0.0f;
          for (int c = 0; c < MC; ++c) {
            s += strips[((unit * MC + c) * NST + parity) * SPF + rt * 64 + mr * 8 + mc + e];
          }
          sc[e] = s * p.opt.scale;
          kl[e] = int2(key_ok[mc + e] != 0u ? 0 : -1, 0);
        }
        float mx = mask_scores<2, 1>(sc, bad_rows, rt * 8 + mr, row_ok[rt], kl, t0 + mc, keys, pos, slope[rt], p.opt);
        mx = max(mx, simd_shuffle_xor(mx, ushort(1)));
        mx = max(mx, simd_shuffle_xor(mx, ushort(2)));
        // A row with nothing accumulated takes the step's max; later the max moves only past kDecodeRescaleSlack.
        const bool fresh = !(mm[rt] > kNoScore);
        const float m_new = fresh || mx > mm[rt] + kDecodeRescaleSlack ? max(mm[rt], mx) : mm[rt];
        alpha[rt] = !fresh && m_new != mm[rt] ? exp(mm[rt] - m_new) : 1.0f;
        float sum = 0.0f;
        for (int e = 0; e < 2; ++e) {
          const float pr = sc[e] > kNoScore ? exp(sc[e] - m_new) : 0.0f;
          p_tile[rt * 64 + mr * 8 + mc + e] = T(pr);
          sum += pr;
        }
        ml[rt] = ml[rt] * alpha[rt] + sum;
        mm[rt] = m_new;
      }
      // The strip the unit does not read this step (the partner read it before this step's barrier).
      threadgroup float* scratch = strips + (int(sg) * NST + (NST - 1 - parity)) * SPF;
      for (int rt = 0; rt < RT; ++rt) {
        if (simd_any(alpha[rt] != 1.0f)) {  // uniform: O_rt = diag(alpha) O_rt where a row moved its max (rare)
          for (int db = 0; db < DB; ++db) {
            scale_rows(of[rt][db], scratch, alpha[rt], mr, mc);
          }
        }
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);  // V and P are staged
      simdgroup_matrix<T, 8, 8> pf[RT];
      for (int rt = 0; rt < RT; ++rt) {
        simdgroup_load(pf[rt], p_tile + rt * 64, 8);
      }
      for (int db = 0; db < DB; ++db) {
        simdgroup_matrix<T, 8, 8> vb;
        simdgroup_load(vb, tile + db * 8, MD);
        for (int rt = 0; rt < RT; ++rt) {
          simdgroup_multiply_accumulate(of[rt][db], pf[rt], vb, of[rt][db]);
        }
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);  // the tiles are free for the next step
      for (int u = 0; u < MU; ++u) {
        loc[u] = loc_next[u];
      }
      parity = NST - 1 - parity;
    }

    for (int rt = 0; rt < RT; ++rt) {
      ml[rt] += simd_shuffle_xor(ml[rt], ushort(1));
      ml[rt] += simd_shuffle_xor(ml[rt], ushort(2));
    }
    for (int r = 0; r < R; ++r) {
      if (simd_any(((bad_rows >> r) & 1u) != 0)) {
        bad_rows |= 1u << r;
      }
    }
    // A strip for the fragments' read-out: not the last step's (the partner may still read that one until the
    // next barrier). A matrix call's splits are long (its short one-token splits run paged_decode_wide), so the units
    // always merge here.
    threadgroup float* strip = strips + (int(sg) * NST + parity) * SPF;
    // The unit's statistics once (its first simdgroup; the others add nothing to row_stats' max and sum).
    if (mc == 0) {
      for (int rt = 0; rt < RT; ++rt) {
        m_tg[sg * R + rt * 8 + mr] = col0 == 0 ? mm[rt] : kNoScore;
        l_tg[sg * R + rt * 8 + mr] = col0 == 0 ? ml[rt] : 0.0f;
      }
    }
    if (lane == 0) {
      bad_tg[sg] = bad_rows;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // also: every simdgroup is done with its tile
    row_stats<R, NSG>(m_tg, l_tg, bad_tg, row_max_tg, row_sum_tg, row_bad_tg, tid);
    // The units' O meet in MS slots of [R][D] floats (over the tiles; the strips lie past them), as below:
    // slot += share x O per row, share = exp(m - the row's max over the units), each fragment read out through
    // the strip (no float x float product: the proxy lowers one to two bfloat-split tensor-core products).
    float share[RT];
    for (int rt = 0; rt < RT; ++rt) {
      float row_max = kNoScore;
      for (int w = 0; w < NSG; ++w) {
        row_max = max(row_max, m_tg[w * R + rt * 8 + mr]);
      }
      share[rt] = mm[rt] > kNoScore ? exp(mm[rt] - row_max) : 0.0f;
    }
    threadgroup float* acc_tg = stage_tg;
    for (int round = 0; round < NU / MS; ++round) {
      if (unit / MS == round) {
        for (int rt = 0; rt < RT; ++rt) {
          threadgroup float* slot = acc_tg + (unit % MS) * R * D + (rt * 8 + mr) * D + col0 + mc;
          for (int db = 0; db < DB; ++db) {
            simdgroup_barrier(mem_flags::mem_threadgroup);
            simdgroup_store(of[rt][db], strip, 8);
            simdgroup_barrier(mem_flags::mem_threadgroup);
            for (int e = 0; e < 2; ++e) {
              const float prev = round == 0 ? 0.0f : slot[db * 8 + e];
              slot[db * 8 + e] = prev + strip[mr * 8 + mc + e] * share[rt];
            }
          }
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    write_rows<T, D, R, MS>(out, lse, o_partial, ml_partial, sinks, p, acc_tg, row_max_tg, row_sum_tg, row_bad_tg,
                            nrows, row0, 1, hkv, group, b, q_row, split, split_mode, tid);
    return;
  }

  // Split s takes the threadgroup steps (NSG x KS keys each) s, s + num_splits, s + 2 num_splits, ... of the keys
  // [lo, hi) the rows see. Where a split starts then depends on the key count only through a left window (lo), so in
  // paged mode its first block-table entries are read while cache_seqlens still is, for lo = 0, and read again below
  // if a window moved lo: one dependent memory round trip less before the first K/V byte (proxy, B = 1 at 256-1000
  // keys: 2-6% of the call, tests/metal_cuda/RESULTS.md).
  static_assert(kMaxSplits * NSG * KS <= (1 << 20), "a split's stride fits the planner's key-count headroom");
  constexpr int kTgStep = NSG * KS;
  const int stride = p.num_splits * kTgStep;
  const int g = int(lane) / L;   // key group of this lane
  const int li = int(lane) % L;  // lane within the key row
  const TableRow bt_row = table_row(b, p);
  // Where the keys of a step live, for this lane's group: loc[u] = (block, slot) (paged) or (k row, 0) (varlen) of
  // key t0 + u * G + g; block -1: past hi or an invalid block id (the key is masked, nothing loaded).
  int2 loc[U];
  int2 loc_next[U];
  TableCursor cursor;

  RequestKeys rk;  // the keys of request b (request_keys)
  if (!request_keys<U, G>(rk, loc, cursor, split * kTgStep + int(sg) * KS + g, stride, b, bt_row, p, block_table,
                          cache_seqlens, cu_seqlens_q, cu_seqlens_k, cache_leftpad)) {
    return;  // varlen: none or several query rows, not this kernel's (uniform per threadgroup)
  }
  const int sk = rk.sk;
  const int k_start = rk.k_start;
  const int q_row = rk.q_row;
  const int diag = sk - sq;  // query i sits at key position i + diag (bottom-right alignment)

  // Keys any row of this request can see: [lo, hi) spans the first row's window to the last row's.
  const int lo = visible_keys(diag, p.opt, sk).x;
  const int hi = visible_keys(sq - 1 + diag, p.opt, sk).y + 1;
  const int first = lo + split * kTgStep + int(sg) * KS;  // this simdgroup's first step
  first_step_locs<U, G>(loc, cursor, lo, first + g, hi, stride, rk, bt_row, p, block_table);

  // The first step's K and V rows (packed: U x CPL chunks of each per lane) are loaded before q is staged, so that
  // their memory round trip overlaps q's and the barrier's instead of following them; the loop loads each later
  // step's at its top.
  const long k_head = long(hkv) * p.k_stride_h;
  const long v_head = long(hkv) * p.v_stride_h;
  const bool aligned = fc_decode_kv_aligned;
  chunk16 kr[U][CPL];
  chunk16 vr[U][CPL];
  load_step<T, U, CPL, CW, NC, L>(kr, vr, loc, k_cache, v_cache, k_head, v_head, p, li, aligned);

  // Stage the rows' q, pre-scaled, in fp32. Row r -> (head hg of the group, token i): r = hg * sq + i.
  for (int idx = int(tid); idx < R * D; idx += kDecodeThreads) {
    const int r = idx / D;
    const int d = idx - r * D;
    float v = 0.0f;
    if (r < nrows) {
      const int gr = row0 + r;
      const int2 ht = row_head_token(gr, sq);
      const int h = hkv * group + ht.x;
      const int i = ht.y;
      // q (B, sq, H, D = 1); varlen: q (total_q, H, D = 1)
      const long qoff = fc_varlen ? long(q_row) * p.q_stride_s : long(b) * p.q_stride_b + long(i) * p.q_stride_s;
      v = float(q[qoff + long(h) * p.q_stride_h + d]) * p.opt.scale;
    }
    q_tg[idx] = v;
  }

  // Bit r: this lane saw a visible key whose score is NaN or inf (the row's output becomes NaN, as in
  // FlashAttention-2; the score itself is dropped so that nothing non-finite reaches the accumulators).
  uint bad_rows = 0;

  // The rows whose scores this lane finishes, first_row .. first_row + RPL - 1 (at R = 1 the one row, on every
  // lane), and their constants: query position, visible keys [first, last], ALiBi slope.
  const int first_row = li * R / L;
  int2 sc_keys[RPL];
  int sc_pos[RPL];
  float sc_slope[RPL];
  for (int rr = 0; rr < RPL; ++rr) {
    const int gr = row0 + min(first_row + rr, nrows - 1);
    const int2 ht = row_head_token(gr, sq);
    sc_pos[rr] = ht.y + diag;
    sc_keys[rr] = visible_keys(sc_pos[rr], p.opt, sk);
    sc_slope[rr] = fc_alibi ? flash_sdpa::alibi_slope(alibi, p.opt, b, hkv * group + ht.x) : 0.0f;
  }
  float m_own[RPL];  // running max and sum of the rows this lane finishes
  float l_own[RPL];
  for (int rr = 0; rr < RPL; ++rr) {
    m_own[rr] = kNoScore;
    l_own[rr] = 0.0f;
  }
  threadgroup float* score_buf = score_tg + (int(sg) * G + g) * 2 * SF;
  int parity = 0;

  // Per lane group: running max, sum and accumulator of each row (the group's own keys).
  float m[R];
  float l[R];
  float o[R][EPL];
  for (int r = 0; r < R; ++r) {
    m[r] = kNoScore;
    l[r] = 0.0f;
    for (int e = 0; e < EPL; ++e) {
      o[r][e] = 0.0f;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  for (int t0 = first; t0 < hi; t0 += stride) {  // the planner keeps key counts below 2^31 - 2^20: no overflow
    // 1. This step's K and V rows (the first step's are in flight already), then the next step's block ids, all in
    // flight together. (Loading K/V one step ahead in every step gained nothing on the proxy at 2 threadgroups per
    // SM: tests/metal_cuda/RESULTS.md.)
    if (t0 != first) {  // uniform per simdgroup
      load_step<T, U, CPL, CW, NC, L>(kr, vr, loc, k_cache, v_cache, k_head, v_head, p, li, aligned);
    }
    step_locs<U, G>(loc_next, t0 + stride + g, hi, fc_varlen, k_start, cursor, block_table, bt_row, p.block_size,
                    p.max_blocks_per_seq, p.num_blocks);

    if (kScatter) {
      // 4'. Per key, reduce-scatter its R partial scores: at each butterfly stage a lane keeps half of its values
      // (the upper half when its lane bit is set) and adds its partner's copy of that half; once one value is left,
      // the remaining stages all-reduce it. Lane li ends with rows first_row .. first_row + RPL - 1.
      float t[RPL][U];
      for (int u = 0; u < U; ++u) {
        float x[R];  // 3'. This lane's share of each row's q.k for key u (one key at a time: R values live)
        for (int r = 0; r < R; ++r) {
          x[r] = r < nrows ? partial_dot<T, D, L, CPL, EPC, NC>(q_tg + r * D, kr[u], li) : 0.0f;
        }
        int cur = R;
        for (int off = L / 2; off >= 1; off /= 2) {
          if (cur > RPL) {
            // Keep the upper half where this lane's bit is set; chosen by bit masks, not a select between two
            // array elements, which compilers turn into a dynamically indexed (memory-resident) array.
            const uint upper = (li & off) != 0 ? ~0u : 0u;
            for (int i = 0; i < cur / 2; ++i) {
              const uint lo = as_type<uint>(x[i]);
              const uint hi = as_type<uint>(x[i + cur / 2]);
              const float keep = as_type<float>((lo & ~upper) | (hi & upper));
              const float send = as_type<float>((hi & ~upper) | (lo & upper));
              x[i] = keep + simd_shuffle_xor(send, ushort(off));
            }
            cur /= 2;
          } else {
            for (int i = 0; i < RPL; ++i) {
              x[i] += simd_shuffle_xor(x[i], ushort(off));
            }
          }
        }
        for (int rr = 0; rr < RPL; ++rr) {
          t[rr][u] = x[rr];
        }
      }
      // 5'. Mask, then the online softmax of this lane's rows over the step's keys, lane-local.
      threadgroup float* buf = score_buf + parity * SF;  // probabilities [R][U], then corrections [R]
      for (int rr = 0; rr < RPL; ++rr) {
        const int r = first_row + rr;
        const float corr = softmax_step<U, G>(t[rr], m_own[rr], l_own[rr], bad_rows, r, r < nrows, loc, t0 + g,
                                              sc_keys[rr], sc_pos[rr], sc_slope[rr], p.opt);
        if (li % DUP == 0) {
          for (int u = 0; u < U; ++u) {
            buf[r * U + u] = t[rr][u];
          }
          buf[R * U + r] = corr;
        }
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);
      // 6'. P.V with every row's probabilities and correction, read back by every lane of the group. With several
      // query tokens a key can be visible to one row and not another; those rows take the masked update (see
      // pv_update). With one token every loaded key is visible to every row: the plain one.
      if (sq > 1) {  // uniform
        pv_update<T, R, U, CPL, EPC, EPL, true>(o, vr, buf, nrows);
      } else {
        pv_update<T, R, U, CPL, EPC, EPL, false>(o, vr, buf, nrows);
      }
      parity ^= 1;
    } else {
      // 3. Scores: partial q.k over this lane's dims, summed over the L lanes of the key (butterfly: every lane of
      // the group gets the total).
      float s[R][U];
      for (int r = 0; r < R; ++r) {
        for (int u = 0; u < U; ++u) {
          s[r][u] = 0.0f;
        }
        if (r < nrows) {  // uniform
          for (int j = 0; j < CPL; ++j) {
            const int ci = li + j * L;
            if (ci < NC) {
              float qv[EPC];
              for (int e = 0; e < EPC; ++e) {
                qv[e] = q_tg[r * D + ci * EPC + e];
              }
              for (int u = 0; u < U; ++u) {
                float acc = 0.0f;
                for (int e = 0; e < EPC; ++e) {
                  acc += qv[e] * chunk_elem<T>(kr[u][j], e);
                }
                s[r][u] += acc;
              }
            }
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        if (r < nrows) {  // uniform
          for (int u = 0; u < U; ++u) {
            for (int off = L / 2; off >= 1; off /= 2) {
              s[r][u] += simd_shuffle_xor(s[r][u], ushort(off));
            }
          }
        }
      }

      // 4. Online softmax and P.V, lane-local: one max / rescale per row and step.
      for (int r = 0; r < R; ++r) {
        if (r < nrows) {
          // R = 1 on this path: the lane's row constants are row 0's.
          const float corr = softmax_step<U, G>(s[r], m[r], l[r], bad_rows, r, true, loc, t0 + g, sc_keys[0], sc_pos[0],
                                                sc_slope[0], p.opt);
          for (int j = 0; j < CPL; ++j) {
            for (int e = 0; e < EPC; ++e) {
              float acc = o[r][j * EPC + e] * corr;
              for (int u = 0; u < U; ++u) {
                acc += s[r][u] * chunk_elem<T>(vr[u][j], e);
              }
              o[r][j * EPC + e] = acc;
            }
          }
        }
      }
    }
    for (int u = 0; u < U; ++u) {
      loc[u] = loc_next[u];
    }
  }

  if (kScatter) {
    // Every lane of the group takes the running max and sum of every row from the lanes that finished them, through
    // the buffer the last step did not use (its readers passed that step's barrier).
    threadgroup float* buf = score_buf + parity * SF;
    if (li % DUP == 0) {
      for (int rr = 0; rr < RPL; ++rr) {
        buf[first_row + rr] = m_own[rr];
        buf[R + first_row + rr] = l_own[rr];
      }
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
    for (int r = 0; r < R; ++r) {
      m[r] = buf[r];
      l[r] = buf[R + r];
    }
  }
  // Merge the key groups of the simdgroup (butterfly over the group bits of the lane), then the simdgroups: global
  // max per row, each share rescaled, summed in simdgroup order.
  for (int r = 0; r < R; ++r) {
    if (simd_any(((bad_rows >> r) & 1u) != 0)) {
      bad_rows |= 1u << r;
    }
    if (G > 1 && r < nrows) {
      float mx = m[r];
      for (int off = L; off < 32; off *= 2) {
        mx = max(mx, simd_shuffle_xor(mx, ushort(off)));
      }
      const float share = m[r] > kNoScore ? exp(m[r] - mx) : 0.0f;
      float lr = l[r] * share;
      for (int off = L; off < 32; off *= 2) {
        lr += simd_shuffle_xor(lr, ushort(off));
      }
      for (int e = 0; e < EPL; ++e) {
        float x = o[r][e] * share;
        for (int off = L; off < 32; off *= 2) {
          x += simd_shuffle_xor(x, ushort(off));
        }
        o[r][e] = x;
      }
      m[r] = mx;
      l[r] = lr;
    }
  }
  if (p.simdgroup_partials != 0) {  // uniform (split mode): each simdgroup writes its own partial, no merge
    // Partial split x NSG + sg, straight from the registers: the key groups hold the same sums now, so group g writes
    // rows g, g + G, ... (each lane its chunks), and the rows' max (NaN bits when bad) and sum.
    const long part = long(split) * NSG + int(sg);
    constexpr int kStoreWidth = EPC % 4 == 0 ? 4 : 2;
    for (int r = 0; r < R; ++r) {
      if (r % G == g && r < nrows) {
        const int gr = row0 + r;
        const int2 ht = row_head_token(gr, sq);
        const long row = (long(b) * p.num_heads + hkv * group + ht.x) * sq + ht.y;  // (B, H, sq)
        const long prow = part * p.batch * p.num_heads * sq + row;                  // (partials, B, H, sq)
        for (int j = 0; j < CPL; ++j) {
          const int ci = li + j * L;
          if (ci < NC) {  // EPC floats at a multiple of EPC (D % 8 == 0): whole float2 / float4 stores
            for (int e = 0; e < EPC; e += kStoreWidth) {
              device float* dst = o_partial + prow * D + ci * EPC + e;
              if (kStoreWidth == 4) {
                *reinterpret_cast<device float4*>(dst) =
                    float4(o[r][j * EPC + e], o[r][j * EPC + e + 1], o[r][j * EPC + e + 2], o[r][j * EPC + e + 3]);
              } else {
                *reinterpret_cast<device float2*>(dst) = float2(o[r][j * EPC + e], o[r][j * EPC + e + 1]);
              }
            }
          }
        }
        if (li == 0) {
          ml_partial[prow * 2] = ((bad_rows >> r) & 1u) != 0 ? as_type<float>(kNanBits) : m[r];
          ml_partial[prow * 2 + 1] = l[r];
        }
      }
    }
    return;
  }
  if (lane == 0) {
    for (int r = 0; r < R; ++r) {
      m_tg[sg * R + r] = m[r];
      l_tg[sg * R + r] = l[r];
    }
    bad_tg[sg] = bad_rows;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);  // also: every simdgroup is done reading q_tg
  row_stats<R, NSG>(m_tg, l_tg, bad_tg, row_max_tg, row_sum_tg, row_bad_tg, tid);
  float share[R];
  for (int r = 0; r < R; ++r) {
    float mx = kNoScore;
    for (int w = 0; w < NSG; ++w) {
      mx = max(mx, m_tg[w * R + r]);
    }
    share[r] = m[r] > kNoScore ? exp(m[r] - mx) : 0.0f;
  }
  // The simdgroups' accumulators meet in MS slots of R x D floats (the q rows' memory and beyond): simdgroup w adds
  // its share to slot w % MS in round w / MS, one barrier per round; the write below sums the slots. As many slots
  // as kMergeBytes holds: one round for small row tiles, one simdgroup per round (no extra memory) for the largest.
  threadgroup float* acc_tg = stage_tg;
  for (int round = 0; round < NSG / MS; ++round) {
    if (int(sg) / MS == round && g == 0) {
      threadgroup float* slot = acc_tg + (int(sg) % MS) * R * D;
      for (int r = 0; r < R; ++r) {
        if (r < nrows) {
          for (int j = 0; j < CPL; ++j) {
            const int ci = li + j * L;
            if (ci < NC) {
              for (int e = 0; e < EPC; ++e) {
                const int d = ci * EPC + e;
                const float prev = round == 0 ? 0.0f : slot[r * D + d];
                slot[r * D + d] = prev + o[r][j * EPC + e] * share[r];
              }
            }
          }
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  write_rows<T, D, R, MS>(out, lse, o_partial, ml_partial, sinks, p, acc_tg, row_max_tg, row_sum_tg, row_bad_tg, nrows,
                          row0, sq, hkv, group, b, q_row, split, split_mode, tid);
}

// Combines split-K partials: one threadgroup per output row (b, h, i). The splits are read in parallel: thread t
// takes float4 column t % (D / 4) of every NS-th split (NS = threads / (D / 4)), kCombineLoads loads in flight, then
// the column sums meet in threadgroup memory. The planner gives it 128 threads up to kCombineFewPartials partials and
// 256 above (a short decode's simdgroup partials: 64-256), read from the dispatch: on the proxy 256 threads took 64 /
// 128 / 256 partials in 3.5 / 4.0-4.4 / 5.4 us against 3.5-3.8 / 4.6-4.8 / 6.3-6.5 for 128, and 8 partials in 3.3
// against 2.9-3.2. The first loads are issued before the split maxima are read, so a short decode's combine waits on
// one memory round trip, not two.
template <typename T>
[[max_total_threads_per_threadgroup(FLASH_SDPA_PAGED_COMBINE_THREADS)]] kernel void paged_decode_combine(
    device const float* o_partial [[buffer(FLASH_SDPA_COMBINE_BUF_O_PARTIAL)]],
    device const float* ml_partial [[buffer(FLASH_SDPA_COMBINE_BUF_ML_PARTIAL)]],
    device const float* sinks [[buffer(FLASH_SDPA_COMBINE_BUF_SINKS)]],
    device T* out [[buffer(FLASH_SDPA_COMBINE_BUF_OUT)]],
    device uint* lse [[buffer(FLASH_SDPA_COMBINE_BUF_LSE)]],  // float bits
    constant flash_sdpa::paged::PagedCombineParams& p [[buffer(FLASH_SDPA_COMBINE_BUF_PARAMS)]],
    device const int* cu_seqlens_q [[buffer(FLASH_SDPA_COMBINE_BUF_CU_SEQLENS_Q)]],
    uint tgid [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]],
    uint simdgroups [[simdgroups_per_threadgroup]]) {
  using namespace flash_sdpa;
  using namespace flash_sdpa::paged;
  const int NSG = int(simdgroups);  // kCombineFewSimdgroups or kCombineSimdgroups (the planner's)
  const int NT = NSG * kSimdWidth;
  threadgroup float w_tg[kMaxSplits];  // per split: exp(max_s - max), 0 for a split that saw no key
  threadgroup float red_tg[2 * kCombineSimdgroups];
  threadgroup uint bad_red_tg[kCombineSimdgroups];
  threadgroup float4 acc_tg[kCombineThreads];

  const long rows = long(p.batch) * p.num_heads * p.seqlen_q;
  const long row = long(tgid);  // (B, H, sq)
  if (row >= rows) {
    return;  // whole threadgroup
  }
  const int D = p.head_dim;
  const int splits = min(p.num_splits, int(kMaxSplits));

  // 0. This thread's first partial outputs (o_partial (splits, B, H, sq, D), fp32, rows 16-byte aligned: D % 8 == 0),
  // in flight while the maxima are read: they do not depend on them. The index math before these loads is 32-bit
  // and unsigned (the grid's ids are 32-bit): on Apple's GPUs, as on NVIDIA's, an integer division is a long
  // instruction sequence, a 64-bit one several times longer, and every instruction before the first load delays it.
  const int C = D / 4;                     // float4 columns
  const int NS = int(uint(NT) / uint(C));  // splits read side by side (D <= 256: >= 2)
  const int j = int(tid / uint(C));
  const int c = int(tid) - j * C;
  device const float4* src = reinterpret_cast<device const float4*>(o_partial) + row * C + c;
  const long split_stride = rows * C;
  float4 x[kCombineLoads];
  load_partials(x, src, split_stride, j, NS, j < NS ? splits : 0);

  // Where the row goes: out (B, sq, H, D = 1) contiguous, LSE (B, H, sq); varlen: out (total_q, H, D = 1), LSE
  // (H, total_q). A one-token row (sq = 1) is (b, h): one division.
  const uint sq = uint(p.seqlen_q);
  const uint head_row = sq == 1 ? tgid : tgid / sq;  // b x H + h
  const uint i = tgid - head_row * sq;
  const uint b = head_row / uint(p.num_heads);
  const int h = int(head_row - b * uint(p.num_heads));
  long out_row = (long(b) * sq + i) * p.num_heads + h;
  long lse_at = row;
  // The head's sink, read now, while the partials are in flight: read at the end, it was one more memory round trip
  // on the row's path.
  const float sink = fc_sinks ? clamp_score(sinks[h]) : 0.0f;
  if (fc_varlen) {
    const int2 q_rows = packed_rows(cu_seqlens_q, int(b), p.total_q);
    if (q_rows.y != 1) {
      return;  // the decode kernel skipped this sequence too
    }
    out_row = long(q_rows.x) * p.num_heads + h;
    lse_at = long(h) * p.total_q + q_rows.x;
  }

  // 1. The row max over the splits; a split that saw a non-finite visible score (NaN bits) makes the row NaN.
  float mx = kNoScore;
  bool bad = false;
  for (int s = int(tid); s < splits; s += NT) {
    const float ms = ml_partial[(s * rows + row) * 2];
    const bool nonfinite = is_nonfinite(ms);
    bad = bad || nonfinite;
    mx = max(mx, nonfinite ? kNoScore : ms);
  }
  mx = simd_max(mx);
  bad = simd_any(bad);
  if (lane == 0) {
    red_tg[sg] = mx;
    bad_red_tg[sg] = bad ? 1u : 0u;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  mx = kNoScore;
  bad = false;
  for (int w = 0; w < NSG; ++w) {
    mx = max(mx, red_tg[w]);
    bad = bad || bad_red_tg[w] != 0;
  }
  if (bad) {  // uniform
    for (int d = int(tid); d < D; d += NT) {
      out[out_row * D + d] = T(as_type<float>(kNanBits));
    }
    if (fc_decode_write_lse && tid == 0) {
      lse[lse_at] = kNanBits;
    }
    return;
  }

  // 2. Split weights and the denominator.
  float lsum = 0.0f;
  for (int s = int(tid); s < splits; s += NT) {
    const float ms = ml_partial[(s * rows + row) * 2];
    const float w = ms > kNoScore ? exp(ms - mx) : 0.0f;
    w_tg[s] = w;
    lsum += w * ml_partial[(s * rows + row) * 2 + 1];
  }
  lsum = simd_sum(lsum);
  if (lane == 0) {
    red_tg[NSG + sg] = lsum;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float sum = 0.0f;
  for (int w = 0; w < NSG; ++w) {
    sum += red_tg[NSG + w];
  }

  // 3. Weighted sum of the partial outputs: the batch loaded in step 0, then the rest kCombineLoads x NS at a time.
  float4 acc = float4(0.0f);
  if (j < NS) {
    for (int s0 = j;; s0 += kCombineLoads * NS) {
      for (int k = 0; k < kCombineLoads; ++k) {
        const int s = s0 + k * NS;
        acc += (s < splits ? w_tg[s] : 0.0f) * x[k];
      }
      if (s0 + kCombineLoads * NS >= splits) {
        break;
      }
      load_partials(x, src, split_stride, s0 + kCombineLoads * NS, NS, splits);
    }
  }
  acc_tg[tid] = acc;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (int(tid) < C) {
    float4 total = float4(0.0f);
    for (int k = 0; k < NS; ++k) {
      total += acc_tg[k * C + int(tid)];
    }
    const bool seen = mx > kNoScore;
    float scale_o = 1.0f;
    float mfinal = mx;
    float denom = sum;
    if (fc_sinks && seen) {
      const float mn = max(mx, sink);
      scale_o = exp(mx - mn);
      denom = sum * scale_o + exp(sink - mn);
      mfinal = mn;
    }
    for (int e = 0; e < 4; ++e) {
      out[out_row * D + 4 * int(tid) + e] = seen ? T(total[e] * scale_o / denom) : T(0.0f);
    }
    if (fc_decode_write_lse && tid == 0) {
      lse[lse_at] = seen ? as_type<uint>(mfinal + log(denom)) : kNegInfBits;
    }
  }
}
