// Parameters of the paged KV-cache kernels (kv_paged_write, paged_decode_attention, paged_decode_combine).
//
// One definition, compiled as MSL (the .metal files) and as C++ (paged_planner.cpp): fixed-width types, int64
// strides, int32 counts, the options last (attention_options.h), the layout pinned by static_asserts on both sides.
// Strides are in elements of the tensor they describe, axis order (A, B, ..., D = 1).
#pragma once

#include "attention_options.h"  // OptionParams, the options' function constants
#include "params_types.h"

// The supported configurations: one list drives the MSL instantiations, the host checks and the test grid
// (the tests parse these two macros). X(msl_type, dtype_name) and X(head_dim, extra...).
#define FLASH_SDPA_PAGED_DTYPES(X) X(float, float32) X(half, float16) X(bfloat, bfloat16)
// X(head_dim, max_rows, extra...): max_rows is the largest decode row tile for that head dim (R x D / 32 fp32 P.V
// accumulators per lane: <= 64).
// An X-macro list: clang-format does not reach a fixed point on it.
// clang-format off
#define FLASH_SDPA_PAGED_HEAD_DIMS(X, ...)                                                       \
  X(32, 16, __VA_ARGS__) X(64, 16, __VA_ARGS__) X(72, 16, __VA_ARGS__) X(80, 16, __VA_ARGS__) \
  X(96, 16, __VA_ARGS__) X(128, 16, __VA_ARGS__) X(192, 8, __VA_ARGS__) X(256, 8, __VA_ARGS__)    \
  X(512, 4, __VA_ARGS__)
// clang-format on
// Decode row tiles R (rows = query head of the KV group x query token per threadgroup) up to a head dim's max_rows:
// the planner takes the smallest R >= group x sq. X(R, extra...).
#define FLASH_SDPA_PAGED_ROWS_UPTO_4(X, ...) X(1, __VA_ARGS__) X(2, __VA_ARGS__) X(4, __VA_ARGS__)
#define FLASH_SDPA_PAGED_ROWS_UPTO_8(X, ...) FLASH_SDPA_PAGED_ROWS_UPTO_4(X, __VA_ARGS__) X(8, __VA_ARGS__)
#define FLASH_SDPA_PAGED_ROWS_UPTO_16(X, ...) FLASH_SDPA_PAGED_ROWS_UPTO_8(X, __VA_ARGS__) X(16, __VA_ARGS__)
// The matrix path's own instances (decode_matrix_rows below; the one-token calls of those configurations run them):
// X(R, head_dim, msl_type, dtype_name).
// clang-format off
#define FLASH_SDPA_PAGED_MATRIX_INSTANCES(X)                                                   \
  X(8, 64, half, float16) X(16, 64, half, float16) X(8, 128, half, float16) X(16, 128, half, float16) \
  X(8, 64, bfloat, bfloat16) X(16, 64, bfloat, bfloat16) X(8, 128, bfloat, bfloat16) X(16, 128, bfloat, bfloat16)
// The wide path's own instances (decode_runs_wide below): X(R, head_dim, msl_type, dtype_name).
#define FLASH_SDPA_PAGED_WIDE_INSTANCES_T(X, T, TN)                                                        \
  X(1, 64, T, TN) X(2, 64, T, TN) X(4, 64, T, TN) X(8, 64, T, TN) X(16, 64, T, TN)                         \
  X(1, 128, T, TN) X(2, 128, T, TN) X(4, 128, T, TN) X(8, 128, T, TN) X(16, 128, T, TN)
#define FLASH_SDPA_PAGED_WIDE_INSTANCES(X) \
  FLASH_SDPA_PAGED_WIDE_INSTANCES_T(X, half, float16) FLASH_SDPA_PAGED_WIDE_INSTANCES_T(X, bfloat, bfloat16)
// clang-format on

