// Op schemas, argument validation and registration of metal-flash-sdpa.
//
// Every op validates all of its arguments before planning (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE: Python sees a
// ValueError / TypeError that names the argument), reads its option group once (checks.h: read_options), then hands
// the call over: flash_sdpa/routing.h picks the kernel, adapts the inputs to it and plans. Nothing past validation
// may throw (on the Mac, encoding runs inside dispatch_sync, where an exception kills the process). The ops are
// registered for MPS; the emulated Linux build (METAL_FLASH_SDPA_EMULATED) registers them for CPU, where the launch
// plan runs on the Metal-on-CPU emulator (msl/cpu/launch_cpu.cpp).
#include "torch_binding.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <initializer_list>
#include <tuple>

#include "checks.h"
#include "paged_params.h"
#include "paged_planner.h"
#include "registration.h"
#include "routing.h"
#include "varlen_planner.h"

namespace {

using namespace flash_sdpa::checks;

// Bytes [first, last) of the storage a view can reach.
std::pair<int64_t, int64_t> byte_range(const at::Tensor& t) {
  int64_t extent = 1;
  for (int64_t d = 0; d < t.dim(); ++d) {
    extent += (t.size(d) - 1) * t.stride(d);
  }
  const int64_t first = t.storage_offset() * static_cast<int64_t>(t.element_size());
  return {first, first + extent * static_cast<int64_t>(t.element_size())};
}

bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined()) {
    return false;
  }
  if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) {
    return false;
  }
  const auto ra = byte_range(a);
  const auto rb = byte_range(b);
  return ra.first < rb.second && rb.first < ra.second;
}

// A tensor the op writes (`written`) must share no byte with any tensor it reads: attention would read what it has
// already overwritten (or the caller's cu_seqlens / slopes would change under it).
struct NamedInput {
  const char* name;
  const at::Tensor* tensor;  // nullptr or undefined: absent
};

void check_no_overlap(const at::Tensor& written, const char* written_name, std::initializer_list<NamedInput> inputs) {
  for (const NamedInput& in : inputs) {
    TORCH_CHECK_VALUE(in.tensor == nullptr || !overlaps(written, *in.tensor), written_name, " must not overlap ",
                      in.name, " (the op writes ", written_name, " while it reads ", in.name, ")");
  }
}

const at::Tensor* opt(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

// q, k, v as check_qkv_layout (kv_rank 0: `rank`), and a forward kernel for the head dim.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t rank, const char* q_shape,
               const char* kv_shape, int64_t kv_rank = 0) {
  check_qkv_layout(q, k, v, rank, q_shape, kv_shape, kv_rank > 0 ? kv_rank : rank);
  const int64_t head_dim = q.size(-1);
  TORCH_CHECK_VALUE(flash_sdpa::varlen_supports(q.scalar_type(), head_dim), "head dim ", head_dim,
                    " is not supported (q.shape[-1]); supported: ", flash_sdpa::varlen_head_dims());
}

void check_out(const at::Tensor& out, const at::Tensor& q, const char* name) {
  check_device(out, name, q);
  TORCH_CHECK_TYPE(out.scalar_type() == q.scalar_type(), name, " must have the dtype of q (", q.scalar_type(),
                   "), got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.sizes() == q.sizes(), name, " must have the shape of q (", q.sizes(), "), got ", out.sizes());
  check_last_dim_contiguous(out, name);
}

constexpr int64_t kMaxKeys = int64_t(1) << 30;  // key positions are int32 in the kernels, with room on top

// Validates the varlen arguments (paged K/V when block_table is given); returns the batch size.
int64_t check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                     const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                     const std::optional<at::Tensor>& block_table = std::nullopt) {
  if (block_table.has_value())
    check_qkv(q, k, v, 3, "[total_q, num_heads, head_dim]", "[num_blocks, block_size, num_kv_heads, head_dim]", 4);
  else
    check_qkv(q, k, v, 3, "[total_q, num_heads, head_dim]", "[total_k, num_kv_heads, head_dim]");
  // The sequences before the block table: its expected shape comes from them.
  const int64_t batch = check_varlen_sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q);
  if (block_table.has_value()) {
    const at::Tensor& table = *block_table;
    check_device(table, "block_table", q);
    TORCH_CHECK_TYPE(table.scalar_type() == at::kInt, "block_table must be int32, got ", table.scalar_type());
    TORCH_CHECK_VALUE(table.dim() == 2 && table.size(0) == batch && table.size(1) >= 1,
                      "block_table must have shape [batch = ", batch, ", max_blocks_per_seq >= 1], got ",
                      table.sizes());
    check_last_dim_contiguous(table, "block_table");
    TORCH_CHECK_VALUE(k.size(1) >= 1, "block_size (k.shape[1]) must be >= 1, got ", k.size(1));
    TORCH_CHECK_VALUE(table.size(1) * k.size(1) <= kMaxKeys, "at most 2^30 keys per sequence: block_table.shape[1] x ",
                      "block_size = ", table.size(1) * k.size(1));
  }
  return batch;
}

}  // namespace

