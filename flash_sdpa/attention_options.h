// The attention options every call takes (FlashAttention-2's), one struct embedded in every planner's call
// (VarlenAttention, PagedKVCacheAttention, AttentionBackward) and filled by one function in the binding, so adding an
// option touches one place per layer. Host C++ only; on the device the shared helpers are attention_device.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace flash_sdpa {

struct AttentionOptions {
  double scale = 1.0;                      // multiplies q . k
  double softcap = 0.0;                    // s = softcap * tanh(s / softcap); 0 = off
  int64_t window_left = -1;                // keys j >= i + sk - sq - left are visible; -1 = unbounded
  int64_t window_right = -1;               // keys j <= i + sk - sq + right; -1 = unbounded (causal: 0)
  std::optional<at::Tensor> alibi_slopes;  // float [H] or [B, H], contiguous: adds -slope * |i + sk - sq - j|
  std::optional<at::Tensor> sinks;         // float [H], contiguous: one logit per head in the denominator
};

}  // namespace flash_sdpa
