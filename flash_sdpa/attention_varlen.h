// Varlen / dense flash-attention forward: the kernel body, instantiated by attention_varlen.metal.
//
// Grid (H, B, query tiles): threadgroup (h, b, z) takes the 32-row query tiles grid.z - 1 - z, + grid.z, ... of head h
// of sequence b, the longest causal tiles of the whole batch first (flash_sdpa::row_tile_slot). Its 4 simdgroups own 8
// query rows each; Q lives in 8x8 simdgroup_matrix registers of the input's type (at D = 256 in 2-byte types, in
// threadgroup memory: varlen_q_resident) and the output accumulator O in float ones, K/V tiles are staged through
// threadgroup memory in the input's type (at D = 256, K then V through one tile), scores come out of the products in
// float (scaled there, not in Q, so no rounding of Q * scale), softmax runs online in the log2 domain with fp32
// statistics held by 4 lanes per row, and its probabilities go back to the input's type for P V (as FlashAttention-2
// does). The running max only moves when a tile's max passes it by more than kVarlenRescaleSlack (probabilities up to
// 2^8, far inside half's range): O's rescale, a diagonal product, is skipped for a simdgroup whose 8 rows all keep
// their max, which after the first tiles is nearly every tile. Masking uses a finite large negative score (fast math:
// no inf arithmetic); a row with no visible key is written as 0 with LSE = -inf. A visible score that is NaN or inf
// makes its row NaN (FlashAttention-2's result) without entering the shared 8x8 tiles, where 0 x NaN would carry it
// into the other rows of the block. Non-finite V elements are staged as 0 for the same reason (P V multiplies every
// row's probabilities, 0 for keys the row cannot see, by every staged V row); the rare tile that holds one sets a bit
// per (row, column) for the rows that see it, and those output elements are written as NaN (torch: NaN or inf there).
#pragma once

#include <metal_stdlib>

#include "attention_device.h"
#include "varlen_params.h"

using namespace metal;

constant bool fc_varlen_paged [[function_constant(FLASH_SDPA_FC_VARLEN_PAGED)]];

constant constexpr float kVarlenMasked = flash_sdpa::kNoScore;  // log2-domain score of an invisible key
constant constexpr float kVarlenLog2e = 1.4426950408889634f;
constant constexpr float kVarlenLn2 = 0.6931471805599453f;
// log2-domain headroom before a row's running max moves: probabilities stay <= 2^8 (no overflow in half, whose range
// ends at 65504, nor in the float sums), and a rescale of O happens only when a score beats the max by that much.
constant constexpr float kVarlenRescaleSlack = 8.0f;

// Writes diag(x_row) of this simdgroup's 8 rows into an 8x8 row-major scratch; x is held by lanes 4r..4r+3.
inline void varlen_write_diagonal(threadgroup float* diag, float x, uint lane) {
  // Entry e = lane is on row lane / 8 (0..3), entry e = lane + 32 on row lane / 8 + 4: both are shuffles every
  // lane executes.
  const float upper = simd_shuffle(x, ushort((lane / 8) * 4));
  const float lower = simd_shuffle(x, ushort((lane / 8 + 4) * 4));
  diag[lane] = (lane / 8 == lane % 8) ? upper : 0.0f;
  diag[lane + 32] = (lane / 8 + 4 == lane % 8) ? lower : 0.0f;
}

// Sequence b's query rows [start_q, start_q + sq) and keys [start_k, start_k + sk) (paged: key positions 0 .. sk - 1
// through its block-table row), clamped to the tensors whatever cu_seqlens holds.
struct VarlenSequence {
  int start_q, start_k, sq, sk;
};

inline VarlenSequence varlen_sequence(int b, const device int* cu_seqlens_q, const device int* cu_seqlens_k,
                                      constant flash_sdpa::VarlenParams& p) {
  VarlenSequence s = {0, 0, min(p.seqlen_q, p.q_rows), min(p.seqlen_k, p.k_rows)};
  if (fc_varlen) {
    const int2 q_rows = flash_sdpa::packed_rows(cu_seqlens_q, b, p.q_rows);
    s.start_q = q_rows.x;
    s.sq = q_rows.y;
    if (fc_varlen_paged) {  // each sequence has its own block-table row: keys count from 0, up to the row's capacity
      const long capacity = long(p.max_blocks) * p.block_size;
      s.sk = int(clamp(long(cu_seqlens_k[b + 1]) - long(cu_seqlens_k[b]), 0l, capacity));
      s.start_k = 0;
    } else {
      const int2 k_rows = flash_sdpa::packed_rows(cu_seqlens_k, b, p.k_rows);
      s.start_k = k_rows.x;
      s.sk = k_rows.y;
    }
    if (s.sq < p.min_seqlen_q) {  // served by another kernel (routing.h): no row of this sequence is computed here
      s.sq = 0;
    }
  }
  return s;
}

// Head h of sequence b: where its rows start in q, k / v (its KV head), out and lse, through the strides
// (batch, row, head, d = 1); and its ALiBi slope.
template <typename T>
struct VarlenHead {
  const device T* q;
  const device T* k;
  const device T* v;
  device T* out;
  device uint* lse;
  float slope;
};

template <typename T>
inline VarlenHead<T> varlen_head(const device T* q, const device T* k, const device T* v, device T* out,
                                 device uint* lse, const device float* alibi_slopes, int b, int h,
                                 const VarlenSequence s, constant flash_sdpa::VarlenParams& p) {
  const int kvh = h / (p.num_heads / p.num_kv_heads);
  VarlenHead<T> r;
  r.q = q + long(b) * p.q_batch_stride + long(s.start_q) * p.q_row_stride + long(h) * p.q_head_stride;
  r.k = k + long(b) * p.k_batch_stride + long(s.start_k) * p.k_row_stride + long(kvh) * p.k_head_stride;
  r.v = v + long(b) * p.v_batch_stride + long(s.start_k) * p.v_row_stride + long(kvh) * p.v_head_stride;
  r.out = out + long(b) * p.o_batch_stride + long(s.start_q) * p.o_row_stride + long(h) * p.o_head_stride;
  r.lse = lse + long(b) * p.lse_batch_stride + long(h) * p.lse_head_stride + s.start_q;
  r.slope = fc_alibi ? flash_sdpa::alibi_slope(alibi_slopes, p.opt, b, h) : 0.0f;
  return r;
}