// Kernel names: "kv_paged_write_<dtype>", "paged_decode_<dtype>_d<D>_r<R>", "paged_decode_matrix_<dtype>_d<D>_r<R>",
// "paged_decode_wide_<dtype>_d<D>_r<R>", "paged_decode_combine_<dtype>".
// The host builds the same strings in paged_planner.cpp (paged_*_kernel_name).
// Each expands to one string literal (token paste, then stringify).
#define FLASH_SDPA_PAGED_STR_(x) #x
#define FLASH_SDPA_PAGED_STR(x) FLASH_SDPA_PAGED_STR_(x)
#define FLASH_SDPA_PAGED_WRITE_NAME(TN) FLASH_SDPA_PAGED_STR(kv_paged_write_##TN)
#define FLASH_SDPA_PAGED_DECODE_NAME(TN, D, R) FLASH_SDPA_PAGED_STR(paged_decode_##TN##_d##D##_r##R)
#define FLASH_SDPA_PAGED_DECODE_MATRIX_NAME(TN, D, R) FLASH_SDPA_PAGED_STR(paged_decode_matrix_##TN##_d##D##_r##R)
#define FLASH_SDPA_PAGED_DECODE_WIDE_NAME(TN, D, R) FLASH_SDPA_PAGED_STR(paged_decode_wide_##TN##_d##D##_r##R)
#define FLASH_SDPA_PAGED_COMBINE_NAME(TN) FLASH_SDPA_PAGED_STR(paged_decode_combine_##TN)

// Threads per threadgroup, also used in [[max_total_threads_per_threadgroup(...)]] (macros: literal after cpp).
#define FLASH_SDPA_PAGED_WRITE_THREADS 256
#define FLASH_SDPA_PAGED_DECODE_THREADS 256
#define FLASH_SDPA_PAGED_COMBINE_THREADS 256

