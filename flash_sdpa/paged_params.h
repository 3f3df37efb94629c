// Parameters of the paged KV-cache kernels (kv_paged_write, paged_decode_attention, paged_decode_combine).
//
// One definition, compiled as MSL (the .metal files) and as C++ (paged_planner.cpp; tests/test_paged_kernels.py
// mirrors it with ctypes and checks the size): fixed-width types, int64 strides, int32 counts, the layout pinned
// by static_asserts on both sides. Strides are in elements of the tensor they describe, axis order (A, B, ..., D = 1).
#pragma once

#if defined(__METAL_VERSION__)
#include <metal_stdlib>
namespace flash_sdpa {
namespace paged {
typedef int i32;
typedef long i64;
typedef float f32;
}  // namespace paged
}  // namespace flash_sdpa
#else
#include <cstdint>
namespace flash_sdpa {
namespace paged {
typedef int32_t i32;
typedef int64_t i64;
typedef float f32;
}  // namespace paged
}  // namespace flash_sdpa
#endif

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

// Kernel names: "kv_paged_write_<dtype>", "paged_decode_<dtype>_d<D>_r<R>", "paged_decode_combine_<dtype>".
// The host builds the same strings in paged_planner.cpp (paged_*_kernel_name).
// Each expands to one string literal (token paste, then stringify).
#define FLASH_SDPA_PAGED_STR_(x) #x
#define FLASH_SDPA_PAGED_STR(x) FLASH_SDPA_PAGED_STR_(x)
#define FLASH_SDPA_PAGED_WRITE_NAME(TN) FLASH_SDPA_PAGED_STR(kv_paged_write_##TN)
#define FLASH_SDPA_PAGED_DECODE_NAME(TN, D, R) FLASH_SDPA_PAGED_STR(paged_decode_##TN##_d##D##_r##R)
#define FLASH_SDPA_PAGED_COMBINE_NAME(TN) FLASH_SDPA_PAGED_STR(paged_decode_combine_##TN)

// Threads per threadgroup, also used in [[max_total_threads_per_threadgroup(...)]] (macros: literal after cpp).
#define FLASH_SDPA_PAGED_WRITE_THREADS 256
#define FLASH_SDPA_PAGED_DECODE_THREADS 256
#define FLASH_SDPA_PAGED_COMBINE_THREADS 128

