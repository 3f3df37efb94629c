"""Why is the paged decode where it is on the proxy? Times the planner's decode (and a few forced splits) at the
benchmark's shapes with PTX built from copies of the kernel with one source edit each (SOURCE_VARIANTS: keys in
flight per step, chunk width) or other compiler settings, and one launch under Nsight Compute.

    python3 -m tests.metal_cuda.decode_variants build [NAME ...]   # here (clang-19): PTX variants (all, or those
                                                                    # whose name holds a NAME) into .cache/metal_cuda
    python3 -m tests.metal_cuda.decode_variants time       # on the GPU machine (time-short: B=1 S<=1000 shapes)
    python3 -m tests.metal_cuda.decode_variants once       # one planner decode (for ncu)
"""

import json
import sys
from pathlib import Path

from msl.cuda import compiler

from . import targets

KERNELS = ["paged_decode_float16_d128_r1", "paged_decode_float16_d128_r2", "paged_decode_float16_d128_r4",
           "paged_decode_float16_d128_r8", "paged_decode_float16_d128_r16", "paged_decode_matrix_float16_d128_r8",
           "paged_decode_matrix_float16_d128_r16", "paged_decode_combine_float16"]
# name -> dict(edits=[(file, old, new)], threads=decode threads per threadgroup, min_blocks=per-instance launch
# bounds). Experiments on a copy (flash_sdpa/ untouched). Earlier ones, with their figures: RESULTS.md.
_INFLIGHT = ("paged_params.h", "  const fsdpa_i32 in_flight = 32 / (chunks_per_lane * chunk);")
_CHUNK = ("paged_params.h", "constexpr fsdpa_i32 decode_chunk_bytes(fsdpa_i32 rows) { return rows <= 4 ? 16 : 8; }")
_NSG = ("paged_params.h", "  kDecodeSimdgroups = 8,")
_CHUNKS = ("paged_params.h", "  const fsdpa_i32 per_lane = rows <= 2 ? 2 : 1;")
_THREADS = ("paged_params.h", "#define FLASH_SDPA_PAGED_DECODE_THREADS 256")
_ROUNDS = ("paged_decode_attention.h", "  for (int round = 0; round < NSG / MS; ++round) {")
_KEY_LOOP = ("paged_decode_attention.h",
             "  for (int t0 = first; t0 < hi; t0 += stride) {  // the planner keeps key counts below 2^31 - 2^20: no "
             "overflow")
_SCATTER = ("paged_decode_attention.h", "  static constexpr int kScatterMinRows = 2;")
_MATRIX_LOOP = ("paged_decode_attention.h", "    for (int t0 = first; t0 - lead < hi; t0 += stride) {")
_GROUP_MERGE = ("paged_decode_attention.h", "    if (G > 1 && r < nrows) {")
_SCORES = ("paged_params.h", "  const fsdpa_i32 max_scores = rows >= 8 ? 16 : 32;  // R x U partial scores per lane")
THREADS = 256  # as built


def _one_edit(edit, new):
    """A variant that replaces one line (edit: (file, old)), threads and launch bounds as built."""
    return dict(edits=[(*edit, new)], threads=THREADS, min_blocks=targets.decode_min_blocks)