void flash_attention_varlen(at::Tensor& out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                            int64_t max_seqlen_k, OptionFloats option_floats, OptionInts option_ints,
                            const OptionTensors& option_tensors) {
  const int64_t batch = check_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  check_out(out, query, "out");
  flash_sdpa::VarlenAttention call;
  call.options =
      read_options(option_floats, option_ints, option_tensors, query, batch, query.size(1), key.size(0), query.size(0));
  check_no_overlap(out, "out",
                   {{"query", &query},
                    {"key", &key},
                    {"value", &value},
                    {"cu_seqlens_q", &cu_seqlens_q},
                    {"cu_seqlens_k", &cu_seqlens_k},
                    {"alibi_slopes", opt(call.options.alibi_slopes)},
                    {"s_aux", opt(call.options.sinks)}});

  call.q = query;
  call.k = key;
  call.v = value;
  call.out = out;
  call.lse = at::empty({query.size(1), query.size(0)}, query.options().dtype(at::kFloat));
  call.cu_seqlens_q = cu_seqlens_q;
  call.cu_seqlens_k = cu_seqlens_k;
  call.max_seqlen_q = max_seqlen_q;
  call.max_seqlen_k = max_seqlen_k;
  call.tensor_ops = flash_sdpa::tensor_ops_enabled();  // the tensor-ops kernels where the package turned them on
  flash_sdpa::run_launch_plan(flash_sdpa::plan_varlen_attention(call));
}

std::tuple<at::Tensor, at::Tensor> varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                              int64_t max_seqlen_q, int64_t max_seqlen_k,
                                              const std::optional<at::Tensor>& block_table, OptionFloats option_floats,
                                              OptionInts option_ints, const OptionTensors& option_tensors) {
  const int64_t batch = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table);
  const int64_t key_rows = block_table.has_value() ? block_table->size(1) * k.size(1) : k.size(0);
  flash_sdpa::VarlenAttention call;
  call.options = read_options(option_floats, option_ints, option_tensors, q, batch, q.size(1), key_rows, q.size(0));
  call.q = q;
  call.k = k;
  call.v = v;
  call.cu_seqlens_q = cu_seqlens_q;
  call.cu_seqlens_k = cu_seqlens_k;
  call.block_table = block_table;
  call.max_seqlen_q = max_seqlen_q;
  const flash_sdpa::RoutedForward routed = flash_sdpa::route_varlen_forward(call, max_seqlen_k);
  flash_sdpa::run_launch_plan(routed.plan);
  return {routed.out, routed.lse};
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       OptionFloats option_floats, OptionInts option_ints,
                                       const OptionTensors& option_tensors) {
  check_qkv(q, k, v, 4, "[batch, seqlen_q, num_heads, head_dim]", "[batch, seqlen_k, num_kv_heads, head_dim]");
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), "k must have the batch size of q (", q.size(0), "), got ", k.size(0));
  const flash_sdpa::AttentionOptions options =
      read_options(option_floats, option_ints, option_tensors, q, q.size(0), q.size(2), k.size(1), q.size(1));
  const flash_sdpa::RoutedForward routed = flash_sdpa::route_dense_forward(q, k, v, options);
  flash_sdpa::run_launch_plan(routed.plan);
  return {routed.out, routed.lse};
}

