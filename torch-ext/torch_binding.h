// Host entry points of the ops registered in torch_binding.cpp (schemas there). Each validates its arguments with
// TORCH_CHECK (messages name the argument), canonicalises, plans (flash_sdpa/*_planner.h) and runs the plan.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

// The package's original op: out [total_q, H, D] is written in place. softcapping = 1.0 means off.
void flash_attention_varlen(at::Tensor& out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                            int64_t max_seqlen_k, bool do_causal, double scale, double softcapping);

// FlashAttention-2 varlen forward: returns (out [total_q, H, D], lse float [H, total_q]).
std::tuple<at::Tensor, at::Tensor> varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                              int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                                              bool causal, int64_t window_left, int64_t window_right, double softcap,
                                              const std::optional<at::Tensor>& alibi_slopes,
                                              const std::optional<at::Tensor>& s_aux);

// FlashAttention-2 dense forward: q [B, Sq, H, D], k/v [B, Sk, Hkv, D]; returns (out [B, Sq, H, D],
// lse float [B, H, Sq]).
std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       double softmax_scale, bool causal, int64_t window_left, int64_t window_right,
                                       double softcap, const std::optional<at::Tensor>& alibi_slopes,
                                       const std::optional<at::Tensor>& s_aux);

// The head dims the varlen/dense kernel supports (one list, flash_sdpa/varlen_params.h).
std::vector<int64_t> varlen_head_dims();

// flash_attn_with_kvcache (paged decode) is declared here by its own change.
