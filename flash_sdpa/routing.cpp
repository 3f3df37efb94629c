#include "routing.h"

#include "paged_params.h"
#include "paged_planner.h"

namespace flash_sdpa {

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
  for (Dispatch& d : plan_varlen_attention(rest).dispatches) {
    plan.dispatches.push_back(std::move(d));
  }
  return plan;
}

}  // namespace flash_sdpa