std::vector<int64_t> varlen_head_dims() { return flash_sdpa::varlen_head_dims(); }

bool tensor_ops_supported() { return flash_sdpa::tensor_ops_supported(); }

void set_tensor_ops(bool enabled) {
  TORCH_CHECK_VALUE(
      !enabled || flash_sdpa::tensor_ops_supported(),
      "set_tensor_ops(True): this GPU or build has no tensor-ops library (tensor_ops_supported() is False)");
  flash_sdpa::set_tensor_ops_enabled(enabled);
}

// flash_attn_with_kvcache.
namespace {

void check_int32_vector(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t batch) {
  check_device(t, name, q);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == batch, name, " must have shape [", batch, "] (batch of q), got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kvcache_fwd(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const std::optional<at::Tensor>& k,
    const std::optional<at::Tensor>& v, const std::optional<at::Tensor>& cache_seqlens,
    const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& cache_batch_idx,
    const std::optional<at::Tensor>& cache_leftpad, int64_t num_splits, bool return_lse, int64_t max_seqlen_k,
    OptionFloats option_floats, OptionInts option_ints, const OptionTensors& option_tensors) {
  // 1. Devices, dtypes, ranks.
  const bool paged = block_table.has_value();
  check_device(q, "q", q);
  check_device(k_cache, "k_cache", q);
  check_device(v_cache, "v_cache", q);
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                   "q must be float32, float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK_TYPE(k_cache.scalar_type() == q.scalar_type(), "k_cache must have the dtype of q (", q.scalar_type(),
                   "), got ", k_cache.scalar_type());
  TORCH_CHECK_TYPE(v_cache.scalar_type() == q.scalar_type(), "v_cache must have the dtype of q (", q.scalar_type(),
                   "), got ", v_cache.scalar_type());
  TORCH_CHECK_VALUE(q.dim() == 4, "q must have shape [batch, seqlen_q, num_heads, head_dim], got ", q.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 4, "k_cache must have shape ",
                    paged ? "[num_blocks, block_size, num_kv_heads, head_dim]"
                          : "[batch_cache, seqlen_cache, num_kv_heads, head_dim]",
                    ", got ", k_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache (", k_cache.sizes(),
                    "), got ", v_cache.sizes());

  // 2. Shapes.
  const int64_t batch = q.size(0), heads = q.size(2), head_dim = q.size(3), kv_heads = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(3) == head_dim, "k_cache must have the head dim of q (", head_dim, "), got ",
                    k_cache.size(3));
  TORCH_CHECK_VALUE(flash_sdpa::paged_supports(q.scalar_type(), head_dim), "head dim ", head_dim,
                    " is not supported (q.shape[-1]); supported: ", flash_sdpa::paged_head_dims());
  TORCH_CHECK_VALUE(kv_heads >= 1 && heads % kv_heads == 0, "the number of heads of q (", heads,
                    ") must be a multiple of the number of heads of k_cache/v_cache (", kv_heads, ")");
  TORCH_CHECK_VALUE(k_cache.size(1) >= 1, paged ? "block_size (k_cache.shape[1])" : "seqlen_cache (k_cache.shape[1])",
                    " must be >= 1, got ", k_cache.size(1));
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k_cache, "k_cache");
  check_last_dim_contiguous(v_cache, "v_cache");
  if (cache_seqlens.has_value()) {
    check_int32_vector(*cache_seqlens, "cache_seqlens", q, batch);
  }

