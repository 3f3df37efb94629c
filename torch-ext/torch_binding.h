// Host entry points of the ops registered in torch_binding.cpp (schemas there). Each validates its arguments with
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE (messages name the argument), reads its option group once (checks.h:
// read_options) and hands the call to flash_sdpa/routing.h or a planner, then runs the plan.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"

// Every op ends with the option group (FLASH_SDPA_OPTION_GROUP): [softmax_scale, softcap], [causal, window_left,
// window_right], [alibi_slopes, s_aux]. Windows: -1 = unbounded; alibi_slopes float [H] or [B, H]; s_aux float [H].
using flash_sdpa::checks::OptionFloats;
using flash_sdpa::checks::OptionInts;
using flash_sdpa::checks::OptionTensors;

// The package's original op: out [total_q, H, D] is written in place (the package's softcapping = 1.0 convention
// is turned into softcap = 0 in Python).
void flash_attention_varlen(at::Tensor& out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                            int64_t max_seqlen_k, OptionFloats option_floats, OptionInts option_ints,
                            const OptionTensors& option_tensors);

// FlashAttention-2 varlen forward: returns (out [total_q, H, D], lse float [H, total_q]). With block_table int32
// [B, max_blocks], k/v are paged caches [num_blocks, block_size, Hkv, D] (sequence b: cu_seqlens_k[b + 1] -
// cu_seqlens_k[b] keys).
std::tuple<at::Tensor, at::Tensor> varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                              int64_t max_seqlen_q, int64_t max_seqlen_k,
                                              const std::optional<at::Tensor>& block_table, OptionFloats option_floats,
                                              OptionInts option_ints, const OptionTensors& option_tensors);

// FlashAttention-2 dense forward: q [B, Sq, H, D], k/v [B, Sk, Hkv, D]; returns (out [B, Sq, H, D],
// lse float [B, H, Sq]).
std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       OptionFloats option_floats, OptionInts option_ints,
                                       const OptionTensors& option_tensors);

// The head dims the varlen/dense kernel supports (one list, flash_sdpa/varlen_params.h).
std::vector<int64_t> varlen_head_dims();

// The forward on Metal 4 tensor ops (flash_sdpa/routing.h): whether this GPU and build run it, and turning it on or
// off for the process (on only where supported). The Python package decides (_tensor_ops.py).
bool tensor_ops_supported();
void set_tensor_ops(bool enabled);

// FlashAttention-2 backward of varlen_fwd / fwd from the forward's q, k, v, out, lse and dout (shaped like out):
// returns (dq like q, dk like k, dv like v, ds_aux float [H] (empty without s_aux)). No gradient for alibi_slopes.
// Deterministic by construction (no atomics): bit-identical on repeat.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, OptionFloats option_floats, OptionInts option_ints, const OptionTensors& option_tensors);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& q,
                                                               const at::Tensor& k, const at::Tensor& v,
                                                               const at::Tensor& out, const at::Tensor& lse,
                                                               OptionFloats option_floats, OptionInts option_ints,
                                                               const OptionTensors& option_tensors);

// FlashAttention-2 flash_attn_with_kvcache forward. q [B, sq, H, D]. Paged cache (block_table int32
// [B, max_blocks]): k_cache/v_cache [num_blocks, block_size, Hkv, D]; contiguous cache (no block_table):
// [B_cache, S, Hkv, D], row b at cache_batch_idx[b] (default b). cache_seqlens int32 [B]: lengths before the new
// tokens, < 0 marks a padding row (none: the whole cache). k/v [B, sk_new, Hkv, D] are written into the cache in
// place first. cache_leftpad int32 [B] (contiguous caches): the first slot of row b's keys.
// max_seqlen_k: an upper bound on keys per request for the split heuristic (0 = the cache capacity).
// Returns (out [B, sq, H, D] contiguous, lse float [B, H, sq] when return_lse, else an empty tensor).
std::tuple<at::Tensor, at::Tensor> kvcache_fwd(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const std::optional<at::Tensor>& k,
    const std::optional<at::Tensor>& v, const std::optional<at::Tensor>& cache_seqlens,
    const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& cache_batch_idx,
    const std::optional<at::Tensor>& cache_leftpad, int64_t num_splits, bool return_lse, int64_t max_seqlen_k,
    OptionFloats option_floats, OptionInts option_ints, const OptionTensors& option_tensors);

// The head dims the paged kernels support (one list, flash_sdpa/paged_params.h).
std::vector<int64_t> kvcache_head_dims();
