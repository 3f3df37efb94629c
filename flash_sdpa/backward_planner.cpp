#include "backward_planner.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <limits>

#include "backward_params.h"
#include "planner_common.h"

namespace flash_sdpa {

std::string backward_kernel_name(const char* pass, at::ScalarType dtype, int64_t head_dim) {
  const char* name = kernel_dtype_name(dtype);
  TORCH_CHECK(name != nullptr, "flash_attn backward: unsupported dtype ", dtype);
  std::string kernel = std::string("flash_attn_bwd_") + pass + "_" + name;
  const std::string name_pass(pass);
  return name_pass == "delta" || name_pass == "dkdv_sum" ? kernel : kernel + "_d" + std::to_string(head_dim);
}

int64_t bwd_group_splits(int64_t group, int64_t threadgroups, int64_t gpu_cores, bool uneven_tiles) {
  const char* s = std::getenv("METAL_FLASH_SDPA_BWD_GROUP_SPLITS");
  const int64_t forced = s != nullptr ? std::atoll(s) : 0;
  if (forced <= 0 && !uneven_tiles) {
    return 1;
  }
  const int64_t cores = gpu_cores > 0 ? gpu_cores : gpu_core_count();
  const int64_t target = kBwdResidentThreadgroups * (cores > 0 ? cores : kCommandBufferReferenceCores);
  int64_t splits = 1;
  for (int64_t d = 2; d <= std::min(group, kBwdMaxGroupSplits); ++d) {
    if (group % d != 0) {
      continue;
    }
    if (forced > 0 ? splits >= forced : threadgroups * splits >= target) {
      break;
    }
    splits = d;
  }
  return splits;
}

const std::vector<int64_t>& backward_head_dims() {
#define FLASH_SDPA_BWD_HEAD_DIM_ENTRY(a, b, D) D,
  static const std::vector<int64_t> dims{FLASH_SDPA_BWD_HEAD_DIMS(FLASH_SDPA_BWD_HEAD_DIM_ENTRY, _, _)};
#undef FLASH_SDPA_BWD_HEAD_DIM_ENTRY
  return dims;
}

bool backward_supports(at::ScalarType dtype, int64_t head_dim) {
  const auto& dims = backward_head_dims();
  return kernel_dtype_name(dtype) != nullptr && std::find(dims.begin(), dims.end(), head_dim) != dims.end();
}

std::string backward_tops_kernel_name(const char* pass, at::ScalarType dtype, int64_t head_dim) {
  const char* name = kernel_dtype_name(dtype);
  TORCH_CHECK(name != nullptr, "flash_attn backward: unsupported dtype ", dtype);
  return std::string("flash_attn_bwd_") + pass + "_tops_" + name + "_d" + std::to_string(head_dim);
}

bool backward_tops_serves(at::ScalarType dtype, int64_t head_dim) {
  const bool two_byte = dtype == at::kHalf || dtype == at::kBFloat16;
  if (!two_byte && dtype != at::kFloat) {
    return false;
  }
#define FLASH_SDPA_BWD_TOPS_ENTRY(a, b, D) D,
  static const std::vector<int64_t> dims{FLASH_SDPA_BWD_TOPS_HEAD_DIMS(FLASH_SDPA_BWD_TOPS_ENTRY, _, _)};
  static const std::vector<int64_t> wide{FLASH_SDPA_BWD_TOPS_WIDE_HEAD_DIMS(FLASH_SDPA_BWD_TOPS_ENTRY, _, _)};
#undef FLASH_SDPA_BWD_TOPS_ENTRY
  const bool listed = std::find(dims.begin(), dims.end(), head_dim) != dims.end() ||
                      (two_byte && std::find(wide.begin(), wide.end(), head_dim) != wide.end());
  return listed && bwd_tops_supports(static_cast<fsdpa_i32>(head_dim), two_byte ? 2 : 4);
}

LaunchPlan plan_attention_backward(const AttentionBackward& call) {
  const bool varlen = call.cu_seqlens_q.has_value();
  // Row axis of q/k/v/...: dim 0 in varlen mode, dim 1 (after batch) in dense mode.
  const int64_t row_dim = varlen ? 0 : 1;
  const int64_t batch = varlen ? call.cu_seqlens_q->size(0) - 1 : call.q.size(0);
  const int64_t heads = call.q.size(row_dim + 1);
  const int64_t kv_heads = call.k.size(row_dim + 1);
  const int64_t head_dim = call.q.size(row_dim + 2);
  const int64_t rows_q = call.q.size(row_dim);
  const int64_t rows_k = call.k.size(row_dim);

  LaunchPlan plan;
  if (batch <= 0 || heads <= 0 || call.q.numel() == 0) {
    return plan;
  }
  // Grid extents: max_seqlen_* size them (clamped to the tensors); the kernels loop over tiles past the grid.
  const int64_t grid_q = varlen ? std::clamp<int64_t>(call.max_seqlen_q, 1, std::max<int64_t>(rows_q, 1)) : rows_q;
  const int64_t grid_k =
      varlen ? std::clamp<int64_t>(call.max_seqlen_k, 1, std::max<int64_t>(rows_k, 1)) : std::max<int64_t>(rows_k, 1);

  BackwardParams params{};
  auto strides = [&](const at::Tensor& t, int64_t& batch_stride, int64_t& row_stride, int64_t& head_stride) {
    batch_stride = varlen ? 0 : t.stride(0);
    row_stride = t.stride(row_dim);
    head_stride = t.stride(row_dim + 1);
  };
  strides(call.q, params.q_batch_stride, params.q_row_stride, params.q_head_stride);
  strides(call.k, params.k_batch_stride, params.k_row_stride, params.k_head_stride);
  strides(call.v, params.v_batch_stride, params.v_row_stride, params.v_head_stride);
  strides(call.out, params.o_batch_stride, params.o_row_stride, params.o_head_stride);
  strides(call.dout, params.do_batch_stride, params.do_row_stride, params.do_head_stride);
  strides(call.dq, params.dq_batch_stride, params.dq_row_stride, params.dq_head_stride);
  strides(call.dk, params.dk_batch_stride, params.dk_row_stride, params.dk_head_stride);
  strides(call.dv, params.dv_batch_stride, params.dv_row_stride, params.dv_head_stride);
  // lse / delta: varlen [H, total_q], dense [B, H, Sq].
  params.lse_batch_stride = varlen ? 0 : call.lse.stride(0);
  params.lse_head_stride = call.lse.stride(varlen ? 0 : 1);
  params.delta_batch_stride = varlen ? 0 : call.delta.stride(0);
  params.delta_head_stride = call.delta.stride(varlen ? 0 : 1);
  params.batch = to_i32(batch, "batch");
  params.num_heads = to_i32(heads, "num_heads");
  params.num_kv_heads = to_i32(kv_heads, "num_kv_heads");
  params.q_rows = to_i32(rows_q, "query rows");
  params.k_rows = to_i32(rows_k, "key rows");
  params.seqlen_q = varlen ? 0 : params.q_rows;
  params.seqlen_k = varlen ? 0 : params.k_rows;
  params.head_dim = to_i32(head_dim, "head_dim");
  params.opt = option_params(call.options);
  params.aligned_rows = (rows_aligned(call.q, 4) ? FLASH_SDPA_BWD_ALIGNED_Q : 0) |
                        (rows_aligned(call.k, 4) ? FLASH_SDPA_BWD_ALIGNED_K : 0) |
                        (rows_aligned(call.v, 4) ? FLASH_SDPA_BWD_ALIGNED_V : 0) |
                        (rows_aligned(call.dout, 4) ? FLASH_SDPA_BWD_ALIGNED_DO : 0);
  params.tile_offset = 0;  // set per dispatch of the dK/dV and dQ passes below
  params.tile_stride = 1;

  const std::vector<FunctionConstant> constants = option_constants(call.options, varlen);
  // Optional inputs that are off get the float32 delta scratch as a placeholder: the kernels never touch them
  // (function constants), and delta is aligned for the int32 / float32 types those slots declare.
  const BufferArg cu_q{FLASH_SDPA_BWD_BUFFER_CU_SEQLENS_Q, varlen ? *call.cu_seqlens_q : call.delta};
  const BufferArg cu_k{FLASH_SDPA_BWD_BUFFER_CU_SEQLENS_K, varlen ? *call.cu_seqlens_k : call.delta};
  const BufferArg alibi{FLASH_SDPA_BWD_BUFFER_ALIBI, call.options.alibi_slopes.value_or(call.delta)};
  const BufferArg q{FLASH_SDPA_BWD_BUFFER_Q, call.q}, k{FLASH_SDPA_BWD_BUFFER_K, call.k},
      v{FLASH_SDPA_BWD_BUFFER_V, call.v}, dout{FLASH_SDPA_BWD_BUFFER_DOUT, call.dout},
      lse{FLASH_SDPA_BWD_BUFFER_LSE, call.lse}, delta{FLASH_SDPA_BWD_BUFFER_DELTA, call.delta};
  const uint32_t h = to_u32(heads, "num_heads"), b = to_u32(batch, "batch");
  const std::array<uint32_t, 3> threads{static_cast<uint32_t>(kBwdThreads), 1, 1};
  const at::ScalarType dtype = call.q.scalar_type();
  // dK/dV and dQ on tensor ops (their own tile rows; the grids' order and splits are the simdgroup passes').
  const bool tops = call.tensor_ops && backward_tops_serves(dtype, head_dim);
  auto pass_name = [&](const char* pass) {
    return tops ? backward_tops_kernel_name(pass, dtype, head_dim) : backward_kernel_name(pass, dtype, head_dim);
  };

  // 1. delta = rowsum(dO * O).
  Dispatch pre;
  pre.kernel = backward_kernel_name("delta", dtype, head_dim);
  pre.constants = constants;
  pre.buffers = {{FLASH_SDPA_BWD_BUFFER_OUT, call.out}, dout, delta, cu_q, cu_k};
  pre.set_bytes(FLASH_SDPA_BWD_BUFFER_PARAMS, params);
  pre.threadgroups = {to_u32((grid_q + kBwdDeltaRows - 1) / kBwdDeltaRows, "delta tiles"), h, b};  // uniform cost
  pre.threads_per_threadgroup = threads;
  plan.dispatches.push_back(std::move(pre));

  // 2. dK, dV: one threadgroup per (KV head, sequence, key tile), looping over the GQA group's query heads; key tiles
  // in order (causal: the first ones see the most queries).
  const auto d32 = static_cast<int32_t>(head_dim), e32 = static_cast<int32_t>(call.q.element_size());
  const int64_t tile_rows = tops ? bwd_tops_tile_rows(d32, e32) : bwd_tile_rows(d32, e32);
  Dispatch dkdv;
  dkdv.kernel = pass_name("dkdv");
  dkdv.tensor_ops_library = tops;
  dkdv.constants = constants;
  dkdv.buffers = {
      q,    k,    v,    dout, lse, delta, {FLASH_SDPA_BWD_BUFFER_DK, call.dk}, {FLASH_SDPA_BWD_BUFFER_DV, call.dv},
      cu_q, cu_k, alibi};
  dkdv.threads_per_threadgroup = threads;
  // A long backward is split like the forward (planner_common.h: macOS limits a command buffer's GPU time): dK/dV
  // over interleaved key tiles, dQ over interleaved query tiles, each dispatch at most command_buffer_flops()
  // estimated, each committed.
  // FLOPs per visible (query, key) pair and query head: dK/dV recompute S and dP and accumulate dV and dK (8 D);
  // dQ recomputes S and dP and accumulates dQ (6 D).
  const double pairs_to_flops = double(batch) * double(heads) * double(head_dim);
  const int64_t key_tiles = (grid_k + tile_rows - 1) / tile_rows;
  const int64_t query_tiles = (grid_q + tile_rows - 1) / tile_rows;
  const int64_t key_splits = interleaved_dispatches(key_tiles, command_buffer_flops(call.gpu_cores), [&](int64_t t) {
    const int64_t first = t * tile_rows, last = std::min(first + tile_rows, grid_k) - 1;
    const int64_t queries = std::max(queries_seeing(first, grid_q, grid_k, call.options),
                                     queries_seeing(last, grid_q, grid_k, call.options));
    return 8.0 * pairs_to_flops * double(last - first + 1) * double(queries);
  });
  const int64_t query_splits =
      interleaved_dispatches(query_tiles, command_buffer_flops(call.gpu_cores), [&](int64_t t) {
        const int64_t first = t * tile_rows, last = std::min(first + tile_rows, grid_q) - 1;
        const int64_t keys =
            std::max(keys_seen(first, grid_q, grid_k, call.options), keys_seen(last, grid_q, grid_k, call.options));
        return 6.0 * pairs_to_flops * double(last - first + 1) * double(keys);
      });
  // `splits` interleaved dispatches of `pass` over `row_tiles` tiles. Grids (heads, B, the dispatch's tiles): the tile
  // axis slowest (row_tile_slot in attention_device.h: the heaviest tiles of the whole batch start first); past
  // kMaxGridTiles the kernels loop over the rest.
  auto push_splits = [&](const Dispatch& pass, int64_t splits, int64_t row_tiles, uint32_t grid_x) {
    params.tile_stride = to_i32(splits, "dispatches");
    for (int64_t k = 0; k < splits; ++k) {
      Dispatch part = pass;
      params.tile_offset = to_i32(k, "first tile");
      part.set_bytes(FLASH_SDPA_BWD_BUFFER_PARAMS, params);
      part.threadgroups = {grid_x, b, to_u32(std::min((row_tiles - k + splits - 1) / splits, kMaxGridTiles), "tiles")};
      part.commit_after = splits > 1;
      plan.dispatches.push_back(std::move(part));
    }
  };
  // A split GQA group (the simdgroup pass; the tensor-ops one keeps a KV head's group in one threadgroup): grid x is
  // KV head x part, each part's dK / dV in fp32 scratch, then one pass sums the parts in order. Counted from the key
  // rows, not the grid (varlen: max_seqlen_k only sizes the grid, and must not change the sums' order).
  // Only where the key tiles' work is uneven, a window bounded on one side (causal: every query sees key 0, one query
  // the last key; the canonical window, so not max_seqlen_k): there the heaviest threadgroup sets the pass's time.
  const bool uneven_tiles = (call.options.window_left < 0) != (call.options.window_right < 0);
  const int64_t busy_tiles = varlen ? (rows_k + tile_rows - 1) / tile_rows : batch * key_tiles;
  const int64_t group_splits =
      tops ? 1 : bwd_group_splits(heads / kv_heads, kv_heads * busy_tiles, call.gpu_cores, uneven_tiles);
  params.group_splits = to_i32(group_splits, "group splits");
  at::Tensor dkdv_partial = call.delta;  // a placeholder when the group is not split: the kernel never touches it
  if (group_splits > 1) {
    const int64_t key_rows = varlen ? rows_k : batch * rows_k;
    dkdv_partial = at::empty({2, group_splits, key_rows, kv_heads, head_dim}, call.q.options().dtype(at::kFloat));
  }
  const BufferArg partial{FLASH_SDPA_BWD_BUFFER_DKDV_PARTIAL, dkdv_partial};
  dkdv.buffers.push_back(partial);
  push_splits(dkdv, key_splits, key_tiles, to_u32(kv_heads * group_splits, "num_kv_heads x group splits"));
  if (group_splits > 1) {
    Dispatch sum;
    sum.kernel = backward_kernel_name("dkdv_sum", dtype, head_dim);
    sum.constants = constants;
    sum.buffers = {{FLASH_SDPA_BWD_BUFFER_DK, call.dk}, {FLASH_SDPA_BWD_BUFFER_DV, call.dv}, cu_q, cu_k, partial};
    sum.set_bytes(FLASH_SDPA_BWD_BUFFER_PARAMS, params);  // its grid covers every key row: no tile offset read
    sum.threadgroups = {to_u32((grid_k + kBwdDeltaRows - 1) / kBwdDeltaRows, "key row tiles"),
                        to_u32(kv_heads, "num_kv_heads"), b};
    sum.threads_per_threadgroup = threads;
    plan.dispatches.push_back(std::move(sum));
  }

  // 3. dQ: one threadgroup per (head, sequence, query tile), query tiles reversed in the kernel (causal: the last ones
  // see the most keys); threadgroups (h, 0, grid.z - 1) also reduce d s_aux[h].
  Dispatch dq;
  dq.kernel = pass_name("dq");
  dq.tensor_ops_library = tops;
  dq.constants = constants;
  dq.buffers = {q,
                k,
                v,
                dout,
                lse,
                delta,
                {FLASH_SDPA_BWD_BUFFER_DQ, call.dq},
                cu_q,
                cu_k,
                alibi,
                {FLASH_SDPA_BWD_BUFFER_SINKS, call.options.sinks.value_or(call.delta)},
                {FLASH_SDPA_BWD_BUFFER_DSINKS, call.options.sinks.has_value() ? call.dsinks : call.delta}};
  dq.threads_per_threadgroup = threads;
  push_splits(dq, query_splits, query_tiles, h);
  return plan;
}

}  // namespace flash_sdpa
