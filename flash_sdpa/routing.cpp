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

}  // namespace flash_sdpa
