// run_launch_plan on the Mac: encodes a flash_sdpa::LaunchPlan on PyTorch's MPS stream.
//
// Generic: it knows nothing about attention. Pipelines are built (and every check runs) before dispatch_sync,
// because an exception inside the stream's queue kills the process. Encoding reuses PyTorch's compute encoder
// (no endEncoding, no commit, no synchronize). Built without ARC: objects cached for the process are retained once.
//
// Any thread may call run_launch_plan: the library loads once (call_once), pipelines are built once behind the
// cache's lock (keyed_cache.h) and are immutable after, everything else is the caller's own stack, and encoding runs
// inside dispatch_sync on the stream's serial queue, as PyTorch's own MPS ops do.
//
// The tensor-ops library (tensor_ops_library.h: the forward on Metal 4 tensor ops, for the M5 family's neural
// accelerators) is not in the metallib: its source is embedded here and compiled at run time, once, on GPUs of Apple
// family 10 only, so that a compiler or driver that rejects it costs that path (tensor_ops_supported() is false, one
// warning says why), never the package.
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <ATen/mps/MPSStream.h>
#include <c10/util/Exception.h>

#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "keyed_cache.h"
#include "launch_plan.h"
#include "paged_planner.h"

#ifdef EMBEDDED_METALLIB_HEADER
#include EMBEDDED_METALLIB_HEADER
#else
#error "metal_launch.mm loads the metallib kernel-builder embeds (EMBEDDED_METALLIB_HEADER)"
#endif

// The tensor-ops library's source: tensor_ops_library.h and every header it reaches, in include order (a file after
// the files it includes), embedded at build time. A compiler without #embed leaves it out: no tensor-ops path.
// scripts/build_manifest.py (tensor_ops_source) assembles the same text for the emulated build and its tests.
#if defined(__has_embed)
#define FLASH_SDPA_TENSOR_OPS_SOURCE 1
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wc23-extensions"
static const char kTopsParamsTypes[] = {
#embed "params_types.h"
    , 0};
static const char kTopsAttentionOptions[] = {
#embed "attention_options.h"
    , 0};
static const char kTopsAttentionDevice[] = {
#embed "attention_device.h"
    , 0};
static const char kTopsVarlenParams[] = {
#embed "varlen_params.h"
    , 0};
static const char kTopsAttentionVarlen[] = {
#embed "attention_varlen.h"
    , 0};
static const char kTopsAttentionTensorOps[] = {
#embed "attention_tensor_ops.h"
    , 0};
static const char kTopsBackwardParams[] = {
#embed "backward_params.h"
    , 0};
static const char kTopsAttentionBackward[] = {
#embed "attention_backward.h"
    , 0};
static const char kTopsAttentionBackwardTensorOps[] = {
#embed "attention_backward_tensor_ops.h"
    , 0};
static const char kTopsLibrary[] = {
#embed "tensor_ops_library.h"
    , 0};
#pragma clang diagnostic pop
static const char* const kTensorOpsSources[] = {
    kTopsParamsTypes,    kTopsAttentionOptions,  kTopsAttentionDevice,
    kTopsVarlenParams,   kTopsAttentionVarlen,   kTopsAttentionTensorOps,
    kTopsBackwardParams, kTopsAttentionBackward, kTopsAttentionBackwardTensorOps,
    kTopsLibrary};
#endif

