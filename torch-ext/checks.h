// Argument checks both bindings share (torch_binding.cpp, backward_binding.cpp). Each raises a ValueError /
// TypeError that names the argument (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE), before anything is planned or encoded.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "attention_options.h"

// The option group every op schema ends with, built once by the package's _op_options() (metal_flash_sdpa):
//   option_floats  = [softmax_scale, softcap]
//   option_ints    = [causal, window_left, window_right]
//   option_tensors = [alibi_slopes, s_aux]
// An op reads it once, with one check call (read_options below), into flash_sdpa::AttentionOptions.
#define FLASH_SDPA_OPTION_GROUP "float[] option_floats, int[] option_ints, Tensor?[] option_tensors"

namespace flash_sdpa {
namespace checks {

// The device the ops are registered for: MPS on a Mac, the CPU in the emulated Linux build.
#ifdef METAL_FLASH_SDPA_EMULATED
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
#else
constexpr c10::DeviceType kDeviceType = c10::DeviceType::MPS;
#endif

inline void check_device(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.device().type() == kDeviceType, name, " must be on ", c10::DeviceTypeName(kDeviceType, true),
                    ", got ", t.device());
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " must be on the same device as q (", q.device(), "), got ",
                    t.device());
}

// q float32 / float16 / bfloat16; k and v of q's dtype.
inline void check_qkv_dtype(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                   "q must be float32, float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "k must have the dtype of q (", q.scalar_type(), "), got ",
                   k.scalar_type());
  TORCH_CHECK_TYPE(v.scalar_type() == q.scalar_type(), "v must have the dtype of q (", q.scalar_type(), "), got ",
                   v.scalar_type());
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must have a contiguous last dimension, got strides ",
                    t.strides());
}

// q [.., H, D] (rank `rank`) and k / v [.., Hkv, D] (rank `kv_rank`): device, dtype, shapes, head dim, GQA group,
// contiguous last dims. The caller checks that a kernel exists for the head dim (forward and backward lists differ).
inline void check_qkv_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t rank,
                             const char* q_shape, const char* kv_shape, int64_t kv_rank) {
  check_device(q, "q", q);
  check_device(k, "k", q);
  check_device(v, "v", q);
  check_qkv_dtype(q, k, v);
  TORCH_CHECK_VALUE(q.dim() == rank, "q must have shape ", q_shape, ", got ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == kv_rank, "k must have shape ", kv_shape, ", got ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have the shape of k (", k.sizes(), "), got ", v.sizes());
  TORCH_CHECK_VALUE(k.size(-1) == q.size(-1), "k must have the head dim of q (", q.size(-1), "), got ", k.size(-1));
  const int64_t heads = q.size(-2), kv_heads = k.size(-2);
  TORCH_CHECK_VALUE(kv_heads >= 1 && heads % kv_heads == 0, "the number of heads of q (", heads,
                    ") must be a multiple of the number of heads of k/v (", kv_heads, ")");
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
}

inline void check_cu_seqlens(const at::Tensor& cu, const char* name, const at::Tensor& q) {
  check_device(cu, name, q);
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, name, " must be 1-D with batch + 1 entries, got shape ",
                    cu.sizes());
  TORCH_CHECK_VALUE(cu.is_contiguous(), name, " must be contiguous");
}

// The varlen sequence arguments: both prefix sums int32 [batch + 1] of one length, max_seqlen_* >= 0. Returns batch.
inline int64_t check_varlen_sequences(const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                      int64_t max_seqlen_q, int64_t max_seqlen_k, const at::Tensor& q) {
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q);
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q);
  TORCH_CHECK_VALUE(cu_seqlens_q.size(0) == cu_seqlens_k.size(0),
                    "cu_seqlens_q and cu_seqlens_k must have the same length, got ", cu_seqlens_q.size(0), " and ",
                    cu_seqlens_k.size(0));
  TORCH_CHECK_VALUE(max_seqlen_q >= 0, "max_seqlen_q must be >= 0, got ", max_seqlen_q);
  TORCH_CHECK_VALUE(max_seqlen_k >= 0, "max_seqlen_k must be >= 0, got ", max_seqlen_k);
  return cu_seqlens_q.size(0) - 1;
}

