// Launch planning of the varlen / dense flash-attention kernel: pure C++, no Metal.
//
// Callers validate first (torch-ext/torch_binding.cpp); the planner turns validated tensors into a LaunchPlan.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "attention_options.h"
#include "launch_plan.h"

namespace flash_sdpa {

// One attention call. Varlen: q [total_q, H, D], k/v [total_k, Hkv, D], out like q, lse [H, total_q] float,
// cu_seqlens_q/k int32 [B + 1]. Dense: q [B, Sq, H, D], k/v [B, Sk, Hkv, D], out like q, lse [B, H, Sq] float.
// Paged varlen: k/v [num_blocks, block_size, Hkv, D] read through block_table int32 [B, max_blocks]; sequence b has
// cu_seqlens_k[b + 1] - cu_seqlens_k[b] keys. Last dims contiguous; every other stride is free.
struct VarlenAttention {
  at::Tensor q, k, v, out, lse;
  std::optional<at::Tensor> cu_seqlens_q, cu_seqlens_k;  // both set: varlen; both empty: dense
  std::optional<at::Tensor> block_table;                 // varlen only: paged K/V
  AttentionOptions options;  // scale, softcap, window, ALiBi slopes, sinks (attention_options.h)
  int64_t max_seqlen_q = 0;  // varlen: sizes the grid (longest query sequence); dense: ignored
  int64_t max_seqlen_k = 0;  // varlen: the longest key sequence, for the work estimate only (0: the rows of k)
  int64_t min_seqlen_q = 0;  // varlen: sequences with fewer query rows are left to another kernel (routing.h)
  int64_t gpu_cores = 0;     // the command-buffer budget's device (planner_common.h); 0: the device's, if known
  // Plan for the forward on Metal 4 tensor ops (attention_tensor_ops.h: 64-row query tiles, the tensor-ops library)
  // where it serves this dtype, head dim and q (tensor_ops_serves); else, or when false, the simdgroup_matrix kernel.
  bool tensor_ops = false;
};

// "flash_attn_varlen_<float32|float16|bfloat16>_d<head_dim>".
std::string varlen_kernel_name(at::ScalarType dtype, int64_t head_dim);

// The head dims the kernel is instantiated for (varlen_params.h), ascending.
const std::vector<int64_t>& varlen_head_dims();
bool varlen_supports(at::ScalarType dtype, int64_t head_dim);

// The tensor-ops forward's kernel name, "flash_attn_varlen_tops_<float32|float16|bfloat16>_d<head_dim>", and whether
// it serves a call: the dtypes and head dims tensor_ops_library.h instantiates (32, 64, 96, 128; 256 in half /
// bfloat), and, where its Q rows are read from device memory through a tensor (tops_q_staged false), a q row stride
// within int32 (a tensor's strides are int).
std::string tensor_ops_kernel_name(at::ScalarType dtype, int64_t head_dim);
bool tensor_ops_serves(at::ScalarType dtype, int64_t head_dim, int64_t q_row_stride);

// One dispatch, or one per range of query rows when the work passes command_buffer_flops() (planner_common.h: a long
// prefill is split into command buffers); an empty plan when there is nothing to compute.
LaunchPlan plan_varlen_attention(const VarlenAttention& call);

}  // namespace flash_sdpa
