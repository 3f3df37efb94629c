// Which kernel serves a forward call, and the reshaping and planning that choice implies, in one place: the bindings
// validate and hand the call over; the functions here allocate the outputs, adapt the inputs to the chosen kernel's
// layout, and return the plan (run_launch_plan runs it).
//
// Decode-shaped calls (a few query rows over the whole K/V) go to the decode kernel: one pass over a KV head's keys
// serves the whole GQA group, and long contexts split across threadgroups. Everything else goes to the varlen /
// dense kernel (32-row query tiles on simdgroup_matrix, or 64-row tiles on tensor ops where they are turned on), which
// is 50-1000x slower at decode shapes on the proxy.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "attention_options.h"
#include "launch_plan.h"
#include "paged_planner.h"
#include "varlen_planner.h"

namespace flash_sdpa {

enum class ForwardKernel { kVarlen, kDecode };

// flash_attn_func: q [B, seqlen_q, H, D] over k [B, seqlen_k, Hkv, D] (K/V read as a contiguous cache).
ForwardKernel route_dense(at::ScalarType dtype, int64_t head_dim, int64_t seqlen_q, int64_t seqlen_k);

// flash_attn_varlen_func: max_seqlen_q == 1 (transformers' generate() with left padding, cu_seqlens_q = arange(B + 1))
// over packed K/V takes the decode kernel's varlen mode; paged K/V (block_table) and longer queries the varlen
// kernel. Empty tensors always go to the varlen path, which handles them without a dispatch. max_seqlen_q only sizes
// the launch: a sequence it understates (several query rows) is not known on the host without a sync, so kDecode
// means two dispatches, plan_varlen_decode below.
ForwardKernel route_varlen(at::ScalarType dtype, int64_t head_dim, int64_t max_seqlen_q, int64_t batch, int64_t total_q,
                           int64_t total_k, bool paged);

// kDecode's plan for flash_attn_varlen_func: the decode kernel's varlen mode for the sequences with exactly one
// query row, then `rest` (the varlen kernel on the same out / lse) for those with two or more; each skips the
// other's (both clamp cu_seqlens alike), so the result never depends on max_seqlen_q. When every sequence has one
// query row (transformers' decode), the second dispatch's threadgroups read two cu_seqlens_q entries and exit.
LaunchPlan plan_varlen_decode(const PagedKVCacheAttention& decode, VarlenAttention rest);

// A forward call routed and planned: the outputs it returns and the plan that writes them.
struct RoutedForward {
  at::Tensor out;
  at::Tensor lse;
  LaunchPlan plan;
};

// flash_attn_func, validated: q [B, Sq, H, D], k / v [B, Sk, Hkv, D], options canonical for Sk keys and Sq rows.
// Returns out [B, Sq, H, D] and lse float [B, H, Sq]. The decode route reads K/V as a contiguous cache of one block
// of Sk keys per batch row.
RoutedForward route_dense_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const AttentionOptions& options);

// flash_attn_varlen_func, validated: `call` without out / lse (q [total_q, H, D], packed or paged K/V, cu_seqlens,
// max_seqlen_q, options); max_seqlen_k steers the decode route's split heuristic only. Returns out [total_q, H, D] and
// lse float [H, total_q]; rows of q that no sequence covers read 0 / LSE -inf. The decode route reads the packed
// K/V as the decode kernel's varlen-mode cache (one query row per sequence; nothing read on the host).
RoutedForward route_varlen_forward(VarlenAttention call, int64_t max_seqlen_k);

// The forward on Metal 4 tensor ops (attention_tensor_ops.h: the varlen kernel's contract, 64-row query tiles) in
// place of the simdgroup_matrix varlen kernel, process-wide. Off until the Python package turns it on: where
// tensor_ops_supported() and the package's one-time self-test against the simdgroup path agree (_tensor_ops.py).
// While on, the forward routes below plan their varlen dispatches with VarlenAttention::tensor_ops (the planner takes
// the tensor-ops kernel where it serves the dtype and head dim: tensor_ops_serves), and the backward bindings plan
// dK/dV and dQ with AttentionBackward::tensor_ops (backward_tops_serves, attention_backward_tensor_ops.h); decode,
// combine, append and the backward's delta pre-pass stay as they are.
void set_tensor_ops_enabled(bool enabled);
bool tensor_ops_enabled();

// flash_attn_with_kvcache, validated: `call` without out / lse. Without a block table (undefined call.block_table), a
// contiguous cache [B_cache, S, Hkv, D] is the paged case with block_size = S and block_table[b] = {cache_batch_idx[b]}
// (default b); without cache_seqlens (undefined), every request has the table's capacity of keys. Returns out [B, sq,
// H, D] contiguous and lse float [B, H, sq] (empty unless return_lse).
RoutedForward route_kvcache_forward(PagedKVCacheAttention call, const std::optional<at::Tensor>& cache_batch_idx,
                                    bool return_lse);

}  // namespace flash_sdpa
