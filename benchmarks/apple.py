"""What a benchmark needs to know about the machine it runs on, and how it times a call.

Chip and GPU facts come from macOS tools (`sysctl`, `system_profiler`, `ioreg`); elsewhere every function answers
with what it can find and never raises. Timers take a zero-argument callable and return the median microseconds per
call after a warm-up of at least `warmup_s` seconds: Apple GPUs ramp their clocks slowly, and a cold GPU reads up to
4x slow.
"""

import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

# Memory bandwidth by chip name (GB/s). M3 Max: 300 with the 30-core GPU, 400 with the 40-core one.
BANDWIDTH = {"M1 Max": 400, "M2 Max": 400, "M3 Max": 400, "M4 Max": 546, "M1 Ultra": 800, "M2 Ultra": 800,
             "M3 Ultra": 819, "M1 Pro": 200, "M2 Pro": 200, "M3 Pro": 150, "M4 Pro": 273, "M5 Pro": 307,
             "M5 Max": 614, "M1": 68, "M2": 100, "M3": 100, "M4": 120, "M5": 153}


def _run(cmd: List[str], timeout: float = 20) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def chip_name() -> str:
    """`Apple M3 Max` on a Mac (sysctl machdep.cpu.brand_string); elsewhere the CPU's model name."""
    name = _run(["sysctl", "-n", "machdep.cpu.brand_string"], timeout=5).strip()
    if name:
        return name
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def parse_gpu_cores(system_profiler: str = "", ioreg: str = "") -> int:
    """The GPU core count from `system_profiler SPDisplaysDataType` ("Total Number of Cores: 40") or from
    `ioreg -l` ("gpu-core-count" = 40); 0 when neither says."""
    m = re.search(r"Total Number of Cores:\s*(\d+)", system_profiler)
    if m:
        return int(m.group(1))
    m = re.search(r'"gpu-core-count"\s*=\s*(\d+)', ioreg)
    return int(m.group(1)) if m else 0


def gpu_cores() -> int:
    if sys.platform != "darwin":
        return 0
    cores = parse_gpu_cores(system_profiler=_run(["system_profiler", "SPDisplaysDataType"]))
    return cores or parse_gpu_cores(ioreg=_run(["ioreg", "-l"]))


def macos_version() -> str:
    release = platform.mac_ver()[0]
    if release:
        return f"macOS {release} ({platform.machine()})"
    return f"not macOS: {platform.system()} {platform.release()} ({platform.machine()})"


def detect_bandwidth(name: str, cores: Optional[int] = None) -> Optional[float]:
    """GB/s of the chip named `name` (None if unknown). `cores`: the GPU core count when known (M3 Max 30c: 300)."""
    for chip in sorted(BANDWIDTH, key=len, reverse=True):  # "M3 Max" before "M3"
        if re.search(re.escape(chip) + r"\b", name):
            if chip == "M3 Max" and (gpu_cores() if cores is None else cores) == 30:
                return 300.0
            return float(BANDWIDTH[chip])
    return None


class Timer:
    """Median microseconds per call of fn: warm up for at least warmup_s (and at least one call), then `runs`
    batches of `calls` calls each. With budget_s, runs and calls are upper bounds, lowered so that one measurement
    takes about budget_s after the warm-up (a batch lasts at least ~2 ms where calls allow; at least min_runs
    batches). Subclasses say how to wait for the device and how to time one batch."""

    clock = "wall clock"

    def __init__(self, warmup_s: float = 1.0, runs: int = 50, calls: int = 10, budget_s: Optional[float] = None,
                 min_runs: int = 5):
        self.warmup_s, self.runs, self.calls, self.budget_s, self.min_runs = warmup_s, runs, calls, budget_s, min_runs

    def sync(self) -> None:
        pass

    def once(self, fn) -> None:
        """One call, finished on the device (the warm-up's step)."""
        fn()
        self.sync()

    def batch_us(self, fn: Callable[[], object], calls: int) -> float:
        self.sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        self.sync()
        return (time.perf_counter() - start) * 1e6

    def plan(self, per_call_s: float):
        """(runs, calls) for a call that took per_call_s during the warm-up."""
        if self.budget_s is None:
            return self.runs, self.calls
        calls = max(1, min(self.calls, int(2e-3 / max(per_call_s, 1e-9))))
        runs = int(self.budget_s / max(per_call_s * calls, 1e-9))
        return max(min(self.min_runs, self.runs), min(self.runs, runs)), calls

    def __call__(self, fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        deadline, n = start + self.warmup_s, 0
        while n == 0 or time.perf_counter() < deadline:
            self.once(fn)
            n += 1
        runs, calls = self.plan((time.perf_counter() - start) / n)
        return statistics.median(self.batch_us(fn, calls) / calls for _ in range(runs))

    def describe(self) -> str:
        bounds = f"up to {self.runs} batches of up to {self.calls} calls (about {self.budget_s:g} s per measurement)" \
            if self.budget_s is not None else f"{self.runs} batches of {self.calls} calls"
        warm = f"warm-up >= {self.warmup_s:g} s per measurement" if self.warmup_s > 0 else "no warm-up (one call)"
        return f"{warm}, then the median of {bounds}, timed by {self.clock}"


class MpsTimer(Timer):
    """torch.mps events around each batch (public API: torch.mps.synchronize, torch.mps.event.Event)."""

    clock = "torch.mps events"

    def sync(self) -> None:
        import torch

        torch.mps.synchronize()

    def batch_us(self, fn, calls: int) -> float:
        import torch

        start = torch.mps.event.Event(enable_timing=True)
        end = torch.mps.event.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3  # ms -> us


class MlxTimer(Timer):
    """MLX is lazy: fn returns the arrays it built, evaluated (mx.eval) at the end of each batch."""

    clock = "wall clock around mx.eval"

    def batch_us(self, fn, calls: int) -> float:
        import mlx.core as mx

        start = time.perf_counter()
        mx.eval([fn() for _ in range(calls)])
        return (time.perf_counter() - start) * 1e6

    def once(self, fn) -> None:
        import mlx.core as mx

        mx.eval(fn())
