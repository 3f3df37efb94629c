#!/usr/bin/env python3
"""Decode benchmark of metal-flash-sdpa: flash_attn_with_kvcache (paged) against the alternatives.

    python benchmarks/bench_decode.py [--local [PATH]] [--bandwidth GB/S] [--plot decode.png] [--report]

On a Mac (device mps) it loads version 2 of kernels-community/metal-flash-sdpa from the Hugging Face Hub, or with
--local a kernel-builder build (PATH/build/<variant>/, PATH defaulting to this checkout). It times each decode path
of benchmarks/cases.py (paged kernel; gather + torch SDPA over the same paged cache; the package's varlen kernel;
torch SDPA on a contiguous cache) and the varlen prefill against torch SDPA, after a warm-up of at least one second
(Apple GPUs ramp their clocks slowly), as the median of many runs timed with torch.mps events. Prints us/call, GB/s
of valid K/V read and the fraction of the chip's bandwidth, and saves a plot of time against context length.

On Linux (no MPS), or with --report: the measured traffic report of this checkout's emulated build
(benchmarks/traffic_report.py, `bash scripts/setup.sh` builds it), with a MODELED time per chip.
"""

import argparse
import sys
from pathlib import Path

# Run as a file (python3 benchmarks/bench_decode.py): the repository root on the path, for benchmarks/ and msl.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import apple, cases  # noqa: E402


def time_us(fn, warmup_s: float = 1.0, runs: int = 50, calls_per_run: int = 10) -> float:
    """Median microseconds per call: warm up for warmup_s, then `runs` event-timed batches of calls_per_run."""
    return apple.MpsTimer(warmup_s, runs, calls_per_run)(fn)


def run_mac(args) -> None:
    try:
        kernel = cases.load_kernel(args.local)
    except Exception as e:  # any loading failure gets the same advice
        sys.exit(cases.load_hint(args.local, e))
    name = apple.chip_name()
    bandwidth = args.bandwidth or apple.detect_bandwidth(name)
    source = f"local build {Path(args.local).resolve()}" if args.local else f"{cases.REPO_ID} v{cases.KERNEL_VERSION}"
    print(f"kernel: {source} ({Path(kernel.__file__).parent.name})")
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
    ax.set_title(f"decode B={base.B} H={base.H}/Hkv={base.Hkv} D={base.D} fp16, {apple.chip_name()}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


def run_report(args) -> None:
    from benchmarks import traffic_report

    try:
        cases.load_kernel()
    except Exception as e:  # no emulated build yet: say what to run
        sys.exit(cases.load_hint(cases.ROOT, e))
    print("Metal-on-CPU traffic report (Linux, emulated build): bytes measured per call, times MODELED.\n")
    print(traffic_report.report(args.cases))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local", nargs="?", const=str(cases.ROOT), metavar="PATH",
                        help="on a Mac: a local kernel-builder build, PATH/build/<variant>/ (PATH: this checkout by "
                             "default) instead of the Hub kernel; Linux always runs this checkout's emulated build")
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
