// Parameters of the varlen / dense flash-attention kernel (attention_varlen.metal), shared by MSL and host C++.
//
// One definition, compiled as both languages: `__METAL_VERSION__` picks the scalar spellings, the static_asserts
// at the bottom pin the layout on both sides. The host fills VarlenParams once per call and sends it with one
// setBytes at FLASH_SDPA_VARLEN_BUFFER_PARAMS.
#pragma once

#include "attention_options.h"  // OptionParams, the options' function constants
#include "params_types.h"

namespace flash_sdpa {

// [[buffer(i)]] of the varlen kernel. Optional inputs are gated by the function constants below; when a feature is
// off the host binds a placeholder that the kernel never touches. Macros, not enums: attribute arguments must be
// integer literals after preprocessing for the Metal-on-CPU front end.
#define FLASH_SDPA_VARLEN_BUFFER_Q 0             // T, (batch, row, head, d = 1) through the q_* strides
#define FLASH_SDPA_VARLEN_BUFFER_K 1             // T, (batch, row, kv head, d = 1) through the k_* strides
#define FLASH_SDPA_VARLEN_BUFFER_V 2             // T, (batch, row, kv head, d = 1) through the v_* strides
#define FLASH_SDPA_VARLEN_BUFFER_OUT 3           // T, (batch, row, head, d = 1) through the o_* strides
#define FLASH_SDPA_VARLEN_BUFFER_LSE 4           // float, (batch, head, row = 1) through the lse_* strides
#define FLASH_SDPA_VARLEN_BUFFER_CU_SEQLENS_Q 5  // int32 [batch + 1], prefix sums of query lengths (varlen only)
#define FLASH_SDPA_VARLEN_BUFFER_CU_SEQLENS_K 6  // int32 [batch + 1], prefix sums of key lengths (varlen only)
#define FLASH_SDPA_VARLEN_BUFFER_ALIBI 7         // float, slope of (batch, head) at b * alibi_batch_stride + h
#define FLASH_SDPA_VARLEN_BUFFER_SINKS 8         // float [heads], one extra logit per head in the denominator
#define FLASH_SDPA_VARLEN_BUFFER_PARAMS 9        // VarlenParams (setBytes)
#define FLASH_SDPA_VARLEN_BUFFER_BLOCK_TABLE 10  // int32 [batch, max_blocks], paged K/V only

// [[function_constant(i)]] of the varlen kernel (all bool; they key the pipeline cache next to the kernel name): the
// options' (attention_options.h: FLASH_SDPA_FC_VARLEN, _SOFTCAP, _ALIBI, _SINKS) and
#define FLASH_SDPA_FC_VARLEN_PAGED 8  // K/V are paged caches read through the block table (varlen only)

// VarlenParams::aligned_rows: q / k / v whose every row starts at a multiple of 4 elements (storage offset and every
// stride but the head dim's, block stride included, multiples of 4); their rows are read 4 elements at a time.
#define FLASH_SDPA_ALIGNED_Q 1
#define FLASH_SDPA_ALIGNED_K 2
#define FLASH_SDPA_ALIGNED_V 4

// Threads per threadgroup, a literal for [[max_total_threads_per_threadgroup]].
#define FLASH_SDPA_VARLEN_THREADS 128

// Tile shape. Every threadgroup has 4 simdgroups of 32 threads; simdgroup s owns query rows [8s, 8s + 8) of a
// 32-row query tile. K and V tiles are staged in the input's type (elem_bytes: 2 for half / bfloat, 4 for float) and
// multiplied as fragments of that type into float accumulators: half the threadgroup memory and fragment registers
// of float staging, and the input's own values (staging in float added no precision). The key tile is the largest
// of 32/16/8 rows whose staging region (varlen_kv_bytes), the 8-row score strips (float) and probability strips (the
// input's type), the 8x8 diagonal scratch of every simdgroup, two words per query row (bad flag, output scale), the
// poison bits and the paged key offsets (two 64-bit per key) fit in 32 KB of threadgroup memory. The output is
// staged as float through the staging region, so that region is at least one 32-row x 32-column float block.
FSDPA_CONSTANT fsdpa_i32 kVarlenSimdgroups = 4;
FSDPA_CONSTANT fsdpa_i32 kVarlenThreads = FLASH_SDPA_VARLEN_THREADS;
FSDPA_CONSTANT fsdpa_i32 kVarlenBlockQ = 8 * kVarlenSimdgroups;  // 32 query rows per threadgroup
FSDPA_CONSTANT fsdpa_i32 kVarlenMaxThreadgroupBytes = 32768;
static_assert(kVarlenThreads == 32 * kVarlenSimdgroups, "one simdgroup per 8 query rows");

// Non-finite V: a bit per (query row, head-dim column) of the tile, set where the row sees a non-finite V element.
constexpr fsdpa_i32 varlen_poison_words(fsdpa_i32 head_dim) { return (head_dim + 31) / 32; }

// The staging layout of the key loop. Register layout (every head dim but one): Q in simdgroup_matrix registers, K
// and V tiles side by side. Resident-Q layout (D = 256, 2-byte types): the 32-row Q tile stays in threadgroup memory
// for the whole key loop (16 KB) and is read back per product, and one key tile holds K, then V, in turn (8 KB at 16
// keys): Q's 32 fragments (of 254 registers) leave the registers, which Apple would spill rather than give up
// occupancy, and 16-key tiles still fit 32 KB (Q beside side-by-side K/V tiles allowed only 8 keys). Float keeps the
// register layout: its Q tile alone is 32 KB.
constexpr bool varlen_q_resident(fsdpa_i32 head_dim, fsdpa_i32 elem_bytes) {
  return head_dim == 256 && elem_bytes == 2;
}

// Bytes of the staging region, in the input's type: register layout, K then V (Q and the float output are staged
// through it); resident Q, Q [32][D] then the one key tile (the float output is staged through it).
constexpr fsdpa_i32 varlen_kv_bytes(fsdpa_i32 head_dim, fsdpa_i32 block_k, fsdpa_i32 elem_bytes) {
  return (varlen_q_resident(head_dim, elem_bytes) ? (kVarlenBlockQ + block_k) * head_dim : 2 * block_k * head_dim) *
         elem_bytes;
}

constexpr fsdpa_i32 varlen_threadgroup_bytes(fsdpa_i32 head_dim, fsdpa_i32 block_k, fsdpa_i32 elem_bytes) {
  return varlen_kv_bytes(head_dim, block_k, elem_bytes) + kVarlenBlockQ * block_k * (4 + elem_bytes) +
         4 * (kVarlenSimdgroups * 64 + 2 * kVarlenBlockQ + kVarlenBlockQ * varlen_poison_words(head_dim) +
              kVarlenSimdgroups) +
         16 * block_k;
}

constexpr fsdpa_i32 varlen_block_k(fsdpa_i32 head_dim, fsdpa_i32 elem_bytes) {
  return varlen_threadgroup_bytes(head_dim, 32, elem_bytes) <= kVarlenMaxThreadgroupBytes   ? 32
         : varlen_threadgroup_bytes(head_dim, 16, elem_bytes) <= kVarlenMaxThreadgroupBytes ? 16
                                                                                            : 8;
}

// Wide head dims (flash_attn_varlen_wide, D > 256): 8-row query tiles whose 4 simdgroups split the head dim, and one
// 8-key staging tile that holds K, then V (the input's type), and the float output at the end (so it is sized for
// 8 float rows).
FSDPA_CONSTANT fsdpa_i32 kVarlenWideBlockQ = 8;
FSDPA_CONSTANT fsdpa_i32 kVarlenWideBlockK = 8;

constexpr fsdpa_i32 varlen_wide_threadgroup_bytes(fsdpa_i32 head_dim, fsdpa_i32 elem_bytes) {
  return 4 * kVarlenWideBlockQ * head_dim + kVarlenWideBlockQ * kVarlenWideBlockK * elem_bytes +
         4 * (kVarlenSimdgroups * kVarlenWideBlockQ * kVarlenWideBlockK + 64 + 2 * kVarlenWideBlockQ +
              kVarlenWideBlockQ * varlen_poison_words(head_dim) + kVarlenSimdgroups + 1) +
         16 * kVarlenWideBlockK;
}

// Query rows per tile (the grid's z axis counts tiles of this many rows).
constexpr fsdpa_i32 varlen_block_q(fsdpa_i32 head_dim) { return head_dim > 256 ? kVarlenWideBlockQ : kVarlenBlockQ; }

// The forward on Metal 4 tensor ops (attention_tensor_ops.h, flash_attn_varlen_tops; the planner uses these for its
// grid and routing for its choice): 64-row query tiles, one 16-row execution_simdgroup operation per simdgroup (Apple's
// row reductions and left input cooperative tensors require one SIMD group). Threadgroup memory (32 KB): the Q tile
// (64 x D, the input's type) where it fits, K and V side by side (BK keys each), a P tile (the input's type) for a GPU
// that cannot turn a destination into a left input, and per-row words: visible keys (2), output factor, bad flag, two
// broadcast slots; the poison bits, a flag per simdgroup and the paged key offsets.
FSDPA_CONSTANT fsdpa_i32 kTopsBlockQ = 64;
FSDPA_CONSTANT fsdpa_i32 kTopsSimdgroupRows = 16;
static_assert(kTopsBlockQ == kTopsSimdgroupRows * kVarlenSimdgroups, "one 16-row operation per simdgroup");

constexpr fsdpa_i32 tops_threadgroup_bytes(fsdpa_i32 head_dim, fsdpa_i32 block_k, fsdpa_i32 elem_bytes, bool q_staged) {
  return ((q_staged ? kTopsBlockQ : 0) + 2 * block_k) * head_dim * elem_bytes + kTopsBlockQ * block_k * elem_bytes +
         4 * (6 * kTopsBlockQ + kTopsBlockQ * varlen_poison_words(head_dim) + kVarlenSimdgroups) + 16 * block_k;
}

// Q in threadgroup memory where the tile fits beside 16-key K / V tiles (read once per query tile); else each
// simdgroup's operation reads its Q rows from device memory on every key tile (half / bfloat at D = 256, float from
// D = 96), as MLX's NAX kernel does at every head dim.
constexpr bool tops_q_staged(fsdpa_i32 head_dim, fsdpa_i32 elem_bytes) {
  return tops_threadgroup_bytes(head_dim, 16, elem_bytes, true) <= kVarlenMaxThreadgroupBytes;
}

// Keys per tile: 32 where they fit, else 16 (matmul2d shapes in multiples of 16).
constexpr fsdpa_i32 tops_block_k(fsdpa_i32 head_dim, fsdpa_i32 elem_bytes) {
  return tops_threadgroup_bytes(head_dim, 32, elem_bytes, tops_q_staged(head_dim, elem_bytes)) <=
                 kVarlenMaxThreadgroupBytes
             ? 32
             : 16;
}

// D-split (flash_attn_varlen_tops_dsplit): half / bfloat above D = 128 (256 here) on 8 simdgroups, two per 16 rows,
// each with half of the head dim of O (16 x 128 floats, as at D = 128: 16 x 256 would be 128 floats a thread), the
// partial S of each half exchanged through a float tile; 16-key K / V tiles, Q read from device memory once per query
// tile into each simdgroup's left input.
#define FLASH_SDPA_TOPS_SPLIT_THREADS 256
FSDPA_CONSTANT fsdpa_i32 kTopsSplitBlockK = 16;

constexpr bool tops_split_d(fsdpa_i32 head_dim, fsdpa_i32 elem_bytes) { return elem_bytes == 2 && head_dim > 128; }

constexpr fsdpa_i32 tops_split_threadgroup_bytes(fsdpa_i32 head_dim, fsdpa_i32 elem_bytes) {
  return 2 * kTopsSplitBlockK * head_dim * elem_bytes + 2 * kTopsBlockQ * kTopsSplitBlockK * 4 +
         4 * (2 * kTopsBlockQ + 2 * kTopsBlockQ + kTopsBlockQ + 4 * kTopsBlockQ +
              kTopsBlockQ * varlen_poison_words(head_dim) + 2 * kVarlenSimdgroups) +
         2 * 16 * kTopsSplitBlockK;  // paged key offsets of two key tiles
}

// Threads per threadgroup of the tensor-ops forward at this head dim (the planner's launch).
constexpr fsdpa_i32 tops_threads(fsdpa_i32 head_dim, fsdpa_i32 elem_bytes) {
  return tops_split_d(head_dim, elem_bytes) ? FLASH_SDPA_TOPS_SPLIT_THREADS : kVarlenThreads;
}

// Head dims of the tensor-ops forward: multiples of 16 from 32 to 256 whose tiles fit 32 KB (Apple documents no
// matmul2d shape granularity; every product shape here is a multiple of 16).
constexpr bool tops_supports(fsdpa_i32 head_dim, fsdpa_i32 elem_bytes) {
  return head_dim % 16 == 0 && head_dim >= 32 && head_dim <= 256 &&
         (tops_split_d(head_dim, elem_bytes)
              ? tops_split_threadgroup_bytes(head_dim, elem_bytes) <= kVarlenMaxThreadgroupBytes
              : tops_threadgroup_bytes(head_dim, tops_block_k(head_dim, elem_bytes), elem_bytes,
                                       tops_q_staged(head_dim, elem_bytes)) <= kVarlenMaxThreadgroupBytes);
}

// The supported configurations: one list drives the MSL instantiations, the host check and the test grid.
//   X(msl type, dtype name): float32 / float16 / bfloat16, the names the kernel names and torch use.
//   Y(a, b, head dim): head dims are multiples of 8 (simdgroup_matrix tiles); a, b are passed through.
//   The wide list (D > 256, multiples of 32) instantiates flash_attn_varlen_wide under the same kernel names.
#define FLASH_SDPA_VARLEN_DTYPES(X) X(float, float32) X(half, float16) X(bfloat, bfloat16)
#define FLASH_SDPA_VARLEN_HEAD_DIMS(Y, a, b) \
  Y(a, b, 32) Y(a, b, 64) Y(a, b, 72) Y(a, b, 80) Y(a, b, 96) Y(a, b, 128) Y(a, b, 192) Y(a, b, 256)
#define FLASH_SDPA_VARLEN_WIDE_HEAD_DIMS(Y, a, b) Y(a, b, 512)

#define FLASH_SDPA_CHECK_HEAD_DIM(a, b, D)                                                              \
  static_assert((D) % 8 == 0, "head dims are whole 8x8 simdgroup_matrix tiles");                        \
  static_assert(varlen_threadgroup_bytes((D), varlen_block_k((D), 4), 4) <= kVarlenMaxThreadgroupBytes, \
                "the tiles of head dim " #D " do not fit in 32 KB of threadgroup memory");              \
  static_assert(varlen_kv_bytes((D), varlen_block_k((D), 2), 2) >= 4 * kVarlenBlockQ * 32,              \
                "the K/V region of head dim " #D " stages 32 float output columns");
FLASH_SDPA_VARLEN_HEAD_DIMS(FLASH_SDPA_CHECK_HEAD_DIM, _, _)
#undef FLASH_SDPA_CHECK_HEAD_DIM
#define FLASH_SDPA_CHECK_WIDE_HEAD_DIM(a, b, D)                                               \
  static_assert((D) > 256 && (D) % 32 == 0, "wide head dims split into 4 x whole 8x8 tiles"); \
  static_assert(varlen_wide_threadgroup_bytes((D), 4) <= kVarlenMaxThreadgroupBytes,          \
                "the wide tiles of head dim " #D " do not fit in 32 KB of threadgroup memory");
FLASH_SDPA_VARLEN_WIDE_HEAD_DIMS(FLASH_SDPA_CHECK_WIDE_HEAD_DIM, _, _)
#undef FLASH_SDPA_CHECK_WIDE_HEAD_DIM

// Element (i, d) of head h of sequence b lives at
//   b * x_batch_stride + (start_x(b) + i) * x_row_stride + h * x_head_stride + d            (elements of T)
// where start_x(b) = cu_seqlens_x[b] in varlen mode (batch strides 0) and 0 in dense mode. Paged K/V
// (FLASH_SDPA_FC_VARLEN_PAGED): key j of sequence b lives at
//   block * k_block_stride + (j % block_size) * k_row_stride + h * k_head_stride + d,  block = block_table[b, j /
//   block_size]
// with sequence b's key count cu_seqlens_k[b + 1] - cu_seqlens_k[b]; blocks outside [0, num_blocks) are masked.
// LSE (natural log, float) of (b, h, i) lives at b * lse_batch_stride + h * lse_head_stride + start_q(b) + i.
struct VarlenParams {
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
  fsdpa_i64 lse_batch_stride;  // floats
  fsdpa_i64 lse_head_stride;
  fsdpa_i64 k_block_stride;  // paged: elements between blocks of k (v below); 0 otherwise
  fsdpa_i64 v_block_stride;
  fsdpa_i64 block_table_stride;  // paged: int32 elements between rows of block_table
  fsdpa_i32 batch;               // number of sequences (grid y)
  fsdpa_i32 num_heads;           // H (grid x)
  fsdpa_i32 num_kv_heads;        // Hkv, H % Hkv == 0; query head h reads kv head h / (H / Hkv)
  fsdpa_i32 q_rows;              // rows of the q/out tensors along the row axis: every row index is clamped below it
  fsdpa_i32 k_rows;              // rows of the k/v tensors along the row axis
  fsdpa_i32 seqlen_q;            // dense mode: queries per sequence (varlen: unused)
  fsdpa_i32 seqlen_k;            // dense mode: keys per sequence (varlen: unused)
  fsdpa_i32 block_size;          // paged: keys per block (>= 1)
  fsdpa_i32 num_blocks;          // paged: blocks in k / v
  fsdpa_i32 max_blocks;          // paged: block_table columns (capacity = max_blocks * block_size keys)
  fsdpa_i32 min_seqlen_q;        // varlen: sequences with fewer query rows are skipped (0: none; see routing.h)
  fsdpa_i32 tile_offset;         // this dispatch computes the query tiles tile_offset, tile_offset + tile_stride, ...
  fsdpa_i32 tile_stride;         // of every sequence (unsplit: 0, 1; a long prefill is split: planner_common.h)
  fsdpa_i32 aligned_rows;        // FLASH_SDPA_ALIGNED_* bits: that tensor's rows start at multiples of 4 elements
  OptionParams opt;              // scale, softcap, window, ALiBi stride
};

static_assert(sizeof(VarlenParams) == 17 * 8 + 14 * 4 + sizeof(OptionParams), "VarlenParams: no padding");
static_assert(__builtin_offsetof(VarlenParams, block_table_stride) == 16 * 8, "64-bit strides first");
static_assert(__builtin_offsetof(VarlenParams, batch) == 17 * 8, "32-bit fields after the strides");
static_assert(__builtin_offsetof(VarlenParams, opt) == 17 * 8 + 14 * 4, "the options last");

}  // namespace flash_sdpa
