// run_launch_plan for the emulated build: executes a flash_sdpa::LaunchPlan on the Metal-on-CPU emulator.
//
// The variant directory holds libmetal_cpu.so and one compiled kernel library per .metal file under
// metal_cpu_kernels/ (scripts/build_emulated.py); they are opened once, next to this extension's own .so. The
// tensor-ops library (the source the Mac glue compiles at run time) is metal_cpu_tensor_ops/tensor_ops_library.so,
// used only by dispatches that name it, on a modelled GPU of Apple family >= 10
// (METAL_FLASH_SDPA_EMULATED_GPU_FAMILY; default 9, an M3 / M4: no tensor-ops path).
// METAL_FLASH_SDPA_EMULATED_TENSOR_OPS_LIBRARY replaces that library (the tests load one with a planted layout bug: a
// GPU whose tensor-ops results are wrong).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <dirent.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "launch_plan.h"
#include "runtime/metal_cpu.h"

namespace flash_sdpa {

namespace {

std::string this_library_dir() {
  Dl_info info{};
  TORCH_CHECK(dladdr(reinterpret_cast<void*>(&this_library_dir), &info) != 0 && info.dli_fname != nullptr,
              "metal_cpu: cannot locate the extension library");
  std::string path(info.dli_fname);
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? std::string(".") : path.substr(0, slash);
}

// Every kernel library of the variant, opened once (one metallib is many .metal files).
const std::vector<mcpu_library*>& kernel_libraries() {
  static std::once_flag once;
  static std::vector<mcpu_library*> libs;
  static std::string error;
  std::call_once(once, [] {
    const std::string dir = this_library_dir() + "/metal_cpu_kernels";
    std::vector<std::string> paths;
    if (DIR* d = opendir(dir.c_str())) {
      while (dirent* e = readdir(d)) {
        const std::string name(e->d_name);
        if (name.size() > 3 && name.compare(name.size() - 3, 3, ".so") == 0) {
          paths.push_back(dir + "/" + name);
        }
      }
      closedir(d);
    }
    std::sort(paths.begin(), paths.end());
    for (const auto& path : paths) {
      char err[1024] = {0};
      mcpu_library* lib = mcpu_open(path.c_str(), err, sizeof(err));
      if (lib == nullptr) {
        error += path + ": " + err + "\n";
        continue;
      }
      libs.push_back(lib);
    }
    if (paths.empty()) {
      error = "no compiled kernel library in " + dir;
    }
  });
  TORCH_CHECK(error.empty(), "metal_cpu: cannot open the kernel libraries: ", error);
  return libs;
}

std::string tensor_ops_library_path() {
  const char* path = std::getenv("METAL_FLASH_SDPA_EMULATED_TENSOR_OPS_LIBRARY");
  return path != nullptr && *path != '\0' ? std::string(path)
                                          : this_library_dir() + "/metal_cpu_tensor_ops/tensor_ops_library.so";
}

// The tensor-ops library at `path`, opened once per path (nullptr and `error` when it cannot be opened).
mcpu_library* tensor_ops_library(const std::string& path, std::string* error) {
  static std::mutex mutex;
  static std::vector<std::pair<std::string, mcpu_library*>> opened;
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& [p, lib] : opened) {
    if (p == path) {
      return lib;
    }
  }
  char err[1024] = {0};
  mcpu_library* lib = mcpu_open(path.c_str(), err, sizeof(err));
  if (lib == nullptr) {
    *error = path + ": " + err;
    return nullptr;
  }
  opened.emplace_back(path, lib);
  return lib;
}

// The bytes a view can reach: from its first element to its last reachable element, inclusive.
uint64_t view_byte_extent(const at::Tensor& t) {
  if (t.numel() == 0) {
    return 0;
  }
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    last += (t.size(d) - 1) * t.stride(d);
  }
  return static_cast<uint64_t>(last + 1) * t.element_size();
}

}  // namespace

void run_launch_plan(const LaunchPlan& plan) {
  if (plan.dispatches.empty()) {
    return;
  }
  const auto& libs = kernel_libraries();
  for (const Dispatch& d : plan.dispatches) {
    mcpu_library* lib = nullptr;
    if (d.tensor_ops_library) {
      std::string error;
      lib = tensor_ops_library(tensor_ops_library_path(), &error);
      TORCH_CHECK(lib != nullptr, "metal_cpu: cannot open the tensor-ops library: ", error);
      TORCH_CHECK(mcpu_find_kernel(&lib, 1, d.kernel.c_str()) == 0, "metal_cpu: no tensor-ops kernel named ", d.kernel);
    } else {
      const int which = mcpu_find_kernel(libs.data(), static_cast<int>(libs.size()), d.kernel.c_str());
      TORCH_CHECK(which >= 0, "metal_cpu: no compiled kernel named ", d.kernel);
      lib = libs[which];
    }

    std::vector<mcpu_buffer> buffers;
    for (const BufferArg& b : d.buffers) {
      TORCH_CHECK(b.tensor.device().is_cpu(), "metal_cpu: buffer ", b.index, " is not a CPU tensor");
      buffers.push_back(
          mcpu_buffer{b.index, b.tensor.numel() ? b.tensor.data_ptr() : nullptr, view_byte_extent(b.tensor)});
    }
    std::vector<mcpu_bytes> bytes;
    for (const BytesArg& b : d.bytes) {
      bytes.push_back(mcpu_bytes{b.index, b.data.data(), b.data.size()});
    }
    std::vector<mcpu_constant> constants;
    for (const FunctionConstant& c : d.constants) {
      constants.push_back(mcpu_constant{c.index, static_cast<uint32_t>(c.type), c.bits});
    }
    std::vector<uint32_t> tg_lengths;
    for (const ThreadgroupMemory& m : d.threadgroup_memory) {
      if (tg_lengths.size() <= m.index) {
        tg_lengths.resize(m.index + 1, 0);
      }
      tg_lengths[m.index] = m.length;
    }

    mcpu_dispatch_desc desc{};
    desc.kernel = d.kernel.c_str();
    desc.buffers = buffers.data();
    desc.num_buffers = static_cast<uint32_t>(buffers.size());
    desc.bytes = bytes.data();
    desc.num_bytes = static_cast<uint32_t>(bytes.size());
    desc.constants = constants.data();
    desc.num_constants = static_cast<uint32_t>(constants.size());
    desc.threadgroup_memory_lengths = tg_lengths.data();
    desc.num_threadgroup_memory_lengths = static_cast<uint32_t>(tg_lengths.size());
    for (int i = 0; i < 3; ++i) {
      desc.threadgroups[i] = d.threadgroups[i];
      desc.threads_per_threadgroup[i] = d.threads_per_threadgroup[i];
    }

    char err[4096] = {0};
    const int rc = mcpu_dispatch(lib, &desc, err, sizeof(err));
    TORCH_CHECK(rc == 0, "metal_cpu: dispatch of ", d.kernel, " failed: ", err);
  }
}

bool tensor_ops_supported() {
  const char* family = std::getenv("METAL_FLASH_SDPA_EMULATED_GPU_FAMILY");
  if (family == nullptr || std::atoi(family) < 10) {
    return false;
  }
  std::string error;
  return tensor_ops_library(tensor_ops_library_path(), &error) != nullptr;
}

}  // namespace flash_sdpa
