// Metal on the CPU: the C API of the emulator runtime (libmetal_cpu.so).
//
// A .metal file is turned into a shared object by msl/cpu/compiler.py (pre-pass + clang-19); this runtime
// loads such objects and runs dispatches on them: every GPU thread is a fiber, threadgroups run one after another,
// and every device / threadgroup memory access goes through the checks below. Python binds this API with ctypes
// (msl/cpu/__init__.py); the emulated build of the package calls it from C++.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MCPU_MAX_BUFFERS 31          // Metal's buffer argument table has 31 entries
#define MCPU_MAX_THREADGROUP_ARGS 8  // [[threadgroup(i)]] arguments

typedef struct mcpu_library mcpu_library;

// A device buffer as the kernel sees it: `data` points at the bound offset, `length` bytes are valid from there.
// The runtime copies it into a guarded arena before the dispatch and copies changed bytes back afterwards.
typedef struct {
  uint32_t index;  // [[buffer(index)]]
  void* data;
  uint64_t length;
} mcpu_buffer;

// setBytes: a small constant struct, copied.
typedef struct {
  uint32_t index;  // [[buffer(index)]]
  const void* data;
  uint64_t length;
} mcpu_bytes;

enum mcpu_constant_type { MCPU_BOOL = 0, MCPU_INT = 1, MCPU_UINT = 2, MCPU_FLOAT = 3 };

// A function-constant value ([[function_constant(index)]]). `bits` holds the value (bool/int32/uint32/float).
typedef struct {
  uint32_t index;
  uint32_t type;
  uint32_t bits;
} mcpu_constant;

enum mcpu_schedule { MCPU_FORWARD = 0, MCPU_REVERSE = 1, MCPU_RANDOM = 2 };

typedef struct {
  const char* kernel;  // the [[host_name]] (or the function name of a non-template kernel)
  const mcpu_buffer* buffers;
  uint32_t num_buffers;
  const mcpu_bytes* bytes;
  uint32_t num_bytes;
  const mcpu_constant* constants;
  uint32_t num_constants;
  const uint32_t* threadgroup_memory_lengths;  // [[threadgroup(i)]] lengths, indexed by i
  uint32_t num_threadgroup_memory_lengths;
  uint32_t threadgroups[3];  // dispatchThreadgroups: threadgroups per grid
  uint32_t threads_per_threadgroup[3];
} mcpu_dispatch_desc;

// Bytes the kernel loaded from / stored to each buffer index during one dispatch (as counted at every
// instrumented access, so a value read twice counts twice).
typedef struct {
  char kernel[128];
  uint64_t threadgroups;
  uint64_t threads;
  uint64_t loaded[MCPU_MAX_BUFFERS];
  uint64_t stored[MCPU_MAX_BUFFERS];
  uint64_t threadgroup_loaded;
  uint64_t threadgroup_stored;
} mcpu_dispatch_stats;

typedef struct {
  uint32_t schedule;     // mcpu_schedule: order of threadgroups, of threads within a threadgroup, and of resumes
  uint64_t seed;         // for MCPU_RANDOM
  uint32_t check_races;  // threadgroup-memory race + uninitialised-read detector (slower)
} mcpu_options;

// Loads a compiled kernel library. Returns NULL and fills `err` on failure.
mcpu_library* mcpu_open(const char* path, char* err, size_t err_len);

// Runs one dispatch. Returns 0 on success; otherwise fills `err` with a message naming the .metal file and line
// (and the buffer index and thread for memory errors), and leaves the buffers as they were before the call.
int mcpu_dispatch(mcpu_library* lib, const mcpu_dispatch_desc* desc, char* err, size_t err_len);

// Finds which of `libs` defines `kernel` (-1 if none): one metallib is many .metal files.
int mcpu_find_kernel(mcpu_library* const* libs, int num_libs, const char* kernel);

// Options apply to later dispatches. Defaults come from METAL_CPU_SCHEDULE (forward|reverse|random),
// METAL_CPU_SEED and METAL_CPU_CHECK_RACES (0|1).
void mcpu_set_options(const mcpu_options* options);
void mcpu_get_options(mcpu_options* options);

// A log of the most recent dispatches (ring of MCPU_STATS_LOG entries). `mcpu_stats_count` counts all
// dispatches since the last reset; entry i (0 = oldest still kept) is copied into `out`.
#define MCPU_STATS_LOG 256
void mcpu_stats_reset(void);
uint64_t mcpu_stats_count(void);
int mcpu_stats_get(uint64_t i, mcpu_dispatch_stats* out);

#ifdef __cplusplus
}
#endif