// Keys [x, y) any of the query rows [q0, q0 + rows) sees (bottom-right aligned: row i sits at key i + sk - sq).
inline int2 varlen_tile_keys(int q0, int rows, const VarlenSequence s, constant flash_sdpa::VarlenParams& p) {
  const int offset = s.sk - s.sq;
  const int last_row = min(q0 + rows, s.sq) - 1;
  return int2(flash_sdpa::visible_keys(q0 + offset, p.opt, s.sk).x,
              flash_sdpa::visible_keys(last_row + offset, p.opt, s.sk).y + 1);
}

// Paged: where key rows k0 .. k0 + BK - 1 live in k ([r]) and v ([BK + r]); -1 for a row past kv_end or whose block
// id is outside [0, num_blocks) (masked). One block-table read per key.
template <int BK, int NT>
inline void varlen_paged_offsets(threadgroup long* key_offsets, const device int* block_table, int b, int k0,
                                 int kv_end, constant flash_sdpa::VarlenParams& p, uint tid) {
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
}

// Where key row k0 + r of `seq` lives (paged_offsets: this tensor's half of key_offsets, paged only); -1: past
// kv_end or masked.
inline long varlen_key_offset(long row_stride, threadgroup const long* paged_offsets, int k0, int r, int kv_end) {
  if (fc_varlen_paged) {
    return paged_offsets[r];
  }
  return k0 + r < kv_end ? long(k0 + r) * row_stride : -1l;
}

// Stages key rows k0 .. k0 + BK - 1 of `seq` (K or V) as T [BK][D]; rows past kv_end or masked are zeros. V
// (DROP): non-finite elements too, selected, never multiplied (they would reach rows that cannot see them through the
// 0 probabilities of P V); returns whether this thread dropped one. K keeps them: a non-finite score only reaches its
// own column of S, where the softmax step masks or flags it. `aligned` (uniform; FLASH_SDPA_ALIGNED_*): the rows
// start at multiples of 4 elements, so each thread moves 4 elements per load and store (a quarter of the memory
// instructions); otherwise one at a time.
template <typename T, int BK, int D, int NT, bool DROP>
inline bool varlen_stage_rows(threadgroup T* dst, const device T* seq, long row_stride,
                              threadgroup const long* paged_offsets, int k0, int kv_end, bool aligned, uint tid) {
  static_assert(D % 4 == 0, "4-element row segments");
  bool dropped = false;
  if (aligned) {
    for (int idx = int(tid); idx < BK * D / 4; idx += NT) {
      const int r = idx / (D / 4), c = 4 * (idx % (D / 4));
      const long off = varlen_key_offset(row_stride, paged_offsets, k0, r, kv_end);
      vec<T, 4> x = flash_sdpa::load_row4(seq + (off >= 0 ? off + c : 0), off >= 0);
      if (DROP && flash_sdpa::drop_nonfinite4(x)) {
        dropped = true;
      }
      *reinterpret_cast<threadgroup vec<T, 4>*>(dst + r * D + c) = x;
    }
    return dropped;
  }
  for (int idx = int(tid); idx < BK * D; idx += NT) {
    const int r = idx / D, c = idx % D;
    const long off = varlen_key_offset(row_stride, paged_offsets, k0, r, kv_end);
    const T x = off >= 0 ? seq[off + c] : T(0);
    const bool bad = DROP && flash_sdpa::is_nonfinite(float(x));
    dropped = dropped || bad;
    dst[idx] = bad ? T(0) : x;
  }
  return dropped;
}

// varlen_stage_rows for the resident-Q layout: thread t owns key row t / 8 of the 16-key tile and every 8th 4-element
// segment (or element) of it, so it computes its row's offset once per tile (one 64-bit product, not one per element:
// 64-bit multiplies are slow on Apple GPUs) and keeps one row address live beside O's fragments. Returns a bit per
// element it staged that was non-finite (V, DROP; staged as 0): bit 4 i + e for element e of segment i (aligned: word
// i of the row, bits 4 (t % 8) + e), bit i for element i (columns t % 8 + 8 i: word i / 4, bit t % 8 + 8 (i % 4)).
// Shape (NT = 8 BK, D = 256) asserted by the kernel: the register layout instantiates this code but never runs it.
template <typename T, int BK, int D, int NT, bool DROP>
inline uint varlen_stage_owned_rows(threadgroup T* dst, const device T* seq, long row_stride,
                                    threadgroup const long* paged_offsets, int k0, int kv_end, bool aligned, uint tid) {
  constexpr int TPR = NT / BK;  // threads per key row
  const int r = int(tid) / TPR, c0 = int(tid) % TPR;
  const long off = varlen_key_offset(row_stride, paged_offsets, k0, r, kv_end);
  const device T* src = seq + (off >= 0 ? off : 0l);
  threadgroup T* row = dst + r * D;
  uint bits = 0;
  if (aligned) {
    for (int i = 0; i < D / (4 * TPR); ++i) {
      const int c = 4 * (c0 + TPR * i);
      vec<T, 4> x = flash_sdpa::load_row4(src + c, off >= 0);
      for (int e = 0; DROP && e < 4; ++e) {
        const bool bad = flash_sdpa::is_nonfinite(float(x[e]));
        bits |= bad ? 1u << (4 * i + e) : 0u;
        x[e] = bad ? T(0) : x[e];
      }
      *reinterpret_cast<threadgroup vec<T, 4>*>(row + c) = x;
    }
    return bits;
  }
  for (int i = 0; i < D / TPR; ++i) {
    const int c = c0 + TPR * i;
    const T x = off >= 0 ? src[c] : T(0);
    const bool bad = DROP && flash_sdpa::is_nonfinite(float(x));
    bits |= bad ? 1u << i : 0u;
    row[c] = bad ? T(0) : x;
  }
  return bits;
}

