// Op schemas, argument validation and registration of metal-flash-sdpa.
//
// Every op validates all of its arguments before planning (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE: Python sees a
// ValueError / TypeError that names the argument): nothing past validation may throw
// (on the Mac, encoding runs inside dispatch_sync, where an exception kills the process). The ops are registered
// for MPS; the emulated Linux build (METAL_FLASH_SDPA_EMULATED) registers them for CPU, where the launch plan runs
// on the Metal-on-CPU emulator (msl/cpu/launch_cpu.cpp).
#include "torch_binding.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
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
  if (block_table.has_value()) {
    check_qkv(q, k, v, 3, "[total_q, num_heads, head_dim]", "[num_blocks, block_size, num_kv_heads, head_dim]", 4);
    const at::Tensor& table = *block_table;
    check_device(table, "block_table", q);
    TORCH_CHECK_TYPE(table.scalar_type() == at::kInt, "block_table must be int32, got ", table.scalar_type());
    TORCH_CHECK_VALUE(table.dim() == 2 && table.size(0) == cu_seqlens_k.size(0) - 1 && table.size(1) >= 1,
                      "block_table must have shape [batch = ", cu_seqlens_k.size(0) - 1,
                      ", max_blocks_per_seq >= 1], got ", table.sizes());
    check_last_dim_contiguous(table, "block_table");
    TORCH_CHECK_VALUE(k.size(1) >= 1, "block_size (k.shape[1]) must be >= 1, got ", k.size(1));
    TORCH_CHECK_VALUE(table.size(1) * k.size(1) <= kMaxKeys, "at most 2^30 keys per sequence: block_table.shape[1] x ",
                      "block_size = ", table.size(1) * k.size(1));
  } else {
    check_qkv(q, k, v, 3, "[total_q, num_heads, head_dim]", "[total_k, num_kv_heads, head_dim]");
  }
  return check_varlen_sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q);
}

void run_varlen(const flash_sdpa::VarlenAttention& call) {
  flash_sdpa::run_launch_plan(flash_sdpa::plan_varlen_attention(call));
}

}  // namespace

void flash_attention_varlen(at::Tensor& out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                            int64_t max_seqlen_k, bool do_causal, double scale, double softcapping,
                            const std::optional<at::Tensor>& s_aux, int64_t window_left, int64_t window_right) {
  const int64_t batch = check_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  check_out(out, query, "out");
  check_no_overlap(out, "out",
                   {{"query", &query},
                    {"key", &key},
                    {"value", &value},
                    {"cu_seqlens_q", &cu_seqlens_q},
                    {"cu_seqlens_k", &cu_seqlens_k},
                    {"s_aux", opt(s_aux)}});
  // softcapping = 1.0 is the package's historical "off".
  const double softcap = softcapping == 1.0 ? 0.0 : softcapping;
  check_scale(scale, softcap);
  check_window(window_left, window_right);
  check_extras(std::nullopt, s_aux, query, batch, query.size(1));

  flash_sdpa::VarlenAttention call;
  call.q = query;
  call.k = key;
  call.v = value;
  call.out = out;
  call.lse = at::empty({query.size(1), query.size(0)}, query.options().dtype(at::kFloat));
  call.cu_seqlens_q = cu_seqlens_q;
  call.cu_seqlens_k = cu_seqlens_k;
  call.max_seqlen_q = max_seqlen_q;
  call.options = flash_sdpa::attention_options(scale, do_causal, window_left, window_right, softcap, std::nullopt,
                                               s_aux, key.size(0), query.size(0));
  run_varlen(call);
}

