// Helpers the launch planners share: kernel-name dtypes and checked narrowing into params / grid fields.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <utility>
#include <vector>

#include "launch_plan.h"

namespace flash_sdpa {

// Whether every row of t (its last dim contiguous) starts at a multiple of `elems` elements: the storage offset and
// the stride of every dim that has more than one index are multiples of it. The glue binds t's buffer at its storage
// offset from an aligned base, so such rows can be read as `elems`-element vectors (the varlen and backward params'
// aligned_rows bits: 4; the decode's 16-byte K/V loads: 16 bytes of elements).
inline bool rows_aligned(const at::Tensor& t, int64_t elems) {
  if (t.storage_offset() % elems != 0) {
    return false;
  }
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % elems != 0) {
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
// interleaved row tiles, each estimated at most command_buffer_flops(), with the command buffer committed after each
// one (Dispatch::commit_after). 2.5e11 FLOPs take about 0.25 s at 1 TFLOPS (an M1's attention, 8 GPU cores): a 20x
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

// How many dispatches a call over `tiles` row tiles takes: dispatch k of n computes the tiles k, k + n, k + 2n, ...
// (row_tile_slot in attention_device.h), each dispatch estimated at most `budget` FLOPs (tile_cost(t) estimates tile
// t), or one tile per dispatch at most. Interleaved rather than ranges of consecutive rows: each dispatch then holds
// tiles of every causal length, starts its longest and ends on short ones, where a range of the last rows ended on a
// wave of equally long tiles with cores idle (the proxy's 32K-token prefill ran ~3% slower than 16x its 8K-token
// one; Apple GPUs, with fewer threadgroup slots and smaller budgets, take more dispatches and more such ends).
template <typename TileCost>
int64_t interleaved_dispatches(int64_t tiles, double budget, TileCost tile_cost) {
  std::vector<double> cost(static_cast<size_t>(std::max<int64_t>(tiles, 0)));
  double total = 0.0;
  for (int64_t t = 0; t < tiles; ++t) {
    cost[t] = tile_cost(t);
    total += cost[t];
  }
  // Counts computed in double and clamped to [1, tiles] before the conversion (a tiny budget gives huge quotients).
  const double most = double(std::max<int64_t>(tiles, 1));
  auto dispatches = [most](double x) { return static_cast<int64_t>(std::clamp(std::ceil(x), 1.0, most)); };
  int64_t n = dispatches(total / budget);
  while (n < tiles) {
    double worst = 0.0;
    for (int64_t k = 0; k < n; ++k) {
      double work = 0.0;
      for (int64_t t = k; t < tiles; t += n) {
        work += cost[t];
      }
      worst = std::max(worst, work);
    }
    if (worst <= budget) {
      break;
    }
    // The heaviest dispatch over budget: grow n in proportion (a few rounds), never past one tile per dispatch.
    n = std::max(n + 1, dispatches(double(n) * worst / budget));
  }
  return n;
}

}  // namespace flash_sdpa
