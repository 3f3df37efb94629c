"""The Mac glue's pipeline cache (flash_sdpa/keyed_cache.h, what metal_launch.mm keeps its pipelines in) from many
threads at once, compiled with ThreadSanitizer and run: each key is built exactly once, every thread gets the value
built for its key, and TSan sees no race. The Objective-C around it cannot run here (no Objective-C runtime or Metal
on Linux; tests/objc_check/check.py compiles it), and its other shared state is a std::call_once and PyTorch's
stream queue, so the cache is the part of the glue that threads share.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.kernels_ci,
    pytest.mark.skipif(sys.platform == "darwin", reason="Linux toolchain test (clang-19 with ThreadSanitizer)"),
]

PROGRAM = r"""
#include "keyed_cache.h"

#include <atomic>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

struct Pipeline { int key; };  // stands in for id<MTLComputePipelineState>: a pointer the cache owns

int main() {
  constexpr int kThreads = 16, kKeys = 24, kRounds = 200;
  flash_sdpa::KeyedCache<Pipeline*> cache;
  std::atomic<int> builds[kKeys] = {};
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int r = 0; r < kRounds; ++r) {
        const int key = (t * 7 + r) % kKeys;
        Pipeline* p = cache.get("kernel_" + std::to_string(key) + "|0:0:1", [&] {
          builds[key]++;
          return key == 5 && builds[key] == 1 ? nullptr : new Pipeline{key};  // key 5: the first build fails
        });
        if (p != nullptr && p->key != key) {
          wrong++;
        }
      }
    });
  }
  for (std::thread& th : threads) th.join();
  int status = wrong.load() != 0;
  for (int k = 0; k < kKeys; ++k) {
    if (builds[k].load() != (k == 5 ? 2 : 1)) {
      std::printf("key %d built %d times\n", k, builds[k].load());
      status = 1;
    }
  }
  std::printf("wrong values: %d\n", wrong.load());
  return status;
}
"""


def _clang():
    for c in ("clang++-19", "clang-19"):
        if shutil.which(c):
            return c
    pytest.skip("needs clang-19 (bash scripts/setup.sh)")


def _run(tmp_path, header_dir):
    src = tmp_path / "threads.cpp"
    src.write_text(PROGRAM)
    exe = tmp_path / "threads"
    build = subprocess.run([_clang(), "-std=c++20", "-O1", "-g", "-fsanitize=thread", "-I", str(header_dir),
                            str(src), "-o", str(exe), "-lstdc++", "-lpthread"], capture_output=True, text=True)
    if build.returncode != 0 and "tsan" in build.stderr.lower():
        pytest.skip("clang-19 has no ThreadSanitizer runtime here (libclang-rt-19-dev)")
    assert build.returncode == 0, build.stderr[-3000:]
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=120,
                          env={"TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})


def test_pipeline_cache_from_many_threads(tmp_path):
    run = _run(tmp_path, ROOT / "flash_sdpa")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]


def test_the_check_sees_a_cache_without_its_lock(tmp_path):
    """The same program against a copy of the cache whose lock is gone: TSan reports the race (or a key is built
    twice), so the test above can fail."""
    header = (ROOT / "flash_sdpa" / "keyed_cache.h").read_text()
    unlocked = header.replace("std::lock_guard<std::mutex> lock(mutex_);", "")
    assert unlocked != header
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / "keyed_cache.h").write_text(unlocked)
    run = _run(tmp_path, tmp_path / "inc")
    assert run.returncode != 0
    assert "ThreadSanitizer: data race" in run.stderr or "built" in run.stdout


def test_glue_keeps_its_pipelines_in_the_cache():
    glue = (ROOT / "flash_sdpa" / "metal_launch.mm").read_text()
    assert "static KeyedCache<id<MTLComputePipelineState>> cache;" in glue
    assert "unordered_map" not in glue  # no second, unlocked map
