#include "varlen_planner.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>

#include "planner_common.h"
#include "varlen_params.h"

namespace flash_sdpa {

std::string varlen_kernel_name(at::ScalarType dtype, int64_t head_dim) {
  const char* name = kernel_dtype_name(dtype);
  TORCH_CHECK(name != nullptr, "flash_attn_varlen: unsupported dtype ", dtype);
  return std::string("flash_attn_varlen_") + name + "_d" + std::to_string(head_dim);
}

const std::vector<int64_t>& varlen_head_dims() {
#define FLASH_SDPA_HEAD_DIM_ENTRY(a, b, D) D,
  static const std::vector<int64_t> dims{FLASH_SDPA_VARLEN_HEAD_DIMS(FLASH_SDPA_HEAD_DIM_ENTRY, _, _)
                                             FLASH_SDPA_VARLEN_WIDE_HEAD_DIMS(FLASH_SDPA_HEAD_DIM_ENTRY, _, _)};
#undef FLASH_SDPA_HEAD_DIM_ENTRY
  return dims;
}

bool varlen_supports(at::ScalarType dtype, int64_t head_dim) {
  const auto& dims = varlen_head_dims();
  return kernel_dtype_name(dtype) != nullptr && std::find(dims.begin(), dims.end(), head_dim) != dims.end();
}

std::string tensor_ops_kernel_name(at::ScalarType dtype, int64_t head_dim) {
  const char* name = kernel_dtype_name(dtype);
  TORCH_CHECK(name != nullptr, "flash_attn_varlen: unsupported dtype ", dtype);
  return std::string("flash_attn_varlen_tops_") + name + "_d" + std::to_string(head_dim);
}

bool tensor_ops_serves(at::ScalarType dtype, int64_t head_dim, int64_t q_row_stride) {
  const bool two_byte = dtype == at::kHalf || dtype == at::kBFloat16;
  if (!(two_byte || dtype == at::kFloat) ||
      !(head_dim == 32 || head_dim == 64 || head_dim == 96 || head_dim == 128 || (two_byte && head_dim == 256))) {
    return false;
  }
  const auto d = static_cast<fsdpa_i32>(head_dim), e = static_cast<fsdpa_i32>(two_byte ? 2 : 4);
  return tops_q_staged(d, e) || q_row_stride <= std::numeric_limits<int32_t>::max();
}

LaunchPlan plan_varlen_attention(const VarlenAttention& call) {
  const bool varlen = call.cu_seqlens_q.has_value();
  const bool paged = call.block_table.has_value();
  // Row axis of q/k/v/out: dim 0 in varlen mode, dim 1 (after batch) in dense mode.
  const int64_t row_dim = varlen ? 0 : 1;
  const int64_t batch = varlen ? call.cu_seqlens_q->size(0) - 1 : call.q.size(0);
  const int64_t heads = call.q.size(row_dim + 1);
  const int64_t head_dim = call.q.size(row_dim + 2);
  const int64_t rows_q = call.q.size(row_dim);
  // Query tiles per (head, sequence) in the grid: the kernel loops over the rest, so a max_seqlen_q below the
  // longest sequence costs time, never rows; above the rows of q it would only launch idle threadgroups.
  const int64_t grid_rows = varlen ? std::clamp<int64_t>(call.max_seqlen_q, 1, std::max<int64_t>(rows_q, 1)) : rows_q;

  LaunchPlan plan;
  if (batch <= 0 || heads <= 0 || call.q.numel() == 0) {
    return plan;
  }

  VarlenParams params{};
  params.q_batch_stride = varlen ? 0 : call.q.stride(0);
  params.q_row_stride = call.q.stride(row_dim);
  params.q_head_stride = call.q.stride(row_dim + 1);
  // K/V row axis: dim row_dim, or dim 1 (slot in block) after the block axis when paged.
  const int64_t kv_row_dim = paged ? 1 : row_dim;
  params.k_batch_stride = varlen ? 0 : call.k.stride(0);
  params.k_row_stride = call.k.stride(kv_row_dim);
  params.k_head_stride = call.k.stride(kv_row_dim + 1);
  params.v_batch_stride = varlen ? 0 : call.v.stride(0);
  params.v_row_stride = call.v.stride(kv_row_dim);
  params.v_head_stride = call.v.stride(kv_row_dim + 1);
  if (paged) {
    params.k_block_stride = call.k.stride(0);
    params.v_block_stride = call.v.stride(0);
    params.block_table_stride = call.block_table->stride(0);
    params.block_size = to_i32(call.k.size(1), "block_size");
    params.num_blocks = to_i32(call.k.size(0), "num_blocks");
    params.max_blocks = to_i32(call.block_table->size(1), "max_blocks_per_seq");
  }
  params.o_batch_stride = varlen ? 0 : call.out.stride(0);
  params.o_row_stride = call.out.stride(row_dim);
  params.o_head_stride = call.out.stride(row_dim + 1);
  // lse: varlen [H, total_q], dense [B, H, Sq].
  params.lse_batch_stride = varlen ? 0 : call.lse.stride(0);
  params.lse_head_stride = call.lse.stride(varlen ? 0 : 1);
  params.batch = to_i32(batch, "batch");
  params.num_heads = to_i32(heads, "num_heads");
  params.num_kv_heads = to_i32(call.k.size(kv_row_dim + 1), "num_kv_heads");
  params.q_rows = to_i32(rows_q, "query rows");
  params.k_rows = paged ? 0 : to_i32(call.k.size(row_dim), "key rows");
  params.seqlen_q = varlen ? 0 : params.q_rows;
  params.seqlen_k = varlen ? 0 : params.k_rows;
  params.min_seqlen_q = varlen ? to_i32(std::min<int64_t>(call.min_seqlen_q, rows_q + 1), "min_seqlen_q") : 0;
  params.opt = option_params(call.options);
  params.aligned_rows = (rows_aligned(call.q, 4) ? FLASH_SDPA_ALIGNED_Q : 0) |
                        (rows_aligned(call.k, 4) ? FLASH_SDPA_ALIGNED_K : 0) |
                        (rows_aligned(call.v, 4) ? FLASH_SDPA_ALIGNED_V : 0);

  // The tensor-ops forward plans its own query tiles (kTopsBlockQ rows); the grid's order and splits are the same.
  const bool tops = call.tensor_ops && tensor_ops_serves(call.q.scalar_type(), head_dim, call.q.stride(row_dim));
  const int64_t block_q = tops ? kTopsBlockQ : varlen_block_q(static_cast<fsdpa_i32>(head_dim));
  const int64_t seqlen_k = varlen ? (call.max_seqlen_k > 0 ? call.max_seqlen_k
                                     : paged               ? call.block_table->size(1) * call.k.size(1)
                                                           : call.k.size(0))
                                  : call.k.size(1);
  // 4 D FLOPs per visible score (two matmuls); a tile costs as much as its most expensive row, the first or the
  // last (causal: the last; a left window alone: the first).
  const double flops_per_score = 4.0 * double(head_dim) * double(batch) * double(heads);
  const int64_t grid_tiles = (grid_rows + block_q - 1) / block_q;
  const int64_t splits = interleaved_dispatches(grid_tiles, command_buffer_flops(call.gpu_cores), [&](int64_t t) {
    const int64_t first = t * block_q, last = std::min(first + block_q, grid_rows) - 1;
    const int64_t keys = std::max(keys_seen(first, grid_rows, seqlen_k, call.options),
                                  keys_seen(last, grid_rows, seqlen_k, call.options));
    return flops_per_score * double(last - first + 1) * double(keys);
  });

  Dispatch d;
  d.kernel = tops ? tensor_ops_kernel_name(call.q.scalar_type(), head_dim)
                  : varlen_kernel_name(call.q.scalar_type(), head_dim);
  d.tensor_ops_library = tops;
  d.constants = option_constants(call.options, varlen);
  d.constants.push_back(bool_constant(FLASH_SDPA_FC_VARLEN_PAGED, paged));
  // Optional inputs that are off get lse as a placeholder: the kernel never reads them (function constants), and
  // lse (float32, allocated here) is aligned for the int32 / float32 types those slots declare.
  d.buffers = {
      {FLASH_SDPA_VARLEN_BUFFER_Q, call.q},
      {FLASH_SDPA_VARLEN_BUFFER_K, call.k},
      {FLASH_SDPA_VARLEN_BUFFER_V, call.v},
      {FLASH_SDPA_VARLEN_BUFFER_OUT, call.out},
      {FLASH_SDPA_VARLEN_BUFFER_LSE, call.lse},
      {FLASH_SDPA_VARLEN_BUFFER_CU_SEQLENS_Q, varlen ? *call.cu_seqlens_q : call.lse},
      {FLASH_SDPA_VARLEN_BUFFER_CU_SEQLENS_K, varlen ? *call.cu_seqlens_k : call.lse},
      {FLASH_SDPA_VARLEN_BUFFER_ALIBI, call.options.alibi_slopes.value_or(call.lse)},
      {FLASH_SDPA_VARLEN_BUFFER_SINKS, call.options.sinks.value_or(call.lse)},
      {FLASH_SDPA_VARLEN_BUFFER_BLOCK_TABLE, call.block_table.value_or(call.lse)},
  };
  const fsdpa_i32 elem_bytes = call.q.scalar_type() == at::kFloat ? 4 : 2;
  d.threads_per_threadgroup = {
      static_cast<uint32_t>(tops ? tops_threads(static_cast<fsdpa_i32>(head_dim), elem_bytes) : kVarlenThreads), 1, 1};
  params.tile_stride = to_i32(splits, "dispatches");
  for (int64_t k = 0; k < splits; ++k) {
    Dispatch part = d;
    params.tile_offset = to_i32(k, "first query tile");
    part.set_bytes(FLASH_SDPA_VARLEN_BUFFER_PARAMS, params);
    // Grid (H, B, query tiles): the tile axis slowest, reversed in the kernel (row_tile_slot), so the heaviest causal
    // tiles of the whole batch start first. Past kMaxGridTiles the kernel loops over the rest.
    const int64_t tiles = std::min<int64_t>((grid_tiles - k + splits - 1) / splits, kMaxGridTiles);
    part.threadgroups = {to_u32(heads, "num_heads"), to_u32(batch, "batch"), to_u32(tiles, "query tiles")};
    part.commit_after = splits > 1;
    plan.dispatches.push_back(std::move(part));
  }
  return plan;
}

}  // namespace flash_sdpa
