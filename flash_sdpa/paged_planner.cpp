#include "paged_planner.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <limits>

#include "paged_params.h"
#include "planner_common.h"

namespace flash_sdpa {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Key positions stay below 2^31 - 2^20 so that the kernel's int32 key arithmetic (a split's stride past the end,
// at most kMaxSplits x 1024 keys) cannot overflow, whatever cache_seqlens / cu_seqlens hold.
constexpr int64_t kMaxKeys = std::numeric_limits<int32_t>::max() - (int64_t{1} << 20);

std::atomic<GpuCoreCountProvider> core_count_provider{nullptr};

// The matrix and wide paths' kernels (FLASH_SDPA_PAGED_MATRIX_INSTANCES, FLASH_SDPA_PAGED_WIDE_INSTANCES) are exactly
// the configurations decode_matrix_rows and decode_runs_wide name, so that every kernel name paged_decode_kernel_name
// builds for a one-token call exists.
constexpr bool has_own_kernel(bool wide, fsdpa_i32 head_dim, fsdpa_i32 elem_bytes, fsdpa_i32 rows) {
  return wide ? paged::decode_runs_wide(head_dim, elem_bytes, rows, 1)
              : paged::decode_matrix_rows(head_dim, elem_bytes, rows);
}
constexpr int listed_instances(bool wide) {  // an instance of another configuration counts 1000
  int n = 0;
#define FLASH_SDPA_COUNT_INSTANCE(R, D, T, TN) n += has_own_kernel(wide, D, 2, R) ? 1 : 1000;
  if (wide) {
    FLASH_SDPA_PAGED_WIDE_INSTANCES(FLASH_SDPA_COUNT_INSTANCE)
  } else {
    FLASH_SDPA_PAGED_MATRIX_INSTANCES(FLASH_SDPA_COUNT_INSTANCE)
  }
#undef FLASH_SDPA_COUNT_INSTANCE
  return n;
}
constexpr int configurations(bool wide) {
  int n = 0;
  const fsdpa_i32 elem_bytes[] = {4, 2, 2};  // FLASH_SDPA_PAGED_DTYPES: float, half, bfloat
#define FLASH_SDPA_COUNT_CONFIG(D, MAXR, ...)           \
  for (fsdpa_i32 rows = 1; rows <= MAXR; rows *= 2) {   \
    for (const fsdpa_i32 elem : elem_bytes) {           \
      n += has_own_kernel(wide, D, elem, rows) ? 1 : 0; \
    }                                                   \
  }
  FLASH_SDPA_PAGED_HEAD_DIMS(FLASH_SDPA_COUNT_CONFIG, _)
#undef FLASH_SDPA_COUNT_CONFIG
  return n;
}
static_assert(listed_instances(false) == configurations(false),
              "FLASH_SDPA_PAGED_MATRIX_INSTANCES lists every decode_matrix_rows configuration, and only those");
static_assert(listed_instances(true) == configurations(true),
              "FLASH_SDPA_PAGED_WIDE_INSTANCES lists every decode_runs_wide configuration, and only those");

}  // namespace

void set_gpu_core_count_provider(GpuCoreCountProvider provider) { core_count_provider.store(provider); }

int64_t gpu_core_count() {
  const GpuCoreCountProvider provider = core_count_provider.load();
  const int64_t cores = provider != nullptr ? provider() : 0;
  return std::max<int64_t>(cores, 0);
}

std::string paged_write_kernel_name(at::ScalarType dtype) {
  const char* name = kernel_dtype_name(dtype);
  TORCH_CHECK(name != nullptr, "flash_attn_with_kvcache: unsupported dtype ", dtype);
  return std::string("kv_paged_write_") + name;
}

std::string paged_decode_kernel_name(at::ScalarType dtype, int64_t head_dim, int64_t rows, DecodePath path) {
  const char* name = kernel_dtype_name(dtype);
  TORCH_CHECK(name != nullptr, "flash_attn_with_kvcache: unsupported dtype ", dtype);
  const char* prefix = path == DecodePath::kMatrix ? "paged_decode_matrix_"
                       : path == DecodePath::kWide ? "paged_decode_wide_"
                                                   : "paged_decode_";
  return std::string(prefix) + name + "_d" + std::to_string(head_dim) + "_r" + std::to_string(rows);
}

std::string paged_combine_kernel_name(at::ScalarType dtype) {
  const char* name = kernel_dtype_name(dtype);
  TORCH_CHECK(name != nullptr, "flash_attn_with_kvcache: unsupported dtype ", dtype);
  return std::string("paged_decode_combine_") + name;
}

