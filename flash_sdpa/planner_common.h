// Helpers the launch planners share: kernel-name dtypes and checked narrowing into params / grid fields.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

#include "launch_plan.h"

namespace flash_sdpa {

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

inline FunctionConstant bool_constant(uint32_t index, bool value) {
  return FunctionConstant{index, FunctionConstant::kBool, value ? 1u : 0u};
}

}  // namespace flash_sdpa