def _simdgroups(n):
    """n simdgroups per decode threadgroup; launch bounds keep the threads per SM of the default build."""
    return dict(edits=[(*_NSG, f"  kDecodeSimdgroups = {n},"),
                       (*_THREADS, f"#define FLASH_SDPA_PAGED_DECODE_THREADS {32 * n}")],
                threads=32 * n, min_blocks=lambda host: max(1, targets.decode_min_blocks(host) * 8 // n))


VARIANTS = {
    "as built": dict(edits=[], threads=THREADS, min_blocks=targets.decode_min_blocks),
    "4 simdgroups": _simdgroups(4),
    "16 simdgroups": _simdgroups(16),
    "all-reduced scores at every R (the previous layout)":
        _one_edit(_SCATTER, "  static constexpr int kScatterMinRows = 64;"),
    "32 partial scores per lane at R >= 8 (R = 8: 4 keys per step)":
        _one_edit(_SCORES, "  const fsdpa_i32 max_scores = 32;"),
    # Diagnostics of a short decode's fixed cost (timing only: the output is wrong).
    "no merge slots (timing only, output wrong)": _one_edit(_ROUNDS, "  for (int round = 0; round < 0; ++round) {"),
    "no key loop (timing only, output wrong)":
        _one_edit(_KEY_LOOP, "  for (int t0 = first; t0 < first; t0 += stride) {"),
    "no key loop on either path (timing only, output wrong)":
        dict(edits=[(*_KEY_LOOP, "  for (int t0 = first; t0 < first; t0 += stride) {"),
                    (*_MATRIX_LOOP, "    for (int t0 = first; t0 < first; t0 += stride) {")],
             threads=THREADS, min_blocks=targets.decode_min_blocks),
    "no key-group merge (timing only, output wrong)": _one_edit(_GROUP_MERGE, "    if (false) {"),
}
INDEX = compiler.cache_dir() / "variants.json"


def _patched_copy(name, edits) -> Path:
    import hashlib
    import shutil

    dst = compiler.cache_dir() / ("src_" + hashlib.sha1(name.encode()).hexdigest()[:8])
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in targets.FLASH_SDPA.glob("*"):
        if f.suffix in (".h", ".metal"):
            shutil.copy(f, dst / f.name)
    for file, old, new in edits:
        text = (dst / file).read_text()
        assert old in text, f"{name}: {file} changed, update the experiment"
        (dst / file).write_text(text.replace(old, new))
    return dst


def build_decode(src: Path, min_blocks=targets.decode_min_blocks) -> Path:
    """The PTX of KERNELS from a folder of flash_sdpa headers (a patched copy, or a git revision's: decode_latency)."""
    return compiler.build(src / "paged_decode_attention.metal", [str(src)], kernels=KERNELS,
                          extra_flags=targets.DECODE_UNROLL, min_blocks=min_blocks)


def build(selected):
    index = {}
    for name, v in VARIANTS.items():
        if selected and not any(s in name for s in selected):
            continue
        path = build_decode(_patched_copy(name, v["edits"]), v["min_blocks"])
        index[name] = dict(folder=path.name, threads=v["threads"])
        print(name, "->", path.name)
    INDEX.write_text(json.dumps(index, indent=1))


# (B, H, Hkv, S) and the forced split counts timed beside the planner's (0).
SHAPES = {(4, 16, 16, 50): (0,), (1, 32, 8, 16384): (0,), (8, 32, 8, 4096): (0,), (1, 32, 32, 8192): (0,),
          (4, 64, 8, 8192): (0, 16), (1, 28, 4, 32768): (0,),
          # short single-sequence contexts: the split count against fixed costs
          (1, 32, 8, 256): (0, 1, 2, 8, 16), (1, 64, 8, 256): (0, 1, 2, 8, 16), (1, 32, 8, 1000): (0, 4, 8, 32),
          (1, 64, 8, 1000): (0, 4, 8, 32), (8, 28, 4, 256): (0, 1, 2)}


SHORT = [(1, 32, 8, 256), (1, 64, 8, 256), (1, 32, 8, 1000), (1, 64, 8, 1000), (4, 16, 16, 50)]


def time_variants(short=False):
    import torch

    from msl.cuda import launch

    from . import bench
    from . import gpu_common as gc

    index = json.loads(INDEX.read_text())
    base = gc.libraries()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print("| variant | shape | splits | regs | local B | us/call | GB/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    cases = {sh: gc.make_paged_case(sh[0], sh[3], sh[1], sh[2], 128, torch.float16, 16, sk_new=0, full_length=True,
                                    padded_rows=False, seed=1) for sh in SHAPES if not short or sh in SHORT}
    for name, v in index.items():
        gc._LIBS = dict(base, paged_decode_attention=launch.Library(compiler.cache_dir() / v["folder"]))
        for (B, H, Hkv, S), case in cases.items():
            ref = gc.reference_attention(case, case.k_cache, case.v_cache, scale=0.1, window=(-1, 0))[0]
            for splits in SHAPES[(B, H, Hkv, S)]:
                out = torch.empty_like(case.q)
                plan = gc.plan_paged(case, out, None, scale=0.1, window=(-1, 0), num_splits=splits, with_new=False,
                                     gpu_cores=sms)
                for d in plan:
                    if "combine" not in d["kernel"] and d["kernel"].startswith("paged_decode_"):
                        d["threads_per_threadgroup"] = (v["threads"], 1, 1)
                prepared = launch.prepare_plan(gc.libraries(), plan)

                def fn():
                    for p in prepared:
                        p.launch()
                fn()
                torch.cuda.synchronize()
                err = (out.float() - ref.float()).abs().max().item()
                attn = next(p for p in prepared if "combine" not in p.pipeline.kernel)
                us = bench.time_us(fn)
                gbs = 2 * B * S * Hkv * 128 * 2 / us / 1e3
                print(f"| {name} | B={B} H={H}/{Hkv} S={S} | {attn.grid[0]} | {attn.pipeline.num_regs} | "
                      f"{attn.pipeline.local_bytes} | {us:.1f} | {gbs:.0f} | err {err:.2e}", flush=True)
    gc._LIBS = base


def once():
    import torch

    from msl.cuda import launch

    from . import bench
    from . import gpu_common as gc

    if len(sys.argv) > 2:
        folder = json.loads(INDEX.read_text())[sys.argv[2]]["folder"]
        gc._LIBS = dict(gc.libraries(), paged_decode_attention=launch.Library(compiler.cache_dir() / folder))

    case = gc.make_paged_case(1, 16384, 32, 8, 128, torch.float16, 16, sk_new=0, full_length=True,
                              padded_rows=False, seed=1)
    fn, _ = bench.paged_callable(case, torch.empty_like(case.q))
    fn()
    torch.cuda.synchronize()


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(sys.argv[2:])
    else:
        {"time": time_variants, "time-short": lambda: time_variants(short=True), "once": once}[sys.argv[1]]()
