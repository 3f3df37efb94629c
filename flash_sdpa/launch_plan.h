// A launch plan: everything a backend needs to encode the dispatches of one op call, as plain data.
//
// The planners (pure C++) fill it from validated tensors; a backend executes it in order on one stream:
//   metal_launch.mm                 Metal, on PyTorch's MPS stream (Mac only, kept small and generic)
//   msl/cpu/launch_cpu.cpp          the Metal-on-CPU emulator (the emulated build that CI runs)
// A backend knows nothing about attention: it binds, sets bytes and constants, and dispatches.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace flash_sdpa {

// A tensor bound at [[buffer(index)]]; the backend binds it at storage_offset() * element_size().
struct BufferArg {
  uint32_t index;
  at::Tensor tensor;
};

// setBytes at [[buffer(index)]]: a parameter struct from a params header, copied by value.
struct BytesArg {
  uint32_t index;
  std::vector<uint8_t> data;
};

// A function-constant value; the pipeline cache key is (kernel, constants).
struct FunctionConstant {
  enum Type : uint32_t { kBool = 0, kInt = 1, kUInt = 2, kFloat = 3 };
  uint32_t index;
  Type type;
  uint32_t bits;  // the value's bit pattern
};

// [[threadgroup(index)]] length in bytes.
struct ThreadgroupMemory {
  uint32_t index;
  uint32_t length;
};

struct Dispatch {
  std::string kernel;  // [[host_name]] of the kernel
  std::vector<FunctionConstant> constants;
  std::vector<BufferArg> buffers;
  std::vector<BytesArg> bytes;
  std::vector<ThreadgroupMemory> threadgroup_memory;
  std::array<uint32_t, 3> threadgroups{1, 1, 1};  // dispatchThreadgroups: threadgroups per grid
  std::array<uint32_t, 3> threads_per_threadgroup{1, 1, 1};
  // End the command buffer after this dispatch (the Mac glue commits it; emulator and proxy run in order anyway):
  // macOS limits the GPU time of one command buffer, so a long op is planned as several (planner_common.h).
  bool commit_after = false;
  // The kernel lives in the tensor-ops library (tensor_ops_library.h), which the backend builds apart from the
  // kernels it was shipped with (the Mac glue compiles it at run time): set by the varlen planner for a call planned
  // with VarlenAttention::tensor_ops (varlen_planner.h), and by the backward planner on the dK/dV and dQ passes of a
  // call planned with AttentionBackward::tensor_ops (backward_planner.h).
  bool tensor_ops_library = false;

  template <typename Params>
  void set_bytes(uint32_t index, const Params& params) {
    BytesArg arg{index, std::vector<uint8_t>(sizeof(Params))};
    std::memcpy(arg.data.data(), &params, sizeof(Params));
    bytes.push_back(std::move(arg));
  }
};

struct LaunchPlan {
  std::vector<Dispatch> dispatches;
};

// Encodes the plan's dispatches, in order, on the current stream. Implemented once per backend.
void run_launch_plan(const LaunchPlan& plan);

// Whether this backend's GPU runs the tensor-ops library (Metal 4 tensor ops on Apple family 10: the M5 family's
// neural accelerators) and the library is built; the Mac glue compiles it on the first call. Implemented once per
// backend; the emulated build models such a GPU when METAL_FLASH_SDPA_EMULATED_GPU_FAMILY >= 10.
bool tensor_ops_supported();

}  // namespace flash_sdpa