namespace {

// max_seqlen_q == 1 (transformers' generate() decode with left padding: cu_seqlens_q = arange(B + 1)) runs on the
// decode kernel in its varlen mode: sequence b attends rows cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1 of the
// packed k / v (clamped to [0, total_k] in the kernel, whatever cu_seqlens hold) from query row cu_seqlens_q[b], each
// K/V byte read once per KV head for the whole GQA group; the varlen kernel then rewrites the sequences that have
// several query rows after all (routing.h: plan_varlen_decode). The result does not depend on max_seqlen_q or
// max_seqlen_k, which only steer the launch. Nothing is read on the host; the only tensor ops are the output fills:
// a sequence without a query row is skipped, and rows of q that no sequence covers read 0 / LSE -inf.
std::tuple<at::Tensor, at::Tensor> varlen_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                 int64_t max_seqlen_k, double softmax_scale, bool causal,
                                                 int64_t window_left, int64_t window_right, double softcap,
                                                 const std::optional<at::Tensor>& alibi_slopes,
                                                 const std::optional<at::Tensor>& s_aux) {
  const int64_t batch = cu_seqlens_q.size(0) - 1, total_q = q.size(0), heads = q.size(1);
  at::Tensor out = at::zeros({total_q, heads, q.size(2)}, q.options());
  at::Tensor lse = at::full({heads, total_q}, -INFINITY, q.options().dtype(at::kFloat));
  if (batch <= 0 || total_q == 0) {
    return {out, lse};  // nothing to attend: no dispatch
  }
  flash_sdpa::PagedKVCacheAttention call;
  call.q = q;        // [total_q, H, D]
  call.k_cache = k;  // [total_k, Hkv, D]
  call.v_cache = v;
  call.cu_seqlens_q = cu_seqlens_q;
  call.cu_seqlens_k = cu_seqlens_k;
  call.out = out;
  call.lse = lse;
  call.options = flash_sdpa::attention_options(softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                                               s_aux, k.size(0), total_q);
  call.max_seqlen_k = std::min<int64_t>(max_seqlen_k, k.size(0));
  flash_sdpa::VarlenAttention rest;
  rest.q = q;
  rest.k = k;
  rest.v = v;
  rest.out = out;
  rest.lse = lse;
  rest.cu_seqlens_q = cu_seqlens_q;
  rest.cu_seqlens_k = cu_seqlens_k;
  rest.options = call.options;
  flash_sdpa::run_launch_plan(flash_sdpa::plan_varlen_decode(call, rest));
  return {out, lse};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                              int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                                              bool causal, int64_t window_left, int64_t window_right, double softcap,
                                              const std::optional<at::Tensor>& alibi_slopes,
                                              const std::optional<at::Tensor>& s_aux,
                                              const std::optional<at::Tensor>& block_table) {
  const int64_t batch = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table);
  check_window(window_left, window_right);
  check_scale(softmax_scale, softcap);
  check_extras(alibi_slopes, s_aux, q, batch, q.size(1));
  const bool paged = block_table.has_value();

  if (flash_sdpa::route_varlen(q.scalar_type(), q.size(2), max_seqlen_q, batch, q.size(0), k.size(0), paged) ==
      flash_sdpa::ForwardKernel::kDecode) {
    return varlen_decode(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, softmax_scale, causal, window_left,
                         window_right, softcap, alibi_slopes, s_aux);
  }
  // Rows of q that no sequence covers (cu_seqlens_q[-1] < total_q, or garbage cu_seqlens) are never written by the
  // kernel: they read as 0 / LSE -inf rather than uninitialised memory.
  at::Tensor out = at::zeros(q.sizes(), q.options());
  at::Tensor lse = at::full({q.size(1), q.size(0)}, -INFINITY, q.options().dtype(at::kFloat));
  flash_sdpa::VarlenAttention call;
  call.q = q;
  call.k = k;
  call.v = v;
  call.out = out;
  call.lse = lse;
  call.cu_seqlens_q = cu_seqlens_q;
  call.cu_seqlens_k = cu_seqlens_k;
  call.block_table = block_table;
  call.max_seqlen_q = max_seqlen_q;
  const int64_t key_rows = paged ? block_table->size(1) * k.size(1) : k.size(0);
  call.options = flash_sdpa::attention_options(softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                                               s_aux, key_rows, q.size(0));
  run_varlen(call);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       double softmax_scale, bool causal, int64_t window_left, int64_t window_right,
                                       double softcap, const std::optional<at::Tensor>& alibi_slopes,
                                       const std::optional<at::Tensor>& s_aux) {
  check_qkv(q, k, v, 4, "[batch, seqlen_q, num_heads, head_dim]", "[batch, seqlen_k, num_kv_heads, head_dim]");
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), "k must have the batch size of q (", q.size(0), "), got ", k.size(0));
  check_window(window_left, window_right);
  check_scale(softmax_scale, softcap);
  check_extras(alibi_slopes, s_aux, q, q.size(0), q.size(2));

  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (flash_sdpa::route_dense(q.scalar_type(), q.size(3), q.size(1), k.size(1)) == flash_sdpa::ForwardKernel::kDecode) {
    // The decode kernel reads K/V as a contiguous cache of one block per batch row (flash_sdpa/routing.h).
    const int64_t batch = q.size(0), seqlen_k = k.size(1);
    flash_sdpa::PagedKVCacheAttention call;
    call.q = q;
    call.k_cache = k;
    call.v_cache = v;
    call.block_table = at::arange(batch, q.options().dtype(at::kInt)).view({batch, 1});
    call.cache_seqlens = at::full({batch}, seqlen_k, q.options().dtype(at::kInt));
    call.out = out;
    call.lse = lse;
    call.options = flash_sdpa::attention_options(softmax_scale, causal, window_left, window_right, softcap,
                                                 alibi_slopes, s_aux, seqlen_k, q.size(1));
    call.max_seqlen_k = seqlen_k;
    flash_sdpa::run_launch_plan(flash_sdpa::plan_paged_kvcache(call));
    return {out, lse};
  }
  flash_sdpa::VarlenAttention call;
  call.q = q;
  call.k = k;
  call.v = v;
  call.out = out;
  call.lse = lse;
  call.options = flash_sdpa::attention_options(softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                                               s_aux, k.size(1), q.size(1));
  run_varlen(call);
  return {out, lse};
}

