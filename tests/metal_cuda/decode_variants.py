"""Why is the paged decode where it is on the proxy? Times the planner's decode (and a few forced splits) at the
benchmark's shapes with PTX built from copies of the kernel with one source edit each (SOURCE_VARIANTS: keys in
flight per step, chunk width) or other compiler settings, and one launch under Nsight Compute.

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

KERNELS = ["paged_decode_float16_d128_r1", "paged_decode_float16_d128_r4", "paged_decode_combine_float16"]
VARIANTS = {
    "proxy default (threshold 5000, no run-time unroll)": dict(extra_flags=compiler.DECODE_UNROLL),
}
INDEX = compiler.cache_dir() / "variants.json"
# Experiments on a copy (flash_sdpa/ untouched): the kernel source with one text edit each.
_INFLIGHT = "  static constexpr int U0 = 32 / (CPL * kChunkBytes);"
_CHUNK = "  static constexpr int kChunkBytes = R <= 4 ? 16 : 8;"
SOURCE_VARIANTS = {
    "16 B of K in flight per lane (U = 1 at 16-byte chunks)":
        [(_INFLIGHT, "  static constexpr int U0 = 16 / (CPL * kChunkBytes);")],
    "8-byte chunks from R = 4 (L = 32 at fp16 D = 128: half the accumulators)":
        [(_CHUNK, "  static constexpr int kChunkBytes = R <= 2 ? 16 : 8;")],
    "8-byte chunks from R = 4, 16 B in flight":
        [(_CHUNK, "  static constexpr int kChunkBytes = R <= 2 ? 16 : 8;"),
         (_INFLIGHT, "  static constexpr int U0 = 16 / (CPL * kChunkBytes);")],
}


def _patched_copy(name, edits) -> Path:
    import hashlib
    import shutil

    src_dir = compiler.FLASH_SDPA
    dst = compiler.cache_dir() / ("src_" + hashlib.sha1(name.encode()).hexdigest()[:8])
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("paged_decode_attention.metal", "paged_params.h"):
        shutil.copy(src_dir / f, dst / f)
    text = (src_dir / "paged_decode_attention.h").read_text()
    for old, new in edits:
        assert old in text, f"{name}: the kernel changed, update the experiment"
        text = text.replace(old, new)
    (dst / "paged_decode_attention.h").write_text(text)
    return dst


def shutil_copy_device_headers(dst: Path) -> None:
    import shutil

    shutil.copy(compiler.FLASH_SDPA / "attention_device.h", dst / "attention_device.h")


def build():
    src, inc = compiler.TARGETS["paged_decode_attention"]
    index = {}
    for name, kw in VARIANTS.items():
        kw = dict(kw)
        path = compiler.build(src, [str(d) for d in inc], kernels=KERNELS, **kw)
        index[name] = path.name
        print(name, "->", path.name)
    for name, edits in SOURCE_VARIANTS.items():
        copy = _patched_copy(name, edits)
        shutil_copy_device_headers(copy)
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
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print("| variant | shape | splits | regs | local B | us/call | GB/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    shapes = ((4, 16, 16, 50), (1, 32, 8, 16384), (32, 32, 8, 2048), (8, 32, 8, 4096), (1, 32, 32, 8192))
    cases = {sh: gc.make_paged_case(sh[0], sh[3], sh[1], sh[2], 128, torch.float16, 16, sk_new=0, full_length=True,
                                    padded_rows=False, seed=1) for sh in shapes}
    for name, folder in index.items():
        gc._LIBS = dict(base, paged_decode_attention=launch.Library(compiler.cache_dir() / folder))
        for (B, H, Hkv, S), case in cases.items():
            for splits in (0, 16, 40):
                if splits * 16 > S:
                    continue
                out = torch.empty_like(case.q)
                plan = gc.plan_paged(case, out, None, scale=0.1, window=(-1, 0), num_splits=splits, with_new=False,
                                     gpu_cores=sms)
                prepared = launch.prepare_plan(gc.libraries(), plan)

                def fn():
                    for p in prepared:
                        p.launch()
                attn = next(p for p in prepared if "combine" not in p.pipeline.kernel)
                us = bench.time_us(fn)
                gbs = 2 * B * S * Hkv * 128 * 2 / us / 1e3
                print(f"| {name} | B={B} H={H}/{Hkv} S={S} | {attn.grid[0]} | {attn.pipeline.num_regs} | "
                      f"{attn.pipeline.local_bytes} | {us:.1f} | {gbs:.0f} |", flush=True)
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