namespace flash_sdpa {
namespace paged {

// Threadgroup shapes (compile-time on both sides).
enum : fsdpa_i32 {
  kSimdWidth = 32,
  // kv_paged_write: one thread per element of one new token's (Hkv, D) slice.
  kWriteThreads = FLASH_SDPA_PAGED_WRITE_THREADS,
  // paged_decode_attention: 8 simdgroups; within a simdgroup, groups of lanes each stream their own keys (lanes
  // across D), and the simdgroups take turns over the split's key range (paged_decode_attention.h). 8 rather than 4:
  // a short context's keys spread over twice the simdgroups (half the dependent steps each), and a long one needs
  // half the splits for the same threads per core (fewer partials to combine); proxy figures in
  // tests/metal_cuda/RESULTS.md.
  kDecodeSimdgroups = 8,
  kDecodeThreads = FLASH_SDPA_PAGED_DECODE_THREADS,
  // paged_decode_combine: one threadgroup per output row (b, h, i); its threads read the splits in parallel:
  // kCombineFewSimdgroups up to kCombineFewPartials partials, kCombineSimdgroups above (the planner's choice; the
  // kernel reads it).
  kCombineSimdgroups = 8,
  kCombineFewSimdgroups = 4,
  kCombineFewPartials = 32,
  kCombineThreads = FLASH_SDPA_PAGED_COMBINE_THREADS,
  // Most split-K partials the combine kernel accepts (its weights live in threadgroup memory: 1 KB).
  kMaxSplits = 256,
  // Largest sq (query tokens per request) the decode kernel takes.
  kMaxSeqlenQ = 16,
};

// The decode's lane layout (paged_decode_attention<T, D, R>'s DecodeLayout), as functions of the head dim, the
// element bytes (sizeof(T)) and the row tile R: the kernel reads them at compile time, the planner for its step size.
// A key row is chunks of 16 bytes (8 when R > 4: fewer accumulators per lane).
constexpr fsdpa_i32 decode_chunk_bytes(fsdpa_i32 rows) { return rows <= 4 ? 16 : 8; }

// L, the lanes that read one key row: the power of two >= its chunks, at most 32. Two chunks per lane at R <= 2 (half
// the lanes per key row: each lane's log2 L shuffles per key and row then serve twice the multiply-adds; on the proxy
// MHA decode 1.3x, GQA 2 1.2x faster), one above (R x EPL accumulators per lane: at most 32).
constexpr fsdpa_i32 decode_row_lanes(fsdpa_i32 head_dim, fsdpa_i32 elem_bytes, fsdpa_i32 rows) {
  const fsdpa_i32 chunks = head_dim * elem_bytes / decode_chunk_bytes(rows);
  const fsdpa_i32 per_lane = rows <= 2 ? 2 : 1;
  const fsdpa_i32 needed = (chunks + per_lane - 1) / per_lane;
  return needed > 16 ? 32 : (needed > 8 ? 16 : (needed > 4 ? 8 : (needed > 2 ? 4 : 2)));
}

// U, the keys a lane group reads per step: ~32 bytes of K, as much of V, per lane in flight (2 keys at 16-byte
// chunks); R x U scores per lane. More per step costs registers, so fewer resident simdgroups: on the proxy 64 B was
// 1.1-1.3x slower than 32 B at every benchmarked shape (tests/metal_cuda/RESULTS.md). At R >= 8 a step keeps 16
// partial scores per lane (R = 8: 2 keys), not 32: the R x EPL accumulators already take 32 registers, and an Apple
// core spills rather than lowering occupancy. On the proxy 4 keys were within 2% (GQA 8 B=4 S=8192: 191 against
// 195 us, 122 against 118 registers).
constexpr fsdpa_i32 decode_group_keys(fsdpa_i32 head_dim, fsdpa_i32 elem_bytes, fsdpa_i32 rows) {
  const fsdpa_i32 chunk = decode_chunk_bytes(rows);
  const fsdpa_i32 lanes = decode_row_lanes(head_dim, elem_bytes, rows);
  const fsdpa_i32 chunks_per_lane = (head_dim * elem_bytes / chunk + lanes - 1) / lanes;
  const fsdpa_i32 in_flight = 32 / (chunks_per_lane * chunk);
  const fsdpa_i32 max_scores = rows >= 8 ? 16 : 32;  // R x U partial scores per lane
  const fsdpa_i32 u = in_flight < max_scores / rows ? in_flight : max_scores / rows;
  return u < 1 ? 1 : (u > 8 ? 8 : u);
}

// The matrix path: at R = 8 and 16 in 2-byte types at D = 64 and 128, a one-token decode (the 8 or 16 query heads of
// a GQA group) runs q.k and P.V as 8x8 simdgroup_matrix products over 8-key steps (K, then V, of the step staged
// through threadgroup memory), instead of per-lane dot products, a reduce-scatter and lane-local P.V: 122 instructions
// per key instead of 308 at D = 64, R = 8 (PTX). Proxy (H100, gpt-oss-20b 64/8, fp16): B = 1 12.6 -> 12.0 us at 256
// keys, 375.8 -> 297.2 at 131072; B = 8 32768 keys 760.0 -> 549.9. A simdgroup holds R / 8 row tiles and
// kDecodeMatrixColumns / (R / 8) columns of Q and O: 8 fragments of each at R = 8 and 16 alike, so its registers do not
// grow with R (an Apple core spills rather than lowering occupancy) and the tiles stay small in the 32 KB of
// threadgroup memory. The simdgroups of a key unit (decode_column_simdgroups) share each key step, each with its
// columns, and add their parts of the step's scores through threadgroup memory (one threadgroup barrier per step;
// Apple GPUs have no asynchronous copies, so every K/V byte passes through one simdgroup's registers into its tile
// either way). One simdgroup holding all 128 columns at R = 8 (16 fragments of Q and 16 of O beside the K / V chunks
// in flight) re-read Q from threadgroup memory every step and spilled on the proxy (B = 1 28/4 32768 keys 107.0 ->
// 116.3 us, B = 8 64/8 1502 -> 1384). The lane-local path at R = 16 (GQA 12 and 16) moved K/V at half the R = 8
// matrix path's rate on the proxy (Mistral-Large-2 96/8, B = 1 32768 keys: 416.6 us, 168 registers, one threadgroup
// per core).
constexpr fsdpa_i32 kDecodeMatrixKeys = 8;
constexpr fsdpa_i32 kDecodeMatrixColumns = 64;  // columns of Q and O per simdgroup at R = 8 (8 fragments)
constexpr bool decode_matrix_rows(fsdpa_i32 head_dim, fsdpa_i32 elem_bytes, fsdpa_i32 rows) {
  return (rows == 8 || rows == 16) && elem_bytes == 2 && (head_dim == 64 || head_dim == 128);
}

// Simdgroups that share one key step on the matrix path (kDecodeMatrixColumns / (R / 8) columns each: 2 at D = 128,
// R = 8; 2 at D = 64 and 4 at D = 128, R = 16), 1 elsewhere.
constexpr fsdpa_i32 decode_column_simdgroups(fsdpa_i32 head_dim, fsdpa_i32 elem_bytes, fsdpa_i32 rows) {
  return decode_matrix_rows(head_dim, elem_bytes, rows) ? head_dim / (kDecodeMatrixColumns / (rows / 8)) : 1;
}

// Whether a call runs the matrix path: a matrix configuration (decode_matrix_rows) at one query token. It has a
// kernel of its own ("paged_decode_matrix_*", FLASH_SDPA_PAGED_MATRIX_INSTANCES), so that its pipeline's registers
// are the matrix path's alone, not the larger of both paths'; several query tokens (their rows see different keys)
// run the lane-local "paged_decode_*" instance of the same configuration, with that path's steps and partials.
constexpr bool decode_runs_matrix(fsdpa_i32 head_dim, fsdpa_i32 elem_bytes, fsdpa_i32 rows, fsdpa_i32 seqlen_q) {
  return decode_matrix_rows(head_dim, elem_bytes, rows) && seqlen_q == 1;
}

// Keys one decode threadgroup covers per step: kDecodeSimdgroups x (32 / L lane groups x U keys each), or
// kDecodeMatrixKeys per decode_column_simdgroups on the matrix path. The planner sizes short splits in whole steps.
constexpr fsdpa_i32 decode_step_keys(fsdpa_i32 head_dim, fsdpa_i32 elem_bytes, fsdpa_i32 rows, fsdpa_i32 seqlen_q) {
  return decode_runs_matrix(head_dim, elem_bytes, rows, seqlen_q)
             ? kDecodeSimdgroups / decode_column_simdgroups(head_dim, elem_bytes, rows) * kDecodeMatrixKeys
             : kDecodeSimdgroups * (32 / decode_row_lanes(head_dim, elem_bytes, rows)) *
                   decode_group_keys(head_dim, elem_bytes, rows);
}

// The wide path (paged_decode_wide.h): a one-token call in 2-byte types at D = 64 or 128 whose splits are short
// enough for simdgroup partials (the planner's choice; any row tile) runs each threadgroup step on the whole
// threadgroup: every thread loads one piece of one key's K or V row into threadgroup memory, then each simdgroup takes
// one row over one part of the step's keys (decode_wide_partials parts per split). The other paths spend a one-step
// split on one chain per simdgroup (table entry, K/V, partial dots, shuffles across lanes, lane-group merge) over a
// few keys each; here a simdgroup's chain after the barrier is a dot product per key over 1-8 lanes, one softmax
// step and P.V from threadgroup memory. The keys of a threadgroup step are decode_step_keys' (the splits are the
// same as the other paths').
constexpr bool decode_runs_wide(fsdpa_i32 head_dim, fsdpa_i32 elem_bytes, fsdpa_i32 rows, fsdpa_i32 seqlen_q) {
  return seqlen_q == 1 && elem_bytes == 2 && (head_dim == 64 || head_dim == 128) && rows >= 1 && rows <= 16;
}

// Partials a wide split writes: one per key part (kDecodeSimdgroups / R below R = kDecodeSimdgroups, else 1).
constexpr fsdpa_i32 decode_wide_partials(fsdpa_i32 rows) {
  return rows < kDecodeSimdgroups ? kDecodeSimdgroups / rows : 1;
}

}  // namespace paged
}  // namespace flash_sdpa

