#include "routing.h"

#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "paged_params.h"
#include "paged_planner.h"

namespace flash_sdpa {

namespace {
std::atomic<bool> g_tensor_ops{false};
}  // namespace

ForwardKernel route_dense(at::ScalarType dtype, int64_t head_dim, int64_t seqlen_q, int64_t seqlen_k) {
  const bool decode = seqlen_q <= paged::kMaxSeqlenQ && seqlen_k >= 1 && paged_supports(dtype, head_dim);
  return decode ? ForwardKernel::kDecode : ForwardKernel::kVarlen;
}

ForwardKernel route_varlen(at::ScalarType dtype, int64_t head_dim, int64_t max_seqlen_q, int64_t batch, int64_t total_q,
                           int64_t total_k, bool paged) {
  const bool decode =
      !paged && max_seqlen_q == 1 && batch >= 1 && total_q >= 1 && total_k >= 1 && paged_supports(dtype, head_dim);
  return decode ? ForwardKernel::kDecode : ForwardKernel::kVarlen;
}

LaunchPlan plan_varlen_decode(const PagedKVCacheAttention& decode, VarlenAttention rest) {
  LaunchPlan plan = plan_paged_kvcache(decode);
  rest.max_seqlen_q = 1;  // one query tile per (head, sequence) in the grid; the kernel loops over the rest
  rest.min_seqlen_q = 2;
  rest.tensor_ops = tensor_ops_enabled();
  for (Dispatch& d : plan_varlen_attention(rest).dispatches) {
    plan.dispatches.push_back(std::move(d));
  }
  return plan;
}

RoutedForward route_dense_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const AttentionOptions& options) {
  const int64_t batch = q.size(0), seqlen_q = q.size(1), heads = q.size(2), seqlen_k = k.size(1);
  RoutedForward routed{
      at::empty(q.sizes(), q.options()), at::empty({batch, heads, seqlen_q}, q.options().dtype(at::kFloat)), {}};
  if (route_dense(q.scalar_type(), q.size(3), seqlen_q, seqlen_k) == ForwardKernel::kDecode) {
    // K/V as a contiguous cache: request b's keys are row b, all seqlen_k of them valid; no block table or length
    // tensor is built (two fewer PyTorch ops a call) or read (the decode's first K/V loads wait on nothing).
    PagedKVCacheAttention call;
    call.q = q;
    call.k_cache = k;
    call.v_cache = v;
    call.cache_row_is_request = true;
    call.fixed_seqlen = seqlen_k;
    call.out = routed.out;
    call.lse = routed.lse;
    call.options = options;
    call.max_seqlen_k = seqlen_k;
    routed.plan = plan_paged_kvcache(call);
    return routed;
  }
  VarlenAttention call;
  call.q = q;
  call.k = k;
  call.v = v;
  call.out = routed.out;
  call.lse = routed.lse;
  call.options = options;
  call.tensor_ops = tensor_ops_enabled();
  routed.plan = plan_varlen_attention(call);
  return routed;
}

RoutedForward route_varlen_forward(VarlenAttention call, int64_t max_seqlen_k) {
  call.max_seqlen_k = max_seqlen_k;
  const at::Tensor& q = call.q;
  const int64_t total_q = q.size(0), heads = q.size(1), batch = call.cu_seqlens_q->size(0) - 1;
  // Rows of q that no sequence covers (cu_seqlens_q[-1] < total_q, or garbage cu_seqlens) are never written by the
  // kernels: they read as 0 / LSE -inf rather than uninitialised memory.
  call.out = at::zeros(q.sizes(), q.options());
  call.lse = at::full({heads, total_q}, -INFINITY, q.options().dtype(at::kFloat));
  RoutedForward routed{call.out, call.lse, {}};
  if (route_varlen(q.scalar_type(), q.size(2), call.max_seqlen_q, batch, total_q, call.k.size(0),
                   call.block_table.has_value()) == ForwardKernel::kDecode) {
    // The decode kernel's varlen mode: sequence b attends rows cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1 of the
    // packed k / v (clamped to [0, total_k] in the kernel) from query row cu_seqlens_q[b], each K/V byte read once per
    // KV head for the whole GQA group; the varlen kernel takes the sequences with several query rows
    // (plan_varlen_decode). The result does not depend on max_seqlen_q or max_seqlen_k.
    PagedKVCacheAttention decode;
    decode.q = q;             // [total_q, H, D]
    decode.k_cache = call.k;  // [total_k, Hkv, D]
    decode.v_cache = call.v;
    decode.cu_seqlens_q = call.cu_seqlens_q;
    decode.cu_seqlens_k = call.cu_seqlens_k;
    decode.out = call.out;
    decode.lse = call.lse;
    decode.options = call.options;
    decode.max_seqlen_k = std::min<int64_t>(max_seqlen_k, call.k.size(0));
    routed.plan = plan_varlen_decode(decode, call);
    return routed;
  }
  call.tensor_ops = tensor_ops_enabled();
  routed.plan = plan_varlen_attention(call);
  return routed;
}

RoutedForward route_kvcache_forward(PagedKVCacheAttention call, const std::optional<at::Tensor>& cache_batch_idx,
                                    bool return_lse) {
  const at::Tensor& q = call.q;
  const int64_t batch = q.size(0);
  // The append kernel reads a block table and the lengths; the decode alone takes row b / the capacity as given.
  const bool appends = call.k_new.has_value() && call.k_new->size(1) > 0;
  if (!call.block_table.defined()) {  // contiguous cache: one block of S keys per request
    if (cache_batch_idx.has_value()) {
      call.block_table = cache_batch_idx->view({batch, 1});
    } else if (appends) {
      call.block_table = at::arange(batch, q.options().dtype(at::kInt)).view({batch, 1});
    } else {
      call.cache_row_is_request = true;
    }
  }
  if (!call.cache_seqlens.defined()) {  // the whole cache: the block table's capacity
    const int64_t capacity = (call.cache_row_is_request ? 1 : call.block_table.size(1)) * call.k_cache.size(1);
    if (appends) {
      call.cache_seqlens = at::full({batch}, capacity, q.options().dtype(at::kInt));
    } else {
      call.fixed_seqlen = capacity;
    }
  }
  call.out = at::empty(q.sizes(), q.options());
  const at::Tensor lse = at::empty(return_lse ? at::IntArrayRef{batch, q.size(2), q.size(1)} : at::IntArrayRef{0},
                                   q.options().dtype(at::kFloat));
  if (return_lse) {
    call.lse = lse;
  }
  return {call.out, lse, plan_paged_kvcache(call)};
}

void set_tensor_ops_enabled(bool enabled) { g_tensor_ops.store(enabled); }

bool tensor_ops_enabled() { return g_tensor_ops.load(); }

}  // namespace flash_sdpa
