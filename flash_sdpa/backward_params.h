// Parameters of the FlashAttention-2 backward (attention_backward.metal), shared by MSL and host C++.
//
// Three dispatches, planned by backward_planner.cpp:
//   1. flash_attn_bwd_delta_<dtype>        delta = rowsum(dO * O) per (row, head), fp32 (the O(S) scratch)
//   2. flash_attn_bwd_dkdv_<dtype>_d<D>     dK, dV of one key tile and one KV head, summed over the GQA group
//   3. flash_attn_bwd_dq_<dtype>_d<D>       dQ of one query tile and one head; the threadgroups (h, 0, grid.z - 1)
//                                           also reduce d s_aux[h] = -sum_rows exp(s_aux[h] - lse) * delta
// P is recomputed from q, k and the forward's LSE; every output element has one writer and a fixed summation
// order (no atomics), so the gradients are bit-identical on repeat.
#pragma once

#include "varlen_params.h"  // fsdpa_* types, the dtype and head-dim lists (one list for forward and backward)

namespace flash_sdpa {

// [[buffer(i)]] of the backward kernels (each kernel declares the subset it uses).
#define FLASH_SDPA_BWD_BUFFER_Q 0              // T, (batch, row, head, d = 1) through the q_* strides
#define FLASH_SDPA_BWD_BUFFER_K 1              // T, (batch, row, kv head, d = 1)
#define FLASH_SDPA_BWD_BUFFER_V 2              // T, (batch, row, kv head, d = 1)
#define FLASH_SDPA_BWD_BUFFER_OUT 3            // T, the forward's output, (batch, row, head, d = 1)
#define FLASH_SDPA_BWD_BUFFER_DOUT 4           // T, dL/dout, (batch, row, head, d = 1)
#define FLASH_SDPA_BWD_BUFFER_LSE 5            // float bits, the forward's LSE, (batch, head, row = 1)
#define FLASH_SDPA_BWD_BUFFER_DELTA 6          // float, rowsum(dO * O), (batch, head, row = 1): written by pass 1
#define FLASH_SDPA_BWD_BUFFER_DQ 7             // T, (batch, row, head, d = 1)
#define FLASH_SDPA_BWD_BUFFER_DK 8             // T, (batch, row, kv head, d = 1)
#define FLASH_SDPA_BWD_BUFFER_DV 9             // T, (batch, row, kv head, d = 1)
#define FLASH_SDPA_BWD_BUFFER_CU_SEQLENS_Q 10  // int32 [batch + 1] (varlen only)
#define FLASH_SDPA_BWD_BUFFER_CU_SEQLENS_K 11  // int32 [batch + 1] (varlen only)
#define FLASH_SDPA_BWD_BUFFER_ALIBI 12         // float, slope of (batch, head) at b * alibi_batch_stride + h
#define FLASH_SDPA_BWD_BUFFER_SINKS 13         // float [heads]
#define FLASH_SDPA_BWD_BUFFER_DSINKS 14        // float [heads], d s_aux (written by pass 3 when sinks are on)
#define FLASH_SDPA_BWD_BUFFER_PARAMS 15        // BackwardParams (setBytes)
#define FLASH_SDPA_BWD_BUFFER_DKDV_PARTIAL 16  // float, dK / dV of each part of a split GQA group (group_splits > 1)

// [[function_constant(i)]] of the backward kernels: the options' (attention_options.h), as in the forward.

#define FLASH_SDPA_BWD_THREADS 128

// Tile layout of passes 2 and 3: 8x8 simdgroup_matrix products with T-typed operands (half, bfloat or float: the
// input dtype) and fp32 accumulators; softmax / dS elementwise math in fp32. The 4 simdgroups of a threadgroup are RB
// row blocks x CS column slices (RB * CS = 4): simdgroup s owns rows [8 (s / CS), + 8) of the tile (key rows in pass
// 2, query rows in pass 3) and head-dim columns [(s % CS) DS, + DS), DS = D / CS, of the tile's operands (T) and
// gradients (float), in registers (pass 2: K, V, dK, dV; pass 3: Q, dO, dQ). The other operand (query rows in pass 2,
// key rows in pass 3) is staged through threadgroup memory as T, STAGE rows at a time; each simdgroup's partial fp32
// scores over its columns go to an [8][STAGE] strip, the threadgroup adds the CS strips of a row block, and P^T / dS
// are written as T for the products that read them (FlashAttention-2 rounds them to the input dtype likewise).
FSDPA_CONSTANT fsdpa_i32 kBwdThreads = FLASH_SDPA_BWD_THREADS;
FSDPA_CONSTANT fsdpa_i32 kBwdSimdgroups = FLASH_SDPA_BWD_THREADS / 32;
FSDPA_CONSTANT fsdpa_i32 kBwdDeltaRows = 32;  // rows per pass-1 tile (8 per simdgroup)
FSDPA_CONSTANT fsdpa_i32 kBwdMaxThreadgroupBytes = 32768;
// Two 128-thread threadgroups resident on an M1/M2-class core (~60 KB of threadgroup memory): the staged-row choice
// stays within 30 KB, so that one threadgroup's staging (no async copies in Metal) overlaps the other's products.
FSDPA_CONSTANT fsdpa_i32 kBwdResidentBytes = 30720;

// Column slices CS of the head dim (elem: bytes of T). Fewer slices, taller tiles: each staged row serves 8 x 4 / CS
// tile rows (per (query, key) pair: half the staged traffic and threadgroup barriers at 2 slices than at 4, a quarter
// of the barriers at 1 than at 2), and one slice needs no cross-simdgroup sum of partial scores (simdgroup barriers
// around the elementwise step instead of threadgroup barriers). The limit is pass 2's fragments, 4 x DS / 8 per lane
// (K, V: T; dK, dV: float): float keeps DS <= 80 below D = 96 (80 words), 96 / 128 words at D = 192 / 256 (the
// forward's D = 256 budget); a half / bfloat fragment is one word, so one slice of D = 96 costs 2 x 12 + 2 x 24 = 72
// words and takes 32-row tiles. One slice of D = 128 (96 words) measured worse than two (48): 244 registers for dK/dV
// against 162 (ptxas, sm_90), a 1.5x slower backward at S = 1024 on the proxy; Apple GPUs spill rather than lower
// occupancy, which favours the smaller layout there too. D = 192 / 256 in one slice would need 144 / 192 words, so
// they keep 2 slices (72 / 96 words), and D = 512 keeps 4. Half / bfloat D = 64 takes 2 slices as well: a
// 16-row tile doubles its dK/dV threadgroups (a KV head's 32-key tile loops over the GQA group, so short sequences
// left cores idle) at 127 registers instead of 165; 10-28% faster on the proxy (S = 1024 / 4096, 16/4 heads). Half /
// bfloat D = 256 takes 4 slices (8-row tiles): dK/dV 255 -> 168 registers, dQ 167 -> 125 (Apple GPUs spill past
// their register budget); proxy, 16/4 heads: causal S = 1024 / 4096 / 16384 28% / 11% / 9% faster, non-causal
// S = 4096 / 16384 5% / 15%, non-causal S = 1024 19% slower (not profiled: each staged row serves half the tile
// rows, and that short call already filled the GPU with 16-row tiles).
constexpr fsdpa_i32 bwd_col_slices(fsdpa_i32 head_dim, fsdpa_i32 elem) {
  if (elem != 4 && head_dim == 64) {
    return 2;
  }
  if (elem != 4 && head_dim == 256) {
    return 4;
  }
  return head_dim <= (elem == 4 ? 80 : 96) ? 1 : head_dim <= 256 ? 2 : 4;
}

// Rows of a pass-2 / pass-3 tile (keys / queries): 8 per row block.
constexpr fsdpa_i32 bwd_tile_rows(fsdpa_i32 head_dim, fsdpa_i32 elem) {
  return 8 * (kBwdSimdgroups / bwd_col_slices(head_dim, elem));
}

// Threadgroup memory of pass 2 or 3 (an upper bound for both): the staged rows as T (buffers = 2: the two staged
// operands side by side; 1: one after the other), the fp32 S and dP strips of every simdgroup, the P^T and dS strips
// as T (2-byte T only: float rewrites its score strips in place), per-row scalars of the staged rows and of the tile,
// and the d s_aux partials. The dK / dV / dQ tile leaves through the staging buffer in column chunks (no extra bytes).
constexpr fsdpa_i32 bwd_threadgroup_bytes(fsdpa_i32 head_dim, fsdpa_i32 elem, fsdpa_i32 stage_rows, fsdpa_i32 buffers) {
  return elem * buffers * stage_rows * head_dim + 4 * 2 * kBwdSimdgroups * 8 * stage_rows +
         (elem == 4 ? 0 : 2 * elem * bwd_tile_rows(head_dim, elem) * stage_rows) +
         4 * (4 * (stage_rows + bwd_tile_rows(head_dim, elem)) + kBwdSimdgroups);
}

// Staged rows: the most of 32 / 16 / 8 whose two buffers fit in kBwdResidentBytes (fewer threadgroup barriers and
// per-block scalar set-up per staged row). 2-byte staging is what lets D = 96 / 128 (one slice, 32-row tiles) stage
// 32 rows, D = 256 16 (float: 8) and D = 512 both operands at once (float: one buffer, Q and dO in turn).
constexpr fsdpa_i32 bwd_stage_rows(fsdpa_i32 head_dim, fsdpa_i32 elem) {
  return bwd_threadgroup_bytes(head_dim, elem, 32, 2) <= kBwdResidentBytes   ? 32
         : bwd_threadgroup_bytes(head_dim, elem, 16, 2) <= kBwdResidentBytes ? 16
                                                                             : 8;
}

constexpr fsdpa_i32 bwd_stage_buffers(fsdpa_i32 head_dim, fsdpa_i32 elem) {
  return bwd_threadgroup_bytes(head_dim, elem, bwd_stage_rows(head_dim, elem), 2) <= kBwdResidentBytes ? 2 : 1;
}

// Floats of the staging buffer (T rows; the gradient tile's float column chunks reuse it).
constexpr fsdpa_i32 bwd_stage_words(fsdpa_i32 head_dim, fsdpa_i32 elem) {
  return elem * bwd_stage_buffers(head_dim, elem) * bwd_stage_rows(head_dim, elem) * head_dim / 4;
}

// Every head dim of the forward, the wide ones included: the backward has one kernel for all.
#define FLASH_SDPA_BWD_HEAD_DIMS(Y, a, b) FLASH_SDPA_VARLEN_HEAD_DIMS(Y, a, b) FLASH_SDPA_VARLEN_WIDE_HEAD_DIMS(Y, a, b)

#define FLASH_SDPA_CHECK_BWD_TILES(D, E)                                                                              \
  static_assert((D) % (8 * bwd_col_slices(D, E)) == 0, "head dim " #D ": whole 8-column fragments per column slice"); \
  static_assert(bwd_tile_rows(D, E) <= bwd_stage_buffers(D, E) * bwd_stage_rows(D, E),                                \
                "the tile's operand rows are loaded through the staging buffer");                                     \
  static_assert(bwd_stage_words(D, E) >= bwd_tile_rows(D, E) * 8 * bwd_col_slices(D, E),                              \
                "one fragment column per slice of the gradient tile fits in the staging buffer as float");            \
  static_assert(                                                                                                      \
      bwd_threadgroup_bytes((D), (E), bwd_stage_rows(D, E), bwd_stage_buffers(D, E)) <= kBwdMaxThreadgroupBytes,      \
      "the backward's staged rows of head dim " #D " do not fit in 32 KB of threadgroup memory");
#define FLASH_SDPA_CHECK_BWD_HEAD_DIM(a, b, D) FLASH_SDPA_CHECK_BWD_TILES(D, 4) FLASH_SDPA_CHECK_BWD_TILES(D, 2)
FLASH_SDPA_BWD_HEAD_DIMS(FLASH_SDPA_CHECK_BWD_HEAD_DIM, _, _)
#undef FLASH_SDPA_CHECK_BWD_HEAD_DIM
#undef FLASH_SDPA_CHECK_BWD_TILES

// The tensor-ops backward (attention_backward_tensor_ops.h: Metal 4 matmul2d, the M5 family's path; the tensor-ops
// library) on the same 128 threads: a tile of BT rows (dK/dV: keys, dQ: queries) and its two operands (K, V or Q, dO)
// in threadgroup memory as T for the whole pass, the other two operands (Q, dO or K, V) staged BS rows at a time
// (NBUF = 2: side by side; 1: in turn), S and dP of a staged block as fp32 [BT][BS] strips, P^T / dS^T (dS) as T tiles
// (float T: in place of the strips). Metal 4 has no asynchronous copy into threadgroup memory, so every operand a
// product reads is staged by the threads between barriers; what must fit is Apple's 32 KB per threadgroup.
// Accumulators stay in cooperative tensors (registers): dK and dV 2 BT D / 128 floats a thread, dQ BT D / 128, at
// most 64 (the forward's O at D = 128), so the tile rows shrink before the registers grow.
constexpr fsdpa_i32 bwd_tops_threadgroup_bytes(fsdpa_i32 head_dim, fsdpa_i32 elem, fsdpa_i32 tile_rows,
                                               fsdpa_i32 stage_rows, fsdpa_i32 buffers) {
  return elem * (2 * tile_rows + buffers * stage_rows) * head_dim +  // tile operands, staged operands
         2 * 4 * tile_rows * stage_rows +                            // S, dP strips (fp32)
         (elem == 4 ? 0 : 2 * elem * tile_rows * stage_rows) +       // P^T, dS^T (2-byte T)
         4 * (4 * (tile_rows > stage_rows ? tile_rows : stage_rows) + kBwdSimdgroups);  // row scalars, sink partials
}

// (BT, BS, NBUF): the first of (32, 32, 2), (32, 16, 2), (16, 16, 2), (16, 16, 1) that fits 32 KB (taller tiles and
// staged blocks first: fewer staged loads and barriers per (query, key) pair); every product shape a multiple of 16
// (Apple documents no granularity for matmul2d). Index 0-3 of that list, 4: none fits.
constexpr fsdpa_i32 bwd_tops_shape(fsdpa_i32 head_dim, fsdpa_i32 elem) {
  return bwd_tops_threadgroup_bytes(head_dim, elem, 32, 32, 2) <= kBwdMaxThreadgroupBytes   ? 0
         : bwd_tops_threadgroup_bytes(head_dim, elem, 32, 16, 2) <= kBwdMaxThreadgroupBytes ? 1
         : bwd_tops_threadgroup_bytes(head_dim, elem, 16, 16, 2) <= kBwdMaxThreadgroupBytes ? 2
         : bwd_tops_threadgroup_bytes(head_dim, elem, 16, 16, 1) <= kBwdMaxThreadgroupBytes ? 3
                                                                                            : 4;
}
constexpr fsdpa_i32 bwd_tops_tile_rows(fsdpa_i32 head_dim, fsdpa_i32 elem) {
  return bwd_tops_shape(head_dim, elem) <= 1 ? 32 : 16;
}
constexpr fsdpa_i32 bwd_tops_stage_rows(fsdpa_i32 head_dim, fsdpa_i32 elem) {
  return bwd_tops_shape(head_dim, elem) == 0 ? 32 : 16;
}
constexpr fsdpa_i32 bwd_tops_stage_buffers(fsdpa_i32 head_dim, fsdpa_i32 elem) {
  return bwd_tops_shape(head_dim, elem) == 3 ? 1 : 2;
}
// Half / bfloat: (32, 32, 2) at D = 32 / 64, (32, 16, 2) at 96 / 128, (16, 16, 1) at 256; float: (32, 32, 2) at 32,
// (32, 16, 2) at 64, (16, 16, 2) at 96, (16, 16, 1) at 128; float D = 256 does not fit (K and V alone are 32 KB).
constexpr bool bwd_tops_supports(fsdpa_i32 head_dim, fsdpa_i32 elem) {
  return head_dim % 16 == 0 && head_dim >= 32 && head_dim <= 256 && bwd_tops_shape(head_dim, elem) < 4;
}

// The head dims the tensor-ops library instantiates the backward for: the tensor-ops forward's (tensor_ops_library.h),
// 256 in half / bfloat only. backward_planner.cpp (backward_tops_serves) reads the same list.
#define FLASH_SDPA_BWD_TOPS_HEAD_DIMS(Y, a, b) Y(a, b, 32) Y(a, b, 64) Y(a, b, 96) Y(a, b, 128)
#define FLASH_SDPA_BWD_TOPS_WIDE_HEAD_DIMS(Y, a, b) Y(a, b, 256)

// BackwardParams::aligned_rows: inputs whose every row starts at a multiple of 4 elements (storage offset and every
// stride but the head dim's multiples of 4); the staging loops read their rows 4 elements at a time.
#define FLASH_SDPA_BWD_ALIGNED_Q 1
#define FLASH_SDPA_BWD_ALIGNED_K 2
#define FLASH_SDPA_BWD_ALIGNED_V 4
#define FLASH_SDPA_BWD_ALIGNED_DO 8

// Element (i, d) of head h of sequence b of x in {q, k, v, o (out), do (dout), dq, dk, dv} lives at
//   b * x_batch_stride + (start_x(b) + i) * x_row_stride + h * x_head_stride + d            (elements of T)
// with start_x(b) = cu_seqlens_x[b] in varlen mode (batch strides 0), 0 in dense mode; LSE and delta of (b, h, i)
// at b * x_batch_stride + h * x_head_stride + start_q(b) + i (floats).
struct BackwardParams {
  fsdpa_i64 q_batch_stride;  // elements
  fsdpa_i64 q_row_stride;
  fsdpa_i64 q_head_stride;
  fsdpa_i64 k_batch_stride;
  fsdpa_i64 k_row_stride;
  fsdpa_i64 k_head_stride;
  fsdpa_i64 v_batch_stride;
  fsdpa_i64 v_row_stride;
  fsdpa_i64 v_head_stride;
  fsdpa_i64 o_batch_stride;
  fsdpa_i64 o_row_stride;
  fsdpa_i64 o_head_stride;
  fsdpa_i64 do_batch_stride;
  fsdpa_i64 do_row_stride;
  fsdpa_i64 do_head_stride;
  fsdpa_i64 dq_batch_stride;
  fsdpa_i64 dq_row_stride;
  fsdpa_i64 dq_head_stride;
  fsdpa_i64 dk_batch_stride;
  fsdpa_i64 dk_row_stride;
  fsdpa_i64 dk_head_stride;
  fsdpa_i64 dv_batch_stride;
  fsdpa_i64 dv_row_stride;
  fsdpa_i64 dv_head_stride;
  fsdpa_i64 lse_batch_stride;  // floats
  fsdpa_i64 lse_head_stride;
  fsdpa_i64 delta_batch_stride;  // floats
  fsdpa_i64 delta_head_stride;
  fsdpa_i32 batch;         // number of sequences (grid y of the dK/dV and dQ passes, z of the delta pass)
  fsdpa_i32 num_heads;     // H (grid x of the dQ pass, y of the delta pass; dK/dV: x = Hkv x group_splits)
  fsdpa_i32 num_kv_heads;  // Hkv, H % Hkv == 0; query head h reads kv head h / (H / Hkv)
  fsdpa_i32 q_rows;        // rows of q/out/dout/dq along the row axis: row indices are clamped below it
  fsdpa_i32 k_rows;        // rows of k/v/dk/dv along the row axis
  fsdpa_i32 seqlen_q;      // dense mode: queries per sequence (varlen: unused)
  fsdpa_i32 seqlen_k;      // dense mode: keys per sequence (varlen: unused)
  fsdpa_i32 head_dim;      // D (pass 1 loops over it; passes 2 and 3 have it as a template constant)
  fsdpa_i32 tile_offset;   // this dispatch's row tiles tile_offset, tile_offset + tile_stride, ... of every sequence:
  fsdpa_i32 tile_stride;  // key tiles in the dK/dV pass, query tiles in dQ (a long backward is split: planner_common.h)
  fsdpa_i32 aligned_rows;  // FLASH_SDPA_BWD_ALIGNED_* bits: that input's rows start at multiples of 4 elements
  fsdpa_i32 group_splits;  // dK/dV: the GQA group's query heads over this many threadgroups (1: one; >1: partials, then
                           // the sum pass; bwd_group_splits in backward_planner.cpp)
  OptionParams opt;        // scale, softcap, window, ALiBi stride (as the forward's)
};

static_assert(sizeof(BackwardParams) == 28 * 8 + 12 * 4 + sizeof(OptionParams), "BackwardParams: no padding");
static_assert(__builtin_offsetof(BackwardParams, delta_head_stride) == 27 * 8, "64-bit strides first");
static_assert(__builtin_offsetof(BackwardParams, batch) == 28 * 8, "32-bit fields after the strides");
static_assert(__builtin_offsetof(BackwardParams, opt) == 28 * 8 + 12 * 4, "the options last");

}  // namespace flash_sdpa
