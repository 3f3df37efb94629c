// The attention options every call takes (FlashAttention-2's: scale, softcap, window, ALiBi slopes, sinks), one layer
// for host and device, so that adding an option touches one place per layer:
//   - OptionParams (MSL and C++): the options as every kernel reads them, the sub-struct `opt` of VarlenParams,
//     BackwardParams and PagedDecodeParams;
//   - FLASH_SDPA_FC_*: the options' function constants, at the same indices in every kernel (declared once for MSL
//     in attention_device.h, with the device helpers on the options);
//   - AttentionOptions (host): the options of one call, embedded in every planner's call (VarlenAttention,
//     PagedKVCacheAttention, AttentionBackward), filled once per op from its option group (torch-ext/checks.h:
//     read_options, windows made canonical by canonical_window below) and turned into the above by option_params()
//     and option_constants() in the planners.
#pragma once

#include "params_types.h"

// bool function constants of the options (kernel-specific ones start at 8).
#define FLASH_SDPA_FC_VARLEN 0   // sequences from cu_seqlens_q / cu_seqlens_k (packed rows); else dense or paged
#define FLASH_SDPA_FC_SOFTCAP 1  // s = softcap * tanh(s / softcap)
#define FLASH_SDPA_FC_ALIBI 2    // s -= slope * |i + sk - sq - j|
#define FLASH_SDPA_FC_SINKS 3    // sinks[h] joins the softmax denominator

namespace flash_sdpa {

struct OptionParams {
  fsdpa_i32 window_left;         // keys j >= i + sk - sq - window_left are visible; -1 = unbounded
  fsdpa_i32 window_right;        // keys j <= i + sk - sq + window_right are visible; -1 = unbounded (causal: 0)
  fsdpa_i32 alibi_batch_stride;  // floats between batches of slopes: 0 for slopes [H], H for [B, H]
  fsdpa_f32 scale;               // multiplies q . k before softcap and ALiBi
  fsdpa_f32 softcap;             // > 0 when FLASH_SDPA_FC_SOFTCAP
  fsdpa_i32 pad0;
};
static_assert(sizeof(OptionParams) == 24, "OptionParams: no padding, same size in MSL and C++");

}  // namespace flash_sdpa

#ifndef __METAL_VERSION__
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "planner_common.h"  // FunctionConstant, bool_constant

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

// The work estimate of a long call split into command buffers (planner_common.h: interleaved_dispatches). Keys that
// query row `row` of a sequence of sq queries and sk keys sees (bottom-right aligned window).
inline int64_t keys_seen(int64_t row, int64_t sq, int64_t sk, const AttentionOptions& o) {
  const int64_t pos = row + sk - sq;
  const int64_t hi = o.window_right < 0 ? sk : std::clamp<int64_t>(pos + o.window_right + 1, 0, sk);
  const int64_t lo = o.window_left < 0 ? 0 : std::clamp<int64_t>(pos - o.window_left, 0, sk);
  return std::max<int64_t>(hi - lo, 0);
}

// Query rows that see key `key` (the same window read from the key's side: i sees j iff
// j - right <= i + sk - sq <= j + left).
inline int64_t queries_seeing(int64_t key, int64_t sq, int64_t sk, const AttentionOptions& o) {
  const int64_t lo = o.window_right < 0 ? 0 : std::clamp<int64_t>(key - o.window_right - (sk - sq), 0, sq);
  const int64_t hi = o.window_left < 0 ? sq : std::clamp<int64_t>(key + o.window_left - (sk - sq) + 1, 0, sq);
  return std::max<int64_t>(hi - lo, 0);
}

// The kernels' copy of the options. Windows saturate at int32 (the kernels' window arithmetic is 64-bit, and no
// sequence has 2^31 keys); the ALiBi batch stride is 0 for slopes [H], H for [B, H] (contiguous, checked).
inline OptionParams option_params(const AttentionOptions& options) {
  auto window = [](int64_t w) {
    return w < 0 ? -1 : static_cast<fsdpa_i32>(std::min<int64_t>(w, std::numeric_limits<int32_t>::max()));
  };
  OptionParams p{};
  p.window_left = window(options.window_left);
  p.window_right = window(options.window_right);
  const bool batched_alibi = options.alibi_slopes.has_value() && options.alibi_slopes->dim() == 2;
  p.alibi_batch_stride = batched_alibi ? static_cast<fsdpa_i32>(options.alibi_slopes->size(1)) : 0;
  p.scale = static_cast<float>(options.scale);
  p.softcap = static_cast<float>(options.softcap);
  return p;
}

// The options' function constants, for every dispatch of a call (kernel-specific ones are appended).
inline std::vector<FunctionConstant> option_constants(const AttentionOptions& options, bool varlen) {
  return {bool_constant(FLASH_SDPA_FC_VARLEN, varlen), bool_constant(FLASH_SDPA_FC_SOFTCAP, options.softcap > 0.0),
          bool_constant(FLASH_SDPA_FC_ALIBI, options.alibi_slopes.has_value()),
          bool_constant(FLASH_SDPA_FC_SINKS, options.sinks.has_value())};
}

}  // namespace flash_sdpa
#endif  // __METAL_VERSION__
