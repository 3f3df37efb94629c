// Host entry points of the FlashAttention-2 backward ops (schemas in torch_binding.cpp): validate -> canonicalise ->
// plan (flash_sdpa/backward_planner.h) -> run. Validation raises ValueError / TypeError naming the argument
// (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) before anything is encoded.
#include <ATen/ATen.h>

#include <utility>

#include "backward_planner.h"
#include "checks.h"
#include "routing.h"
#include "torch_binding.h"

namespace {

using namespace flash_sdpa::checks;

// out / dout: q's device, dtype and shape, contiguous last dim.
void check_like_q(const at::Tensor& t, const char* name, const at::Tensor& q) {
  check_device(t, name, q);
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, " must have the dtype of q (", q.scalar_type(), "), got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == q.sizes(), name, " must have the shape of q (", q.sizes(), "), got ", t.sizes());
  check_last_dim_contiguous(t, name);
}

// q [.., H, D], k/v [.., Hkv, D], out/dout like q (rank `rank`), lse float32 [lse_shape] with contiguous rows.
void check_backward_tensors(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& out, const at::Tensor& lse, int64_t rank, const char* q_shape,
                            const char* kv_shape, at::IntArrayRef lse_shape) {
  check_qkv_layout(q, k, v, rank, q_shape, kv_shape, rank);
  check_like_q(out, "out", q);
  check_like_q(dout, "dout", q);
  const int64_t head_dim = q.size(-1);
  TORCH_CHECK_VALUE(flash_sdpa::backward_supports(q.scalar_type(), head_dim), "head dim ", head_dim,
                    " has no backward (q.shape[-1]); supported: ", flash_sdpa::backward_head_dims());
  check_device(lse, "lse", q);
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.sizes() == lse_shape, "lse must have shape ", lse_shape, ", got ", lse.sizes());
  check_last_dim_contiguous(lse, "lse");
}

// Outputs, the delta scratch and the options; rows no sequence covers keep their zeros.
flash_sdpa::AttentionBackward make_call(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                        flash_sdpa::AttentionOptions options) {
  flash_sdpa::AttentionBackward call;
  call.dout = dout;
  call.q = q;
  call.k = k;
  call.v = v;
  call.out = out;
  call.lse = lse;
  call.delta = at::zeros(lse.sizes(), lse.options());  // O(rows x heads) floats: the only scratch
  call.dq = at::zeros(q.sizes(), q.options());
  call.dk = at::zeros(k.sizes(), k.options());
  call.dv = at::zeros(v.sizes(), v.options());
  call.dsinks = at::zeros({options.sinks.has_value() ? q.size(-2) : 0}, q.options().dtype(at::kFloat));
  call.options = std::move(options);
  call.tensor_ops = flash_sdpa::tensor_ops_enabled();  // dK/dV and dQ on tensor ops where the forward's are on
  return call;
}

}  // namespace

// The forward's options are read the same way (rows axis: -3 for varlen [T, H, D] and dense [B, S, H, D]), so the
// canonical window is the forward's.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, OptionFloats option_floats, OptionInts option_ints, const OptionTensors& option_tensors) {
  TORCH_CHECK_VALUE(q.dim() == 3, "q must have shape [total_q, num_heads, head_dim], got ", q.sizes());
  check_backward_tensors(dout, q, k, v, out, lse, 3, "[total_q, num_heads, head_dim]",
                         "[total_k, num_kv_heads, head_dim]", {q.size(1), q.size(0)});
  const int64_t batch = check_varlen_sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q);
  flash_sdpa::AttentionBackward call =
      make_call(dout, q, k, v, out, lse,
                read_options(option_floats, option_ints, option_tensors, q, batch, q.size(1), k.size(0), q.size(0)));
  call.cu_seqlens_q = cu_seqlens_q;
  call.cu_seqlens_k = cu_seqlens_k;
  call.max_seqlen_q = max_seqlen_q;
  call.max_seqlen_k = max_seqlen_k;
  flash_sdpa::run_launch_plan(flash_sdpa::plan_attention_backward(call));
  return {call.dq, call.dk, call.dv, call.dsinks};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& q,
                                                               const at::Tensor& k, const at::Tensor& v,
                                                               const at::Tensor& out, const at::Tensor& lse,
                                                               OptionFloats option_floats, OptionInts option_ints,
                                                               const OptionTensors& option_tensors) {
  TORCH_CHECK_VALUE(q.dim() == 4, "q must have shape [batch, seqlen_q, num_heads, head_dim], got ", q.sizes());
  check_backward_tensors(dout, q, k, v, out, lse, 4, "[batch, seqlen_q, num_heads, head_dim]",
                         "[batch, seqlen_k, num_kv_heads, head_dim]", {q.size(0), q.size(2), q.size(1)});
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), "k must have the batch size of q (", q.size(0), "), got ", k.size(0));
  flash_sdpa::AttentionBackward call = make_call(
      dout, q, k, v, out, lse,
      read_options(option_floats, option_ints, option_tensors, q, q.size(0), q.size(2), k.size(1), q.size(1)));
  flash_sdpa::run_launch_plan(flash_sdpa::plan_attention_backward(call));
  return {call.dq, call.dk, call.dv, call.dsinks};
}
