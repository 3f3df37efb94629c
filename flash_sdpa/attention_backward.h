// FlashAttention-2 backward of the varlen / dense attention: kernel bodies, instantiated by attention_backward.metal.
//
// With P = exp(s' - lse) recomputed from q, k and the forward's LSE (s' = the forward's transformed score: scale,
// softcap, ALiBi, mask), dP = dO V^T and delta = rowsum(dO * O):
//   dS = P * (dP - delta) * ds'/ds      (ds'/ds = 1 - tanh^2 with softcap, else 1; ALiBi and masks add constants)
//   dV = P^T dO,   dK = scale * dS^T Q,   dQ = scale * dS K,   d s_aux[h] = -sum_rows exp(s_aux[h] - lse) * delta.
// Pass 2 owns key rows (dK, dV summed over the query heads of the GQA group), pass 3 owns query rows (dQ): each
// gradient element has one writer and a fixed summation order, so no atomics (older Apple GPUs have no float atomics
// on threadgroup memory, and device float atomics would make the sums order-dependent) and the result is
// bit-identical on repeat. Pass 3 recomputes S and dP instead of receiving dS from pass 2: two more 8x8
// products per pair, the price of no atomics.
//
// The products are 8x8 simdgroup_matrix operations on T operands (the input dtype: half, bfloat or float) with fp32
// accumulators (backward_params.h: row blocks x column slices of the head dim per threadgroup); the elementwise step
// (P, dS, masks, softcap, ALiBi, the scale) runs in fp32 per element on strips in threadgroup memory, never on a
// fragment's elements (their lane layout is undocumented). P^T and dS enter their products rounded to T, as in
// FlashAttention-2; S = q . k is computed from unscaled T operands and scaled in fp32 (no extra rounding of scale q).
// Fast math: masking is explicit (a masked pair's P and dS are selected to 0, never exp of a large negative), and a row
// whose LSE is not finite (no visible key: -inf, or a NaN row) has P = 0. A product sums over rows (dV = P^T dO and dK
// = dS^T Q over the staged query rows, dQ = dS K over the staged keys), where a 0 weight times a NaN operand would
// still be NaN: those staged operands hold 0 for non-finite elements (selected), so a NaN in k, v, q or dO where a row
// cannot see it changes nothing of that row's gradients.
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

// Where part `part` of a split GQA group (BackwardParams::group_splits) keeps its dK and dV of KV head kvh, sequence
// b: fp32 [2 (dK, dV)][group_splits][key rows][Hkv][D], key rows as k's (dense: batch x k_rows; varlen: k_rows);
// dk / dv point at the sequence's key 0, rows row_stride apart, parts part_stride apart.
struct BwdPartial {
  device float* dk;
  device float* dv;
  long row_stride, part_stride;
};