namespace flash_sdpa {
namespace paged {

// Threadgroup shapes (compile-time on both sides).
enum : i32 {
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
  // paged_decode_combine: one threadgroup per output row (b, h, i); its threads read the splits in parallel.
  kCombineSimdgroups = 4,
  kCombineThreads = FLASH_SDPA_PAGED_COMBINE_THREADS,
  // Most split-K partials the combine kernel accepts (its weights live in threadgroup memory: 1 KB).
  kMaxSplits = 256,
  // Largest sq (query tokens per request) the decode kernel takes.
  kMaxSeqlenQ = 16,
};

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
#define FLASH_SDPA_DECODE_BUF_LSE 6             // float [B, H, sq] contiguous (unsplit, FC_WRITE_LSE)
#define FLASH_SDPA_DECODE_BUF_ALIBI 7           // float, slope of (b, h) at b * alibi_stride_b + h (FC_ALIBI)
#define FLASH_SDPA_DECODE_BUF_SINKS 8           // float [H] sink logits (unsplit, FC_SINKS)
#define FLASH_SDPA_DECODE_BUF_O_PARTIAL 9       // float [splits, B, H, sq, D] unnormalised partial outputs (split)
#define FLASH_SDPA_DECODE_BUF_ML_PARTIAL 10     // float [splits, B, H, sq, 2]: (max, sum of exp) per split (split)
#define FLASH_SDPA_DECODE_BUF_PARAMS 11         // PagedDecodeParams
#define FLASH_SDPA_DECODE_BUF_CU_SEQLENS_Q 12   // int32 [B + 1] (FC_DECODE_VARLEN): query rows of sequence b
#define FLASH_SDPA_DECODE_BUF_CU_SEQLENS_K 13   // int32 [B + 1] (FC_DECODE_VARLEN): key rows of sequence b
#define FLASH_SDPA_DECODE_BUF_CACHE_LEFTPAD 14  // int32 [B] (FC_DECODE_LEFTPAD): the cache row's first key slot

#define FLASH_SDPA_COMBINE_BUF_O_PARTIAL 0     // float [splits, B, H, sq, D]
#define FLASH_SDPA_COMBINE_BUF_ML_PARTIAL 1    // float [splits, B, H, sq, 2]
#define FLASH_SDPA_COMBINE_BUF_SINKS 2         // float [H] (FC_COMBINE_SINKS)
#define FLASH_SDPA_COMBINE_BUF_OUT 3           // T [B, sq, H, D] contiguous
#define FLASH_SDPA_COMBINE_BUF_LSE 4           // float [B, H, sq] (FC_COMBINE_WRITE_LSE)
#define FLASH_SDPA_COMBINE_BUF_PARAMS 5        // PagedCombineParams
#define FLASH_SDPA_COMBINE_BUF_CU_SEQLENS_Q 6  // int32 [B + 1] (FC_COMBINE_VARLEN)

// bool function constants; part of the pipeline-cache key, not of the kernel name. None depends on the split count
// (a run-time value, num_splits > 1 writes partials): a growing context never needs a new pipeline.
#define FLASH_SDPA_FC_DECODE_VARLEN 0     // packed K/V [total_k, Hkv, D] and q/out rows from cu_seqlens (varlen decode)
#define FLASH_SDPA_FC_DECODE_WRITE_LSE 1  // write the LSE (when unsplit; the combine writes it when split)
#define FLASH_SDPA_FC_DECODE_ALIBI 2      // add -slope * |i + sk - sq - j|
#define FLASH_SDPA_FC_DECODE_SINKS 3  // sink logits join the denominator (unsplit; the combine applies them when split)
#define FLASH_SDPA_FC_DECODE_SOFTCAP 4  // s = softcap * tanh(s / softcap)
#define FLASH_SDPA_FC_COMBINE_WRITE_LSE 5
#define FLASH_SDPA_FC_COMBINE_SINKS 6
#define FLASH_SDPA_FC_DECODE_KV_ALIGNED 7  // K/V strides and offsets are multiples of 16 bytes: vector loads
#define FLASH_SDPA_FC_COMBINE_VARLEN 8     // out / LSE rows from cu_seqlens_q (varlen decode)
#define FLASH_SDPA_FC_DECODE_LEFTPAD 9     // keys start at slot cache_leftpad[b] (FlashAttention-2's cache_leftpad)

namespace flash_sdpa {
namespace paged {

// kv_paged_write: grid (ceil(Hkv * D / kWriteThreads), sk_new, B), kWriteThreads threads.
// New token i of request b lands at slot t = cache_seqlens[b] + i: block block_table[b, t / block_size], row
// t % block_size. Rows with cache_seqlens < 0, slots past the table and block ids outside [0, num_blocks) are skipped.
struct KVPagedWriteParams {
  i64 k_new_stride_b;  // k_new strides (B, sk_new, Hkv, D = 1), elements
  i64 k_new_stride_s;
  i64 k_new_stride_h;
  i64 v_new_stride_b;  // v_new strides, elements (transformers may pass k and v with different layouts)
  i64 v_new_stride_s;
  i64 v_new_stride_h;
  i64 k_cache_stride_block;  // k_cache strides (num_blocks, block_size, Hkv, D = 1), elements
  i64 k_cache_stride_slot;
  i64 k_cache_stride_h;
  i64 v_cache_stride_block;  // v_cache strides, elements
  i64 v_cache_stride_slot;
  i64 v_cache_stride_h;
  i64 block_table_stride_b;  // block_table row stride, elements (int32)
  i32 batch;                 // B: rows of block_table / cache_seqlens / k_new
  i32 seqlen_new;            // sk_new: new tokens per request
  i32 num_kv_heads;          // Hkv
  i32 head_dim;              // D
  i32 block_size;            // slots per block (>= 1)
  i32 num_blocks;            // blocks in each cache view
  i32 max_blocks_per_seq;    // block_table columns
  i32 pad0;
};

// paged_decode_attention<T, D, R>: grid (num_splits, Hkv * row_blocks, B), kDecodeThreads threads.
// Paged mode: request b has sk = cache_seqlens[b] + seqlen_new keys (clamped to the table capacity
// max_blocks_per_seq * block_size), key t at block block_table[b, t / block_size], slot t % block_size; keys whose
// block id is outside [0, num_blocks) are masked. Varlen mode (FC_DECODE_VARLEN): sequence b has the keys at rows
// cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1 of k [total_k, Hkv, D] (both clamped to [0, total_k]) and one query, row
// cu_seqlens_q[b] of q [total_q, H, D] (sq = 1); a sequence with no query row in [0, total_q) is skipped (nothing
// written). Query i of head h sees key j when lo(i) <= j <= hi(i) (window below). A row with no visible key
// outputs 0 and LSE -inf.
struct PagedDecodeParams {
  i64 q_stride_b;  // q strides (B, sq, H, D = 1), elements; varlen: q (total_q, H, D = 1) uses s and h
  i64 q_stride_s;
  i64 q_stride_h;
  i64 k_stride_block;  // k_cache strides (num_blocks, block_size, Hkv, D = 1), elements; varlen: k (total_k,
  i64 k_stride_slot;   //   Hkv, D = 1) uses slot (row) and h
  i64 k_stride_h;
  i64 v_stride_block;  // v_cache strides (num_blocks, block_size, Hkv, D = 1), elements
  i64 v_stride_slot;
  i64 v_stride_h;
  i64 block_table_stride_b;  // elements (int32)
  i32 batch;                 // B
  i32 seqlen_q;              // sq, 1..kMaxSeqlenQ
  i32 num_heads;             // H (query heads)
  i32 num_kv_heads;          // Hkv; H % Hkv == 0, query head h reads KV head h / (H / Hkv)
  i32 head_dim;              // D; equals the kernel's template D
  i32 row_blocks;            // ceil(group * sq / R), R the kernel's row tile
  i32 block_size;            // slots per block (>= 1)
  i32 num_blocks;            // blocks in each cache view
  i32 max_blocks_per_seq;    // block_table columns
  i32 seqlen_new;            // tokens appended by kv_paged_write this call (attention covers them)
  i32 num_splits;            // split-K partials per (b, Hkv, row block); 1 = unsplit
  i32 window_left;           // keys j >= i + sk - sq - left; -1 = unbounded
  i32 window_right;          // keys j <= i + sk - sq + right; -1 = unbounded (causal: 0)
  i32 alibi_stride_b;        // alibi slopes batch stride (0 for [H], H for [B, H]), elements
  i32 total_q;               // varlen: rows of q / out (LSE is [H, total_q]); else 0
  i32 total_k;               // varlen: rows of k / v; else 0
  f32 scale;                 // softmax scale on q.k
  f32 softcap;               // > 0 when FC_DECODE_SOFTCAP
};

// paged_decode_combine: grid (B * H * sq), kCombineThreads threads.
struct PagedCombineParams {
  i32 batch;       // B
  i32 seqlen_q;    // sq
  i32 num_heads;   // H
  i32 head_dim;    // D
  i32 num_splits;  // partials per row, <= kMaxSplits
  i32 total_q;     // varlen (FC_COMBINE_VARLEN): rows of out; LSE is [H, total_q]
};

// Layout pins: the host, the MSL compiler and the ctypes mirror in the tests must agree byte for byte.
static_assert(sizeof(KVPagedWriteParams) == 136, "KVPagedWriteParams layout changed: update the ctypes mirror");
static_assert(__builtin_offsetof(KVPagedWriteParams, batch) == 104, "int64 strides first, then int32 counts");
static_assert(__builtin_offsetof(KVPagedWriteParams, max_blocks_per_seq) == 128, "write params: count offsets");
static_assert(sizeof(PagedDecodeParams) == 152, "PagedDecodeParams layout changed: update the ctypes mirror");
static_assert(__builtin_offsetof(PagedDecodeParams, batch) == 80, "int64 strides first, then int32 counts");
static_assert(__builtin_offsetof(PagedDecodeParams, scale) == 144, "decode params: float tail offset");
static_assert(sizeof(PagedCombineParams) == 24, "PagedCombineParams layout changed: update the ctypes mirror");
static_assert(kDecodeThreads == kDecodeSimdgroups * kSimdWidth, "decode: whole simdgroups");
static_assert(kCombineThreads == kCombineSimdgroups * kSimdWidth, "combine: whole simdgroups");
static_assert(kDecodeThreads <= 1024 && kCombineThreads <= 1024 && kWriteThreads <= 1024, "Metal thread limit");

}  // namespace paged
}  // namespace flash_sdpa
