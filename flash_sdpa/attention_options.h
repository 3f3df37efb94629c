// The attention options every call takes (FlashAttention-2's), one struct embedded in every planner's call
// (VarlenAttention, PagedKVCacheAttention, AttentionBackward) and filled by attention_options() in the bindings, so
// adding an option touches one place per layer. Host C++ only; on the device the shared helpers are attention_device.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

namespace flash_sdpa {

struct AttentionOptions {
  double scale = 1.0;                      // multiplies q . k
  double softcap = 0.0;                    // s = softcap * tanh(s / softcap); 0 = off
  int64_t window_left = -1;                // keys j >= i + sk - sq - left are visible; -1 = unbounded
  int64_t window_right = -1;               // keys j <= i + sk - sq + right; -1 = unbounded (causal: 0)
  std::optional<at::Tensor> alibi_slopes;  // float [H] or [B, H], contiguous: adds -slope * |i + sk - sq - j|
  std::optional<at::Tensor> sinks;         // float [H], contiguous: one logit per head in the denominator
};

// FlashAttention-2: causal is window (left, 0); a window that reaches past every key is unbounded (-1). key_rows and
// query_rows bound the sequence lengths (the tensors' rows), so the canonical window never changes a result.
inline std::pair<int64_t, int64_t> canonical_window(bool causal, int64_t window_left, int64_t window_right,
                                                    int64_t key_rows, int64_t query_rows) {
  const int64_t right = causal ? 0 : window_right;
  return {window_left >= key_rows ? -1 : window_left, right >= key_rows + query_rows ? -1 : right};
}

// The options of one call, as every binding fills them (windows canonical).
inline AttentionOptions attention_options(double softmax_scale, bool causal, int64_t window_left, int64_t window_right,
                                          double softcap, const std::optional<at::Tensor>& alibi_slopes,
                                          const std::optional<at::Tensor>& s_aux, int64_t key_rows,
                                          int64_t query_rows) {
  AttentionOptions options;
  options.scale = softmax_scale;
  options.softcap = softcap;
  std::tie(options.window_left, options.window_right) =
      canonical_window(causal, window_left, window_right, key_rows, query_rows);
  options.alibi_slopes = alibi_slopes;
  options.sinks = s_aux;
  return options;
}

}  // namespace flash_sdpa