// [[buffer(i)]] and [[function_constant(i)]] indices: macros, so that attribute arguments are plain literals after
// preprocessing, on the Metal compiler and on the emulator alike. Unused optional buffers are bound to a dummy tensor;
// function constants gate every use.
#define FLASH_SDPA_WRITE_BUF_K_NEW 0          // T [B, sk_new, Hkv, D]
#define FLASH_SDPA_WRITE_BUF_V_NEW 1          // T [B, sk_new, Hkv, D]
#define FLASH_SDPA_WRITE_BUF_K_CACHE 2        // T [num_blocks, block_size, Hkv, D] (a view: bound at its offset)
#define FLASH_SDPA_WRITE_BUF_V_CACHE 3        // T [num_blocks, block_size, Hkv, D]
#define FLASH_SDPA_WRITE_BUF_BLOCK_TABLE 4    // int32 [B, max_blocks_per_seq]
#define FLASH_SDPA_WRITE_BUF_CACHE_SEQLENS 5  // int32 [B], length before the new tokens; < 0: padding, skipped
#define FLASH_SDPA_WRITE_BUF_PARAMS 6         // KVPagedWriteParams

#define FLASH_SDPA_DECODE_BUF_Q 0               // T [B, sq, H, D]
#define FLASH_SDPA_DECODE_BUF_K_CACHE 1         // T [num_blocks, block_size, Hkv, D]
#define FLASH_SDPA_DECODE_BUF_V_CACHE 2         // T [num_blocks, block_size, Hkv, D]
#define FLASH_SDPA_DECODE_BUF_BLOCK_TABLE 3     // int32 [B, max_blocks_per_seq]
#define FLASH_SDPA_DECODE_BUF_CACHE_SEQLENS 4   // int32 [B]
#define FLASH_SDPA_DECODE_BUF_OUT 5             // T [B, sq, H, D] contiguous (unsplit)
#define FLASH_SDPA_DECODE_BUF_LSE 6             // float [B, H, sq] contiguous (unsplit, FC_DECODE_WRITE_LSE)
#define FLASH_SDPA_DECODE_BUF_ALIBI 7           // float, slope of (b, h) at b * opt.alibi_batch_stride + h (FC_ALIBI)
#define FLASH_SDPA_DECODE_BUF_SINKS 8           // float [H] sink logits (unsplit, FC_SINKS)
#define FLASH_SDPA_DECODE_BUF_O_PARTIAL 9       // float [splits, B, H, sq, D] unnormalised partial outputs (split)
#define FLASH_SDPA_DECODE_BUF_ML_PARTIAL 10     // float [splits, B, H, sq, 2]: (max, sum of exp) per split (split)
#define FLASH_SDPA_DECODE_BUF_PARAMS 11         // PagedDecodeParams
#define FLASH_SDPA_DECODE_BUF_CU_SEQLENS_Q 12   // int32 [B + 1] (FC_VARLEN): query rows of sequence b
#define FLASH_SDPA_DECODE_BUF_CU_SEQLENS_K 13   // int32 [B + 1] (FC_VARLEN): key rows of sequence b
#define FLASH_SDPA_DECODE_BUF_CACHE_LEFTPAD 14  // int32 [B] (FC_DECODE_LEFTPAD): the cache row's first key slot