// Rare path (a V tile held a non-finite element): sets bit d of poison[r][d / 32] for each query row q0 + r and
// column d where the row sees a key of [k0, k0 + BK) whose V element d is non-finite (read again from memory; the
// staged tile holds 0 there). One thread owns each 32-column word, so no two threads write one.
template <typename T, int BQ, int BK, int D, int NT>
inline void varlen_poison_rows(threadgroup uint* poison, const device T* v_seq, long row_stride,
                               threadgroup const long* v_offsets, int q0, int k0, int kv_end, const VarlenSequence s,
                               constant flash_sdpa::VarlenParams& p, uint tid) {
  constexpr int W = flash_sdpa::varlen_poison_words(D);
  for (int idx = int(tid); idx < BQ * W; idx += NT) {
    const int i = q0 + idx / W, d0 = 32 * (idx % W);
    if (i >= s.sq) {
      continue;
    }
    const int2 keys = flash_sdpa::visible_keys(i + s.sk - s.sq, p.opt, s.sk);
    uint bits = poison[idx];
    for (int r = 0; r < BK; ++r) {
      const long off = varlen_key_offset(row_stride, v_offsets, k0, r, kv_end);
      if (off < 0 || k0 + r < keys.x || k0 + r > keys.y) {
        continue;
      }
      for (int d = d0; d < min(d0 + 32, D); ++d) {
        bits |= flash_sdpa::is_nonfinite(float(v_seq[off + d])) ? 1u << (d - d0) : 0u;
      }
    }
    poison[idx] = bits;
  }
}

// Rare path of the resident-Q layout (a V tile held a non-finite element): mask[r][w] gets the non-finite bits of word
// w (32 columns) of key row r, from the bits varlen_stage_owned_rows returned (`bits`, this thread's), which the 8
// threads of the row OR together by shuffles that every lane executes. No second read of V: varlen_poison_rows, which
// reads 16 keys x 32 columns per thread, took this kernel from 168 to 255 registers (ptxas, sm_90). Shape as above.
template <int BK, int D, int NT>
inline void varlen_nonfinite_mask(threadgroup uint* mask, uint bits, bool aligned, uint tid) {
  constexpr int TPR = NT / BK, W = flash_sdpa::varlen_poison_words(D);
  const int r = int(tid) / TPR, c0 = int(tid) % TPR;
  for (int w = 0; w < W; ++w) {
    const uint nibble = (bits >> (4 * w)) & 15u;
    uint word = 0;
    if (aligned) {
      word = nibble << (4 * c0);
    } else {
      for (int e = 0; e < 4; ++e) {
        word |= ((nibble >> e) & 1u) << (c0 + TPR * e);
      }
    }
    word |= simd_shuffle_xor(word, ushort(1));
    word |= simd_shuffle_xor(word, ushort(2));
    word |= simd_shuffle_xor(word, ushort(4));
    if (c0 == 0) {
      mask[r * W + w] = word;
    }
  }
}

// Sets the poison bits varlen_poison_rows would, from varlen_nonfinite_mask's mask (written before the last
// threadgroup barrier): query row q0 + i gets the OR of the mask rows of the tile's keys it sees.
template <int BQ, int BK, int D, int NT>
inline void varlen_poison_from_mask(threadgroup uint* poison, threadgroup const uint* mask, int q0, int k0,
                                    const VarlenSequence s, constant flash_sdpa::VarlenParams& p, uint tid) {
  constexpr int W = flash_sdpa::varlen_poison_words(D);
  for (int idx = int(tid); idx < BQ * W; idx += NT) {
    const int i = q0 + idx / W, w = idx % W;
    if (i >= s.sq) {
      continue;
    }
    const int2 keys = flash_sdpa::visible_keys(i + s.sk - s.sq, p.opt, s.sk);
    uint bits = poison[idx];
    for (int r = max(keys.x - k0, 0); r < min(keys.y - k0 + 1, BK); ++r) {
      bits |= mask[r * W + w];
    }
    poison[idx] = bits;
  }
}

// Whether any simdgroup dropped a non-finite V element (flags[sg] written before the last threadgroup barrier).
inline bool varlen_any_dropped(threadgroup const uint* flags) {
  uint any = 0;
  for (int s = 0; s < flash_sdpa::kVarlenSimdgroups; ++s) {
    any |= flags[s];
  }
  return any != 0;
}

// The state of one query row during the key loop, held by its 4 lanes (lane = 4 row + sub).
struct VarlenRow {
  int i;        // query index within the sequence
  int lo, hi;   // visible keys [lo, hi]; hi < lo: none (or a row past the sequence)
  int pos;      // key position of the row (i + sk - sq)
  float slope;  // ALiBi slope
  float m;      // running max, log2 domain
  float l;      // running sum of exp2(s - m)
  bool bad;     // this lane saw a visible score that is NaN or inf
};

inline VarlenRow varlen_row(int i, const VarlenSequence s, float slope, constant flash_sdpa::VarlenParams& p) {
  const int pos = i + s.sk - s.sq;
  const int2 keys = flash_sdpa::visible_keys(pos, p.opt, s.sk);
  return VarlenRow{i, keys.x, i >= s.sq ? -1 : keys.y, pos, slope, kVarlenMasked, 0.0f, false};
}

