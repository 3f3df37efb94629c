// Launch planning of the FlashAttention-2 backward (attention_backward.metal): pure C++, no Metal.
//
// Callers validate first (torch-ext/backward_binding.cpp); the planner turns validated tensors into a LaunchPlan of
// three dispatches (delta pre-pass, dK/dV, dQ + d s_aux; four with a split GQA group) on one stream, in order.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "attention_options.h"
#include "launch_plan.h"

namespace flash_sdpa {

// One backward call. Varlen: q/out/dout/dq [total_q, H, D], k/v/dk/dv [total_k, Hkv, D], lse/delta float
// [H, total_q], cu_seqlens_q/k int32 [B + 1]. Dense: q/out/dout/dq [B, Sq, H, D], k/v/dk/dv [B, Sk, Hkv, D], lse/delta
// float [B, H, Sq]. Last dims contiguous (lse/delta: the row axis); every other stride is free.
struct AttentionBackward {
  at::Tensor dout, q, k, v, out, lse;                    // inputs: the forward's q, k, v, out, lse and dL/dout
  at::Tensor delta;                                      // float scratch shaped like lse, written by the first dispatch
  at::Tensor dq, dk, dv;                                 // outputs; rows no sequence covers are not written
  at::Tensor dsinks;                                     // float [H], written when sinks are given
  std::optional<at::Tensor> cu_seqlens_q, cu_seqlens_k;  // both set: varlen; both empty: dense
  AttentionOptions options;  // scale, softcap, window, ALiBi slopes, sinks (attention_options.h)
  int64_t max_seqlen_q = 0;  // varlen: sizes the grids (the kernels loop over the rest); dense: ignored
  int64_t max_seqlen_k = 0;
  int64_t gpu_cores = 0;  // the command-buffer budget's device (planner_common.h); 0: the device's, if known
  // Plan dK/dV and dQ on Metal 4 tensor ops (attention_backward_tensor_ops.h, the tensor-ops library) where they serve
  // this dtype and head dim (backward_tops_serves); else, or when false, the simdgroup_matrix passes. The delta
  // pre-pass is the metallib's either way. The bindings set it from tensor_ops_enabled() (routing.h), as the forward.
  bool tensor_ops = false;
};

// "flash_attn_bwd_delta_<dtype>" (pass = "delta"), "flash_attn_bwd_<dkdv|dq>_<dtype>_d<head_dim>".
std::string backward_kernel_name(const char* pass, at::ScalarType dtype, int64_t head_dim);

// The head dims the backward is instantiated for: every head dim of the forward (FLASH_SDPA_BWD_HEAD_DIMS).
const std::vector<int64_t>& backward_head_dims();
bool backward_supports(at::ScalarType dtype, int64_t head_dim);

// "flash_attn_bwd_<dkdv|dq>_tops_<dtype>_d<head_dim>": the tensor-ops passes (tensor_ops_library.h), served for the
// dtypes and head dims that library instantiates (FLASH_SDPA_BWD_TOPS_HEAD_DIMS: 32, 64, 96, 128; 256 in half /
// bfloat).
std::string backward_tops_kernel_name(const char* pass, at::ScalarType dtype, int64_t head_dim);
bool backward_tops_serves(at::ScalarType dtype, int64_t head_dim);

// dK/dV threadgroups loop over their KV head's GQA group; with few KV heads and short sequences that grid (Hkv x B x
// key tiles) leaves cores idle: on the proxy (H100), 16/4 heads at S = 1024 (256 dK/dV threadgroups at D = 64) took
// the backward time of 32/32 heads (2048), twice the (query, key) pairs. So where the key tiles' work is uneven (a
// window bounded on one side: causal) the group's query heads are split over `group_splits` threadgroups (a divisor
// of the group, at most kBwdMaxGroupSplits) until the grid holds kBwdResidentThreadgroups per core
// (backward_params.h: two resident on an M1/M2-class core; unknown device: an M1's 8 cores), each part's dK / dV in
// fp32 scratch and one more pass summing the parts in order (deterministic). On the proxy, 16/4 heads at
// S = 1024 fp16, 2 parts: causal 0.71-0.72x the time at D = 64 / 128; without a mask 0.82x at D = 64 but 1.13x at
// D = 128 (equal tiles: the grid was near the resident limit and the parts only add the fp32 traffic and a pass), so
// an even grid keeps one part. METAL_FLASH_SDPA_BWD_GROUP_SPLITS forces a count on any call (tests; a divisor of the
// group is taken, at most the group).
constexpr int64_t kBwdResidentThreadgroups = 2;
constexpr int64_t kBwdMaxGroupSplits = 8;
int64_t bwd_group_splits(int64_t group, int64_t threadgroups, int64_t gpu_cores, bool uneven_tiles);

// Delta pre-pass, dK/dV, dQ (+ d s_aux): three dispatches, four with a split GQA group (the sum of its dK / dV
// parts); an empty plan when there is nothing to compute. Scratch is the caller's delta (O(total_q * H) floats) and,
// with a split group, 2 x group_splits x total_k x Hkv x D floats: no S x S buffer exists.
LaunchPlan plan_attention_backward(const AttentionBackward& call);

}  // namespace flash_sdpa