inline BwdPartial bwd_partial(device float* partials, int b, int kvh, int part, const BwdSequence seq,
                              constant flash_sdpa::BackwardParams& p, int D) {
  const long rows = fc_varlen ? long(p.k_rows) : long(p.batch) * p.k_rows;
  const long row0 = fc_varlen ? long(seq.start_k) : long(b) * p.k_rows;
  BwdPartial s;
  s.row_stride = long(p.num_kv_heads) * D;
  s.part_stride = rows * s.row_stride;
  s.dk = partials + (long(part) * rows + row0) * s.row_stride + long(kvh) * D;
  s.dv = s.dk + p.group_splits * s.part_stride;
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

// (P, dS) of one (query, key) pair from qk_dp = (q . k, dO . v): s = scale q . k, P = exp(s' - lse) where visible,
// else 0 (selected: s or dP may be NaN for a masked pair).
inline float2 bwd_p_ds(float2 qk_dp, float scale, float softcap, float slope, int dist, bool visible, float lse2,
                       float delta) {
  float dsoft;
  const float s2 = bwd_score_log2(scale * qk_dp.x, softcap, slope, dist, &dsoft);
  const float pr = visible ? exp2(s2 - lse2) : 0.0f;
  return visible ? float2(pr, pr * (qk_dp.y - delta) * dsoft) : float2(0.0f);
}

// The forward's LSE of a row in the log2 domain; false when it is not finite (no visible key, or a NaN row).
inline bool bwd_row_lse2(uint bits, thread float* lse2) {
  *lse2 = as_type<float>(bits) * kBwdLog2e;
  return !flash_sdpa::is_nonfinite(as_type<float>(bits));
}

// The query side of head h of sequence b: q, dO, the forward's LSE (float bits) and delta from the sequence's first
// row, and the head's ALiBi slope.
template <typename T>
struct BwdQueryHead {
  const device T* q;
  const device T* dout;
  const device uint* lse;
  const device float* delta;
  float slope;
};

template <typename T>
inline BwdQueryHead<T> bwd_query_head(const device T* q, const device T* dout, const device uint* lse,
                                      const device float* delta, const device float* alibi_slopes, int b, int h,
                                      BwdSequence seq, constant flash_sdpa::BackwardParams& p) {
  BwdQueryHead<T> x;
  x.q = q + long(b) * p.q_batch_stride + long(seq.start_q) * p.q_row_stride + long(h) * p.q_head_stride;
  x.dout = dout + long(b) * p.do_batch_stride + long(seq.start_q) * p.do_row_stride + long(h) * p.do_head_stride;
  x.lse = lse + long(b) * p.lse_batch_stride + long(h) * p.lse_head_stride + seq.start_q;
  x.delta = delta + long(b) * p.delta_batch_stride + long(h) * p.delta_head_stride + seq.start_q;
  x.slope = fc_alibi ? flash_sdpa::alibi_slope(alibi_slopes, p.opt, b, h) : 0.0f;
  return x;
}

// The key side of KV head kvh of sequence b: K and V from the sequence's first key row.
template <typename T>
struct BwdKeyHead {
  const device T* k;
  const device T* v;
};

template <typename T>
inline BwdKeyHead<T> bwd_key_head(const device T* k, const device T* v, int b, int kvh, BwdSequence seq,
                                  constant flash_sdpa::BackwardParams& p) {
  BwdKeyHead<T> x;
  x.k = k + long(b) * p.k_batch_stride + long(seq.start_k) * p.k_row_stride + long(kvh) * p.k_head_stride;
  x.v = v + long(b) * p.v_batch_stride + long(seq.start_k) * p.v_row_stride + long(kvh) * p.v_head_stride;
  return x;
}

// The elementwise step's scalars of query rows [i0, i0 + ROWS) (row r by thread r mod kBwdThreads): LSE in the log2
// domain and delta (0 past n or without a finite LSE), the visible keys [lo, hi] (hi = -1: the row sees none).
template <typename T, int ROWS>
inline void bwd_row_scalars(threadgroup float* lse2, threadgroup float* delta, threadgroup int* lo, threadgroup int* hi,
                            const thread BwdQueryHead<T>& head, int i0, int n, int offset, int sk,
                            constant flash_sdpa::BackwardParams& p, uint tid) {
  for (int r = int(tid); r < ROWS; r += flash_sdpa::kBwdThreads) {
    const int i = i0 + r;
    float row_lse2 = 0.0f;
    const bool active = r < n && bwd_row_lse2(head.lse[i], &row_lse2);
    const int2 keys = flash_sdpa::visible_keys(i + offset, p.opt, sk);
    lse2[r] = active ? row_lse2 : 0.0f;
    delta[r] = active ? head.delta[i] : 0.0f;
    lo[r] = keys.x;
    hi[r] = active ? keys.y : -1;
  }
}

// ---- pass 1: delta = rowsum(dO * O) ---------------------------------------------------------------------------------
// Grid (row tiles, H, B); threadgroup x takes tiles x, x + grid.x, ... of 32 rows; each simdgroup 8 rows, lanes
// over the head dim. Every tile costs the same here, so the grid order of the passes below does not matter.
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

// The inputs whose every row starts at a multiple of 4 elements (BackwardParams::aligned_rows): bwd_stage reads them
// 4 elements at a time.
struct BwdAligned {
  bool q, k, v, dout;
};

inline BwdAligned bwd_aligned(constant flash_sdpa::BackwardParams& p) {
  return BwdAligned{(p.aligned_rows & FLASH_SDPA_BWD_ALIGNED_Q) != 0, (p.aligned_rows & FLASH_SDPA_BWD_ALIGNED_K) != 0,
                    (p.aligned_rows & FLASH_SDPA_BWD_ALIGNED_V) != 0,
                    (p.aligned_rows & FLASH_SDPA_BWD_ALIGNED_DO) != 0};
}

// Stages rows [r0, r0 + n) of one head (row stride in elements of T) as T [ROWS][D]; rows past n are 0. DROP: a
// non-finite element is staged as 0 (selected): this operand is summed over rows by a product. `aligned` (uniform;
// FLASH_SDPA_BWD_ALIGNED_*): the rows start at multiples of 4 elements, so each thread moves 4 elements per load and
// store, a quarter of the memory instructions; otherwise one at a time.
template <typename T, int ROWS, int D, bool DROP>
inline void bwd_stage(threadgroup T* dst, const device T* src, long row_stride, int r0, int n, bool aligned, uint tid) {
  static_assert(D % 4 == 0, "4-element row segments");
  if (aligned) {
    for (int idx = int(tid); idx < ROWS * D / 4; idx += flash_sdpa::kBwdThreads) {
      const int r = idx / (D / 4), c = 4 * (idx % (D / 4));
      vec<T, 4> x = flash_sdpa::load_row4(src + long(r0 + r) * row_stride + c, r < n);
      if (DROP) {
        flash_sdpa::drop_nonfinite4(x);
      }
      *reinterpret_cast<threadgroup vec<T, 4>*>(dst + r * D + c) = x;
    }
    return;
  }
  for (int idx = int(tid); idx < ROWS * D; idx += flash_sdpa::kBwdThreads) {
    const int r = idx / D, c = idx % D;
    const T x = r < n ? src[long(r0 + r) * row_stride + c] : T(0.0f);
    dst[idx] = DROP && flash_sdpa::is_nonfinite(float(x)) ? T(0.0f) : x;
  }
}

// A simdgroup's fragments of rows [8 rb, 8 rb + 8) x columns [col0, col0 + 8 FB) of a staged T [ROWS][D] tile.
template <typename T, int FB, int D>
__attribute__((always_inline)) inline void bwd_load_frags(thread simdgroup_matrix<T, 8, 8> (&frags)[FB],
                                                          threadgroup const T* tile, int rb, int col0) {
  for (int f = 0; f < FB; ++f) {
    simdgroup_load(frags[f], tile + rb * 8 * D + col0 + f * 8, D);
  }
}

// The tile's two operands (pass 2: K, V; pass 3: Q, dO), rows [r0, r0 + n) of one head (rows past n: 0), into this
// simdgroup's fragments (rows [8 rb, + 8), columns [col0, + 8 FB)) through the staging buffer: side by side when
// both fit (BOTH), else in turn. Ends with a barrier: the buffer is free again.
template <typename T, int ROWS, int D, int FB, bool BOTH>
__attribute__((always_inline)) inline void bwd_load_tile(thread simdgroup_matrix<T, 8, 8> (&a_frag)[FB],
                                                         thread simdgroup_matrix<T, 8, 8> (&b_frag)[FB],
                                                         threadgroup T* stage, const device T* a, long a_row_stride,
                                                         bool a_aligned, const device T* b, long b_row_stride,
                                                         bool b_aligned, int r0, int n, int rb, int col0, uint tid) {
  bwd_stage<T, ROWS, D, false>(stage, a, a_row_stride, r0, n, a_aligned, tid);
  if (BOTH) {
    bwd_stage<T, ROWS, D, false>(stage + ROWS * D, b, b_row_stride, r0, n, b_aligned, tid);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  bwd_load_frags<T, FB, D>(a_frag, stage, rb, col0);
  if (!BOTH) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    bwd_stage<T, ROWS, D, false>(stage, b, b_row_stride, r0, n, b_aligned, tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  bwd_load_frags<T, FB, D>(b_frag, stage + (BOTH ? ROWS * D : 0), rb, col0);
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// The largest divisor of fb that is at most most: fragments per column slice of one output chunk.
constexpr int bwd_chunk_frags(int fb, int most) {
  int f = most < fb ? most : fb;
  while (fb % f != 0) {
    --f;
  }
  return f;
}

// Writes a gradient tile, rows [r0, r0 + n) of one head, times scale: simdgroup (rb, cs) holds rows [8 rb, + 8) x
// columns [cs DS, + DS) as fp32 fragments. They leave through `buf` (WORDS floats, the staging buffer) FC fragments
// of every slice at a time, as a float [ROWS][CS FC 8] chunk: 2-byte staging is too small for the whole float tile.
template <typename T, int ROWS, int D, int CS, int FB, int WORDS>
__attribute__((always_inline)) inline void bwd_write(device T* dst, long row_stride, threadgroup float* buf,
                                                     thread const simdgroup_matrix<float, 8, 8> (&acc)[FB], int rb,
                                                     int cs, int r0, int n, float scale, uint tid) {
  constexpr int FC = bwd_chunk_frags(FB, WORDS / (ROWS * CS * 8));
  constexpr int W = CS * FC * 8;  // columns of a chunk
  static_assert(FC >= 1 && ROWS * W <= WORDS, "a chunk of one fragment per slice fits in the staging buffer");
  for (int f0 = 0; f0 < FB; f0 += FC) {
    for (int f = 0; f < FC; ++f) {
      simdgroup_store(acc[f0 + f], buf + rb * 8 * W + cs * FC * 8 + f * 8, W);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int idx = int(tid); idx < ROWS * W; idx += flash_sdpa::kBwdThreads) {
      const int r = idx / W, c = idx % W;
      if (r < n) {
        dst[long(r0 + r) * row_stride + (c / (FC * 8)) * (D / CS) + f0 * 8 + c % (FC * 8)] = T(buf[idx] * scale);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

// A simdgroup's partial products with every staged row: block xb of the strip (8 x 8, fp32) = sum over the
// simdgroup's FB column fragments f of frags[f] (its own 8 rows) times block xb of the staged T [SB * 8][D] tile,
// transposed, columns [col0 + 8 f, col0 + 8 f + 8). The column slices' partials are summed in the elementwise step.
template <typename T, int SB, int FB, int D, int STAGE>
__attribute__((always_inline)) inline void bwd_strip_products(threadgroup float* strip,
                                                              thread const simdgroup_matrix<T, 8, 8> (&frags)[FB],
                                                              threadgroup const T* tile, int col0) {
  for (int xb = 0; xb < SB; ++xb) {
    simdgroup_matrix<float, 8, 8> acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    for (int f = 0; f < FB; ++f) {
      simdgroup_matrix<T, 8, 8> block;
      simdgroup_load(block, tile + xb * 8 * D + col0 + f * 8, D, ulong2(0, 0), true);
      simdgroup_multiply_accumulate(acc, frags[f], block, acc);
    }
    simdgroup_store(acc, strip + xb * 8, STAGE);
  }
}

// The T strip [tile rows][STAGE] a product reads P^T or dS from. float: the fp32 strip itself (its first slice),
// rewritten in place (each element is read, then written, by one thread); 2-byte T: a strip of its own.
template <typename T>
inline threadgroup T* bwd_t_strip(threadgroup float* scores, threadgroup T* own) {
  return sizeof(T) == 4 ? reinterpret_cast<threadgroup T*>(scores) : own;
}

// Elements of the T strips a kernel declares (float needs none: 1, unused).
template <typename T>
constexpr int bwd_t_strip_elems(int count, int rows, int stage) {
  return sizeof(T) == 4 ? 1 : count * rows * stage;
}

// Orders the score strips around the elementwise step. One column slice (CS = 1): a simdgroup's strips are written
// and read by that simdgroup alone (lanes over its 8 rows), so a simdgroup barrier does, as for the forward's score
// strips; two threadgroup barriers a staged block fewer. Else the row block's simdgroups add each other's partials.
template <int CS>
inline void bwd_strip_barrier() {
  if (CS == 1) {
    simdgroup_barrier(mem_flags::mem_threadgroup);
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

// The elements [x, y), step z, of a [ROWS][STAGE] score strip this thread takes in the elementwise step, matching
// bwd_strip_barrier: one column slice, the lanes of row block rb's simdgroup over its 8 rows; else the whole
// threadgroup over every element.
template <int CS, int ROWS, int STAGE>
inline int3 bwd_strip_elements(int rb, uint lane, uint tid) {
  return CS == 1 ? int3(rb * 8 * STAGE + int(lane), (rb + 1) * 8 * STAGE, 32)
                 : int3(int(tid), ROWS * STAGE, flash_sdpa::kBwdThreads);
}

// The score and dP of element e: the CS slices' partials ([CS][ROWS][STAGE] strips) summed in slice order.
template <int CS, int ROWS, int STAGE>
inline float2 bwd_sum_partials(threadgroup const float* s_strip, threadgroup const float* dp_strip, int e) {
  float2 qk_dp = float2(0.0f);
  for (int w = 0; w < CS; ++w) {
    qk_dp += float2(s_strip[e + w * ROWS * STAGE], dp_strip[e + w * ROWS * STAGE]);
  }
  return qk_dp;
}

// The buffers of pass 2 (dK, dV) and pass 3 (dQ, d s_aux), shared by the simdgroup kernels below and the tensor-ops
// ones (attention_backward_tensor_ops.h): one list each, so the two paths keep one binding contract
// (backward_planner.cpp binds them). Macros, so that the [[buffer(i)]] arguments stay plain literals after
// preprocessing.
#define FLASH_SDPA_BWD_DKDV_KERNEL_BUFFERS                                                                      \
  const device T *q [[buffer(FLASH_SDPA_BWD_BUFFER_Q)]], const device T *k [[buffer(FLASH_SDPA_BWD_BUFFER_K)]], \
      const device T *v [[buffer(FLASH_SDPA_BWD_BUFFER_V)]],                                                    \
      const device T *dout [[buffer(FLASH_SDPA_BWD_BUFFER_DOUT)]],                                              \
      const device uint *lse [[buffer(FLASH_SDPA_BWD_BUFFER_LSE)]], /* float bits */                            \
      const device float *delta [[buffer(FLASH_SDPA_BWD_BUFFER_DELTA)]],                                        \
      device T *dk [[buffer(FLASH_SDPA_BWD_BUFFER_DK)]], device T *dv [[buffer(FLASH_SDPA_BWD_BUFFER_DV)]],     \
      const device int *cu_seqlens_q [[buffer(FLASH_SDPA_BWD_BUFFER_CU_SEQLENS_Q)]],                            \
      const device int *cu_seqlens_k [[buffer(FLASH_SDPA_BWD_BUFFER_CU_SEQLENS_K)]],                            \
      const device float *alibi_slopes [[buffer(FLASH_SDPA_BWD_BUFFER_ALIBI)]],                                 \
      constant flash_sdpa::BackwardParams &p [[buffer(FLASH_SDPA_BWD_BUFFER_PARAMS)]]
#define FLASH_SDPA_BWD_DQ_KERNEL_BUFFERS                                                                        \
  const device T *q [[buffer(FLASH_SDPA_BWD_BUFFER_Q)]], const device T *k [[buffer(FLASH_SDPA_BWD_BUFFER_K)]], \
      const device T *v [[buffer(FLASH_SDPA_BWD_BUFFER_V)]],                                                    \
      const device T *dout [[buffer(FLASH_SDPA_BWD_BUFFER_DOUT)]],                                              \
      const device uint *lse [[buffer(FLASH_SDPA_BWD_BUFFER_LSE)]], /* float bits */                            \
      const device float *delta [[buffer(FLASH_SDPA_BWD_BUFFER_DELTA)]],                                        \
      device T *dq [[buffer(FLASH_SDPA_BWD_BUFFER_DQ)]],                                                        \
      const device int *cu_seqlens_q [[buffer(FLASH_SDPA_BWD_BUFFER_CU_SEQLENS_Q)]],                            \
      const device int *cu_seqlens_k [[buffer(FLASH_SDPA_BWD_BUFFER_CU_SEQLENS_K)]],                            \
      const device float *alibi_slopes [[buffer(FLASH_SDPA_BWD_BUFFER_ALIBI)]],                                 \
      const device float *sinks [[buffer(FLASH_SDPA_BWD_BUFFER_SINKS)]],                                        \
      device float *dsinks [[buffer(FLASH_SDPA_BWD_BUFFER_DSINKS)]],                                            \
      constant flash_sdpa::BackwardParams &p [[buffer(FLASH_SDPA_BWD_BUFFER_PARAMS)]]

// ---- pass 2: dK, dV -------------------------------------------------------------------------------------------------
// Grid (Hkv, B, key tiles); threadgroup z takes the key tiles z, z + grid.z, ... (max_seqlen_k only sizes the grid):
// the first key tiles, which the most causal query rows see, of every head and sequence start first (row_tile_slot).
// Simdgroup s holds K, V (T) and dK, dV (fp32) of key rows [8 rb, 8 rb + 8) x columns [cs DS, cs DS + DS) as
// fragments (rb = s / CS, cs = s % CS); the query rows that see the tile are staged STAGE at a time as T, for each
// query head of the group in turn. Per staged block: K Q^T and dP^T = V dO^T (partials per column slice), then per
// element S^T = scale K Q^T, P^T and dS^T (fp32, stored as T), then dV += P^T dO and dK += dS^T Q (scale at the store).
template <typename T, int D>
[[max_total_threads_per_threadgroup(FLASH_SDPA_BWD_THREADS)]] kernel void flash_attn_bwd_dkdv(
    FLASH_SDPA_BWD_DKDV_KERNEL_BUFFERS, device float* dkdv_partial [[buffer(FLASH_SDPA_BWD_BUFFER_DKDV_PARTIAL)]],
    uint3 tg_pos [[threadgroup_position_in_grid]], uint3 tg_count [[threadgroups_per_grid]],
    uint tid [[thread_index_in_threadgroup]], uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr int NT = flash_sdpa::kBwdThreads;
  constexpr int E = sizeof(T);
  constexpr int CS = flash_sdpa::bwd_col_slices(D, E);
  constexpr int DS = D / CS;  // columns of a slice
  constexpr int FB = DS / 8;  // fragments of a slice
  constexpr int BK = flash_sdpa::bwd_tile_rows(D, E);
  constexpr int STAGE = flash_sdpa::bwd_stage_rows(D, E);
  constexpr int NBUF = flash_sdpa::bwd_stage_buffers(D, E);
  constexpr int WORDS = flash_sdpa::bwd_stage_words(D, E);
  constexpr int SB = STAGE / 8;                  // 8-row blocks of the staged rows
  constexpr bool BOTH = 2 * BK <= NBUF * STAGE;  // the tile's K and V rows staged side by side (else in turn)
  static_assert(BK <= NBUF * STAGE && STAGE % 8 == 0 && DS % 8 == 0, "whole 8x8 tiles");

  threadgroup float
      stage_words[WORDS];  // T: Q rows, then dO rows (NBUF = 1: one after the other); float chunks of dK, dV
  threadgroup float s_strip[flash_sdpa::kBwdSimdgroups * 8 * STAGE];   // [CS][BK][STAGE]: slice cs's partial K Q^T
  threadgroup float dp_strip[flash_sdpa::kBwdSimdgroups * 8 * STAGE];  // [CS][BK][STAGE]: slice cs's partial dP^T
  threadgroup T pds_own[bwd_t_strip_elems<T>(2, BK, STAGE)];           // 2-byte T: P^T, then dS^T, [BK][STAGE] each
  threadgroup float row_lse2[STAGE];                                   // LSE * log2(e) of the staged rows
  threadgroup float row_delta[STAGE];
  threadgroup int row_lo[STAGE];  // visible keys [lo, hi]; hi = -1 for a row with no finite LSE or past the rows
  threadgroup int row_hi[STAGE];

  const flash_sdpa::RowTileSlot slot = flash_sdpa::row_tile_slot(tg_pos, tg_count, false, p.tile_offset, p.tile_stride);
  // Grid x: KV head x group_splits parts of its GQA group (GS > 1: each part's dK, dV to dkdv_partial, summed by
  // flash_attn_bwd_dkdv_sum).
  const int GS = p.group_splits;
  const int b = slot.b, kvh = slot.head / GS, part = slot.head % GS;
  const BwdSequence seq = bwd_sequence(cu_seqlens_q, cu_seqlens_k, b, p);
  const BwdAligned aligned = bwd_aligned(p);
  const int sq = seq.sq, sk = seq.sk, offset = sk - sq;
  const int group = p.num_heads / p.num_kv_heads;
  const int part_heads = group / GS;
  const int rb = int(sg) / CS, cs = int(sg) % CS;
  threadgroup T* stage = reinterpret_cast<threadgroup T*>(stage_words);
  threadgroup T* q_tile = stage;
  threadgroup T* do_tile = stage + (NBUF - 1) * STAGE * D;
  threadgroup float* s_mine = s_strip + (cs * BK + rb * 8) * STAGE;
  threadgroup float* dp_mine = dp_strip + (cs * BK + rb * 8) * STAGE;
  threadgroup T* pt_strip = bwd_t_strip<T>(s_strip, pds_own);
  threadgroup T* dst_strip = bwd_t_strip<T>(dp_strip, pds_own + BK * STAGE);

  const BwdKeyHead<T> kv = bwd_key_head(k, v, b, kvh, seq, p);
  device T* dk_seq =
      dk + long(b) * p.dk_batch_stride + long(seq.start_k) * p.dk_row_stride + long(kvh) * p.dk_head_stride;
  device T* dv_seq =
      dv + long(b) * p.dv_batch_stride + long(seq.start_k) * p.dv_row_stride + long(kvh) * p.dv_head_stride;
  const BwdPartial partial = bwd_partial(dkdv_partial, b, kvh, part, seq, p, D);

  // This threadgroup's key tiles of this dispatch (a long backward is split into command buffers: row_tile_slot).
  for (int k0 = slot.first_tile * BK; k0 < sk; k0 += slot.step * BK) {
    const int nk = min(BK, sk - k0);
    // K and V of this simdgroup's rows and columns, through the staging buffer (rows past the keys: 0).
    simdgroup_matrix<T, 8, 8> k_frag[FB], v_frag[FB];
    simdgroup_matrix<float, 8, 8> dk_acc[FB], dv_acc[FB];
    for (int f = 0; f < FB; ++f) {
      dk_acc[f] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      dv_acc[f] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    bwd_load_tile<T, BK, D, FB, BOTH>(k_frag, v_frag, stage, kv.k, p.k_row_stride, aligned.k, kv.v, p.v_row_stride,
                                      aligned.v, k0, nk, rb, cs * DS, tid);
    const int2 rows = bwd_visible_queries(k0, k0 + nk - 1, p.opt.window_left, p.opt.window_right, sq, sk);

    for (int g = part * part_heads; g < (part + 1) * part_heads; ++g) {
      const BwdQueryHead<T> head = bwd_query_head(q, dout, lse, delta, alibi_slopes, b, kvh * group + g, seq, p);

      for (int i0 = rows.x; i0 <= rows.y; i0 += STAGE) {
        const int n = min(STAGE, rows.y + 1 - i0);  // uniform
        bwd_stage<T, STAGE, D, true>(q_tile, head.q, p.q_row_stride, i0, n, aligned.q, tid);
        if (NBUF == 2) {
          bwd_stage<T, STAGE, D, true>(do_tile, head.dout, p.do_row_stride, i0, n, aligned.dout, tid);
        }
        bwd_row_scalars<T, STAGE>(row_lse2, row_delta, row_lo, row_hi, head, i0, n, offset, sk, p, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);

        // Partial K Q^T over this simdgroup's columns (Q blocks loaded transposed); dP^T = V dO^T likewise.
        bwd_strip_products<T, SB, FB, D, STAGE>(s_mine, k_frag, q_tile, cs * DS);
        if (NBUF == 1) {  // dO replaces Q in the buffer
          threadgroup_barrier(mem_flags::mem_threadgroup);
          bwd_stage<T, STAGE, D, true>(do_tile, head.dout, p.do_row_stride, i0, n, aligned.dout, tid);
          threadgroup_barrier(mem_flags::mem_threadgroup);
        }
        bwd_strip_products<T, SB, FB, D, STAGE>(dp_mine, v_frag, do_tile, cs * DS);
        bwd_strip_barrier<CS>();

        // Per element (key row, staged query c): the CS partials summed in slice order, then P^T and dS^T (fp32,
        // stored as T) at the same place of the T strips (CS = 1: each simdgroup its own rows).
        const int3 mine = bwd_strip_elements<CS, BK, STAGE>(rb, lane, tid);
        for (int e = mine.x; e < mine.y; e += mine.z) {
          const int row = e / STAGE, c = e % STAGE;
          const float2 qk_dp = bwd_sum_partials<CS, BK, STAGE>(s_strip, dp_strip, e);
          const int j = k0 + row;
          const bool vis = j >= row_lo[c] && j <= row_hi[c];
          const float2 pds = bwd_p_ds(qk_dp, p.opt.scale, p.opt.softcap, head.slope, i0 + c + offset - j, vis,
                                      row_lse2[c], row_delta[c]);
          pt_strip[e] = T(pds.x);
          dst_strip[e] = T(pds.y);
        }
        bwd_strip_barrier<CS>();

        // dV += P^T dO, dK += dS^T Q over this simdgroup's columns.
        simdgroup_matrix<T, 8, 8> pt[SB], dst[SB];
        for (int qb = 0; qb < SB; ++qb) {
          simdgroup_load(pt[qb], pt_strip + rb * 8 * STAGE + qb * 8, STAGE);
          simdgroup_load(dst[qb], dst_strip + rb * 8 * STAGE + qb * 8, STAGE);
        }
        for (int f = 0; f < FB; ++f) {
          for (int qb = 0; qb < SB; ++qb) {
            simdgroup_matrix<T, 8, 8> ob;
            simdgroup_load(ob, do_tile + qb * 8 * D + cs * DS + f * 8, D);
            simdgroup_multiply_accumulate(dv_acc[f], pt[qb], ob, dv_acc[f]);
          }
        }
        if (NBUF == 1) {  // Q again, in place of dO
          threadgroup_barrier(mem_flags::mem_threadgroup);
          bwd_stage<T, STAGE, D, true>(q_tile, head.q, p.q_row_stride, i0, n, aligned.q, tid);
          threadgroup_barrier(mem_flags::mem_threadgroup);
        }
        for (int f = 0; f < FB; ++f) {
          for (int qb = 0; qb < SB; ++qb) {
            simdgroup_matrix<T, 8, 8> qblk;
            simdgroup_load(qblk, q_tile + qb * 8 * D + cs * DS + f * 8, D);
            simdgroup_multiply_accumulate(dk_acc[f], dst[qb], qblk, dk_acc[f]);
          }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
    }

    // dK = scale dS^T Q, then dV, through the staging buffer.
    if (GS > 1) {  // uniform
      bwd_write<float, BK, D, CS, FB, WORDS>(partial.dk, partial.row_stride, stage_words, dk_acc, rb, cs, k0, nk,
                                             p.opt.scale, tid);
      bwd_write<float, BK, D, CS, FB, WORDS>(partial.dv, partial.row_stride, stage_words, dv_acc, rb, cs, k0, nk, 1.0f,
                                             tid);
    } else {
      bwd_write<T, BK, D, CS, FB, WORDS>(dk_seq, p.dk_row_stride, stage_words, dk_acc, rb, cs, k0, nk, p.opt.scale,
                                         tid);
      bwd_write<T, BK, D, CS, FB, WORDS>(dv_seq, p.dv_row_stride, stage_words, dv_acc, rb, cs, k0, nk, 1.0f, tid);
    }
  }
}

// The sum of a split GQA group's dK / dV parts (group_splits > 1), in part order (deterministic), rounded once to T.
// Grid (key-row tiles, Hkv, B) as the delta pass's; lanes over the head dim.
template <typename T>
[[max_total_threads_per_threadgroup(FLASH_SDPA_BWD_THREADS)]] kernel void flash_attn_bwd_dkdv_sum(
    device T* dk [[buffer(FLASH_SDPA_BWD_BUFFER_DK)]], device T* dv [[buffer(FLASH_SDPA_BWD_BUFFER_DV)]],
    const device int* cu_seqlens_q [[buffer(FLASH_SDPA_BWD_BUFFER_CU_SEQLENS_Q)]],
    const device int* cu_seqlens_k [[buffer(FLASH_SDPA_BWD_BUFFER_CU_SEQLENS_K)]],
    constant flash_sdpa::BackwardParams& p [[buffer(FLASH_SDPA_BWD_BUFFER_PARAMS)]],
    device float* dkdv_partial [[buffer(FLASH_SDPA_BWD_BUFFER_DKDV_PARTIAL)]],
    uint3 tg_pos [[threadgroup_position_in_grid]], uint3 tg_count [[threadgroups_per_grid]],
    uint tid [[thread_index_in_threadgroup]]) {
  constexpr int ROWS = flash_sdpa::kBwdDeltaRows;
  const int b = int(tg_pos.z), kvh = int(tg_pos.y), D = p.head_dim;
  const BwdSequence seq = bwd_sequence(cu_seqlens_q, cu_seqlens_k, b, p);
  device T* dk_seq =
      dk + long(b) * p.dk_batch_stride + long(seq.start_k) * p.dk_row_stride + long(kvh) * p.dk_head_stride;
  device T* dv_seq =
      dv + long(b) * p.dv_batch_stride + long(seq.start_k) * p.dv_row_stride + long(kvh) * p.dv_head_stride;
  const BwdPartial first = bwd_partial(dkdv_partial, b, kvh, 0, seq, p, D);
  for (int j0 = int(tg_pos.x) * ROWS; j0 < seq.sk; j0 += int(tg_count.x) * ROWS) {
    for (int idx = int(tid); idx < ROWS * D; idx += flash_sdpa::kBwdThreads) {
      const int j = j0 + idx / D, d = idx % D;
      if (j < seq.sk) {
        float sum_k = 0.0f, sum_v = 0.0f;
        for (int part = 0; part < p.group_splits; ++part) {
          sum_k += first.dk[part * first.part_stride + long(j) * first.row_stride + d];
          sum_v += first.dv[part * first.part_stride + long(j) * first.row_stride + d];
        }
        dk_seq[long(j) * p.dk_row_stride + d] = T(sum_k);
        dv_seq[long(j) * p.dv_row_stride + d] = T(sum_v);
      }
    }
  }
}

// d s_aux[h] = -sum over the rows of every sequence of P_sink * delta, P_sink = exp(s_aux[h] - lse) (<= 1), by one
// threadgroup per head (the dQ passes': the one of sequence 0 whose tiles start at row 0, the lightest causal ones,
// started last), in a fixed order (strided per thread, then simd_sum, then simdgroups in order).
inline void bwd_sink_gradient(const device uint* lse, const device float* delta, const device int* cu_seqlens_q,
                              const device int* cu_seqlens_k, const device float* sinks, device float* dsinks,
                              threadgroup float* sink_partial, int h, constant flash_sdpa::BackwardParams& p, uint tid,
                              uint sg, uint lane) {
  const float sink2 = flash_sdpa::clamp_score(sinks[h]) * kBwdLog2e;  // as the forward
  float acc = 0.0f;
  for (int bb = 0; bb < p.batch; ++bb) {
    const BwdSequence s = bwd_sequence(cu_seqlens_q, cu_seqlens_k, bb, p);
    const device uint* lse_b = lse + long(bb) * p.lse_batch_stride + long(h) * p.lse_head_stride + s.start_q;
    const device float* delta_b = delta + long(bb) * p.delta_batch_stride + long(h) * p.delta_head_stride + s.start_q;
    for (int r = int(tid); r < s.sq; r += flash_sdpa::kBwdThreads) {
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

// ---- pass 3: dQ (and d s_aux) ---------------------------------------------------------------------------------------
// Grid (H, B, query tiles); threadgroup z takes the query tiles grid.z - 1 - z, + grid.z, ...: the last query tiles,
// which see the most causal keys, of every head and sequence start first (row_tile_slot). Simdgroup s holds Q, dO (T)
// and dQ (fp32) of query rows [8 rb, 8 rb + 8) x columns [cs DS, cs DS + DS) as fragments; the keys the tile sees are
// staged STAGE at a time as T. Per staged block: Q K^T and dP = dO V^T (partials per column slice), then per
// element S = scale Q K^T and dS (fp32, stored as T), then dQ += dS K (scale at the store).
template <typename T, int D>
[[max_total_threads_per_threadgroup(FLASH_SDPA_BWD_THREADS)]] kernel void flash_attn_bwd_dq(
    FLASH_SDPA_BWD_DQ_KERNEL_BUFFERS, uint3 tg_pos [[threadgroup_position_in_grid]],
    uint3 tg_count [[threadgroups_per_grid]], uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
  constexpr int NT = flash_sdpa::kBwdThreads;
  constexpr int E = sizeof(T);
  constexpr int CS = flash_sdpa::bwd_col_slices(D, E);
  constexpr int DS = D / CS;
  constexpr int FB = DS / 8;
  constexpr int BQ = flash_sdpa::bwd_tile_rows(D, E);
  constexpr int STAGE = flash_sdpa::bwd_stage_rows(D, E);
  constexpr int NBUF = flash_sdpa::bwd_stage_buffers(D, E);
  constexpr int WORDS = flash_sdpa::bwd_stage_words(D, E);
  constexpr int SB = STAGE / 8;
  constexpr bool BOTH = 2 * BQ <= NBUF * STAGE;  // the tile's Q and dO rows staged side by side (else in turn)
  static_assert(BQ <= NBUF * STAGE && STAGE % 8 == 0 && DS % 8 == 0, "whole 8x8 tiles");

  threadgroup float stage_words[WORDS];  // T: K rows, then V rows (NBUF = 1: V first, then K in its place); dQ chunks
  threadgroup float s_strip[flash_sdpa::kBwdSimdgroups * 8 * STAGE];   // [CS][BQ][STAGE]: slice cs's partial Q K^T
  threadgroup float dp_strip[flash_sdpa::kBwdSimdgroups * 8 * STAGE];  // [CS][BQ][STAGE]: slice cs's partial dP
  threadgroup T ds_own[bwd_t_strip_elems<T>(1, BQ, STAGE)];            // 2-byte T: dS, [BQ][STAGE]
  threadgroup float tile_lse2[BQ];                                     // per query row of the tile
  threadgroup float tile_delta[BQ];
  threadgroup int tile_lo[BQ];
  threadgroup int tile_hi[BQ];  // -1: no finite LSE or past the rows
  threadgroup float sink_partial[flash_sdpa::kBwdSimdgroups];

  const flash_sdpa::RowTileSlot slot = flash_sdpa::row_tile_slot(tg_pos, tg_count, true, p.tile_offset, p.tile_stride);
  const int b = slot.b, h = slot.head;
  const BwdSequence seq = bwd_sequence(cu_seqlens_q, cu_seqlens_k, b, p);
  const BwdAligned aligned = bwd_aligned(p);
  const int sq = seq.sq, sk = seq.sk, offset = sk - sq;
  const int kvh = h / (p.num_heads / p.num_kv_heads);
  const int rb = int(sg) / CS, cs = int(sg) % CS;
  threadgroup T* stage = reinterpret_cast<threadgroup T*>(stage_words);
  threadgroup T* k_tile = stage;
  threadgroup T* v_tile = stage + (NBUF - 1) * STAGE * D;
  threadgroup float* s_mine = s_strip + (cs * BQ + rb * 8) * STAGE;
  threadgroup float* dp_mine = dp_strip + (cs * BQ + rb * 8) * STAGE;
  threadgroup T* ds_strip = bwd_t_strip<T>(dp_strip, ds_own);

  const BwdQueryHead<T> head = bwd_query_head(q, dout, lse, delta, alibi_slopes, b, h, seq, p);
  device T* dq_seq =
      dq + long(b) * p.dq_batch_stride + long(seq.start_q) * p.dq_row_stride + long(h) * p.dq_head_stride;
  const BwdKeyHead<T> kv = bwd_key_head(k, v, b, kvh, seq, p);

  // This threadgroup's query tiles of this dispatch (a long backward is split into command buffers: row_tile_slot).
  for (int q0 = slot.first_tile * BQ; q0 < sq; q0 += slot.step * BQ) {
    const int nq = min(BQ, sq - q0);
    // Q and dO of this simdgroup's rows and columns, through the staging buffer (rows past the queries: 0).
    simdgroup_matrix<T, 8, 8> q_frag[FB], do_frag[FB];
    simdgroup_matrix<float, 8, 8> dq_acc[FB];
    bwd_row_scalars<T, BQ>(tile_lse2, tile_delta, tile_lo, tile_hi, head, q0, nq, offset, sk, p, tid);
    for (int f = 0; f < FB; ++f) {
      dq_acc[f] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    bwd_load_tile<T, BQ, D, FB, BOTH>(q_frag, do_frag, stage, head.q, p.q_row_stride, aligned.q, head.dout,
                                      p.do_row_stride, aligned.dout, q0, nq, rb, cs * DS, tid);

    // Keys any row of the tile sees (uniform bounds: every thread meets every barrier).
    const int kv_begin = flash_sdpa::visible_keys(q0 + offset, p.opt, sk).x;
    const int kv_end = flash_sdpa::visible_keys(q0 + nq - 1 + offset, p.opt, sk).y + 1;
    for (int j0 = kv_begin; j0 < kv_end; j0 += STAGE) {
      const int n = min(STAGE, kv_end - j0);
      // V is only read per (row, key) pair (dP); K is summed over keys by dS K: its non-finite elements are dropped.
      bwd_stage<T, STAGE, D, false>(v_tile, kv.v, p.v_row_stride, j0, n, aligned.v, tid);
      if (NBUF == 1) {  // dP first, then K replaces V
        threadgroup_barrier(mem_flags::mem_threadgroup);
        bwd_strip_products<T, SB, FB, D, STAGE>(dp_mine, do_frag, v_tile, cs * DS);
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
      bwd_stage<T, STAGE, D, true>(k_tile, kv.k, p.k_row_stride, j0, n, aligned.k, tid);
      threadgroup_barrier(mem_flags::mem_threadgroup);

      // Partial Q K^T and dP = dO V^T over this simdgroup's columns (K, V blocks loaded transposed).
      bwd_strip_products<T, SB, FB, D, STAGE>(s_mine, q_frag, k_tile, cs * DS);
      if (NBUF == 2) {
        bwd_strip_products<T, SB, FB, D, STAGE>(dp_mine, do_frag, v_tile, cs * DS);
      }
      bwd_strip_barrier<CS>();

      // Per element (query row, staged key c): the CS partials summed in slice order, then dS (fp32, stored as T) at
      // the same place of the T strip (CS = 1: each simdgroup its own rows).
      const int3 mine = bwd_strip_elements<CS, BQ, STAGE>(rb, lane, tid);
      for (int e = mine.x; e < mine.y; e += mine.z) {
        const int row = e / STAGE, c = e % STAGE;
        const float2 qk_dp = bwd_sum_partials<CS, BQ, STAGE>(s_strip, dp_strip, e);
        const int j = j0 + c;
        const bool vis = j >= tile_lo[row] && j <= tile_hi[row];
        ds_strip[e] = T(bwd_p_ds(qk_dp, p.opt.scale, p.opt.softcap, head.slope, q0 + row + offset - j, vis,
                                 tile_lse2[row], tile_delta[row])
                            .y);
      }
      bwd_strip_barrier<CS>();

      // dQ += dS K over this simdgroup's columns (scale at the store).
      for (int kb = 0; kb < SB; ++kb) {
        simdgroup_matrix<T, 8, 8> ds;
        simdgroup_load(ds, ds_strip + rb * 8 * STAGE + kb * 8, STAGE);
        for (int f = 0; f < FB; ++f) {
          simdgroup_matrix<T, 8, 8> kblk;
          simdgroup_load(kblk, k_tile + kb * 8 * D + cs * DS + f * 8, D);
          simdgroup_multiply_accumulate(dq_acc[f], ds, kblk, dq_acc[f]);
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    bwd_write<T, BQ, D, CS, FB, WORDS>(dq_seq, p.dq_row_stride, stage_words, dq_acc, rb, cs, q0, nq, p.opt.scale, tid);
  }

  if (fc_sinks && slot.first_tile == 0 && slot.b == 0) {  // the threadgroup of tile 0 (in dispatch 0)
    bwd_sink_gradient(lse, delta, cu_seqlens_q, cu_seqlens_k, sinks, dsinks, sink_partial, h, p, tid, sg, lane);
  }
}