// One online-softmax step of a row over key tile [k0, k0 + BK): `scores` holds the row's BK products q . k (unscaled,
// row-major; this lane reads columns sub, sub + 4, ...), `probs` gets its probabilities in T. Returns alpha, the
// factor that rescales the row's previous accumulator: exactly 1 unless the running max moved (by more than
// kVarlenRescaleSlack) after something was accumulated. A visible non-finite score marks the row bad and is dropped
// (before the softcap clamp could hide a NaN), so nothing non-finite enters the shared 8x8 tiles.
template <int BK, typename T>
inline float varlen_softmax_step(threadgroup const float* scores, threadgroup T* probs,
                                 threadgroup const long* key_offsets, thread VarlenRow& row, int sub, int k0,
                                 constant flash_sdpa::VarlenParams& p) {
  float sv[BK / 4];
  float tile_max = kVarlenMasked;
  for (int t = 0; t < BK / 4; ++t) {
    const int c = sub + 4 * t;
    const int j = k0 + c;
    float s = scores[c] * p.opt.scale;
    bool visible = j >= row.lo && j <= row.hi && (!fc_varlen_paged || key_offsets[c] >= 0);
    if (visible && flash_sdpa::is_nonfinite(s)) {
      row.bad = true;
      visible = false;
    }
    if (fc_softcap) {
      s = flash_sdpa::apply_softcap(s, p.opt.softcap);
    }
    if (fc_alibi) {
      s -= row.slope * abs(float(row.pos - j));
    }
    s = visible ? flash_sdpa::clamp_score(s) * kVarlenLog2e : kVarlenMasked;
    sv[t] = s;
    tile_max = max(tile_max, s);
  }
  tile_max = max(tile_max, simd_shuffle_xor(tile_max, ushort(1)));
  tile_max = max(tile_max, simd_shuffle_xor(tile_max, ushort(2)));
  // A row with nothing accumulated takes the tile's max (its O is 0: no rescale); later the max moves only past the
  // slack. row.m - m_new never overflows: both are clamped scores or, for a fresh row, alpha is not computed.
  const bool fresh = !(row.m > kVarlenMasked);
  const float m_new = fresh || tile_max > row.m + kVarlenRescaleSlack ? max(row.m, tile_max) : row.m;
  const float alpha = !fresh && m_new != row.m ? exp2(row.m - m_new) : 1.0f;
  float row_sum = 0.0f;
  for (int t = 0; t < BK / 4; ++t) {
    const float pr = sv[t] > kVarlenMasked ? exp2(sv[t] - m_new) : 0.0f;
    probs[sub + 4 * t] = T(pr);
    row_sum += pr;
  }
  row_sum += simd_shuffle_xor(row_sum, ushort(1));
  row_sum += simd_shuffle_xor(row_sum, ushort(2));
  row.l = row.l * alpha + row_sum;
  row.m = m_new;
  return alpha;
}

// End of a row (its sub == 0 lane writes): its flag (1: bad) to *bad_slot, the factor that normalises its
// accumulator (0 for a row with no visible key) to *scale_slot, and its LSE. Sinks join the denominator only.
inline void varlen_finish_row(const thread VarlenRow& row, int sub, int sq, float sink_logit,
                              threadgroup uint* bad_slot, threadgroup float* scale_slot, device uint* lse_seq) {
  const bool empty = !(row.l > 0.0f);
  float m_final = row.m, factor = 1.0f, denom = row.l;
  if (fc_sinks && !empty) {
    const float sink = flash_sdpa::clamp_score(sink_logit) * kVarlenLog2e;
    m_final = max(row.m, sink);
    factor = exp2(row.m - m_final);
    denom = row.l * factor + exp2(sink - m_final);
  }
  uint bad = row.bad ? 1u : 0u;  // over the row's 4 lanes; every lane shuffles (no short-circuit)
  bad |= simd_shuffle_xor(bad, ushort(1));
  bad |= simd_shuffle_xor(bad, ushort(2));
  if (sub == 0) {
    *bad_slot = bad;
    *scale_slot = empty ? 0.0f : factor / denom;
    if (row.i < sq) {
      lse_seq[row.i] = bad != 0 ? flash_sdpa::kNanBits
                       : empty  ? flash_sdpa::kNegInfBits
                                : as_type<uint>((m_final + log2(denom)) * kVarlenLn2);
    }
  }
}

// Writes rows [q0, q0 + BQ) x columns [c0, c0 + CHUNK) of the output from `staged` ([BQ][CHUNK] float, the
// accumulator) times each row's scale; bad rows and poisoned (row, column) elements (W words of bits per row) get
// NaN. Rows past the sequence are not written.
template <typename T, int BQ, int CHUNK, int NT, int W>
inline void varlen_write_out(device T* o_seq, long row_stride, threadgroup const float* staged,
                             threadgroup const float* row_scale, threadgroup const uint* bad_tile,
                             threadgroup const uint* poison, int q0, int c0, int sq, uint tid) {
  for (int idx = int(tid); idx < BQ * CHUNK; idx += NT) {
    const int r = idx / CHUNK, c = idx % CHUNK, d = c0 + c;
    if (q0 + r < sq) {
      const bool nan = bad_tile[r] != 0 || ((poison[r * W + d / 32] >> (d % 32)) & 1u) != 0;
      const float o = nan ? as_type<float>(flash_sdpa::kNanBits) : staged[idx] * row_scale[r];
      o_seq[long(q0 + r) * row_stride + d] = T(o);
    }
  }
}

