// The Metal-on-CPU runtime: runs dispatches of compiled kernel libraries with every GPU thread as a fiber and
// checks every memory access the kernel makes (SanitizerCoverage load/store hooks).
//
// One dispatch at a time (a global lock): threadgroups run one after another on the calling thread.
#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "fiber.h"
#include "mcpu_abi.h"
#include "metal_cpu.h"

namespace {

constexpr uint32_t kSimdWidth = 32;
constexpr size_t kStackSize = 256 * 1024;
constexpr size_t kThreadgroupMemoryLimit = 32 * 1024;
constexpr uint64_t kSpinLimit = 1ull << 26;  // accesses by one thread without reaching any sync point
constexpr size_t kGuard = 64 * 1024;
constexpr uint32_t kSimdgroupBarrier = 1u << 16;  // Fiber::flags: this collective is a simdgroup_barrier         //
                                                  // unmapped-by-convention gap around every buffer copy

enum class State { kRunnable, kBarrier, kSimd, kDone };

struct Site {  // a barrier or collective's place in the .metal source
  const char* file = nullptr;
  uint32_t line = 0, column = 0;
  bool operator==(const Site& o) const {
    return line == o.line && column == o.column && (file == o.file || (file && o.file && !strcmp(file, o.file)));
  }
  bool operator!=(const Site& o) const { return !(*this == o); }
  std::string str() const { return std::string(file ? file : "?") + ":" + std::to_string(line); }
};

struct Fiber {
  void* sp = nullptr;
  State state = State::kRunnable;
  Site site;           // the barrier / collective it waits at
  uint32_t flags = 0;  // barrier mem_flags
  mcpu_thread_args args;
  // simd exchange
  const void* value = nullptr;
  uint32_t value_size = 0;
  void* all = nullptr;
  uint32_t result_mask = 0;
  uint64_t accesses = 0;  // since the last sync point
};

struct Slot {  // a copy of one bound buffer inside the arena
  uintptr_t lo, hi;
  uint32_t index;
  bool is_bytes;
  void* host;
};

// Threadgroup-memory shadow for the race / uninitialised-read detector, one entry per byte.
struct Shadow {
  uint32_t write_epoch, read_epoch;
  uint32_t write_sepoch, read_sepoch;
  uint16_t writer, reader;  // thread index in threadgroup; reader = kMany when several
  int16_t read_sg;          // simdgroup of the readers in read_epoch, -1 when several
  uint8_t init;
};
constexpr uint16_t kMany = 0xffff;

struct Range {
  uintptr_t lo, hi;
};

struct Library {
  void* handle;
  const mcpu_library_info* info;
  std::string path;
  std::vector<Range> image;  // the object's own mapped segments (constants, function-constant storage)
};

struct Global {
  std::mutex lock;
  mcpu_options options{};
  // current dispatch
  const Library* lib = nullptr;
  const mcpu_kernel_info* kernel = nullptr;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  void* scheduler_sp = nullptr;
  uint32_t num_threads = 0;
  uint32_t threadgroup_id[3] = {0, 0, 0};
  // memory
  char* stacks = nullptr;
  size_t stacks_size = 0;
  uintptr_t stack_lo = 0, stack_hi = 0;
  std::vector<Slot> slots;
  char* tg_mem = nullptr;  // threadgroup memory (declared + [[threadgroup(i)]] arguments)
  uint32_t tg_used = 0;
  std::vector<std::pair<uint32_t, uint32_t>> tg_decls;  // (decl_id, offset) of kernel-scope declarations
  std::vector<Shadow> shadow;
  uint32_t epoch = 1;
  std::vector<uint32_t> simd_epoch;
  // error
  bool failed = false;
  std::string error;
  mcpu_dispatch_stats stats{};
  // stats log
  std::vector<mcpu_dispatch_stats> log = std::vector<mcpu_dispatch_stats>(MCPU_STATS_LOG);
  uint64_t log_count = 0;
  bool options_loaded = false;
};

Global g;

std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

// ---------------------------------------------------------------------------------------------------------------
// Error reports: a source location from a return address, via llvm-symbolizer (debug info points at the .metal).
std::string locate(void* pc) {
  Dl_info info;
  if (!pc || !dladdr(pc, &info) || !info.dli_fname) return "<unknown location>";
  uintptr_t offset = (uintptr_t)pc - (uintptr_t)info.dli_fbase - 1;
  const char* tool = getenv("METAL_CPU_SYMBOLIZER");
  std::string cmd = format("%s --obj='%s' --inlining 0x%lx 2>/dev/null", tool ? tool : "llvm-symbolizer-19",
                           info.dli_fname, (unsigned long)offset);
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return "<no symbolizer>";
  std::vector<std::string> lines;
  char line[4096];
  while (fgets(line, sizeof line, p)) {
    std::string s(line);
    while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
    if (!s.empty()) lines.push_back(s);
  }
  pclose(p);
  // Pairs of (function, file:line:col), innermost first; report the innermost frame outside the shim.
  std::string where, chain;
  for (size_t i = 0; i + 1 < lines.size(); i += 2) {
    const std::string& loc = lines[i + 1];
    bool shim = loc.find("msl/cpu/shim/") != std::string::npos || loc.find("msl/shim/") != std::string::npos ||
                loc.find("<mcpu-generated>") != std::string::npos;
    if (shim) continue;
    if (where.empty()) {
      where = loc;
      chain = lines[i];
    }
  }
  if (where.empty()) return lines.empty() ? "<unknown location>" : lines.size() > 1 ? lines[1] : lines[0];
  // strip ":col"
  size_t last = where.rfind(':');
  if (last != std::string::npos && where.find(':') != last) where = where.substr(0, last);
  return where + " (in " + chain + ")";
}

std::string thread_name(const Fiber* f) {
  const mcpu_thread_args& a = f->args;
  return format("thread %u (simdgroup %u, lane %u) of threadgroup (%u,%u,%u)", a.thread_index_in_threadgroup,
                a.simdgroup_index_in_threadgroup, a.thread_index_in_simdgroup, g.threadgroup_id[0], g.threadgroup_id[1],
                g.threadgroup_id[2]);
}

[[noreturn]] void fail_on_fiber(const std::string& message) {
  if (!g.failed) {
    g.failed = true;
    g.error = message;
  }
  Fiber* self = g.current;
  mcpu_switch(&self->sp, g.scheduler_sp);
  __builtin_unreachable();
}

void fail(const std::string& message) {
  if (!g.failed) {
    g.failed = true;
    g.error = message;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Memory access checks, called before every load and store of the kernel code.
void check_threadgroup_access(uintptr_t a, uint32_t n, bool store, void* pc) {
  uintptr_t off = a - (uintptr_t)g.tg_mem;
  Fiber* f = g.current;
  if (off + n > g.tg_used) {
    fail_on_fiber(format("threadgroup memory overrun: %s of %u bytes at offset %lu of %u allocated bytes, by %s, at %s",
                         store ? "write" : "read", n, (unsigned long)off, g.tg_used, thread_name(f).c_str(),
                         locate(pc).c_str()));
  }
  if (store)
    g.stats.threadgroup_stored += n;
  else
    g.stats.threadgroup_loaded += n;
  if (!g.options.check_races) return;
  const uint16_t t = (uint16_t)f->args.thread_index_in_threadgroup;
  const int16_t sg = (int16_t)f->args.simdgroup_index_in_threadgroup;
  const uint32_t se = g.simd_epoch[sg];
  auto ordered = [&](uint16_t other, uint32_t other_sepoch) {
    // Same barrier epoch: ordered only for the same thread, or the same simdgroup with a simdgroup_barrier since.
    if (other == t) return true;
    if (other == kMany) return false;
    return (int16_t)g.fibers[other].args.simdgroup_index_in_threadgroup == sg && other_sepoch != se;
  };
  for (uint32_t i = 0; i < n; ++i) {
    Shadow& s = g.shadow[off + i];
    const char* kind = nullptr;
    uint16_t other = 0;
    if (!store && !s.init) {
      fail_on_fiber(format("read of uninitialised threadgroup memory (offset %lu) by %s, at %s",
                           (unsigned long)(off + i), thread_name(f).c_str(), locate(pc).c_str()));
    }
    if (s.write_epoch == g.epoch && !ordered(s.writer, s.write_sepoch)) {
      kind = store ? "write after write" : "read after write";
      other = s.writer;
    } else if (store && s.read_epoch == g.epoch) {
      bool race = s.read_sg != sg ? true : (s.reader != t && s.read_sepoch == se);
      if (race) {
        kind = "write after read";
        other = s.reader;
      }
    }
    if (kind) {
      std::string who = other == kMany ? std::string("several threads") : thread_name(&g.fibers[other]);
      fail_on_fiber(format("threadgroup memory race (%s, no barrier between) at offset %lu: %s at %s, against %s", kind,
                           (unsigned long)(off + i), thread_name(f).c_str(), locate(pc).c_str(), who.c_str()));
    }
    if (store) {
      s.write_epoch = g.epoch;
      s.write_sepoch = se;
      s.writer = t;
      s.init = 1;
    } else if (s.read_epoch != g.epoch) {
      s.read_epoch = g.epoch;
      s.read_sepoch = se;
      s.reader = t;
      s.read_sg = sg;
    } else {
      if (s.reader != t) s.reader = kMany;
      if (s.read_sg != sg) s.read_sg = -1;
      s.read_sepoch = se;
    }
  }
}

bool in_image(uintptr_t a, uint32_t n) {
  for (const Range& r : g.lib->image)
    if (a >= r.lo && a + n <= r.hi) return true;
  return false;
}

void check_device_access(uintptr_t a, uint32_t n, bool store, void* pc) {
  // Slots are sorted by address; find the last one starting at or before `a`.
  const std::vector<Slot>& slots = g.slots;
  size_t lo = 0, hi = slots.size();
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (slots[mid].lo <= a)
      lo = mid + 1;
    else
      hi = mid;
  }
  const Slot* before = lo > 0 ? &slots[lo - 1] : nullptr;
  if (before && a + n <= before->hi) {
    if (store && before->is_bytes)
      fail_on_fiber(format("write to constant buffer %u (setBytes) by %s, at %s", before->index,
                           thread_name(g.current).c_str(), locate(pc).c_str()));
    (store ? g.stats.stored : g.stats.loaded)[before->index] += n;
    return;
  }
  if (in_image(a, n)) return;  // program-scope constants, function-constant storage
  const Slot* after = lo < slots.size() ? &slots[lo] : nullptr;
  std::string what;
  if (before && a < before->hi + kGuard) {
    what = format("byte offset %ld of buffer %u (%lu bytes long)", (long)(a - before->lo), before->index,
                  (unsigned long)(before->hi - before->lo));
  } else if (after && a + kGuard >= after->lo) {
    what = format("byte offset -%lu of buffer %u (%lu bytes long)", (unsigned long)(after->lo - a), after->index,
                  (unsigned long)(after->hi - after->lo));
  } else {
    what = "an address outside every bound buffer";
  }
  fail_on_fiber(format("device memory overrun: %s of %u bytes at %s, by %s, at %s", store ? "write" : "read", n,
                       what.c_str(), thread_name(g.current).c_str(), locate(pc).c_str()));
}

inline void on_access(void* addr, uint32_t n, bool store, void* pc) {
  uintptr_t a = (uintptr_t)addr;
  if (a - g.stack_lo < g.stack_hi - g.stack_lo) return;  // a GPU thread's own (thread address space) memory
  Fiber* f = g.current;
  if (!f) return;
  if (++f->accesses > kSpinLimit) {
    fail_on_fiber(
        format("deadlock: %s made %llu memory accesses without reaching a barrier or simd collective "
               "(spinning on a value no other thread can change?), at %s",
               thread_name(f).c_str(), (unsigned long long)kSpinLimit, locate(pc).c_str()));
  }
  if (a - (uintptr_t)g.tg_mem < kThreadgroupMemoryLimit + kGuard)
    check_threadgroup_access(a, n, store, pc);
  else
    check_device_access(a, n, store, pc);
}

// ---------------------------------------------------------------------------------------------------------------
// Scheduling.
void fiber_main() {
  Fiber* f = g.current;
  const mcpu_thread_args args = f->args;  // on this thread's own stack: reading it is not a device access
  g.kernel->entry(&args);
  f = g.current;
  f->state = State::kDone;
  mcpu_switch(&f->sp, g.scheduler_sp);
  __builtin_unreachable();
}

void block(State state, Site site) {
  Fiber* f = g.current;
  f->state = state;
  f->site = site;
  f->accesses = 0;
  mcpu_switch(&f->sp, g.scheduler_sp);
}

void start_fiber(Fiber& f, size_t i) {
  f.sp = mcpu_fiber_frame(g.stacks + (i + 1) * kStackSize, &fiber_main);  // stacks are page aligned
  f.state = State::kRunnable;
}

void run_fiber(Fiber& f) {
  g.current = &f;
  mcpu_switch(&g.scheduler_sp, f.sp);
  g.current = nullptr;
}

// Completes every simd collective that can complete: a simdgroup whose lanes all wait somewhere.
bool complete_collectives() {
  bool progress = false;
  const uint32_t num_sg = (g.num_threads + kSimdWidth - 1) / kSimdWidth;
  for (uint32_t sg = 0; sg < num_sg; ++sg) {
    const uint32_t first = sg * kSimdWidth, last = std::min(g.num_threads, first + kSimdWidth);
    bool any_simd = false;
    for (uint32_t t = first; t < last; ++t) {
      if (g.fibers[t].state == State::kRunnable) return progress;  // cannot happen after a full pass
      any_simd |= g.fibers[t].state == State::kSimd;
    }
    if (!any_simd) continue;
    // Lanes waiting at the same call site form one collective (the active lanes of that instruction).
    std::vector<bool> done(last - first, false);
    for (uint32_t t = first; t < last; ++t) {
      Fiber& lead = g.fibers[t];
      if (lead.state != State::kSimd || done[t - first]) continue;
      uint32_t mask = 0;
      for (uint32_t u = t; u < last; ++u) {
        Fiber& o = g.fibers[u];
        if (o.state == State::kSimd && o.site == lead.site) {
          if (o.value_size != lead.value_size) {
            fail(format("simd collective at %s: lanes pass values of different sizes", lead.site.str().c_str()));
            return false;
          }
          mask |= 1u << (u - first);
        }
      }
      for (uint32_t u = t; u < last; ++u) {
        if (!(mask & (1u << (u - first)))) continue;
        Fiber& o = g.fibers[u];
        for (uint32_t v = first; v < last; ++v)
          if (mask & (1u << (v - first)))
            memcpy((char*)o.all + (v - first) * o.value_size, g.fibers[v].value, o.value_size);
        o.result_mask = mask;
        o.state = State::kRunnable;
        done[u - first] = true;
      }
      // A simdgroup_barrier over threadgroup memory orders the accesses of its lanes before and after it.
      if ((lead.flags & kSimdgroupBarrier) && (lead.flags & MCPU_MEM_THREADGROUP)) ++g.simd_epoch[sg];
      progress = true;
    }
  }
  return progress;
}

// All live threads wait at threadgroup barriers: release them, or report why they cannot be released.
bool release_barrier() {
  Fiber* waiting = nullptr;
  Fiber* exited = nullptr;
  for (Fiber& f : g.fibers) {
    if (f.state == State::kBarrier) {
      if (waiting && waiting->site != f.site) {
        fail(format("divergent barrier: %s waits at the barrier at %s while %s waits at the barrier at %s",
                    thread_name(waiting).c_str(), waiting->site.str().c_str(), thread_name(&f).c_str(),
                    f.site.str().c_str()));
        return false;
      }
      waiting = &f;
    } else if (f.state == State::kDone) {
      exited = &f;
    }
  }
  if (!waiting) return false;
  if (exited) {
    fail(format("barrier skipped: %s waits at the barrier at %s but %s exited without reaching it",
                thread_name(waiting).c_str(), waiting->site.str().c_str(), thread_name(exited).c_str()));
    return false;
  }
  if (waiting->flags & MCPU_MEM_THREADGROUP) ++g.epoch;  // only a threadgroup-memory barrier orders that memory
  for (Fiber& f : g.fibers) f.state = State::kRunnable;
  return true;
}

std::vector<uint32_t> order(uint32_t n, std::mt19937_64& rng) {
  std::vector<uint32_t> o(n);
  for (uint32_t i = 0; i < n; ++i) o[i] = i;
  if (g.options.schedule == MCPU_REVERSE) std::reverse(o.begin(), o.end());
  if (g.options.schedule == MCPU_RANDOM) std::shuffle(o.begin(), o.end(), rng);
  return o;
}

void run_threadgroup(std::mt19937_64& rng) {
  for (size_t i = 0; i < g.fibers.size(); ++i) start_fiber(g.fibers[i], i);
  while (!g.failed) {
    for (uint32_t i : order(g.num_threads, rng)) {
      Fiber& f = g.fibers[i];
      if (f.state == State::kRunnable) run_fiber(f);
      if (g.failed) return;
    }
    if (complete_collectives()) continue;
    if (g.failed) return;
    bool all_done = true;
    for (Fiber& f : g.fibers) all_done &= f.state == State::kDone;
    if (all_done) return;
    if (!release_barrier()) {
      if (!g.failed) fail("deadlock: no thread can make progress");
      return;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Dispatch set-up.
void load_default_options() {
  if (g.options_loaded) return;
  g.options_loaded = true;
  const char* s = getenv("METAL_CPU_SCHEDULE");
  g.options.schedule = MCPU_FORWARD;
  if (s && !strcmp(s, "reverse")) g.options.schedule = MCPU_REVERSE;
  if (s && !strcmp(s, "random")) g.options.schedule = MCPU_RANDOM;
  const char* seed = getenv("METAL_CPU_SEED");
  g.options.seed = seed ? strtoull(seed, nullptr, 10) : 0;
  const char* races = getenv("METAL_CPU_CHECK_RACES");
  g.options.check_races = races ? atoi(races) != 0 : 1;
}

void* map(size_t size) {
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// A buffer's copy in the arena and what it held before the dispatch, kept chunk by chunk: an all-zero chunk is
// neither copied nor saved (the fresh arena mapping already reads as zeros). So a buffer's cost in memory is its
// non-zero bytes, and a sparse tensor of many GB (a KV cache past 2^32 elements of which a test fills a few
// blocks) can be bound: reading an untouched anonymous page of the caller's costs no memory.
constexpr size_t kChunk = 4096;
constexpr uint64_t kZeroChunk = ~0ull;
const char kZeros[kChunk] = {};

struct Snapshot {
  std::vector<uint64_t> where;  // per chunk: its offset in saved, or kZeroChunk
  std::vector<char> saved;
};

// Copies n bytes from src to dst (a fresh, zero mapping) and records them.
Snapshot copy_in(char* dst, const char* src, size_t n) {
  Snapshot s;
  s.where.assign((n + kChunk - 1) / kChunk, kZeroChunk);
  for (size_t c = 0; c < s.where.size(); ++c) {
    const size_t at = c * kChunk, len = std::min(kChunk, n - at);
    if (!memcmp(src + at, kZeros, len)) continue;
    memcpy(dst + at, src + at, len);
    s.where[c] = s.saved.size();
    s.saved.insert(s.saved.end(), src + at, src + at + len);
  }
  return s;
}

// Writes to host only the bytes the kernel changed: two bound views of one buffer (k_cache and v_cache one page
// apart) must not undo each other's writes.
void copy_back(char* host, const char* now, size_t n, const Snapshot& s) {
  for (size_t c = 0; c < s.where.size(); ++c) {
    const size_t at = c * kChunk, len = std::min(kChunk, n - at);
    const char* before = s.where[c] == kZeroChunk ? kZeros : s.saved.data() + s.where[c];
    if (!memcmp(now + at, before, len)) continue;
    for (size_t k = 0; k < len; ++k)
      if (now[at + k] != before[k]) host[at + k] = now[at + k];
  }
}

int dispatch_locked(Library* lib, const mcpu_dispatch_desc* d, char* err, size_t err_len) {
  auto error = [&](const std::string& m) {
    snprintf(err, err_len, "%s", m.c_str());
    return -1;
  };
  const mcpu_kernel_info* kernel = nullptr;
  for (uint32_t i = 0; i < lib->info->num_kernels; ++i)
    if (!strcmp(lib->info->kernels[i].name, d->kernel)) kernel = &lib->info->kernels[i];
  if (!kernel) return error(format("no kernel named '%s' in %s", d->kernel, lib->info->source_path));

  const uint32_t tx = d->threads_per_threadgroup[0], ty = d->threads_per_threadgroup[1],
                 tz = d->threads_per_threadgroup[2];
  const uint64_t threads = (uint64_t)tx * ty * tz;
  if (threads == 0 || threads > 1024)
    return error(
        format("%s: %llu threads per threadgroup (Metal allows 1..1024)", d->kernel, (unsigned long long)threads));
  if (kernel->max_total_threads_per_threadgroup && threads > kernel->max_total_threads_per_threadgroup)
    return error(
        format("%s: %llu threads per threadgroup exceed the kernel's max_total_threads_per_threadgroup(%u); "
               "Metal would run nothing",
               d->kernel, (unsigned long long)threads, kernel->max_total_threads_per_threadgroup));
  const uint64_t num_tg = (uint64_t)d->threadgroups[0] * d->threadgroups[1] * d->threadgroups[2];

  // Bind: every buffer parameter needs a buffer or bytes; threadgroup arguments need a length.
  std::vector<const mcpu_buffer*> buffers(MCPU_MAX_BUFFERS, nullptr);
  std::vector<const mcpu_bytes*> bytes(MCPU_MAX_BUFFERS, nullptr);
  for (uint32_t i = 0; i < d->num_buffers; ++i) {
    if (d->buffers[i].index >= MCPU_MAX_BUFFERS)
      return error(format("buffer index %u out of range", d->buffers[i].index));
    buffers[d->buffers[i].index] = &d->buffers[i];
  }
  for (uint32_t i = 0; i < d->num_bytes; ++i) {
    if (d->bytes[i].index >= MCPU_MAX_BUFFERS) return error(format("bytes index %u out of range", d->bytes[i].index));
    bytes[d->bytes[i].index] = &d->bytes[i];
  }
  uint32_t tg_arg_offset[MCPU_MAX_THREADGROUP_ARGS] = {0};
  uint32_t tg_args_total = 0;
  for (uint32_t p = 0; p < kernel->num_params; ++p) {
    const mcpu_param_info& param = kernel->params[p];
    if (param.kind == MCPU_PARAM_BUFFER && !buffers[param.index] && !bytes[param.index])
      return error(format("%s: nothing bound at buffer(%u) (parameter '%s')", d->kernel, param.index, param.name));
    // Metal's validation layer rejects a buffer offset that is not a multiple of the type's alignment.
    if (param.kind == MCPU_PARAM_BUFFER && buffers[param.index] && param.align > 1 &&
        (uintptr_t)buffers[param.index]->data % param.align != 0)
      return error(format("%s: buffer(%u) (parameter '%s') is bound at an address not aligned to its type's %u bytes",
                          d->kernel, param.index, param.name, param.align));
    if (param.kind == MCPU_PARAM_THREADGROUP) {
      if (param.index >= d->num_threadgroup_memory_lengths || !d->threadgroup_memory_lengths[param.index])
        return error(format("%s: no threadgroup memory length for threadgroup(%u) (parameter '%s')", d->kernel,
                            param.index, param.name));
      tg_arg_offset[param.index] = tg_args_total;
      tg_args_total += (uint32_t)round_up(d->threadgroup_memory_lengths[param.index], 16);
    }
  }
  if (tg_args_total > kThreadgroupMemoryLimit)
    return error(format("%s: %u bytes of threadgroup memory arguments exceed 32 KB", d->kernel, tg_args_total));

  // Function constants.
  lib->info->set_function_constant(UINT32_MAX, 0, 0);
  for (uint32_t i = 0; i < d->num_constants; ++i) {
    int rc = lib->info->set_function_constant(d->constants[i].index, d->constants[i].type, d->constants[i].bits);
    if (rc == -1) return error(format("%s: no function constant with index %u", d->kernel, d->constants[i].index));
    if (rc == -2)
      return error(format("%s: function constant %u given with the wrong type", d->kernel, d->constants[i].index));
  }

  // Arena: each buffer copied between guard gaps, sorted by address.
  std::vector<Slot> slots;
  size_t arena_size = kGuard;
  struct Pending {
    uint32_t index;
    const void* src;
    uint64_t len;
    bool is_bytes;
    void* host;
  };
  std::vector<Pending> pending;
  for (uint32_t i = 0; i < MCPU_MAX_BUFFERS; ++i) {
    if (buffers[i])
      pending.push_back({i, buffers[i]->data, buffers[i]->length, false, buffers[i]->data});
    else if (bytes[i])
      pending.push_back({i, bytes[i]->data, bytes[i]->length, true, nullptr});
  }
  // A buffer's copy keeps the bound address's offset from 16-byte alignment (a Metal buffer bound at offset 4 is
  // 4 bytes past an aligned base, so a vector read through it is misaligned there too); setBytes data is aligned.
  auto misalignment = [](const Pending& p) { return p.is_bytes ? size_t(0) : size_t((uintptr_t)p.src % 16); };
  for (const Pending& p : pending) arena_size += round_up(p.len + 16, 4096) + kGuard;
  char* arena = (char*)map(arena_size);
  if (!arena) return error("cannot map the buffer arena");
  size_t at = kGuard;
  std::vector<Snapshot> snapshots;  // what each buffer held before the dispatch
  for (const Pending& p : pending) {
    // The copy ends exactly where its guard gap starts (less than 16 bytes before it, for alignment), so an
    // overrun by even one element leaves the slot.
    const size_t mis = misalignment(p), slot = round_up(p.len + 16, 4096);
    const size_t start = at + slot - round_up(p.len + mis, 16) + mis;
    snapshots.push_back(copy_in(arena + start, (const char*)p.src, p.len));
    slots.push_back({(uintptr_t)(arena + start), (uintptr_t)(arena + start + p.len), p.index, p.is_bytes, p.host});
    at += slot + kGuard;
  }

  // Threads, stacks, threadgroup memory.
  const size_t stacks_needed = threads * kStackSize;
  if (g.stacks_size < stacks_needed) {
    if (g.stacks) munmap(g.stacks, g.stacks_size);
    g.stacks = (char*)map(stacks_needed);
    g.stacks_size = stacks_needed;
  }
  g.stack_lo = (uintptr_t)g.stacks;
  g.stack_hi = (uintptr_t)g.stacks + g.stacks_size;
  if (!g.tg_mem) g.tg_mem = (char*)map(kThreadgroupMemoryLimit + kGuard);

  g.lib = lib;
  g.kernel = kernel;
  g.slots = slots;
  g.num_threads = (uint32_t)threads;
  g.fibers.assign(threads, Fiber());
  g.failed = false;
  g.error.clear();
  g.stats = mcpu_dispatch_stats{};
  snprintf(g.stats.kernel, sizeof g.stats.kernel, "%s", d->kernel);
  g.stats.threadgroups = num_tg;
  g.stats.threads = num_tg * threads;
  g.simd_epoch.assign((threads + kSimdWidth - 1) / kSimdWidth, 0);
  g.shadow.assign(kThreadgroupMemoryLimit, Shadow{});

  std::mt19937_64 rng(g.options.seed);
  std::vector<uint64_t> tg_order(num_tg);
  for (uint64_t i = 0; i < num_tg; ++i) tg_order[i] = i;
  if (g.options.schedule == MCPU_REVERSE) std::reverse(tg_order.begin(), tg_order.end());
  if (g.options.schedule == MCPU_RANDOM) std::shuffle(tg_order.begin(), tg_order.end(), rng);

  void* buffer_ptrs[31] = {nullptr};
  for (const Slot& s : g.slots) buffer_ptrs[s.index] = (void*)s.lo;
  const uint32_t gx = d->threadgroups[0], gy = d->threadgroups[1];
  size_t dirty = kThreadgroupMemoryLimit;  // threadgroup-memory bytes to reset before the next threadgroup
  for (uint64_t tgi : tg_order) {
    const uint32_t bx = (uint32_t)(tgi % gx), by = (uint32_t)(tgi / gx % gy), bz = (uint32_t)(tgi / gx / gy);
    g.threadgroup_id[0] = bx, g.threadgroup_id[1] = by, g.threadgroup_id[2] = bz;
    // Fresh threadgroup memory: poisoned (NaN for float/half), nothing initialised, nothing allocated. Only the
    // bytes the previous threadgroup used need resetting.
    memset(g.tg_mem, 0xff, dirty);
    for (size_t i = 0; i < dirty; ++i) g.shadow[i].init = 0;
    g.tg_used = tg_args_total;
    g.tg_decls.clear();
    g.epoch += 2;
    std::fill(g.simd_epoch.begin(), g.simd_epoch.end(), 0);
    for (uint32_t t = 0; t < threads; ++t) {
      mcpu_thread_args& a = g.fibers[t].args;
      memset(&a, 0, sizeof a);
      memcpy(a.buffers, buffer_ptrs, sizeof buffer_ptrs);
      for (uint32_t i = 0; i < MCPU_MAX_THREADGROUP_ARGS; ++i) a.threadgroup_args[i] = g.tg_mem + tg_arg_offset[i];
      const uint32_t lx = t % tx, ly = t / tx % ty, lz = t / tx / ty;
      const uint32_t local[3] = {lx, ly, lz}, group[3] = {bx, by, bz};
      for (int k = 0; k < 3; ++k) {
        a.thread_position_in_threadgroup[k] = local[k];
        a.threadgroup_position_in_grid[k] = group[k];
        a.threadgroups_per_grid[k] = d->threadgroups[k];
        a.threads_per_threadgroup[k] = d->threads_per_threadgroup[k];
        a.threads_per_grid[k] = d->threadgroups[k] * d->threads_per_threadgroup[k];
        a.thread_position_in_grid[k] = group[k] * d->threads_per_threadgroup[k] + local[k];
      }
      a.thread_index_in_threadgroup = t;
      a.simdgroup_index_in_threadgroup = t / kSimdWidth;
      a.thread_index_in_simdgroup = t % kSimdWidth;
      a.simdgroups_per_threadgroup = (uint32_t)((threads + kSimdWidth - 1) / kSimdWidth);
    }
    run_threadgroup(rng);
    dirty = g.tg_used;
    if (g.failed) break;
  }
  g.current = nullptr;

  int rc = 0;
  if (g.failed) {
    rc = error(format("%s (kernel %s, %s): %s", lib->info->source_path, d->kernel,
                      g.options.schedule == MCPU_FORWARD ? "forward schedule"
                      : g.options.schedule == MCPU_REVERSE
                          ? "reverse schedule"
                          : format("random schedule, seed %llu", (unsigned long long)g.options.seed).c_str(),
                      g.error.c_str()));
  } else {
    for (size_t i = 0; i < g.slots.size(); ++i) {
      const Slot& s = g.slots[i];
      if (!s.is_bytes) copy_back((char*)s.host, (const char*)s.lo, s.hi - s.lo, snapshots[i]);
    }
    g.log[g.log_count % MCPU_STATS_LOG] = g.stats;
    ++g.log_count;
  }
  munmap(arena, arena_size);
  g.slots.clear();
  g.lib = nullptr;
  return rc;
}

// ---------------------------------------------------------------------------------------------------------------
// Services for the libraries (mcpu_runtime_api).
void service_access(void* addr, uint32_t size, int is_store, void* pc) { on_access(addr, size, is_store != 0, pc); }

void* service_threadgroup_alloc(uint32_t size, uint32_t align, uint32_t decl_id, void* pc) {
  for (auto& d : g.tg_decls)
    if (d.first == decl_id) return g.tg_mem + d.second;
  uint32_t offset = (uint32_t)round_up(g.tg_used, std::max<uint32_t>(align, 16));
  if (offset + size > kThreadgroupMemoryLimit)
    fail_on_fiber(format("threadgroup memory: %u bytes requested, %u already used, limit 32 KB, at %s", size, offset,
                         locate(pc).c_str()));
  g.tg_used = offset + size;
  g.tg_decls.push_back({decl_id, offset});
  return g.tg_mem + offset;
}

void service_threadgroup_barrier(uint32_t mem_flags, const char* file, uint32_t line, uint32_t column) {
  g.current->flags = mem_flags;
  block(State::kBarrier, Site{file, line, column});
}

uint32_t service_simd_exchange(const void* value, uint32_t size, void* all, const char* file, uint32_t line,
                               uint32_t column) {
  Fiber* f = g.current;
  f->value = value;
  f->value_size = size;
  f->all = all;
  f->flags = 0;
  block(State::kSimd, Site{file, line, column});
  return f->result_mask;
}

void service_simdgroup_barrier(uint32_t mem_flags, const char* file, uint32_t line, uint32_t column) {
  Fiber* f = g.current;
  uint32_t dummy = 0, all[kSimdWidth];
  f->value = &dummy;
  f->value_size = 4;
  f->all = all;
  f->flags = mem_flags | kSimdgroupBarrier;
  block(State::kSimd, Site{file, line, column});
}

uint32_t service_lane_id() { return g.current->args.thread_index_in_simdgroup; }

void service_atomic_access(void* addr, uint32_t size, int is_store, void* pc) {
  uintptr_t a = (uintptr_t)addr;
  if (++g.current->accesses > kSpinLimit)
    fail_on_fiber(
        format("deadlock: %s made %llu memory accesses without reaching a barrier or simd collective "
               "(spinning on an atomic no other thread can change?), at %s",
               thread_name(g.current).c_str(), (unsigned long long)kSpinLimit, locate(pc).c_str()));
  if (a - (uintptr_t)g.tg_mem < kThreadgroupMemoryLimit + kGuard) {
    uintptr_t off = a - (uintptr_t)g.tg_mem;
    if (off + size > g.tg_used)
      fail_on_fiber(format("threadgroup memory overrun by an atomic at offset %lu, by %s, at %s", (unsigned long)off,
                           thread_name(g.current).c_str(), locate(pc).c_str()));
    for (uint32_t i = 0; i < size; ++i) g.shadow[off + i].init = 1;
    return;
  }
  check_device_access(a, size, is_store != 0, pc);
}

void service_fatal(const char* message, void* pc) {
  fail_on_fiber(format("%s, by %s, at %s", message, thread_name(g.current).c_str(), locate(pc).c_str()));
}

void service_thread_info(uint32_t* simdgroup, uint32_t* simdgroups, uint64_t* layout_seed) {
  *simdgroup = g.current->args.simdgroup_index_in_threadgroup;
  *simdgroups = g.current->args.simdgroups_per_threadgroup;
  *layout_seed = g.options.seed;
}

const mcpu_runtime_api kRuntimeApi = {
    service_access,        service_threadgroup_alloc, service_threadgroup_barrier, service_simdgroup_barrier,
    service_simd_exchange, service_lane_id,           service_atomic_access,       service_fatal,
    service_thread_info};

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Public API.
struct mcpu_library : Library {};

extern "C" mcpu_library* mcpu_open(const char* path, char* err, size_t err_len) {
  void* h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    snprintf(err, err_len, "cannot load %s: %s", path, dlerror());
    return nullptr;
  }
  auto* info = (const mcpu_library_info*)dlsym(h, "mcpu_library");
  if (!info || info->abi_version != MCPU_ABI_VERSION) {
    snprintf(err, err_len, "%s is not a metal_cpu kernel library of ABI version %d", path, MCPU_ABI_VERSION);
    dlclose(h);
    return nullptr;
  }
  info->bind_runtime(&kRuntimeApi);
  auto* lib = new mcpu_library();
  lib->handle = h;
  lib->info = info;
  lib->path = path;
  Dl_info where;
  dladdr((const void*)info, &where);
  struct Ctx {
    const void* base;
    std::vector<Range>* out;
  } ctx{where.dli_fbase, &lib->image};
  dl_iterate_phdr(
      [](dl_phdr_info* i, size_t, void* p) {
        auto* c = (Ctx*)p;
        for (int k = 0; k < i->dlpi_phnum; ++k) {
          const ElfW(Phdr)& ph = i->dlpi_phdr[k];
          if (ph.p_type != PT_LOAD) continue;
          uintptr_t lo = i->dlpi_addr + ph.p_vaddr;
          if ((void*)(i->dlpi_addr) != c->base) break;
          c->out->push_back({lo, lo + ph.p_memsz});
        }
        return 0;
      },
      &ctx);
  return lib;
}

extern "C" int mcpu_dispatch(mcpu_library* lib, const mcpu_dispatch_desc* desc, char* err, size_t err_len) {
  std::lock_guard<std::mutex> guard(g.lock);
  load_default_options();
  lib->info->bind_runtime(&kRuntimeApi);  // a library opened by two runtimes calls the one dispatching it
  return dispatch_locked(lib, desc, err, err_len);
}

extern "C" int mcpu_find_kernel(mcpu_library* const* libs, int num_libs, const char* kernel) {
  for (int l = 0; l < num_libs; ++l)
    for (uint32_t i = 0; i < libs[l]->info->num_kernels; ++i)
      if (!strcmp(libs[l]->info->kernels[i].name, kernel)) return l;
  return -1;
}

extern "C" void mcpu_set_options(const mcpu_options* options) {
  std::lock_guard<std::mutex> guard(g.lock);
  g.options_loaded = true;
  g.options = *options;
}

extern "C" void mcpu_get_options(mcpu_options* options) {
  std::lock_guard<std::mutex> guard(g.lock);
  load_default_options();
  *options = g.options;
}

extern "C" void mcpu_stats_reset(void) {
  std::lock_guard<std::mutex> guard(g.lock);
  g.log_count = 0;
}

extern "C" uint64_t mcpu_stats_count(void) { return g.log_count; }

extern "C" int mcpu_stats_get(uint64_t i, mcpu_dispatch_stats* out) {
  std::lock_guard<std::mutex> guard(g.lock);
  if (i >= g.log_count || g.log_count - i > MCPU_STATS_LOG) return -1;
  *out = g.log[i % MCPU_STATS_LOG];
  return 0;
}
