// Helpers the launch planners share: kernel-name dtypes and checked narrowing into params / grid fields.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <utility>
#include <vector>

#include "launch_plan.h"

namespace flash_sdpa {

// Whether every row of t (its last dim contiguous) starts at a multiple of 4 elements: the storage offset and the
// stride of every dim that has more than one index are multiples of 4. The glue binds t's buffer at its storage
// offset from an aligned base, so such rows can be read as 4-element vectors (the params' aligned_rows bits).
inline bool rows_aligned4(const at::Tensor& t) {
  if (t.storage_offset() % 4 != 0) {
    return false;
  }
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % 4 != 0) {
      return false;
    }
  }
  return true;
}

// The dtype part of a kernel name ("float32", "float16", "bfloat16"), or nullptr if no kernel takes it.
inline const char* kernel_dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return "float32";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    default:
      return nullptr;
  }
}

inline uint32_t to_u32(int64_t x, const char* what) {
  TORCH_CHECK_VALUE(x >= 0 && x <= std::numeric_limits<uint32_t>::max(), what, " = ", x,
                    " does not fit a grid dimension");
  return static_cast<uint32_t>(x);
}

inline int32_t to_i32(int64_t x, const char* what) {
  TORCH_CHECK_VALUE(x >= std::numeric_limits<int32_t>::min() && x <= std::numeric_limits<int32_t>::max(), what, " = ",
                    x, " does not fit int32");
  return static_cast<int32_t>(x);
}

// Most threadgroups on a grid's tile axis (z): CUDA's limit on grid y and z (the NVIDIA proxy runs these plans).
// The kernels loop over the tiles past the grid, so a longer axis is capped here, never refused.
constexpr int64_t kMaxGridTiles = 65535;

inline FunctionConstant bool_constant(uint32_t index, bool value) {
  return FunctionConstant{index, FunctionConstant::kBool, value ? 1u : 0u};
}

// ---- Long calls split into command buffers --------------------------------------------------------------------
// A command buffer's GPU time is limited: macOS terminates one that runs longer than the system allows
// (MTLCommandBufferError.timeout; a single attention dispatch over 65K-128K keys was killed after ~5 s, mlx#3302).
// The limit counts the command buffer, not the dispatch, so a long prefill or backward is planned as dispatches over
// ranges of rows, each estimated at most command_buffer_flops(), with the command buffer committed after each one
// (Dispatch::commit_after). 2.5e11 FLOPs take about 0.25 s at 1 TFLOPS (an M1's attention, 8 GPU cores): a 20x
// margin. The limit is a time, so the budget grows with the GPU's cores: an M3 Ultra (80 cores, 21.6 TFLOPS in MLX's
// prefill) gets 10x, 2.5e12 FLOPs, about 0.12 s there, and its command buffers still hold several waves of
// threadgroups (at the M1's budget a 32K prompt's command buffer held about one wave of an Ultra). Unknown device: the
// M1's. METAL_FLASH_SDPA_COMMAND_BUFFER_FLOPS overrides it (tests, tuning).
constexpr double kCommandBufferFlops = 2.5e11;
constexpr int64_t kCommandBufferReferenceCores = 8;

// GPU cores (Apple) or SMs (the proxy) from the Metal backend's provider, 0 when unknown (paged_planner.h).
int64_t gpu_core_count();

// gpu_cores: the plan's device (0: the provider's answer, else unknown).
inline double command_buffer_flops(int64_t gpu_cores) {
  const char* s = std::getenv("METAL_FLASH_SDPA_COMMAND_BUFFER_FLOPS");
  const double v = s != nullptr ? std::atof(s) : 0.0;
  if (v > 0.0) {
    return v;
  }
  const int64_t cores = gpu_cores > 0 ? gpu_cores : gpu_core_count();
  return kCommandBufferFlops * std::max(1.0, double(cores) / double(kCommandBufferReferenceCores));
}

// Row ranges [begin, end) of whole tiles of `tile` rows covering [0, rows), each of at most `budget` estimated FLOPs
// (at least one tile per range); tile_cost(first_row, last_row) estimates a tile. The last range ends at INT32_MAX,
// so that the kernel computes every row whatever the estimate (an understated max_seqlen) said.
template <typename TileCost>
std::vector<std::pair<int64_t, int64_t>> split_rows(int64_t rows, int64_t tile, double budget, TileCost tile_cost) {
  std::vector<std::pair<int64_t, int64_t>> ranges;
  int64_t begin = 0;
  double work = 0.0;
  for (int64_t t = 0; t * tile < rows; ++t) {
    const double cost = tile_cost(t * tile, std::min((t + 1) * tile, rows) - 1);
    if (work > 0.0 && work + cost > budget) {
      ranges.emplace_back(begin, t * tile);
      begin = t * tile;
      work = 0.0;
    }
    work += cost;
  }
  ranges.emplace_back(begin, std::numeric_limits<int32_t>::max());
  return ranges;
}

}  // namespace flash_sdpa