std::vector<int64_t> varlen_head_dims() { return flash_sdpa::varlen_head_dims(); }

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
    const std::optional<at::Tensor>& v, const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& cache_batch_idx, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& s_aux, int64_t num_splits, bool return_lse, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& cache_leftpad) {
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
  check_int32_vector(cache_seqlens, "cache_seqlens", q, batch);

  // 3. Block table: given (paged), or one block per request (contiguous cache, optionally cache_batch_idx).
  at::Tensor table;
  if (paged) {
    table = *block_table;
    TORCH_CHECK_VALUE(!cache_batch_idx.has_value(), "cache_batch_idx cannot be combined with block_table");
    check_device(table, "block_table", q);
    TORCH_CHECK_TYPE(table.scalar_type() == at::kInt, "block_table must be int32, got ", table.scalar_type());
    TORCH_CHECK_VALUE(table.dim() == 2 && table.size(0) == batch && table.size(1) >= 1, "block_table must have shape [",
                      batch, ", max_blocks_per_seq >= 1], got ", table.sizes());
    check_last_dim_contiguous(table, "block_table");
  } else if (cache_batch_idx.has_value()) {
    check_int32_vector(*cache_batch_idx, "cache_batch_idx", q, batch);
    table = cache_batch_idx->view({batch, 1});
  } else {
    TORCH_CHECK_VALUE(k_cache.size(0) >= batch, "k_cache has ", k_cache.size(0), " rows, fewer than the batch of q (",
                      batch, "): pass cache_batch_idx");
    table = at::arange(batch, q.options().dtype(at::kInt)).view({batch, 1});
  }

  // 4. New tokens.
  TORCH_CHECK_VALUE(k.has_value() == v.has_value(), "k and v must be given together (got ", k.has_value() ? "k" : "v",
                    " only)");
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
                        {"cache_seqlens", &cache_seqlens},
                        {"block_table", opt(block_table)},
                        {"cache_batch_idx", opt(cache_batch_idx)},
                        {"alibi_slopes", opt(alibi_slopes)},
                        {"s_aux", opt(s_aux)},
                        {"cache_leftpad", opt(cache_leftpad)}});
    }
  }

  if (cache_leftpad.has_value()) {
    TORCH_CHECK_VALUE(!paged, "cache_leftpad cannot be combined with block_table (FlashAttention-2 rejects it too)");
    check_int32_vector(*cache_leftpad, "cache_leftpad", q, batch);
  }

  // 5. Options.
  check_window(window_left, window_right);
  check_scale(softmax_scale, softcap);
  check_extras(alibi_slopes, s_aux, q, batch, heads);
  TORCH_CHECK_VALUE(num_splits >= 0 && num_splits <= flash_sdpa::paged::kMaxSplits, "num_splits must be in [0, ",
                    int(flash_sdpa::paged::kMaxSplits), "] (0 = automatic), got ", num_splits);
  TORCH_CHECK_VALUE(max_seqlen_k >= 0, "max_seqlen_k must be >= 0 (0 = unknown), got ", max_seqlen_k);
  // Key positions are int32 in the kernels, with room for the new tokens and the query rows on top.
  const int64_t capacity = paged ? table.size(1) * k_cache.size(1) : k_cache.size(1);
  const int64_t seqlen_new = k.has_value() ? k->size(1) : 0;
  TORCH_CHECK_VALUE(
      capacity <= kMaxKeys && seqlen_new <= kMaxKeys && q.size(1) <= kMaxKeys,
      "at most 2^30 keys per request: ", paged ? "block_table.shape[1] x block_size = " : "seqlen_cache = ", capacity,
      ", seqlen_new = ", seqlen_new, ", seqlen_q = ", q.size(1));

  // 6. Plan (may still reject sizes that overflow int32) and run.
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(return_lse ? at::IntArrayRef{batch, heads, q.size(1)} : at::IntArrayRef{0},
                             q.options().dtype(at::kFloat));
  flash_sdpa::PagedKVCacheAttention call;
  call.q = q;
  call.k_cache = k_cache;
  call.v_cache = v_cache;
  call.block_table = table;
  call.cache_seqlens = cache_seqlens;
  call.k_new = k;
  call.v_new = v;
  call.out = out;
  if (return_lse) {
    call.lse = lse;
  }
  call.options = flash_sdpa::attention_options(softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                                               s_aux, capacity, q.size(1));
  call.cache_leftpad = cache_leftpad;
  call.num_splits = num_splits;
  call.max_seqlen_k = max_seqlen_k;
  flash_sdpa::run_launch_plan(flash_sdpa::plan_paged_kvcache(call));
  return {out, lse};
}

