#!/usr/bin/env python3
"""Decode benchmark of metal-flash-sdpa: flash_attn_with_kvcache (paged) against the alternatives.

    python benchmarks/bench_decode.py [--bandwidth GB/S] [--plot decode.png] [--report]

On a Mac (device mps): times each decode path of benchmarks/cases.py (paged kernel; gather + torch SDPA over the
same paged cache; the package's varlen kernel; torch SDPA on a contiguous cache) and the varlen prefill against torch
SDPA, after a warm-up of at least one second (Apple GPUs ramp their clocks slowly), as the median of many runs timed
with torch.mps events. Prints us/call, GB/s of valid K/V read and the fraction of the chip's bandwidth, and saves a
plot of time against context length.

On Linux (no MPS), or with --report: the measured traffic report of the emulated build (benchmarks/traffic_report.py),
with a MODELED time per chip.
"""

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Run as a file (python3 benchmarks/bench_decode.py): the repository root on the path, for benchmarks/ and msl.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import cases  # noqa: E402

# Memory bandwidth by chip name (GB/s). M3 Max: 300 with the 30-core GPU, 400 with the 40-core one.
BANDWIDTH = {"M1 Max": 400, "M2 Max": 400, "M3 Max": 400, "M4 Max": 546, "M1 Ultra": 800, "M2 Ultra": 800,
             "M3 Ultra": 819, "M1 Pro": 200, "M2 Pro": 200, "M3 Pro": 150, "M4 Pro": 273, "M1": 68, "M2": 100,
             "M3": 100, "M4": 120}


def chip_name() -> str:
    try:
        return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown"


def gpu_cores() -> int:
    try:
        out = subprocess.run(["system_profiler", "SPDisplaysDataType"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    for line in out.splitlines():
        if "Total Number of Cores" in line:
            return int(line.split(":")[1])
    return 0


def detect_bandwidth(name: str):
    for chip in sorted(BANDWIDTH, key=len, reverse=True):  # "M3 Max" before "M3"
        if chip in name:
            if chip == "M3 Max" and gpu_cores() == 30:
                return 300.0
            return float(BANDWIDTH[chip])
    return None


def time_us(fn, warmup_s: float = 1.0, runs: int = 50, calls_per_run: int = 10) -> float:
    """Median microseconds per call: warm up for warmup_s, then `runs` event-timed batches of calls_per_run."""
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        fn()
        torch.mps.synchronize()
    samples = []
    for _ in range(runs):
        start = torch.mps.event.Event(enable_timing=True)
        end = torch.mps.event.Event(enable_timing=True)
        start.record()
        for _ in range(calls_per_run):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls_per_run)  # ms -> us
    return statistics.median(samples)


def run_mac(args) -> None:
    kernel = cases.load_kernel()
    name = chip_name()
    bandwidth = args.bandwidth or detect_bandwidth(name)
    print(f"chip: {name}; bandwidth: {f'{bandwidth:g} GB/s' if bandwidth else 'unknown (pass --bandwidth)'}")
    dtype = torch.float16
    print(f"{'case':<40} {'path':<32} {'us/call':>9} {'GB/s':>8} {'of peak':>8}")
    for c in cases.DECODE_CASES.values():
        t = cases.make_decode(c, "mps", dtype)
        ref = cases.reference_decode(c, t)
        for path, fn in cases.DECODE_PATHS.items():
            out = fn(kernel, c, t)
            err = (out.float() - ref.float()).abs().max().item()
            us = time_us(lambda: fn(kernel, c, t), args.warmup)
            gbps = cases.kv_bytes(c, dtype) / (us * 1e3)
            frac = f"{gbps / bandwidth:8.0%}" if bandwidth else f"{'-':>8}"
            note = f"  (max err {err:.1e})" if err > 2e-2 else ""
            print(f"{c.label():<40} {path:<32} {us:9.1f} {gbps:8.1f} {frac}" + note)
    for c in cases.PREFILL_CASES.values():
        t = cases.make_prefill(c, "mps", dtype)
        for path, fn in cases.PREFILL_PATHS.items():
            us = time_us(lambda: fn(kernel, c, t), args.warmup, runs=20, calls_per_run=2)
            flops = 4 * c.B * c.H * c.D * c.S * c.S / 2  # causal: half the score matrix
            print(f"{c.label():<40} {path:<32} {us:9.1f}   {flops / (us * 1e6):8.2f} TFLOP/s")
    plot(kernel, args, dtype)


def plot(kernel, args, dtype) -> None:
    base = cases.DECODE_CASES["b1_gqa8_s16k"]
    times = {path: [] for path in cases.DECODE_PATHS}
    for s in cases.PLOT_CONTEXTS:
        c = cases.DecodeCase(f"plot_s{s}", base.B, base.H, base.Hkv, base.D, s)
        t = cases.make_decode(c, "mps", dtype)
        for path, fn in cases.DECODE_PATHS.items():
            times[path].append(time_us(lambda: fn(kernel, c, t), 0.25))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib). Times (us):")
        for path, ts in times.items():
            print(f"  {path}: " + ", ".join(f"S={s}: {x:.1f}" for s, x in zip(cases.PLOT_CONTEXTS, ts)))
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path, ts in times.items():
        ax.plot(cases.PLOT_CONTEXTS, ts, marker="o", label=path)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length S (tokens)")
    ax.set_ylabel("us per decode step (one layer)")
    ax.set_title(f"decode B={base.B} H={base.H}/Hkv={base.Hkv} D={base.D} fp16, {chip_name()}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


def run_report(args) -> None:
    from benchmarks import traffic_report

    print("Metal-on-CPU traffic report (Linux, emulated build): bytes measured per call, times MODELED.\n")
    print(traffic_report.report(args.cases))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandwidth", type=float, help="chip memory bandwidth in GB/s (default: from the chip name)")
    parser.add_argument("--plot", default="decode_vs_context.png", help="PNG of time against context length")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per measurement (>= 1)")
    parser.add_argument("--report", action="store_true", help="the emulator traffic report, even on a Mac")
    parser.add_argument("--cases", nargs="*", help=f"report only these cases ({', '.join(cases.EMULATED)})")
    args = parser.parse_args()
    if args.warmup < 1.0:
        parser.error("--warmup must be at least 1 s: Apple GPUs ramp their clocks slowly")
    if args.report or not torch.backends.mps.is_available():
        run_report(args)
    else:
        run_mac(args)


if __name__ == "__main__":
    main()