const std::vector<int64_t>& paged_head_dims() {
#define FLASH_SDPA_PAGED_HEAD_DIM_ENTRY(D, MAXR, ...) D,
  static const std::vector<int64_t> dims{FLASH_SDPA_PAGED_HEAD_DIMS(FLASH_SDPA_PAGED_HEAD_DIM_ENTRY, _)};
#undef FLASH_SDPA_PAGED_HEAD_DIM_ENTRY
  return dims;
}

bool paged_supports(at::ScalarType dtype, int64_t head_dim) {
  const auto& dims = paged_head_dims();
  return kernel_dtype_name(dtype) != nullptr && std::find(dims.begin(), dims.end(), head_dim) != dims.end();
}

int64_t paged_max_rows(int64_t head_dim) {
#define FLASH_SDPA_PAGED_MAX_ROWS_ENTRY(D, MAXR, ...) \
  if (head_dim == D) {                                \
    return MAXR;                                      \
  }
  FLASH_SDPA_PAGED_HEAD_DIMS(FLASH_SDPA_PAGED_MAX_ROWS_ENTRY, _)
#undef FLASH_SDPA_PAGED_MAX_ROWS_ENTRY
  TORCH_CHECK(false, "flash_attn_with_kvcache: no kernel for head_dim ", head_dim);
  return 0;
}

int64_t paged_rows_per_threadgroup(int64_t head_dim, int64_t rows_needed) {
  const int64_t max_rows = paged_max_rows(head_dim);
  int64_t rows = 1;  // the row tiles are the powers of two up to max_rows (FLASH_SDPA_PAGED_ROWS_UPTO_*)
  while (rows < rows_needed && rows < max_rows) {
    rows *= 2;
  }
  return rows;
}

int64_t decode_threadgroups_per_core(int64_t rows, int64_t head_dim, bool matrix) {
  return rows == 1 ? 3 : (rows * head_dim <= 1024 || matrix ? 2 : 1);
}

int64_t paged_pick_num_splits(int64_t work_threadgroups, int64_t max_seqlen_k, int64_t target, bool target_known,
                              int64_t step_keys, int64_t cores) {
  if (work_threadgroups <= 0 || work_threadgroups >= target) {
    return 1;  // the grid already fills the GPU
  }
  // Known device: rounded down, one wave; a partial last wave costs a whole wave's latency (proxy, B=1 H=32/16
  // S=8192: 16 splits 41.5 us, 17 splits 62.6 us). Unknown device (kDefaultGpuCores): rounded up, since idle cores
  // cost more than a partial wave on a GPU that holds more than the guess (proxy, B=8 S=4096 at the default's 160
  // threadgroups: 2 splits 210 us, 3 splits 166 us).
  int64_t splits = target_known ? target / work_threadgroups : ceil_div(target, work_threadgroups);
  const int64_t step = std::max<int64_t>(step_keys, 1);
  splits = std::min(splits, std::max<int64_t>(1, max_seqlen_k / std::min(kMinKeysPerSplit, step)));
  splits = std::clamp<int64_t>(splits, 1, paged::kMaxSplits);
  // Splits take whole threadgroup steps in turn (paged_decode_attention.h), so a split's time is its number of steps:
  // the fewest splits with the same most steps per split do the same in fewer threadgroups and partials (H200, B=1
  // S=1000 GQA 4, 32 steps: 16 splits of 2 steps 14.5 us, 31 splits of 1-2 steps 15.9).
  const int64_t steps = std::max<int64_t>(1, ceil_div(max_seqlen_k, step));
  int64_t per_split = ceil_div(steps, splits);
  // A split call whose grid leaves cores idle takes shorter splits, up to one threadgroup per core and one step per
  // split (a partial last step counts): an idle core adds nothing, a split's time is its steps. Proxy (H100, 132
  // SMs), B=1 S=1000 GQA 7 (4 KV heads, 32 steps): 16 splits of 2 steps (64 threadgroups) 15.4 us, 32 of 1 step
  // 12.8; where the fewest splits already give each core a threadgroup (GQA 4, 8 KV heads: 16 x 8 = 128) the
  // combine's extra partials cost more than the steps save (32 splits 14.7 us against 14.1). An unsplit call stays
  // so: a second split adds the combine's dispatch (B=4 H=16/16 S=50: 1 split 6.2 us, 2 splits 8.1). On an Apple
  // GPU: one KV head at B = 1 (multi-query models) took 16 splits of 2 steps at 1000 keys, 16 threadgroups for 40
  // cores.
  const int64_t fewest = ceil_div(steps, per_split);
  if (cores > 0 && fewest > 1 && work_threadgroups * fewest < cores) {
    const int64_t min_keys = std::min(kMinKeysPerSplit, step);
    const int64_t wider = std::clamp<int64_t>(
        std::min({steps, ceil_div(max_seqlen_k, min_keys), cores / work_threadgroups}), 1, paged::kMaxSplits);
    per_split = std::min(per_split, ceil_div(steps, wider));
  }
  return ceil_div(steps, per_split);  // >= 1: steps and per_split are
}