  // 3. Block table (paged), or cache rows (contiguous cache: cache_batch_idx, default 0 .. batch - 1).
  if (paged) {
    const at::Tensor& table = *block_table;
    TORCH_CHECK_VALUE(!cache_batch_idx.has_value(), "cache_batch_idx cannot be combined with block_table");
    check_device(table, "block_table", q);
    TORCH_CHECK_TYPE(table.scalar_type() == at::kInt, "block_table must be int32, got ", table.scalar_type());
    TORCH_CHECK_VALUE(table.dim() == 2 && table.size(0) == batch && table.size(1) >= 1, "block_table must have shape [",
                      batch, ", max_blocks_per_seq >= 1], got ", table.sizes());
    check_last_dim_contiguous(table, "block_table");
  } else if (cache_batch_idx.has_value()) {
    check_int32_vector(*cache_batch_idx, "cache_batch_idx", q, batch);
  } else {
    TORCH_CHECK_VALUE(k_cache.size(0) >= batch, "k_cache has ", k_cache.size(0), " rows, fewer than the batch of q (",
                      batch, "): pass cache_batch_idx");
  }
  // Key positions are int32 in the kernels, with room for the new tokens and the query rows on top.
  const int64_t capacity = paged ? block_table->size(1) * k_cache.size(1) : k_cache.size(1);
  const int64_t seqlen_new = k.has_value() ? k->size(1) : 0;
  TORCH_CHECK_VALUE(
      capacity <= kMaxKeys && seqlen_new <= kMaxKeys && q.size(1) <= kMaxKeys,
      "at most 2^30 keys per request: ", paged ? "block_table.shape[1] x block_size = " : "seqlen_cache = ", capacity,
      ", seqlen_new = ", seqlen_new, ", seqlen_q = ", q.size(1));
  flash_sdpa::PagedKVCacheAttention call;
  call.options = read_options(option_floats, option_ints, option_tensors, q, batch, heads, capacity, q.size(1));

  // 4. New tokens.
  TORCH_CHECK_VALUE(k.has_value() == v.has_value(), "k and v must be given together (got ", k.has_value() ? "k" : "v",
                    " only)");
  TORCH_CHECK_VALUE(cache_seqlens.has_value() || !k.has_value(), "cache_seqlens is required when k and v are appended");
  if (k.has_value()) {
    check_device(*k, "k", q);
    check_device(*v, "v", q);
    TORCH_CHECK_TYPE(k->scalar_type() == q.scalar_type() && v->scalar_type() == q.scalar_type(),
                     "k and v must have the dtype of q (", q.scalar_type(), "), got ", k->scalar_type(), " and ",
                     v->scalar_type());
    TORCH_CHECK_VALUE(k->dim() == 4 && k->size(0) == batch && k->size(2) == kv_heads && k->size(3) == head_dim,
                      "k must have shape [", batch, ", seqlen_new, ", kv_heads, ", ", head_dim, "], got ", k->sizes());
    TORCH_CHECK_VALUE(v->sizes() == k->sizes(), "v must have the shape of k (", k->sizes(), "), got ", v->sizes());
    check_last_dim_contiguous(*k, "k");
    check_last_dim_contiguous(*v, "v");
    // The caches are written in place: no input may share bytes with them, and the two views must differ (one
    // buffer with v_cache shifted from k_cache, as transformers allocates it, is fine: the slots written differ).
    TORCH_CHECK_VALUE(!(k_cache.is_alias_of(v_cache) && k_cache.storage_offset() == v_cache.storage_offset() &&
                        k_cache.strides() == v_cache.strides()),
                      "k_cache and v_cache must not be the same tensor when k and v are appended (both would be "
                      "written to the same slots)");
    for (const at::Tensor* cache : {&k_cache, &v_cache}) {
      check_no_overlap(*cache, cache == &k_cache ? "k_cache" : "v_cache",
                       {{"q", &q},
                        {"k", &*k},
                        {"v", &*v},
                        {"cache_seqlens", opt(cache_seqlens)},
                        {"block_table", opt(block_table)},
                        {"cache_batch_idx", opt(cache_batch_idx)},
                        {"alibi_slopes", opt(call.options.alibi_slopes)},
                        {"s_aux", opt(call.options.sinks)},
                        {"cache_leftpad", opt(cache_leftpad)}});
    }
  }

