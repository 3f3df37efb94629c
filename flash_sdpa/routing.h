// Which kernel serves a forward call, decided in one place (the binding validates, then asks; the planners plan).
//
// Decode-shaped calls (a few query rows over the whole K/V) go to the decode kernel: one pass over a KV head's keys
// serves the whole GQA group, and long contexts split across threadgroups. Everything else goes to the varlen /
// dense kernel (32-row query tiles on simdgroup_matrix), which is 50-1000x slower at decode shapes on the proxy.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

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

}  // namespace flash_sdpa