#define FLASH_SDPA_COMBINE_BUF_O_PARTIAL 0     // float [splits, B, H, sq, D]
#define FLASH_SDPA_COMBINE_BUF_ML_PARTIAL 1    // float [splits, B, H, sq, 2]
#define FLASH_SDPA_COMBINE_BUF_SINKS 2         // float [H] (FC_SINKS)
#define FLASH_SDPA_COMBINE_BUF_OUT 3           // T [B, sq, H, D] contiguous
#define FLASH_SDPA_COMBINE_BUF_LSE 4           // float [B, H, sq] (FC_DECODE_WRITE_LSE)
#define FLASH_SDPA_COMBINE_BUF_PARAMS 5        // PagedCombineParams
#define FLASH_SDPA_COMBINE_BUF_CU_SEQLENS_Q 6  // int32 [B + 1] (FC_VARLEN)

// bool function constants; part of the pipeline-cache key, not of the kernel name. None depends on the split count
// (a run-time value, num_splits > 1 writes partials): a growing context never needs a new pipeline. Both kernels read
// the options' (attention_options.h): FLASH_SDPA_FC_VARLEN (packed K/V [total_k, Hkv, D], q / out / LSE rows from
// cu_seqlens), _SOFTCAP, _ALIBI, _SINKS (the decode applies the sinks when unsplit, the combine when split); and
#define FLASH_SDPA_FC_DECODE_WRITE_LSE 8   // write the LSE (the decode when unsplit, the combine when split)
#define FLASH_SDPA_FC_DECODE_KV_ALIGNED 9  // K/V strides and offsets are multiples of 16 bytes: vector loads
#define FLASH_SDPA_FC_DECODE_LEFTPAD 10    // keys start at slot cache_leftpad[b] (FlashAttention-2's cache_leftpad)