// Stages rows [q0, q0 + BQ) x columns [c0, c0 + CHUNK) of q as T [BQ][CHUNK] (rows past the sequence: 0), 4 elements
// at a time where q's rows are aligned (uniform), as varlen_stage_rows.
template <typename T, int BQ, int CHUNK, int NT>
inline void varlen_stage_q(threadgroup T* dst, const device T* q_seq, long row_stride, int q0, int c0, int sq,
                           bool aligned, uint tid) {
  static_assert(CHUNK % 4 == 0, "4-element row segments");
  if (aligned) {
    for (int idx = int(tid); idx < BQ * CHUNK / 4; idx += NT) {
      const int r = idx / (CHUNK / 4), c = 4 * (idx % (CHUNK / 4));
      *reinterpret_cast<threadgroup vec<T, 4>*>(dst + r * CHUNK + c) =
          flash_sdpa::load_row4(q_seq + long(q0 + r) * row_stride + c0 + c, q0 + r < sq);
    }
    return;
  }
  for (int idx = int(tid); idx < BQ * CHUNK; idx += NT) {
    const int r = idx / CHUNK, c = idx % CHUNK;
    dst[idx] = q0 + r < sq ? q_seq[long(q0 + r) * row_stride + c0 + c] : T(0);
  }
}

// The kernel's buffers, in FLASH_SDPA_VARLEN_BUFFER_* order (both kernels below take the same).
#define FLASH_SDPA_VARLEN_KERNEL_BUFFERS                                                                              \
  const device T *q [[buffer(FLASH_SDPA_VARLEN_BUFFER_Q)]], const device T *k [[buffer(FLASH_SDPA_VARLEN_BUFFER_K)]], \
      const device T *v [[buffer(FLASH_SDPA_VARLEN_BUFFER_V)]],                                                       \
      device T *out [[buffer(FLASH_SDPA_VARLEN_BUFFER_OUT)]],                                                         \
      device uint *lse [[buffer(FLASH_SDPA_VARLEN_BUFFER_LSE)]], /* float bits */                                     \
      const device int *cu_seqlens_q [[buffer(FLASH_SDPA_VARLEN_BUFFER_CU_SEQLENS_Q)]],                               \
      const device int *cu_seqlens_k [[buffer(FLASH_SDPA_VARLEN_BUFFER_CU_SEQLENS_K)]],                               \
      const device float *alibi_slopes [[buffer(FLASH_SDPA_VARLEN_BUFFER_ALIBI)]],                                    \
      const device float *sinks [[buffer(FLASH_SDPA_VARLEN_BUFFER_SINKS)]],                                           \
      constant flash_sdpa::VarlenParams &p [[buffer(FLASH_SDPA_VARLEN_BUFFER_PARAMS)]],                               \
      const device int *block_table [[buffer(FLASH_SDPA_VARLEN_BUFFER_BLOCK_TABLE)]]