namespace flash_sdpa {

namespace {

id<MTLBuffer> buffer_of(const at::Tensor& t) { return __builtin_bit_cast(id<MTLBuffer>, t.storage().data()); }

id<MTLLibrary> library(id<MTLDevice> device) {
  static std::once_flag once;
  static id<MTLLibrary> lib = nil;
  static std::string error;
  std::call_once(once, [device] {
    NSError* err = nil;
    lib = EMBEDDED_METALLIB_NAMESPACE::createLibrary(device, &err);
    if (lib == nil) {
      error = err != nil ? err.localizedDescription.UTF8String : "unknown error";
    } else {
      [lib retain];
    }
  });
  TORCH_CHECK(lib != nil, "metal-flash-sdpa: cannot load the embedded metallib: ", error);
  return lib;
}

// The embedded files as one source: their quoted includes and include guards dropped (each file is already there,
// once, before the files that include it).
std::string tensor_ops_source() {
  std::string source;
#ifdef FLASH_SDPA_TENSOR_OPS_SOURCE
  for (const char* file : kTensorOpsSources) {
    std::istringstream lines(file);
    std::string line;
    while (std::getline(lines, line)) {
      const size_t start = line.find_first_not_of(" \t");
      const bool dropped = start != std::string::npos && (line.compare(start, 10, "#include \"") == 0 ||
                                                          line.compare(start, 12, "#pragma once") == 0);
      if (!dropped) {
        source += line;
        source += '\n';
      }
    }
  }
#endif
  return source;
}

// The tensor-ops library, compiled once for the process; nil where the GPU is not of Apple family 10 or the
// compiler rejects the source (one warning with its message).
id<MTLLibrary> tensor_ops_library(id<MTLDevice> device) {
  static std::once_flag once;
  static id<MTLLibrary> lib = nil;
  std::call_once(once, [device] {
    std::string warning;
    @autoreleasepool {
      // Apple family 10 (the M5 family) by value: SDKs before macOS 26 do not name it.
      if (![device supportsFamily:static_cast<MTLGPUFamily>(1010)]) {
        return;
      }
      const std::string source = tensor_ops_source();
      if (source.empty()) {
        warning = "this build has no tensor-ops source (its compiler has no #embed)";
      } else {
        MTLCompileOptions* options = [[MTLCompileOptions alloc] init];
        options.languageVersion = MTLLanguageVersion4_0;  // Metal 4 tensors and MetalPerformancePrimitives
        options.mathMode = MTLMathModeFast;               // as the metallib's kernels (Metal's default)
        NSError* err = nil;
        lib = [device newLibraryWithSource:[NSString stringWithUTF8String:source.c_str()] options:options error:&err];
        [options release];
        if (lib == nil) {
          warning = std::string("the Metal compiler rejected the tensor-ops source: ") +
                    (err != nil ? err.localizedDescription.UTF8String : "unknown error");
        }
      }
    }
    if (!warning.empty()) {
      TORCH_WARN("metal-flash-sdpa: ", warning, "; the forward keeps the simdgroup_matrix kernels");
    }
  });
  return lib;
}

// Cache key: the library, the kernel name and every function constant (index, type, bits).
std::string pipeline_key(const Dispatch& d) {
  std::string key = (d.tensor_ops_library ? "tops|" : "") + d.kernel;
  for (const FunctionConstant& c : d.constants) {
    key += "|" + std::to_string(c.index) + ":" + std::to_string(c.type) + ":" + std::to_string(c.bits);
  }
  return key;
}

id<MTLComputePipelineState> pipeline(id<MTLDevice> device, const Dispatch& d) {
  static KeyedCache<id<MTLComputePipelineState>> cache;  // owns each pipeline for the process
  id<MTLLibrary> lib = d.tensor_ops_library ? tensor_ops_library(device) : library(device);
  TORCH_CHECK(lib != nil, "metal-flash-sdpa: ", d.kernel, " needs the tensor-ops library, which this GPU lacks");
  std::string error;
  // Built once per key, under the cache's lock; nil (and `error`) on failure.
  id<MTLComputePipelineState> pso = cache.get(pipeline_key(d), [&]() -> id<MTLComputePipelineState> {
    id<MTLComputePipelineState> built = nil;
    // Metal hands back autoreleased objects (errors, descriptions): drain them here, on whatever thread calls us.
    // Nothing throws inside the pool; the checks run after it.
    @autoreleasepool {
      MTLFunctionConstantValues* values = [[MTLFunctionConstantValues alloc] init];
      for (const FunctionConstant& c : d.constants) {
        switch (c.type) {
          case FunctionConstant::kBool: {
            const bool b = c.bits != 0;
            [values setConstantValue:&b type:MTLDataTypeBool atIndex:c.index];
            break;
          }
          case FunctionConstant::kInt:
            [values setConstantValue:&c.bits type:MTLDataTypeInt atIndex:c.index];
            break;
          case FunctionConstant::kUInt:
            [values setConstantValue:&c.bits type:MTLDataTypeUInt atIndex:c.index];
            break;
          case FunctionConstant::kFloat:
            [values setConstantValue:&c.bits type:MTLDataTypeFloat atIndex:c.index];
            break;
        }
      }
      NSError* err = nil;
      id<MTLFunction> fn = [lib newFunctionWithName:[NSString stringWithUTF8String:d.kernel.c_str()]
                                     constantValues:values
                                              error:&err];
      [values release];
      if (fn == nil) {
        error = std::string("no kernel ") + d.kernel +
                " in the metallib: " + (err != nil ? err.localizedDescription.UTF8String : "");
      } else {
        built = [device newComputePipelineStateWithFunction:fn error:&err];
        [fn release];
        if (built == nil) {
          error = std::string("cannot build the pipeline of ") + d.kernel + ": " +
                  (err != nil ? err.localizedDescription.UTF8String : "");
        }
      }
    }
    return built;
  });
  TORCH_CHECK(pso != nil, "metal-flash-sdpa: ", error);
  return pso;
}

// GPU cores of the MPS device for the decode split heuristic, read once from its name ("Apple M2 Max"): the largest
// configuration of its class (base 10, Pro 20, Max 40, Ultra 80); 0 for any other name, and the planner falls back
// to kDefaultGpuCores. Metal has no core-count API; the IORegistry's gpu-core-count would be exact but needs IOKit.
int64_t mps_gpu_core_count() {
  static std::once_flag once;
  static int64_t cores = 0;
  std::call_once(once, [] {
    @autoreleasepool {
      at::mps::MPSStream* stream = at::mps::getCurrentMPSStream();
      NSString* name = stream != nullptr ? stream->device().name : nil;
      const std::string n = name != nil ? std::string(name.UTF8String) : std::string();
      if (n.rfind("Apple M", 0) == 0) {
        cores = n.find("Ultra") != std::string::npos ? 80
                : n.find("Max") != std::string::npos ? 40
                : n.find("Pro") != std::string::npos ? 20
                                                     : 10;
      }
    }
  });
  return cores;
}

// Registered when the library loads; called only when a decode is planned.
const bool kCoreCountProviderRegistered = (set_gpu_core_count_provider(&mps_gpu_core_count), true);

}  // namespace

bool tensor_ops_supported() {
  at::mps::MPSStream* stream = at::mps::getCurrentMPSStream();
  return stream != nullptr && tensor_ops_library(stream->device()) != nil;
}

void run_launch_plan(const LaunchPlan& plan) {
  if (plan.dispatches.empty()) {
    return;
  }
  at::mps::MPSStream* stream = at::mps::getCurrentMPSStream();
  TORCH_CHECK(stream != nullptr, "metal-flash-sdpa: no current MPS stream");
  id<MTLDevice> device = stream->device();

  // Everything that can fail, before dispatch_sync.
  std::vector<id<MTLComputePipelineState>> psos;
  for (const Dispatch& d : plan.dispatches) {
    id<MTLComputePipelineState> pso = pipeline(device, d);
    const uint64_t threads =
        uint64_t(d.threads_per_threadgroup[0]) * d.threads_per_threadgroup[1] * d.threads_per_threadgroup[2];
    // A launch above the pipeline's limit silently writes nothing.
    TORCH_CHECK(threads <= pso.maxTotalThreadsPerThreadgroup, "metal-flash-sdpa: ", d.kernel, " needs ", threads,
                " threads per threadgroup, the pipeline allows ", pso.maxTotalThreadsPerThreadgroup);
    for (const BufferArg& b : d.buffers) {
      TORCH_CHECK(b.tensor.numel() == 0 || b.tensor.device().is_mps(), "metal-flash-sdpa: buffer ", b.index, " of ",
                  d.kernel, " is not an MPS tensor");
    }
    psos.push_back(pso);
  }

  const LaunchPlan* p = &plan;
  const std::vector<id<MTLComputePipelineState>>* pipelines = &psos;
  dispatch_sync(stream->queue(), ^() {
    @autoreleasepool {  // commandEncoder() may hand back an autoreleased encoder
      id<MTLComputeCommandEncoder> encoder = stream->commandEncoder();
      for (size_t n = 0; n < p->dispatches.size(); ++n) {
        const Dispatch& d = p->dispatches[n];
        [encoder setComputePipelineState:(*pipelines)[n]];
        for (const BufferArg& b : d.buffers) {
          [encoder setBuffer:buffer_of(b.tensor)
                      offset:b.tensor.storage_offset() * b.tensor.element_size()
                     atIndex:b.index];
        }
        for (const BytesArg& b : d.bytes) {
          [encoder setBytes:b.data.data() length:b.data.size() atIndex:b.index];
        }
        for (const ThreadgroupMemory& m : d.threadgroup_memory) {
          [encoder setThreadgroupMemoryLength:m.length atIndex:m.index];
        }
        [encoder dispatchThreadgroups:MTLSizeMake(d.threadgroups[0], d.threadgroups[1], d.threadgroups[2])
                threadsPerThreadgroup:MTLSizeMake(d.threads_per_threadgroup[0], d.threads_per_threadgroup[1],
                                                  d.threads_per_threadgroup[2])];
        if (d.commit_after) {
          // macOS limits a command buffer's GPU time (planner_common.h): end the encoder and commit, as PyTorch's
          // own ops do on this queue (MPSStream::copy / executeMPSGraph call synchronize inside their
          // dispatch_sync); the next dispatch starts a new command buffer.
          stream->synchronize(at::mps::SyncType::COMMIT);
          if (n + 1 < p->dispatches.size()) {
            encoder = stream->commandEncoder();
          }
        }
      }
    }
  });
}

}  // namespace flash_sdpa