namespace flash_sdpa {
namespace paged {

// kv_paged_write: grid (ceil(Hkv * D / kWriteThreads), sk_new, B), kWriteThreads threads.
// New token i of request b lands at slot t = cache_seqlens[b] + i: block block_table[b, t / block_size], row
// t % block_size. Rows with cache_seqlens < 0, slots past the table and block ids outside [0, num_blocks) are skipped.
struct KVPagedWriteParams {
  fsdpa_i64 k_new_stride_b;  // k_new strides (B, sk_new, Hkv, D = 1), elements
  fsdpa_i64 k_new_stride_s;
  fsdpa_i64 k_new_stride_h;
  fsdpa_i64 v_new_stride_b;  // v_new strides, elements (transformers may pass k and v with different layouts)
  fsdpa_i64 v_new_stride_s;
  fsdpa_i64 v_new_stride_h;
  fsdpa_i64 k_cache_stride_block;  // k_cache strides (num_blocks, block_size, Hkv, D = 1), elements
  fsdpa_i64 k_cache_stride_slot;
  fsdpa_i64 k_cache_stride_h;
  fsdpa_i64 v_cache_stride_block;  // v_cache strides, elements
  fsdpa_i64 v_cache_stride_slot;
  fsdpa_i64 v_cache_stride_h;
  fsdpa_i64 block_table_stride_b;  // block_table row stride, elements (int32)
  fsdpa_i32 batch;                 // B: rows of block_table / cache_seqlens / k_new
  fsdpa_i32 seqlen_new;            // sk_new: new tokens per request
  fsdpa_i32 num_kv_heads;          // Hkv
  fsdpa_i32 head_dim;              // D
  fsdpa_i32 block_size;            // slots per block (>= 1)
  fsdpa_i32 num_blocks;            // blocks in each cache view
  fsdpa_i32 max_blocks_per_seq;    // block_table columns
  fsdpa_i32 pad0;
};

// paged_decode_attention<T, D, R>: grid (num_splits, Hkv * row_blocks, B), kDecodeThreads threads.
// Paged mode: request b has sk = cache_seqlens[b] + seqlen_new keys (clamped to the table capacity
// max_blocks_per_seq * block_size), key t at block block_table[b, t / block_size], slot t % block_size; keys whose
// block id is outside [0, num_blocks) are masked. Varlen mode (FC_VARLEN): sequence b has the keys at rows
// cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1 of k [total_k, Hkv, D] (both clamped to [0, total_k]) and one query, row
// cu_seqlens_q[b] of q [total_q, H, D] (sq = 1); a sequence with no query row in [0, total_q) is skipped (nothing
// written). Query i of head h sees key j when lo(i) <= j <= hi(i) (window below). A row with no visible key
// outputs 0 and LSE -inf.
struct PagedDecodeParams {
  fsdpa_i64 q_stride_b;  // q strides (B, sq, H, D = 1), elements; varlen: q (total_q, H, D = 1) uses s and h
  fsdpa_i64 q_stride_s;
  fsdpa_i64 q_stride_h;
  fsdpa_i64 k_stride_block;  // k_cache strides (num_blocks, block_size, Hkv, D = 1), elements; varlen: k (total_k,
  fsdpa_i64 k_stride_slot;   //   Hkv, D = 1) uses slot (row) and h
  fsdpa_i64 k_stride_h;
  fsdpa_i64 v_stride_block;  // v_cache strides (num_blocks, block_size, Hkv, D = 1), elements
  fsdpa_i64 v_stride_slot;
  fsdpa_i64 v_stride_h;
  fsdpa_i64 block_table_stride_b;  // elements (int32)
  fsdpa_i32 batch;                 // B
  fsdpa_i32 seqlen_q;              // sq, 1..kMaxSeqlenQ
  fsdpa_i32 num_heads;             // H (query heads)
  fsdpa_i32 num_kv_heads;          // Hkv; H % Hkv == 0, query head h reads KV head h / (H / Hkv)
  fsdpa_i32 head_dim;              // D; equals the kernel's template D
  fsdpa_i32 row_blocks;            // ceil(group * sq / R), R the kernel's row tile
  fsdpa_i32 block_size;            // slots per block (>= 1)
  fsdpa_i32 num_blocks;            // blocks in each cache view
  fsdpa_i32 max_blocks_per_seq;    // block_table columns
  fsdpa_i32 seqlen_new;            // tokens appended by kv_paged_write this call (attention covers them)
  fsdpa_i32 num_splits;            // split-K partials per (b, Hkv, row block); 1 = unsplit
  fsdpa_i32 total_q;               // varlen: rows of q / out (LSE is [H, total_q]); else 0
  fsdpa_i32 total_k;               // varlen: rows of k / v; else 0
  fsdpa_i32 simdgroup_partials;    // split mode: 1 = each simdgroup writes its own partial (the lane-local path:
                                   // num_splits x kDecodeSimdgroups for the combine; the wide kernel, which takes
                                   // only this mode: num_splits x decode_wide_partials); 0 = the threadgroup merges
                                   // them (the matrix path always)
  fsdpa_i32 cache_row_is_request;  // 1: request b's keys are row b of a contiguous cache (one block of block_size
                                   // slots; block_table is not read, max_blocks_per_seq = 1); 0: block_table
  fsdpa_i32 fixed_seqlen;          // >= 0: cache_seqlens[b] of every request (cache_seqlens is not read); -1: read
  OptionParams opt;                // scale, softcap, window, ALiBi stride
};

// paged_decode_combine: grid (B * H * sq), kCombineFewSimdgroups x 32 threads (<= kCombineFewPartials partials) or
// kCombineThreads.
struct PagedCombineParams {
  fsdpa_i32 batch;       // B
  fsdpa_i32 seqlen_q;    // sq
  fsdpa_i32 num_heads;   // H
  fsdpa_i32 head_dim;    // D
  fsdpa_i32 num_splits;  // partials per row, <= kMaxSplits
  fsdpa_i32 total_q;     // varlen (FC_VARLEN): rows of out; LSE is [H, total_q]
};

// Layout pins: the host and the MSL compiler must agree byte for byte.
static_assert(sizeof(KVPagedWriteParams) == 136, "KVPagedWriteParams layout changed: no padding");
static_assert(__builtin_offsetof(KVPagedWriteParams, batch) == 104, "int64 strides first, then int32 counts");
static_assert(__builtin_offsetof(KVPagedWriteParams, max_blocks_per_seq) == 128, "write params: count offsets");
static_assert(sizeof(PagedDecodeParams) == 80 + 16 * 4 + sizeof(OptionParams), "PagedDecodeParams: no padding");
static_assert(__builtin_offsetof(PagedDecodeParams, batch) == 80, "int64 strides first, then int32 counts");
static_assert(__builtin_offsetof(PagedDecodeParams, opt) == 80 + 16 * 4, "the options last");
static_assert(sizeof(PagedCombineParams) == 24, "PagedCombineParams layout changed: no padding");
static_assert(kDecodeThreads == kDecodeSimdgroups * kSimdWidth, "decode: whole simdgroups");
static_assert(kCombineThreads == kCombineSimdgroups * kSimdWidth, "combine: whole simdgroups");
static_assert(kDecodeThreads <= 1024 && kCombineThreads <= 1024 && kWriteThreads <= 1024, "Metal thread limit");

}  // namespace paged
}  // namespace flash_sdpa
