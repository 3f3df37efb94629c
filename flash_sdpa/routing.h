// Which kernel serves a forward call, decided in one place (the binding validates, then asks; the planners plan).
//
// Decode-shaped calls (a few query rows over the whole K/V) go to the decode kernel: one pass over a KV head's keys
// serves the whole GQA group, and long contexts split across threadgroups. Everything else goes to the varlen /
// dense kernel (32-row query tiles on simdgroup_matrix), which is 50-1000x slower at decode shapes on the proxy.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace flash_sdpa {

enum class ForwardKernel { kVarlen, kDecode };

// flash_attn_func: q [B, seqlen_q, H, D] over k [B, seqlen_k, Hkv, D] (K/V read as a contiguous cache).
ForwardKernel route_dense(at::ScalarType dtype, int64_t head_dim, int64_t seqlen_q, int64_t seqlen_k);

// flash_attn_varlen_func: one query per sequence (max_seqlen_q == 1: transformers' generate() with left padding)
// over packed K/V takes the decode kernel's varlen mode; paged K/V (block_table) and longer queries the varlen
// kernel. Empty tensors always go to the varlen path, which handles them without a dispatch.
ForwardKernel route_varlen(at::ScalarType dtype, int64_t head_dim, int64_t max_seqlen_q, int64_t batch, int64_t total_q,
                           int64_t total_k, bool paged);

}  // namespace flash_sdpa
