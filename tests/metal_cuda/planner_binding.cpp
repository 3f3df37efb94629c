// The project's C++ launch planners (flash_sdpa/paged_planner.cpp, varlen_planner.cpp) exposed to Python, so the
// CUDA launcher (launch.py) executes exactly the dispatches a Mac would encode. Built by planner_ext.py with
// torch.utils.cpp_extension; plans hold CUDA tensors when the inputs are CUDA tensors.
#include <torch/extension.h>

#include "backward_planner.h"
#include "paged_planner.h"
#include "routing.h"
#include "varlen_planner.h"

namespace {

namespace py = pybind11;
using flash_sdpa::LaunchPlan;

py::list to_python(const LaunchPlan& plan) {
  py::list out;
  for (const auto& d : plan.dispatches) {
    py::dict e;
    e["kernel"] = d.kernel;
    py::list constants, buffers, bytes, tgmem;
    for (const auto& c : d.constants) constants.append(py::make_tuple(c.index, static_cast<uint32_t>(c.type), c.bits));
    for (const auto& b : d.buffers) buffers.append(py::make_tuple(b.index, b.tensor));
    for (const auto& b : d.bytes) {
      bytes.append(py::make_tuple(b.index, py::bytes(reinterpret_cast<const char*>(b.data.data()), b.data.size())));
    }
    for (const auto& m : d.threadgroup_memory) tgmem.append(py::make_tuple(m.index, m.length));
    e["constants"] = constants;
    e["buffers"] = buffers;
    e["bytes"] = bytes;
    e["threadgroup_memory"] = tgmem;
    e["threadgroups"] = py::make_tuple(d.threadgroups[0], d.threadgroups[1], d.threadgroups[2]);
    e["threads_per_threadgroup"] =
        py::make_tuple(d.threads_per_threadgroup[0], d.threads_per_threadgroup[1], d.threads_per_threadgroup[2]);
    e["commit_after"] = d.commit_after;  // a command-buffer boundary on a Mac; the proxy runs the plan in order
    e["tensor_ops_library"] = d.tensor_ops_library;  // the kernel lives in the tensor-ops library
    out.append(e);
  }
  return out;
}

py::list plan_paged(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, std::optional<at::Tensor> block_table,
                    std::optional<at::Tensor> cache_seqlens, std::optional<at::Tensor> k_new,
                    std::optional<at::Tensor> v_new, at::Tensor out, std::optional<at::Tensor> lse,
                    std::optional<at::Tensor> alibi_slopes, std::optional<at::Tensor> sinks, double scale,
                    double softcap, int64_t window_left, int64_t window_right, int64_t num_splits, int64_t max_seqlen_k,
                    int64_t target_threadgroups, int64_t gpu_cores, int64_t simdgroup_partials, int64_t fixed_seqlen,
                    int64_t decode_wide) {
  flash_sdpa::PagedKVCacheAttention call;
  call.q = q;
  call.k_cache = k_cache;
  call.v_cache = v_cache;
  // No block table: row b of the cache is request b's (cache_row_is_request); no cache_seqlens: fixed_seqlen.
  call.cache_row_is_request = !block_table.has_value();
  if (block_table.has_value()) {
    call.block_table = *block_table;
  }
  if (cache_seqlens.has_value()) {
    call.cache_seqlens = *cache_seqlens;
  }
  call.fixed_seqlen = fixed_seqlen;
  call.k_new = k_new;
  call.v_new = v_new;
  call.out = out;
  call.lse = lse;
  call.options = {scale, softcap, window_left, window_right, alibi_slopes, sinks};
  call.num_splits = num_splits;
  call.max_seqlen_k = max_seqlen_k;
  call.target_threadgroups = target_threadgroups;  // 0: gpu_cores x decode_threadgroups_per_core(R, D, matrix)
  call.gpu_cores = gpu_cores;                      // 0: unknown device (kDefaultGpuCores, rounded up)
  call.simdgroup_partials = simdgroup_partials;    // -1: the planner's
  call.decode_wide = decode_wide;                  // 0: no wide path (benchmarks); -1: the planner's
  return to_python(flash_sdpa::plan_paged_kvcache(call));
}

// flash_attn_varlen_func's decode route as routing.cpp plans it: the decode kernel's varlen mode for the sequences with
// one query row, then the varlen kernel for those with several (flash_sdpa::plan_varlen_decode; its second dispatch
// exits at once when every sequence has one row).
py::list plan_varlen_decode(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor cu_seqlens_q, at::Tensor cu_seqlens_k,
                            at::Tensor out, std::optional<at::Tensor> lse, std::optional<at::Tensor> alibi_slopes,
                            std::optional<at::Tensor> sinks, double scale, double softcap, int64_t window_left,
                            int64_t window_right, int64_t num_splits, int64_t max_seqlen_k, int64_t gpu_cores) {
  flash_sdpa::PagedKVCacheAttention call;
  call.q = q;
  call.k_cache = k;
  call.v_cache = v;
  call.cu_seqlens_q = cu_seqlens_q;
  call.cu_seqlens_k = cu_seqlens_k;
  call.out = out;
  call.lse = lse;
  call.options = {scale, softcap, window_left, window_right, alibi_slopes, sinks};
  call.num_splits = num_splits;
  call.max_seqlen_k = max_seqlen_k;
  call.gpu_cores = gpu_cores;
  flash_sdpa::VarlenAttention rest;
  rest.q = q;
  rest.k = k;
  rest.v = v;
  rest.out = out;
  rest.lse = lse.has_value() ? *lse : at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  rest.cu_seqlens_q = cu_seqlens_q;
  rest.cu_seqlens_k = cu_seqlens_k;
  rest.options = call.options;
  return to_python(flash_sdpa::plan_varlen_decode(call, rest));
}

py::list plan_varlen(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor out, at::Tensor lse,
                     std::optional<at::Tensor> cu_seqlens_q, std::optional<at::Tensor> cu_seqlens_k,
                     std::optional<at::Tensor> alibi_slopes, std::optional<at::Tensor> sinks, int64_t max_seqlen_q,
                     double scale, double softcap, int64_t window_left, int64_t window_right,
                     std::optional<at::Tensor> block_table, int64_t gpu_cores, bool tensor_ops) {
  flash_sdpa::VarlenAttention call;
  call.gpu_cores = gpu_cores;
  call.tensor_ops = tensor_ops;  // the tensor-ops forward's plan (64-row tiles) where it serves the call
  call.block_table = block_table;
  call.q = q;
  call.k = k;
  call.v = v;
  call.out = out;
  call.lse = lse;
  call.cu_seqlens_q = cu_seqlens_q;
  call.cu_seqlens_k = cu_seqlens_k;
  call.max_seqlen_q = max_seqlen_q;
  call.options = {scale, softcap, window_left, window_right, alibi_slopes, sinks};
  return to_python(flash_sdpa::plan_varlen_attention(call));
}

py::list plan_backward(at::Tensor dout, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor out, at::Tensor lse,
                       at::Tensor delta, at::Tensor dq, at::Tensor dk, at::Tensor dv, at::Tensor dsinks,
                       std::optional<at::Tensor> cu_seqlens_q, std::optional<at::Tensor> cu_seqlens_k,
                       std::optional<at::Tensor> alibi_slopes, std::optional<at::Tensor> sinks, int64_t max_seqlen_q,
                       int64_t max_seqlen_k, double scale, double softcap, int64_t window_left, int64_t window_right,
                       int64_t gpu_cores, bool tensor_ops) {
  flash_sdpa::AttentionBackward call;
  call.gpu_cores = gpu_cores;
  call.tensor_ops = tensor_ops;  // the tensor-ops dK/dV and dQ passes where they serve the call
  call.dout = dout;
  call.q = q;
  call.k = k;
  call.v = v;
  call.out = out;
  call.lse = lse;
  call.delta = delta;
  call.dq = dq;
  call.dk = dk;
  call.dv = dv;
  call.dsinks = dsinks;
  call.cu_seqlens_q = cu_seqlens_q;
  call.cu_seqlens_k = cu_seqlens_k;
  call.max_seqlen_q = max_seqlen_q;
  call.max_seqlen_k = max_seqlen_k;
  call.options = {scale, softcap, window_left, window_right, alibi_slopes, sinks};
  return to_python(flash_sdpa::plan_attention_backward(call));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("plan_paged", &plan_paged, "flash_sdpa::plan_paged_kvcache -> list of dispatch dicts", py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("block_table"), py::arg("cache_seqlens"), py::arg("k_new"),
        py::arg("v_new"), py::arg("out"), py::arg("lse"), py::arg("alibi_slopes"), py::arg("sinks"), py::arg("scale"),
        py::arg("softcap"), py::arg("window_left"), py::arg("window_right"), py::arg("num_splits"),
        py::arg("max_seqlen_k"), py::arg("target_threadgroups") = 0, py::arg("gpu_cores") = 0,
        py::arg("simdgroup_partials") = -1, py::arg("fixed_seqlen") = -1, py::arg("decode_wide") = -1);
  m.def("plan_varlen_decode", &plan_varlen_decode, "flash_sdpa::plan_paged_kvcache, varlen decode mode", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("out"), py::arg("lse"),
        py::arg("alibi_slopes"), py::arg("sinks"), py::arg("scale"), py::arg("softcap"), py::arg("window_left"),
        py::arg("window_right"), py::arg("num_splits"), py::arg("max_seqlen_k"), py::arg("gpu_cores") = 0);
  m.def("plan_varlen", &plan_varlen, "flash_sdpa::plan_varlen_attention -> list of dispatch dicts", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("alibi_slopes"), py::arg("sinks"), py::arg("max_seqlen_q"), py::arg("scale"), py::arg("softcap"),
        py::arg("window_left"), py::arg("window_right"), py::arg("block_table") = py::none(), py::arg("gpu_cores") = 0,
        py::arg("tensor_ops") = false);
  m.def("plan_backward", &plan_backward, "flash_sdpa::plan_attention_backward -> list of dispatch dicts",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("delta"),
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("dsinks"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("alibi_slopes"), py::arg("sinks"), py::arg("max_seqlen_q"),
        py::arg("max_seqlen_k"), py::arg("scale"), py::arg("softcap"), py::arg("window_left"), py::arg("window_right"),
        py::arg("gpu_cores") = 0, py::arg("tensor_ops") = false);
  m.def("paged_pick_num_splits", &flash_sdpa::paged_pick_num_splits, py::arg("work_threadgroups"),
        py::arg("max_seqlen_k"), py::arg("target_threadgroups"), py::arg("target_known"), py::arg("step_keys"),
        py::arg("cores") = 0);
}