template <typename T, int D>
[[max_total_threads_per_threadgroup(FLASH_SDPA_VARLEN_THREADS)]] kernel void flash_attn_varlen(
    FLASH_SDPA_VARLEN_KERNEL_BUFFERS, uint3 tg_pos [[threadgroup_position_in_grid]],
    uint3 tg_count [[threadgroups_per_grid]], uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
  constexpr int BQ = flash_sdpa::kVarlenBlockQ;
  constexpr int BK = flash_sdpa::varlen_block_k(D, sizeof(T));
  constexpr int NT = flash_sdpa::kVarlenThreads;
  constexpr int DB = D / 8;   // 8-column blocks of the head dim
  constexpr int KB = BK / 8;  // 8-row blocks of a key tile
  constexpr int KV_BYTES = flash_sdpa::varlen_kv_bytes(D, BK, sizeof(T));
  constexpr bool QRES = flash_sdpa::varlen_q_resident(D, sizeof(T));
  // Q is loaded (as T; resident Q: into its own tile, whole) and O written (as float) through the staging region,
  // CHUNK head-dim columns of all 32 rows at a time.
  constexpr int CHUNK = BQ * D * 4 <= KV_BYTES ? D : D / 2;
  static_assert(D % 8 == 0 && BK % 8 == 0, "whole 8x8 tiles");
  static_assert(BQ * CHUNK * 4 <= KV_BYTES && D % CHUNK == 0 && CHUNK % 8 == 0, "Q/O staging fits the K/V region");
  static_assert(BK % 4 == 0, "4 lanes share a score row");
  static_assert(!QRES || KV_BYTES == (BQ + BK) * D * int(sizeof(T)), "resident Q: Q tile, then one key tile");

  // Register layout: K rows [0, BK) then V rows [BK, 2 BK) as T, Q (T) and O (float) staging. Resident Q: Q rows
  // [0, BQ), then one key tile (K, then V) as T; O (float) staging.
  threadgroup float kv_region[KV_BYTES / 4];
  threadgroup float score_tile[BQ * BK];  // simdgroup s: rows [8s, 8s + 8) x BK products q . k
  threadgroup T prob_tile[BQ * BK];       // simdgroup s: the same rows' probabilities
  threadgroup float diag_tile[flash_sdpa::kVarlenSimdgroups * 64];  // simdgroup s: an 8x8 diagonal
  threadgroup uint bad_tile[BQ];                                    // row r of the tile saw a non-finite visible score
  threadgroup float row_scale[BQ];       // row r's output factor (1 / denominator, 0 for an empty row)
  threadgroup long key_offsets[2 * BK];  // paged: offsets of key rows k0 + r in k ([r]) and v ([BK + r]); -1: masked
  constexpr int W = flash_sdpa::varlen_poison_words(D);
  threadgroup uint poison[BQ * W];  // (row, column) bits: the row sees a non-finite V element there
  threadgroup uint dropped_sg[flash_sdpa::kVarlenSimdgroups];  // simdgroup s staged a non-finite V element as 0
  // Resident Q: 8 threads stage each key row, 32 elements each, whose non-finite bits (one word) make the mask's 8
  // words of the row, which the score strips hold (the rare V path).
  static_assert(!QRES || (NT == 8 * BK && D == 256 && W == 8 && BK * W <= BQ * BK), "the resident-Q staging shape");

  const flash_sdpa::RowTileSlot slot = flash_sdpa::row_tile_slot(tg_pos, tg_count, true, p.tile_offset, p.tile_stride);
  const int b = slot.b;
  const int h = slot.head;
  const VarlenSequence seq = varlen_sequence(b, cu_seqlens_q, cu_seqlens_k, p);
  const VarlenHead<T> head = varlen_head(q, k, v, out, lse, alibi_slopes, b, h, seq, p);
  const bool aligned_q = (p.aligned_rows & FLASH_SDPA_ALIGNED_Q) != 0;
  const bool aligned_k = (p.aligned_rows & FLASH_SDPA_ALIGNED_K) != 0;
  const bool aligned_v = (p.aligned_rows & FLASH_SDPA_ALIGNED_V) != 0;

  threadgroup T* q_stage = reinterpret_cast<threadgroup T*>(kv_region);
  threadgroup T* k_tile = q_stage + (QRES ? BQ * D : 0);
  threadgroup T* v_tile = QRES ? k_tile : k_tile + BK * D;
  threadgroup float* o_stage = kv_region;
  threadgroup float* s_strip = score_tile + sg * 8 * BK;
  threadgroup T* p_strip = prob_tile + sg * 8 * BK;
  threadgroup float* diag = diag_tile + sg * 64;
  const int sub = int(lane) % 4;

  // This threadgroup's query tiles of this dispatch, to the sequence's end: every row of every sequence is computed
  // whatever max_seqlen_q (which only sizes the grid) says. The loop bounds are uniform across the threadgroup, so
  // every thread meets every barrier. Longest tiles first across the whole batch (row_tile_slot).
  for (int q0 = slot.first_tile * BQ; q0 < seq.sq; q0 += slot.step * BQ) {
    const int2 tile_keys = varlen_tile_keys(q0, BQ, seq, p);  // keys any row of this tile sees
    const int kv_begin = tile_keys.x, kv_end = tile_keys.y;

    for (int idx = int(tid); idx < BQ * W; idx += NT) {
      poison[idx] = 0;
    }
    // Q rows of this simdgroup as DB 8x8 blocks (resident Q: the whole tile stays in q_stage, [BQ][D]).
    simdgroup_matrix<T, 8, 8> q_frag[QRES ? 1 : DB];
    if (QRES) {
      varlen_stage_q<T, BQ, D, NT>(q_stage, head.q, p.q_row_stride, q0, 0, seq.sq, aligned_q, tid);
      threadgroup_barrier(mem_flags::mem_threadgroup);
    } else {
      for (int c0 = 0; c0 < D; c0 += CHUNK) {
        varlen_stage_q<T, BQ, CHUNK, NT>(q_stage, head.q, p.q_row_stride, q0, c0, seq.sq, aligned_q, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int cb = 0; cb < CHUNK / 8; ++cb) {
          simdgroup_load(q_frag[c0 / 8 + cb], q_stage + sg * 8 * CHUNK + cb * 8, CHUNK);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
    }

    simdgroup_matrix<float, 8, 8> o_frag[DB];
    for (int db = 0; db < DB; ++db) {
      o_frag[db] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    // Softmax state of row lane / 4 of this simdgroup, replicated in its 4 lanes.
    VarlenRow row = varlen_row(q0 + int(sg) * 8 + int(lane) / 4, seq, head.slope, p);

    for (int k0 = kv_begin; k0 < kv_end; k0 += BK) {
      if (fc_varlen_paged) {
        varlen_paged_offsets<BK, NT>(key_offsets, block_table, b, k0, kv_end, p, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
      if (QRES) {  // K alone: V follows into the same tile once the scores are out
        varlen_stage_owned_rows<T, BK, D, NT, false>(k_tile, head.k, p.k_row_stride, key_offsets, k0, kv_end, aligned_k,
                                                     tid);
      } else {
        varlen_stage_rows<T, BK, D, NT, false>(k_tile, head.k, p.k_row_stride, key_offsets, k0, kv_end, aligned_k, tid);
        const bool dropped = simd_any(varlen_stage_rows<T, BK, D, NT, true>(
            v_tile, head.v, p.v_row_stride, key_offsets + BK, k0, kv_end, aligned_v, tid));
        if (lane == 0) {
          dropped_sg[sg] = dropped ? 1u : 0u;
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (!QRES && varlen_any_dropped(dropped_sg)) {  // uniform; poison is read after the barriers below
        varlen_poison_rows<T, BQ, BK, D, NT>(poison, head.v, p.v_row_stride, key_offsets + BK, q0, k0, kv_end, seq, p,
                                             tid);
      }

      // S (8 x BK) = Q K^T: K blocks loaded transposed.
      if (QRES) {  // each Q block read back once from threadgroup memory, for the tile's KB products
        simdgroup_matrix<float, 8, 8> s[KB];
        for (int kb = 0; kb < KB; ++kb) {
          s[kb] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        }
        for (int db = 0; db < DB; ++db) {
          simdgroup_matrix<T, 8, 8> qb;
          simdgroup_load(qb, q_stage + sg * 8 * D + db * 8, D);
          for (int kb = 0; kb < KB; ++kb) {
            simdgroup_matrix<T, 8, 8> kt;
            simdgroup_load(kt, k_tile + kb * 8 * D + db * 8, D, ulong2(0, 0), true);
            simdgroup_multiply_accumulate(s[kb], qb, kt, s[kb]);
          }
        }
        for (int kb = 0; kb < KB; ++kb) {
          simdgroup_store(s[kb], s_strip + kb * 8, BK);
        }
      } else {
        for (int kb = 0; kb < KB; ++kb) {
          simdgroup_matrix<float, 8, 8> s = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
          for (int db = 0; db < DB; ++db) {
            simdgroup_matrix<T, 8, 8> kt;
            simdgroup_load(kt, k_tile + kb * 8 * D + db * 8, D, ulong2(0, 0), true);
            simdgroup_multiply_accumulate(s, q_frag[db], kt, s);
          }
          simdgroup_store(s, s_strip + kb * 8, BK);
        }
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);

      const int strip_row = (int(lane) / 4) * BK;
      const float alpha =
          varlen_softmax_step<BK>(s_strip + strip_row, p_strip + strip_row, key_offsets, row, sub, k0, p);
      // O = diag(alpha) O, only where a row of this simdgroup moved its max (uniform over the simdgroup).
      if (simd_any(alpha != 1.0f)) {
        varlen_write_diagonal(diag, alpha, lane);
        simdgroup_barrier(mem_flags::mem_threadgroup);
        simdgroup_matrix<float, 8, 8> rescale;
        simdgroup_load(rescale, diag, 8);
        for (int db = 0; db < DB; ++db) {
          simdgroup_multiply(o_frag[db], rescale, o_frag[db]);
        }
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);
      // Resident Q: V replaces K in the key tile once every simdgroup has its scores. 4 threadgroup barriers per 16
      // keys (K staged, K read, V staged, V read; paged: 5), as many as 2 per 8-key tile of side-by-side K/V tiles
      // would be, with half the softmax steps and rescale checks.
      if (QRES) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
        const uint v_bits = varlen_stage_owned_rows<T, BK, D, NT, true>(v_tile, head.v, p.v_row_stride,
                                                                        key_offsets + BK, k0, kv_end, aligned_v, tid);
        const bool dropped = simd_any(v_bits != 0);
        if (lane == 0) {
          dropped_sg[sg] = dropped ? 1u : 0u;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (varlen_any_dropped(dropped_sg)) {  // uniform; poison is read after the barriers below
          // The score strips are free until the next tile's products (two barriers on): the mask goes there.
          varlen_nonfinite_mask<BK, D, NT>(reinterpret_cast<threadgroup uint*>(score_tile), v_bits, aligned_v, tid);
          threadgroup_barrier(mem_flags::mem_threadgroup);
          varlen_poison_from_mask<BQ, BK, D, NT>(poison, reinterpret_cast<threadgroup const uint*>(score_tile), q0, k0,
                                                 seq, p, tid);
        }
      }

      // O += P V.
      simdgroup_matrix<T, 8, 8> p_frag[KB];
      for (int kb = 0; kb < KB; ++kb) {
        simdgroup_load(p_frag[kb], p_strip + kb * 8, BK);
      }
      for (int db = 0; db < DB; ++db) {
        for (int kb = 0; kb < KB; ++kb) {
          simdgroup_matrix<T, 8, 8> vb;
          simdgroup_load(vb, v_tile + kb * 8 * D + db * 8, D);
          simdgroup_multiply_accumulate(o_frag[db], p_frag[kb], vb, o_frag[db]);
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    varlen_finish_row(row, sub, seq.sq, fc_sinks ? sinks[h] : 0.0f, &bad_tile[int(sg) * 8 + int(lane) / 4],
                      &row_scale[int(sg) * 8 + int(lane) / 4], head.lse);
    for (int c0 = 0; c0 < D; c0 += CHUNK) {
      for (int cb = 0; cb < CHUNK / 8; ++cb) {
        simdgroup_store(o_frag[c0 / 8 + cb], o_stage + sg * 8 * CHUNK + cb * 8, CHUNK);
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      varlen_write_out<T, BQ, CHUNK, NT, W>(head.out, p.o_row_stride, o_stage, row_scale, bad_tile, poison, q0, c0,
                                            seq.sq, tid);
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
  }
}

// Head dims above 256 (Gemma's global layers use 512): the layout above would hold 2 x D / 8 fragments of Q and O per
// lane and need more than 32 KB for its K/V tiles. Here a threadgroup takes 8 query rows, and its 4 simdgroups split
// the head dim: simdgroup c owns columns [c D/4, (c + 1) D/4) of Q and O (D / 32 fragments each, as many as the
// D = 128 layout), computes the partial scores of its columns, and simdgroup 0 sums the 4 partials and runs the
// softmax for all. K and V go through one staging tile in the input's type, one after the other; the region is sized
// for the float output of the 8 rows (16 KB at D = 512).
template <typename T, int D>
[[max_total_threads_per_threadgroup(FLASH_SDPA_VARLEN_THREADS)]] kernel void flash_attn_varlen_wide(
    FLASH_SDPA_VARLEN_KERNEL_BUFFERS, uint3 tg_pos [[threadgroup_position_in_grid]],
    uint3 tg_count [[threadgroups_per_grid]], uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
  constexpr int NSG = flash_sdpa::kVarlenSimdgroups;
  constexpr int BQ = flash_sdpa::kVarlenWideBlockQ;  // 8 query rows per tile
  constexpr int BK = flash_sdpa::kVarlenWideBlockK;  // 8 keys per tile
  constexpr int NT = flash_sdpa::kVarlenThreads;
  constexpr int DS = D / NSG;  // head-dim columns of one simdgroup
  constexpr int FB = DS / 8;   // its 8x8 fragments
  static_assert(BQ == 8 && BK == 8 && DS % 8 == 0, "one 8x8 score block per simdgroup");
  static_assert(flash_sdpa::varlen_wide_threadgroup_bytes(D, sizeof(T)) <= flash_sdpa::kVarlenMaxThreadgroupBytes,
                "32 KB");

  threadgroup float kv_region[BQ * D];       // K, then V, of the key tile and Q (T); the output (float)
  threadgroup float partial[NSG * BQ * BK];  // simdgroup c's partial products over its columns; [0]: their sums
  threadgroup T probs[BQ * BK];              // the tile's probabilities
  threadgroup float diag[64];                // diag(alpha)
  threadgroup uint rescale_tile[1];          // whether diag(alpha) is not the identity this tile
  threadgroup uint bad_tile[BQ];
  threadgroup float row_scale[BQ];
  threadgroup long key_offsets[2 * BK];
  constexpr int W = flash_sdpa::varlen_poison_words(D);
  threadgroup uint poison[BQ * W];  // as in flash_attn_varlen
  threadgroup uint dropped_sg[NSG];

  const flash_sdpa::RowTileSlot slot = flash_sdpa::row_tile_slot(tg_pos, tg_count, true, p.tile_offset, p.tile_stride);
  const int b = slot.b;
  const int h = slot.head;
  const VarlenSequence seq = varlen_sequence(b, cu_seqlens_q, cu_seqlens_k, p);
  const VarlenHead<T> head = varlen_head(q, k, v, out, lse, alibi_slopes, b, h, seq, p);
  const bool aligned_q = (p.aligned_rows & FLASH_SDPA_ALIGNED_Q) != 0;
  const bool aligned_k = (p.aligned_rows & FLASH_SDPA_ALIGNED_K) != 0;
  const bool aligned_v = (p.aligned_rows & FLASH_SDPA_ALIGNED_V) != 0;
  threadgroup T* kv_tile = reinterpret_cast<threadgroup T*>(kv_region);
  const int col0 = int(sg) * DS;
  const int sub = int(lane) % 4;

  // This dispatch's query tiles, longest first, as in the kernel above.
  for (int q0 = slot.first_tile * BQ; q0 < seq.sq; q0 += slot.step * BQ) {
    const int2 tile_keys = varlen_tile_keys(q0, BQ, seq, p);  // keys any row of this tile sees
    const int kv_begin = tile_keys.x, kv_end = tile_keys.y;

    for (int idx = int(tid); idx < BQ * W; idx += NT) {
      poison[idx] = 0;
    }
    // This simdgroup's columns of the 8 Q rows.
    varlen_stage_q<T, BQ, D, NT>(kv_tile, head.q, p.q_row_stride, q0, 0, seq.sq, aligned_q, tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_matrix<T, 8, 8> q_frag[FB];
    simdgroup_matrix<float, 8, 8> o_frag[FB];
    for (int f = 0; f < FB; ++f) {
      simdgroup_load(q_frag[f], kv_tile + col0 + f * 8, D);
      o_frag[f] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // Softmax state (simdgroup 0 only: row lane / 4, its 4 lanes).
    VarlenRow row = varlen_row(q0 + int(lane) / 4, seq, head.slope, p);

    for (int k0 = kv_begin; k0 < kv_end; k0 += BK) {
      if (fc_varlen_paged) {
        varlen_paged_offsets<BK, NT>(key_offsets, block_table, b, k0, kv_end, p, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
      varlen_stage_rows<T, BK, D, NT, false>(kv_tile, head.k, p.k_row_stride, key_offsets, k0, kv_end, aligned_k, tid);
      threadgroup_barrier(mem_flags::mem_threadgroup);

      // Partial S (8 x 8) over this simdgroup's columns: K blocks loaded transposed.
      simdgroup_matrix<float, 8, 8> s = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      for (int f = 0; f < FB; ++f) {
        simdgroup_matrix<T, 8, 8> kt;
        simdgroup_load(kt, kv_tile + col0 + f * 8, D, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(s, q_frag[f], kt, s);
      }
      simdgroup_store(s, partial + int(sg) * BQ * BK, BK);
      threadgroup_barrier(mem_flags::mem_threadgroup);

      // V replaces K in the tile while simdgroup 0 sums the partials and runs the softmax step.
      const bool dropped = simd_any(varlen_stage_rows<T, BK, D, NT, true>(
          kv_tile, head.v, p.v_row_stride, key_offsets + BK, k0, kv_end, aligned_v, tid));
      if (lane == 0) {
        dropped_sg[sg] = dropped ? 1u : 0u;
      }
      if (sg == 0) {
        threadgroup float* strip = partial + (int(lane) / 4) * BK;
        for (int t = 0; t < BK / 4; ++t) {
          const int c = sub + 4 * t;
          float sum = strip[c];
          for (int w = 1; w < NSG; ++w) {
            sum += strip[w * BQ * BK + c];
          }
          strip[c] = sum;
        }
        const float alpha = varlen_softmax_step<BK>(strip, probs + (int(lane) / 4) * BK, key_offsets, row, sub, k0, p);
        const bool rescale = simd_any(alpha != 1.0f);
        if (rescale) {
          varlen_write_diagonal(diag, alpha, lane);
        }
        if (lane == 0) {
          rescale_tile[0] = rescale ? 1u : 0u;
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (varlen_any_dropped(dropped_sg)) {  // uniform; poison is read after the barriers below
        varlen_poison_rows<T, BQ, BK, D, NT>(poison, head.v, p.v_row_stride, key_offsets + BK, q0, k0, kv_end, seq, p,
                                             tid);
      }

      // O = diag(alpha) O (only where a row moved its max) + P V over this simdgroup's columns.
      if (rescale_tile[0] != 0) {  // uniform
        simdgroup_matrix<float, 8, 8> rescale;
        simdgroup_load(rescale, diag, 8);
        for (int f = 0; f < FB; ++f) {
          simdgroup_multiply(o_frag[f], rescale, o_frag[f]);
        }
      }
      simdgroup_matrix<T, 8, 8> p_frag;
      simdgroup_load(p_frag, probs, BK);
      for (int f = 0; f < FB; ++f) {
        simdgroup_matrix<T, 8, 8> vb;
        simdgroup_load(vb, kv_tile + col0 + f * 8, D);
        simdgroup_multiply_accumulate(o_frag[f], p_frag, vb, o_frag[f]);
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    if (sg == 0) {
      varlen_finish_row(row, sub, seq.sq, fc_sinks ? sinks[h] : 0.0f, &bad_tile[int(lane) / 4],
                        &row_scale[int(lane) / 4], head.lse);
    }
    for (int f = 0; f < FB; ++f) {
      simdgroup_store(o_frag[f], kv_region + col0 + f * 8, D);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    varlen_write_out<T, BQ, D, NT, W>(head.out, p.o_row_stride, kv_region, row_scale, bad_tile, poison, q0, 0, seq.sq,
                                      tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}