std::vector<int64_t> kvcache_head_dims() { return flash_sdpa::paged_head_dims(); }

TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops) {
  ops.def(
      "flash_attention_varlen(Tensor(a!) out, Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool do_causal, float scale, float softcapping, "
      "Tensor? s_aux=None, int window_left=-1, int window_right=-1) -> ()");
  ops.def(
      "varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float softmax_scale, bool causal, int window_left, int window_right, float softcap, "
      "Tensor? alibi_slopes, Tensor? s_aux, Tensor? block_table=None) -> (Tensor, Tensor)");
  ops.def(
      "fwd(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal, int window_left, int window_right, "
      "float softcap, Tensor? alibi_slopes, Tensor? s_aux) -> (Tensor, Tensor)");
  ops.def("varlen_head_dims() -> int[]", &varlen_head_dims);

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
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal, int window_left, "
      "int window_right, float softcap, Tensor? alibi_slopes, Tensor? s_aux) -> (Tensor, Tensor, Tensor, Tensor)");
  ops.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float softmax_scale, bool causal, "
      "int window_left, int window_right, float softcap, Tensor? alibi_slopes, Tensor? s_aux) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  ops.impl("varlen_bwd", kDispatchKey, &varlen_bwd);
  ops.impl("bwd", kDispatchKey, &bwd);

  // flash_attn_with_kvcache.
  ops.def(
      "kvcache_fwd(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, Tensor cache_seqlens, "
      "Tensor? block_table, Tensor? cache_batch_idx, float softmax_scale, bool causal, int window_left, "
      "int window_right, float softcap, Tensor? alibi_slopes, Tensor? s_aux, int num_splits, bool return_lse, "
      "int max_seqlen_k, Tensor? cache_leftpad=None) -> (Tensor, Tensor)");
  ops.def("kvcache_head_dims() -> int[]", &kvcache_head_dims);
  ops.impl("kvcache_fwd", kDispatchKey, &kvcache_fwd);
}

REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
