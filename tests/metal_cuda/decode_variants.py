"""Why is the paged decode where it is on the proxy? Times the planner's decode at the benchmark's long shapes with
PTX built under different compiler settings (the kernel source unchanged), and one launch under Nsight Compute.

    python3 tests/metal_cuda/decode_variants.py build      # here (clang-19): PTX variants into .cache/metal_cuda
    python3 tests/metal_cuda/decode_variants.py time       # on the GPU machine
    python3 tests/metal_cuda/decode_variants.py once       # one planner decode (for ncu)
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from metal_cuda import compiler  # noqa: E402

KERNELS = ["paged_decode_float16_d128_r4", "paged_decode_combine_float16"]
_NORUN = ["-mllvm", "-unroll-runtime=false", "-mllvm", "-unroll-allow-partial=false"]
VARIANTS = {
    "proxy default (threshold 2000, no run-time unroll)": dict(extra_flags=compiler.DECODE_UNROLL),
    "threshold 5000 (the earlier default)": dict(extra_flags=["-mllvm", "-unroll-threshold=5000"]),
    "clang default unrolling": dict(extra_flags=["-mllvm", "-unroll-threshold=300"]),
    "threshold 1000, no run-time unroll": dict(extra_flags=["-mllvm", "-unroll-threshold=1000"] + _NORUN),
}
INDEX = compiler.cache_dir() / "variants.json"
# Experiments on a copy (flash_sdpa/ untouched): the kernel source with one text edit each.
SOURCE_VARIANTS = {}


def _patched_copy(name, old, new) -> Path:
    import hashlib
    import shutil

    src_dir = compiler.FLASH_SDPA
    dst = compiler.cache_dir() / ("src_" + hashlib.sha1(name.encode()).hexdigest()[:8])
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("paged_decode_attention.metal", "paged_params.h"):
        shutil.copy(src_dir / f, dst / f)
    text = (src_dir / "paged_decode_attention.h").read_text()
    assert old in text, f"{name}: the kernel changed, update the experiment"
    (dst / "paged_decode_attention.h").write_text(text.replace(old, new))
    return dst


def build():
    src, inc = compiler.TARGETS["paged_decode_attention"]
    index = {}
    for name, kw in VARIANTS.items():
        kw = dict(kw)
        path = compiler.build(src, [str(d) for d in inc], kernels=KERNELS, **kw)
        index[name] = path.name
        print(name, "->", path.name)
    for name, (old, new) in SOURCE_VARIANTS.items():
        copy = _patched_copy(name, old, new)
        path = compiler.build(copy / "paged_decode_attention.metal", [str(copy)], kernels=KERNELS,
                              extra_flags=compiler.DECODE_UNROLL)
        index[name] = path.name
        print(name, "->", path.name)
    INDEX.write_text(json.dumps(index, indent=1))


def time_variants():
    import bench
    import gpu_common as gc
    import torch

    from metal_cuda import launch

    index = json.loads(INDEX.read_text())
    base = gc.libraries()
    print("| variant | shape | splits | regs | local B | us/call | GB/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, folder in index.items():
        gc._LIBS = dict(base, paged_decode_attention=launch.Library(compiler.cache_dir() / folder))
        for B, S in ((1, 16384), (32, 2048)):
            case = gc.make_paged_case(B, S, 32, 8, 128, torch.float16, 16, sk_new=0, full_length=True,
                                      padded_rows=False, seed=1)
            fn, attn = bench.paged_callable(case, torch.empty_like(case.q))
            us = bench.time_us(fn)
            gbs = 2 * B * S * 8 * 128 * 2 / us / 1e3
            print(f"| {name} | B={B} S={S} | {attn.grid[0]} | {attn.pipeline.num_regs} | "
                  f"{attn.pipeline.local_bytes} | {us:.1f} | {gbs:.0f} |")
    gc._LIBS = base


def once():
    import bench
    import gpu_common as gc
    import torch

    from metal_cuda import launch

    if len(sys.argv) > 2:
        folder = json.loads(INDEX.read_text())[sys.argv[2]]
        gc._LIBS = dict(gc.libraries(), paged_decode_attention=launch.Library(compiler.cache_dir() / folder))

    case = gc.make_paged_case(1, 16384, 32, 8, 128, torch.float16, 16, sk_new=0, full_length=True,
                              padded_rows=False, seed=1)
    fn, _ = bench.paged_callable(case, torch.empty_like(case.q))
    fn()
    torch.cuda.synchronize()


if __name__ == "__main__":
    {"build": build, "time": time_variants, "once": once}[sys.argv[1]]()