  if (cache_leftpad.has_value()) {
    TORCH_CHECK_VALUE(!paged, "cache_leftpad cannot be combined with block_table (FlashAttention-2 rejects it too)");
    check_int32_vector(*cache_leftpad, "cache_leftpad", q, batch);
  }

  // 5. The decode kernel's own limits.
  TORCH_CHECK_VALUE(num_splits >= 0 && num_splits <= flash_sdpa::paged::kMaxSplits, "num_splits must be in [0, ",
                    int(flash_sdpa::paged::kMaxSplits), "] (0 = automatic), got ", num_splits);
  TORCH_CHECK_VALUE(max_seqlen_k >= 0, "max_seqlen_k must be >= 0 (0 = unknown), got ", max_seqlen_k);

  // 6. Hand over (routing.cpp fills what a contiguous cache or a missing cache_seqlens implies, and plans).
  call.q = q;
  call.k_cache = k_cache;
  call.v_cache = v_cache;
  if (paged) {
    call.block_table = *block_table;
  }
  if (cache_seqlens.has_value()) {
    call.cache_seqlens = *cache_seqlens;
  }
  call.k_new = k;
  call.v_new = v;
  call.cache_leftpad = cache_leftpad;
  call.num_splits = num_splits;
  call.max_seqlen_k = max_seqlen_k;
  const flash_sdpa::RoutedForward routed = flash_sdpa::route_kvcache_forward(call, cache_batch_idx, return_lse);
  flash_sdpa::run_launch_plan(routed.plan);
  return {routed.out, routed.lse};
}

std::vector<int64_t> kvcache_head_dims() { return flash_sdpa::paged_head_dims(); }

// Every op's schema ends with the option group (FLASH_SDPA_OPTION_GROUP, checks.h).
TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops) {
  ops.def(
      "flash_attention_varlen(Tensor(a!) out, Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, " FLASH_SDPA_OPTION_GROUP ") -> ()");
  ops.def(
      "varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, Tensor? block_table, " FLASH_SDPA_OPTION_GROUP ") -> (Tensor, Tensor)");
  ops.def("fwd(Tensor q, Tensor k, Tensor v, " FLASH_SDPA_OPTION_GROUP ") -> (Tensor, Tensor)");
  ops.def("varlen_head_dims() -> int[]", &varlen_head_dims);
  // The forward on Metal 4 tensor ops (routing.h): the Python package asks, self-tests and turns it on.
  ops.def("tensor_ops_supported() -> bool", &tensor_ops_supported);
  ops.def("set_tensor_ops(bool enabled) -> ()", &set_tensor_ops);

#ifdef METAL_FLASH_SDPA_EMULATED
  constexpr auto kDispatchKey = c10::DispatchKey::CPU;
#else
  constexpr auto kDispatchKey = c10::DispatchKey::MPS;
#endif
  ops.impl("flash_attention_varlen", kDispatchKey, &flash_attention_varlen);
  ops.impl("varlen_fwd", kDispatchKey, &varlen_fwd);
  ops.impl("fwd", kDispatchKey, &fwd);

  // The backward (backward_binding.cpp).
  ops.def(
      "varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, " FLASH_SDPA_OPTION_GROUP
      ") -> (Tensor, Tensor, Tensor, Tensor)");
  ops.def("bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, " FLASH_SDPA_OPTION_GROUP
          ") -> (Tensor, Tensor, Tensor, Tensor)");
  ops.impl("varlen_bwd", kDispatchKey, &varlen_bwd);
  ops.impl("bwd", kDispatchKey, &bwd);

  // flash_attn_with_kvcache.
  ops.def(
      "kvcache_fwd(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, Tensor? cache_seqlens, "
      "Tensor? block_table, Tensor? cache_batch_idx, Tensor? cache_leftpad, int num_splits, bool return_lse, "
      "int max_seqlen_k, " FLASH_SDPA_OPTION_GROUP ") -> (Tensor, Tensor)");
  ops.def("kvcache_head_dims() -> int[]", &kvcache_head_dims);
  ops.impl("kvcache_fwd", kDispatchKey, &kvcache_fwd);
}

REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