using OptionFloats = c10::ArrayRef<double>;
using OptionInts = c10::IntArrayRef;
using OptionTensors = c10::List<std::optional<at::Tensor>>;

// The options of one call, checked once: windows >= -1, finite scale, softcap >= 0; alibi_slopes float32 [heads] or
// [batch, heads] and s_aux float32 [heads], contiguous, on q's device.
inline void check_options(const AttentionOptions& options, const at::Tensor& q, int64_t batch, int64_t heads) {
  TORCH_CHECK_VALUE(options.window_left >= -1, "window_size[0] (left) must be >= -1 (-1 = unbounded), got ",
                    options.window_left);
  TORCH_CHECK_VALUE(options.window_right >= -1, "window_size[1] (right) must be >= -1 (-1 = unbounded), got ",
                    options.window_right);
  TORCH_CHECK_VALUE(std::isfinite(options.scale), "softmax_scale must be finite, got ", options.scale);
  TORCH_CHECK_VALUE(std::isfinite(options.softcap) && options.softcap >= 0.0, "softcap must be >= 0 (0 = off), got ",
                    options.softcap);
  if (options.alibi_slopes.has_value()) {
    const at::Tensor& a = *options.alibi_slopes;
    check_device(a, "alibi_slopes", q);
    TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, "alibi_slopes must be float32, got ", a.scalar_type());
    TORCH_CHECK_VALUE(
        (a.dim() == 1 && a.size(0) == heads) || (a.dim() == 2 && a.size(0) == batch && a.size(1) == heads),
        "alibi_slopes must have shape [", heads, "] or [", batch, ", ", heads, "], got ", a.sizes());
    TORCH_CHECK_VALUE(a.is_contiguous(), "alibi_slopes must be contiguous");
  }
  if (options.sinks.has_value()) {
    const at::Tensor& s = *options.sinks;
    check_device(s, "s_aux", q);
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, "s_aux must be float32, got ", s.scalar_type());
    TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == heads, "s_aux must have shape [", heads, "], got ", s.sizes());
    TORCH_CHECK_VALUE(s.is_contiguous(), "s_aux must be contiguous");
  }
}

// The op's option group (FLASH_SDPA_OPTION_GROUP), read once into AttentionOptions and checked with one call
// (check_options); the window is then made canonical for key_rows / query_rows (canonical_window folds causal in).
inline AttentionOptions read_options(OptionFloats option_floats, OptionInts option_ints,
                                     const OptionTensors& option_tensors, const at::Tensor& q, int64_t batch,
                                     int64_t heads, int64_t key_rows, int64_t query_rows) {
  TORCH_CHECK_VALUE(option_floats.size() == 2 && option_ints.size() == 3 && option_tensors.size() == 2,
                    "the option group must be [softmax_scale, softcap], [causal, window_left, window_right], "
                    "[alibi_slopes, s_aux] (metal_flash_sdpa._op_options), got ",
                    option_floats.size(), ", ", option_ints.size(), " and ", option_tensors.size(), " values");
  AttentionOptions options;
  options.scale = option_floats[0];
  options.softcap = option_floats[1];
  options.window_left = option_ints[1];
  options.window_right = option_ints[2];
  options.alibi_slopes = option_tensors.get(0);
  options.sinks = option_tensors.get(1);
  check_options(options, q, batch, heads);
  const bool causal = option_ints[0] != 0;
  std::tie(options.window_left, options.window_right) =
      canonical_window(causal, options.window_left, options.window_right, key_rows, query_rows);
  return options;
}

}  // namespace checks
}  // namespace flash_sdpa