LaunchPlan plan_paged_kvcache(const PagedKVCacheAttention& call) {
  using namespace paged;
  const at::Tensor& q = call.q;
  const bool varlen = call.cu_seqlens_q.has_value() && call.cu_seqlens_k.has_value();
  // Varlen: q [total_q, H, D], k [total_k, Hkv, D]; paged: q [B, sq, H, D], k_cache [num_blocks, block_size, Hkv, D].
  const int64_t batch = varlen ? call.cu_seqlens_q->size(0) - 1 : q.size(0);
  const int64_t seqlen_q = varlen ? 1 : q.size(1);
  const int64_t heads = q.size(varlen ? 1 : 2);
  const int64_t head_dim = q.size(varlen ? 2 : 3);
  const int64_t total_q = varlen ? q.size(0) : 0;
  const int64_t total_k = varlen ? call.k_cache.size(0) : 0;
  const int64_t num_blocks = varlen ? total_k : call.k_cache.size(0);
  const int64_t block_size = varlen ? 1 : call.k_cache.size(1);
  const int64_t kv_heads = call.k_cache.size(varlen ? 1 : 2);
  const int64_t max_blocks = varlen ? 0 : call.cache_row_is_request ? 1 : call.block_table.size(1);
  const bool has_new = !varlen && call.k_new.has_value() && call.k_new->size(1) > 0;
  const int64_t seqlen_new = has_new ? call.k_new->size(1) : 0;
  const at::ScalarType dtype = q.scalar_type();

  // Request b's cache row, fixed lengths: the callers that set them (routing.cpp) append nothing and give a cache of
  // at least B rows.
  TORCH_CHECK(!call.cache_row_is_request || (!varlen && !has_new && num_blocks >= batch),
              "flash_attn_with_kvcache: cache_row_is_request needs a contiguous cache of >= batch rows, no new tokens");
  TORCH_CHECK(call.fixed_seqlen < 0 || (!varlen && !has_new),
              "flash_attn_with_kvcache: fixed_seqlen is for a call without new tokens");

  LaunchPlan plan;
  if (batch <= 0 || (varlen && total_q <= 0)) {
    return plan;
  }
  TORCH_CHECK(paged_supports(dtype, head_dim), "flash_attn_with_kvcache: no kernel for dtype ", dtype, " head_dim ",
              head_dim);
  TORCH_CHECK(max_blocks * block_size <= kMaxKeys && total_k <= kMaxKeys,
              "flash_attn_with_kvcache: ", varlen ? "total_k " : "block_table capacity ",
              varlen ? total_k : max_blocks * block_size, " exceeds the ", kMaxKeys,
              " keys the kernels index with int32");

  // 1. Append the new tokens' K/V in place.
  if (has_new) {
    KVPagedWriteParams wp{};
    wp.k_new_stride_b = call.k_new->stride(0);
    wp.k_new_stride_s = call.k_new->stride(1);
    wp.k_new_stride_h = call.k_new->stride(2);
    wp.v_new_stride_b = call.v_new->stride(0);
    wp.v_new_stride_s = call.v_new->stride(1);
    wp.v_new_stride_h = call.v_new->stride(2);
    wp.k_cache_stride_block = call.k_cache.stride(0);
    wp.k_cache_stride_slot = call.k_cache.stride(1);
    wp.k_cache_stride_h = call.k_cache.stride(2);
    wp.v_cache_stride_block = call.v_cache.stride(0);
    wp.v_cache_stride_slot = call.v_cache.stride(1);
    wp.v_cache_stride_h = call.v_cache.stride(2);
    wp.block_table_stride_b = call.block_table.stride(0);
    wp.batch = to_i32(batch, "batch");
    wp.seqlen_new = to_i32(seqlen_new, "seqlen_new");
    wp.num_kv_heads = to_i32(kv_heads, "num_kv_heads");
    wp.head_dim = to_i32(head_dim, "head_dim");
    wp.block_size = to_i32(block_size, "block_size");
    wp.num_blocks = to_i32(num_blocks, "num_blocks");
    wp.max_blocks_per_seq = to_i32(max_blocks, "max_blocks_per_seq");

    Dispatch d;
    d.kernel = paged_write_kernel_name(dtype);
    d.buffers = {
        {FLASH_SDPA_WRITE_BUF_K_NEW, *call.k_new},
        {FLASH_SDPA_WRITE_BUF_V_NEW, *call.v_new},
        {FLASH_SDPA_WRITE_BUF_K_CACHE, call.k_cache},
        {FLASH_SDPA_WRITE_BUF_V_CACHE, call.v_cache},
        {FLASH_SDPA_WRITE_BUF_BLOCK_TABLE, call.block_table},
        {FLASH_SDPA_WRITE_BUF_CACHE_SEQLENS, call.cache_seqlens},
    };
    d.set_bytes(FLASH_SDPA_WRITE_BUF_PARAMS, wp);
    d.threadgroups = {to_u32(ceil_div(kv_heads * head_dim, kWriteThreads), "write threadgroups"),
                      to_u32(seqlen_new, "seqlen_new"), to_u32(batch, "batch")};
    d.threads_per_threadgroup = {static_cast<uint32_t>(kWriteThreads), 1, 1};
    plan.dispatches.push_back(std::move(d));
  }

  if (heads <= 0 || seqlen_q <= 0) {
    return plan;  // nothing to attend; the new tokens are still written
  }

  // 2. Attention: one threadgroup per (split, KV head x row block, request).
  const int64_t group = heads / kv_heads;
  const int64_t rows = paged_rows_per_threadgroup(head_dim, group * seqlen_q);
  const int64_t row_blocks = ceil_div(group * seqlen_q, rows);
  const int64_t work = batch * kv_heads * row_blocks;
  const int64_t capacity = varlen ? total_k : max_blocks * block_size;
  const int64_t max_keys = std::min(capacity, call.max_seqlen_k > 0 ? call.max_seqlen_k : capacity);
  const fsdpa_i32 dim32 = to_i32(head_dim, "head_dim");
  const fsdpa_i32 elem32 = to_i32(q.element_size(), "element size");
  const fsdpa_i32 rows32 = to_i32(rows, "rows");
  const fsdpa_i32 sq32 = to_i32(seqlen_q, "seqlen_q");
  const bool matrix = decode_runs_matrix(dim32, elem32, rows32, sq32);           // the matrix path's own kernel
  const int64_t cores = call.gpu_cores > 0 ? call.gpu_cores : gpu_core_count();  // 0: unknown device
  const int64_t target = call.target_threadgroups > 0 ? call.target_threadgroups
                                                      : (cores > 0 ? cores : kDefaultGpuCores) *
                                                            decode_threadgroups_per_core(rows, head_dim, matrix);
  // Keys one threadgroup covers per step (each of its simdgroups one step): splits take whole steps.
  const int64_t tg_step_keys = decode_step_keys(dim32, elem32, rows32, sq32);
  int64_t splits = call.num_splits > 0
                       ? std::min<int64_t>(call.num_splits, kMaxSplits)
                       : paged_pick_num_splits(work, max_keys, target, call.target_threadgroups > 0 || cores > 0,
                                               tg_step_keys, cores);
  splits = std::max<int64_t>(1, std::min(splits, ceil_div(std::max<int64_t>(max_keys, 1), 16)));
  const bool split = splits > 1;
  // Short splits (at most kSimdgroupPartialSteps steps of each simdgroup): each simdgroup writes its own partial
  // straight from its registers and the combine merges them with the splits', instead of the threadgroup merging its
  // simdgroups through threadgroup memory first (barriers, read-modify-write rounds and a write loop, which a one-step
  // split spends most of its instructions on). Long splits keep the merge: it is paid once per many steps there, and
  // 8x the partials would cost the combine more.
  const int64_t sg_steps = ceil_div(std::max<int64_t>(max_keys, 1), splits * tg_step_keys);
  const bool short_splits =
      split && (call.simdgroup_partials >= 0 ? call.simdgroup_partials == 1 : sg_steps <= kSimdgroupPartialSteps);
  // Short one-token splits in 2-byte types at D = 64 / 128 run the wide path (decode_runs_wide, one partial per key
  // part): proxy (H100, the model zoo's 39 rows that take it), 0.65-0.96x the time of the other paths' simdgroup
  // partials. The matrix path's calls are all of those configurations, so its splits always merge in the threadgroup
  // (with decode_wide = 0 too).
  const bool wide = short_splits && decode_runs_wide(dim32, elem32, rows32, sq32) && call.decode_wide != 0;
  const int64_t split_partials = wide ? decode_wide_partials(rows32) : kDecodeSimdgroups;
  const bool simdgroup_partials = short_splits && (wide || !matrix) && splits * split_partials <= kMaxSplits;
  const int64_t partials = simdgroup_partials ? splits * split_partials : splits;

  PagedDecodeParams ap{};
  if (varlen) {
    ap.q_stride_b = 0;
    ap.q_stride_s = q.stride(0);
    ap.q_stride_h = q.stride(1);
    ap.k_stride_block = call.k_cache.stride(0);  // the row of k is the "block", slot 0
    ap.k_stride_slot = 0;
    ap.k_stride_h = call.k_cache.stride(1);
    ap.v_stride_block = call.v_cache.stride(0);
    ap.v_stride_slot = 0;
    ap.v_stride_h = call.v_cache.stride(1);
    ap.block_table_stride_b = 0;
  } else {
    ap.q_stride_b = q.stride(0);
    ap.q_stride_s = q.stride(1);
    ap.q_stride_h = q.stride(2);
    ap.k_stride_block = call.k_cache.stride(0);
    ap.k_stride_slot = call.k_cache.stride(1);
    ap.k_stride_h = call.k_cache.stride(2);
    ap.v_stride_block = call.v_cache.stride(0);
    ap.v_stride_slot = call.v_cache.stride(1);
    ap.v_stride_h = call.v_cache.stride(2);
    ap.block_table_stride_b = call.cache_row_is_request ? 0 : call.block_table.stride(0);
  }
  ap.batch = to_i32(batch, "batch");
  ap.seqlen_q = to_i32(seqlen_q, "seqlen_q");
  ap.num_heads = to_i32(heads, "num_heads");
  ap.num_kv_heads = to_i32(kv_heads, "num_kv_heads");
  ap.head_dim = to_i32(head_dim, "head_dim");
  ap.row_blocks = to_i32(row_blocks, "row_blocks");
  ap.block_size = to_i32(block_size, "block_size");
  ap.num_blocks = to_i32(num_blocks, "num_blocks");
  ap.max_blocks_per_seq = to_i32(max_blocks, "max_blocks_per_seq");
  ap.seqlen_new = to_i32(seqlen_new, "seqlen_new");
  ap.num_splits = to_i32(splits, "num_splits");
  ap.simdgroup_partials = simdgroup_partials ? 1 : 0;
  ap.cache_row_is_request = call.cache_row_is_request ? 1 : 0;
  ap.fixed_seqlen = call.fixed_seqlen >= 0 ? to_i32(call.fixed_seqlen, "fixed_seqlen") : -1;
  ap.total_q = to_i32(total_q, "total_q");
  ap.total_k = to_i32(total_k, "total_k");
  ap.opt = option_params(call.options);

  at::Tensor o_partial, ml_partial;
  if (split) {
    const auto f32 = q.options().dtype(at::kFloat);
    o_partial = at::empty({partials, batch, heads, seqlen_q, head_dim}, f32);
    ml_partial = at::empty({partials, batch, heads, seqlen_q, 2}, f32);
  }
  // Optional buffers that are off get a placeholder: function constants (or the run-time split count) keep the
  // kernel off them.
  const at::Tensor& none = varlen ? *call.cu_seqlens_q : q;

  // 16-byte vector loads of K/V rows need every row start 16-byte aligned: strides and view offsets (the buffers
  // themselves are allocation-aligned).
  const int64_t vec_elems = 16 / static_cast<int64_t>(q.element_size());
  const bool kv_aligned = rows_aligned(call.k_cache, vec_elems) && rows_aligned(call.v_cache, vec_elems);

  Dispatch a;
  a.kernel = paged_decode_kernel_name(dtype, head_dim, rows,
                                      wide && simdgroup_partials ? DecodePath::kWide
                                      : matrix                   ? DecodePath::kMatrix
                                                                 : DecodePath::kLaneLocal);
  // The options' constants and whether the LSE is written: the same for the decode and the combine.
  std::vector<FunctionConstant> shared_constants = option_constants(call.options, varlen);
  shared_constants.push_back(bool_constant(FLASH_SDPA_FC_DECODE_WRITE_LSE, call.lse.has_value()));
  a.constants = shared_constants;
  a.constants.push_back(bool_constant(FLASH_SDPA_FC_DECODE_KV_ALIGNED, kv_aligned));
  a.constants.push_back(bool_constant(FLASH_SDPA_FC_DECODE_LEFTPAD, !varlen && call.cache_leftpad.has_value()));
  a.buffers = {
      {FLASH_SDPA_DECODE_BUF_Q, q},
      {FLASH_SDPA_DECODE_BUF_K_CACHE, call.k_cache},
      {FLASH_SDPA_DECODE_BUF_V_CACHE, call.v_cache},
      {FLASH_SDPA_DECODE_BUF_BLOCK_TABLE, varlen || call.cache_row_is_request ? none : call.block_table},
      {FLASH_SDPA_DECODE_BUF_CACHE_SEQLENS, varlen || call.fixed_seqlen >= 0 ? none : call.cache_seqlens},
      {FLASH_SDPA_DECODE_BUF_OUT, split ? none : call.out},
      {FLASH_SDPA_DECODE_BUF_LSE, split || !call.lse.has_value() ? none : *call.lse},
      {FLASH_SDPA_DECODE_BUF_ALIBI, call.options.alibi_slopes.value_or(none)},
      {FLASH_SDPA_DECODE_BUF_SINKS, split || !call.options.sinks.has_value() ? none : *call.options.sinks},
      {FLASH_SDPA_DECODE_BUF_O_PARTIAL, split ? o_partial : none},
      {FLASH_SDPA_DECODE_BUF_ML_PARTIAL, split ? ml_partial : none},
      {FLASH_SDPA_DECODE_BUF_CU_SEQLENS_Q, varlen ? *call.cu_seqlens_q : none},
      {FLASH_SDPA_DECODE_BUF_CU_SEQLENS_K, varlen ? *call.cu_seqlens_k : none},
      {FLASH_SDPA_DECODE_BUF_CACHE_LEFTPAD, varlen ? none : call.cache_leftpad.value_or(none)},
  };
  a.set_bytes(FLASH_SDPA_DECODE_BUF_PARAMS, ap);
  a.threadgroups = {to_u32(splits, "num_splits"), to_u32(kv_heads * row_blocks, "kv_heads x row_blocks"),
                    to_u32(batch, "batch")};
  a.threads_per_threadgroup = {static_cast<uint32_t>(kDecodeThreads), 1, 1};
  plan.dispatches.push_back(std::move(a));

  // 3. Combine the split-K partials: one threadgroup per output row.
  if (split) {
    PagedCombineParams cp{};
    cp.batch = ap.batch;
    cp.seqlen_q = ap.seqlen_q;
    cp.num_heads = ap.num_heads;
    cp.head_dim = ap.head_dim;
    cp.num_splits = to_i32(partials, "partials");
    cp.total_q = ap.total_q;

    Dispatch c;
    c.kernel = paged_combine_kernel_name(dtype);
    c.constants = shared_constants;
    c.buffers = {
        {FLASH_SDPA_COMBINE_BUF_O_PARTIAL, o_partial},
        {FLASH_SDPA_COMBINE_BUF_ML_PARTIAL, ml_partial},
        {FLASH_SDPA_COMBINE_BUF_SINKS, call.options.sinks.value_or(none)},
        {FLASH_SDPA_COMBINE_BUF_OUT, call.out},
        {FLASH_SDPA_COMBINE_BUF_LSE, call.lse.value_or(none)},
        {FLASH_SDPA_COMBINE_BUF_CU_SEQLENS_Q, varlen ? *call.cu_seqlens_q : none},
    };
    c.set_bytes(FLASH_SDPA_COMBINE_BUF_PARAMS, cp);
    c.threadgroups = {to_u32(batch * heads * seqlen_q, "combine threadgroups"), 1, 1};
    const int64_t combine_simdgroups = partials <= kCombineFewPartials ? kCombineFewSimdgroups : kCombineSimdgroups;
    c.threads_per_threadgroup = {static_cast<uint32_t>(combine_simdgroups * kSimdWidth), 1, 1};
    plan.dispatches.push_back(std::move(c));
  }
  return plan;
}

}  // namespace flash_sdpa
