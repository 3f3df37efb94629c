// Launch planning of flash_attn_with_kvcache on a paged cache: pure C++, no Metal.
//
// Callers validate first (torch-ext/torch_binding.cpp); the planner turns validated tensors into a LaunchPlan of
// at most three dispatches, in order: kv_paged_write (when new k/v are given), paged_decode_attention,
// paged_decode_combine (when split-K is used). No host sync: nothing here reads tensor data.
// A contiguous cache [B_cache, S, Hkv, D] is the paged case with block_size = S and block_table[b] = {batch index}.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "attention_options.h"
#include "launch_plan.h"

namespace flash_sdpa {

struct PagedKVCacheAttention {
  at::Tensor q;              // [B, sq, H, D], last dim contiguous, 1 <= sq <= 16
  at::Tensor k_cache;        // [num_blocks, block_size, Hkv, D], last dim contiguous (a view; bound at its offset)
  at::Tensor v_cache;        // like k_cache, same shape and strides
  at::Tensor block_table;    // int32 [B, max_blocks_per_seq], last dim contiguous
  at::Tensor cache_seqlens;  // int32 [B], contiguous: lengths before the new tokens (< 0: padding row)
  std::optional<at::Tensor> k_new, v_new;  // [B, sk_new, Hkv, D], same strides, last dim contiguous
  at::Tensor out;                          // [B, sq, H, D] contiguous
  std::optional<at::Tensor> lse;           // float [B, H, sq] contiguous
  AttentionOptions options;                // scale, softcap, window, ALiBi slopes, sinks (attention_options.h)
  // Varlen decode (flash_attn_varlen_func with one query per sequence), when both are set: int32 [B + 1], contiguous.
  // Then q is [total_q, H, D], k_cache / v_cache are the packed k / v [total_k, Hkv, D] (last dim contiguous), out
  // is [total_q, H, D] contiguous and lse float [H, total_q]; sequence b attends keys cu_seqlens_k[b] ..
  // cu_seqlens_k[b + 1] - 1 (clamped to [0, total_k]) from query row cu_seqlens_q[b]; a sequence without a query row
  // is skipped (its out / lse rows are not written). block_table, cache_seqlens and k_new / v_new are not used.
  std::optional<at::Tensor> cu_seqlens_q, cu_seqlens_k;
  // int32 [B], contiguous cache only (FlashAttention-2's cache_leftpad): request b's keys are slots cache_leftpad[b] ..
  // cache_seqlens[b] + seqlen_new - 1 of its row (cache_seqlens is where the new tokens land).
  std::optional<at::Tensor> cache_leftpad;
  int64_t num_splits = 0;  // 0: the planner picks; 1: no split; n > 1: n splits (at most paged::kMaxSplits)
  // Upper bound on keys per request, for the split heuristic only (no host sync): the caller passes the exact
  // value when cache_seqlens is a Python int, else the block table's capacity (varlen: max_seqlen_k).
  int64_t max_seqlen_k = 0;
  // Threadgroups the split heuristic aims at; 0: gpu_cores x decode_threadgroups_per_core(R, D, matrix).
  int64_t target_threadgroups = 0;
  // GPU cores (Apple) or SMs (the NVIDIA proxy); 0: the device's, from the provider the Metal backend registers
  // (gpu_core_count), else unknown (kDefaultGpuCores, splits rounded up).
  int64_t gpu_cores = 0;
  // Split mode: whether each simdgroup writes its own partial (1) or the threadgroup merges them (0); -1: the planner
  // picks. Benchmarks force it.
  int64_t simdgroup_partials = -1;
  // Short one-token splits (simdgroup partials) in 2-byte types at D = 64 / 128: 0 keeps them on the other paths (the
  // lane-local one's simdgroup partials; a matrix configuration merges in the threadgroup), for benchmarks to
  // compare; anything else lets the planner run the wide path (decode_runs_wide, paged_params.h).
  int64_t decode_wide = -1;
  // A contiguous cache whose row b is request b's (flash_attn_func's decode; flash_attn_with_kvcache without
  // block_table and cache_batch_idx): block_table may be undefined and is not read (no new tokens, k_cache.size(0) >=
  // B). With fixed_seqlen >= 0 (every request's cache_seqlens; no new tokens) cache_seqlens may be undefined and is
  // not read either: the decode's first K/V loads then wait on no memory read, and the caller builds no index tensors.
  bool cache_row_is_request = false;
  int64_t fixed_seqlen = -1;
};

// The device description the split heuristic uses. metal_launch.mm registers a provider that reads the GPU's core
// count once; without one (the emulator, an unknown device) the planner assumes kDefaultGpuCores and rounds the split
// count up.
constexpr int64_t kDefaultGpuCores = 80;  // the largest Apple GPUs (Ultra: 76-80 cores): splitting for more cores
                                          // than exist costs a little combine work, for fewer leaves cores idle
// Split heuristic: aim at one full wave of the decode threadgroups (256 threads, <= 9 KB of threadgroup memory each)
// a core keeps resident: more splits only add waves and combine work (proxy sweeps: the best split count was within
// 2% of target / work on every benchmarked shape, tests/metal_cuda/RESULTS.md). How many are resident depends on
// the registers per thread, on Apple GPUs as on NVIDIA's (an Apple core's resident threads fall from 1,024 as a
// kernel's registers grow): 3 for the single-row tile (about 80 registers), 2 while a lane holds at most 32
// accumulators (R x D / 32: GQA <= 8 at D = 128, about 128 registers) and for the matrix path's instances (`matrix`:
// R = 16 in 2-byte types at D = 128 too, 8 fragments of Q and 8 of O per simdgroup as at R = 8), 1 above (the
// lane-local R = 16 at D = 128: about 170). tests/metal_cuda/targets.py builds the proxy's instances for the same
// counts (decode_min_blocks). Keep each split long enough that its fixed costs (q staging, merge, one combine read)
// stay small next to its keys.
int64_t decode_threadgroups_per_core(int64_t rows, int64_t head_dim, bool matrix);
// 32, or one threadgroup step where a step covers fewer keys (decode_step_keys, paged_params.h: 16 at D = 256 and
// on the matrix path at R = 16, D = 128; 8 on the lane-local path at R = 16, D = 128): short single sequences need many
// splits to fill the GPU, and a split's time is its number of steps (proxy, B=1 S=256, GQA 4 / 8: 8 splits 13.1 / 17.2
// us, 4 splits 14.8 / 21.6; S=1000 GQA 8: 32 splits 20.5 us, 15 splits 24.0; H200, S=256 GQA 8 / 7: 16 splits of one
// step 13.6 / 13.3 us, 8 of two 15.8 / 15.5); 128 capped S=1000 at 7 splits (21.6 us).
constexpr int64_t kMinKeysPerSplit = 32;
// Splits of at most this many steps per simdgroup write one partial per simdgroup (PagedDecodeParams::
// simdgroup_partials): proxy (H100, B = 1, fp16 D = 128, the same split count with and without): S = 256 GQA 4 / 8 / 7
// 13.5 / 15.0 / 14.8 -> 11.7 / 13.1 / 12.4 us (one step), S = 1000 GQA 4 / 8 15.5 / 19.2 -> 14.4 / 18.5 (two).
constexpr int64_t kSimdgroupPartialSteps = 2;
using GpuCoreCountProvider = int64_t (*)();
void set_gpu_core_count_provider(GpuCoreCountProvider provider);
int64_t gpu_core_count();  // the provider's answer, 0 when there is none or it does not know

// "kv_paged_write_<dtype>", "paged_decode_<dtype>_d<D>_r<R>" ("paged_decode_matrix_..." / "paged_decode_wide_..." for
// the matrix and wide paths' instances: decode_runs_matrix, decode_runs_wide, paged_params.h),
// "paged_decode_combine_<dtype>".
enum class DecodePath { kLaneLocal, kMatrix, kWide };
std::string paged_write_kernel_name(at::ScalarType dtype);
std::string paged_decode_kernel_name(at::ScalarType dtype, int64_t head_dim, int64_t rows, DecodePath path);
std::string paged_combine_kernel_name(at::ScalarType dtype);

// The head dims the paged kernels are instantiated for (paged_params.h), ascending.
const std::vector<int64_t>& paged_head_dims();
bool paged_supports(at::ScalarType dtype, int64_t head_dim);

// Row tile R of the attention kernel (rows = query head of a KV group x query token per threadgroup): the smallest
// instantiated R >= rows_needed, capped at the head dim's largest (paged_params.h); more rows take several row blocks.
int64_t paged_max_rows(int64_t head_dim);
int64_t paged_rows_per_threadgroup(int64_t head_dim, int64_t rows_needed);

// Split count: 1 when batch x kv_heads x row_blocks threadgroups already reach target (cores x
// decode_threadgroups_per_core), else target / work splits, rounded down when the target comes from a known device
// and up when it is the kDefaultGpuCores guess, keeping >= kMinKeysPerSplit keys per split (or one step of the
// kernel, step_keys = decode_step_keys, when smaller), then the fewest splits with the same steps per split; where
// a split grid leaves some of `cores` (0: unknown) idle, fewer steps per split, up to one threadgroup per core. A
// run-time value of the kernel: no pipeline depends on it.
int64_t paged_pick_num_splits(int64_t work_threadgroups, int64_t max_seqlen_k, int64_t target, bool target_known,
                              int64_t step_keys, int64_t cores);

LaunchPlan plan_paged_kvcache(const PagedKVCacheAttention& call);

}  // namespace flash_sdpa
