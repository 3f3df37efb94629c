"""The project's kernels as the CUDA proxy builds them: which .metal files (TARGETS), the decode's unroll flags and
launch bounds, and the PTX cache index the GPU machine reads (build_all here, load_all there). The generic MSL-to-PTX
compiler is msl/cuda/compiler.py.

    python3 -m tests.metal_cuda.targets [--jobs N] [--precise] [--mma 0|1|2]   # here: PTX into .cache/metal_cuda
    python3 -m tests.metal_cuda.targets --mma 0 --ptxas                        # + ptxas -v registers / spills
    python3 -m tests.metal_cuda.targets --mma 2 --only simdgroup_mma           # one target (merged into its index)

One index per simdgroup_matrix lowering (compiler.SIMDGROUP_MMA_MODES): index.json for the default tensor-core
lowering (1), index-mma<N>.json for the others; load_all(N) on the GPU machine.
"""

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional

from msl.cuda import compiler

ROOT = Path(__file__).resolve().parents[2]

# Per-target unroll settings (later flags win over CUDA_FLAGS). The paged decode keeps its per-lane arrays (K/V
# chunks, scores, accumulators: constant trip counts, as Apple's compiler unrolls them) in registers only when
# fully unrolled: threshold 5000, with the run-time / partial unrolling of the key loop off (its trip count is a
# run-time value; a partially unrolled copy only adds registers). At 2000 the R = 8 body stays rolled (448 B of
# local arrays); ptxas -v per instance: tests/metal_cuda/RESULTS.md.
DECODE_UNROLL = ["-mllvm", "-unroll-threshold=5000", "-mllvm", "-unroll-runtime=false",
                 "-mllvm", "-unroll-allow-partial=false"]


def decode_kernel_flags(host: str) -> List[str]:
    return DECODE_UNROLL


TARGET_KERNEL_FLAGS = {"paged_decode_attention": decode_kernel_flags}


# Apple GPUs keep occupancy and spill when a kernel needs more registers (DESIGN.md section 6); ptxas instead lowers
# occupancy. The decode's instances with at most 32 accumulators per lane (R x D <= 1024: GQA <= 8 at D = 128) are
# built for 512 threads per SM (256-thread threadgroups: launch_bounds(256, 2), at most 128 registers; R = 1: 768
# threads, at most 85), as an Apple core would keep them resident, and so are the matrix path's own instances
# ("paged_decode_matrix_*": 8 fragments of Q and 8 of O per simdgroup at R = 8 and 16) and the wide path's up to
# R = 8 ("paged_decode_wide_*"); larger ones are left unbounded (one threadgroup per SM). The split planner counts
# the same (decode_threadgroups_per_core).
def decode_min_blocks(host: str) -> int:
    m = re.search(r"_d(\d+)_r(\d+)$", host)
    if not m:
        return 0
    d, r = int(m.group(1)), int(m.group(2))
    if host.startswith("paged_decode_wide_"):
        # D / 32 accumulators per lane and row: two threadgroups per core, but for R = 16 (two rows per simdgroup,
        # whose dot products spilled at D = 64 within 128 registers)
        return 2 if r <= 8 else 0
    matrix = host.startswith("paged_decode_matrix_")
    return 3 if r == 1 else (2 if r * d <= 1024 or matrix else 0)


TARGET_MIN_BLOCKS = {"paged_decode_attention": decode_min_blocks}

# The project's kernels, the emulator's feature kernels and the lowering's check, as the GPU suite and CI build them.
FLASH_SDPA = ROOT / "flash_sdpa"
TARGETS = {
    "kv_paged_write": (FLASH_SDPA / "kv_paged_write.metal", [FLASH_SDPA]),
    "paged_decode_attention": (FLASH_SDPA / "paged_decode_attention.metal", [FLASH_SDPA]),
    "attention_varlen": (FLASH_SDPA / "attention_varlen.metal", [FLASH_SDPA]),
    "attention_backward": (FLASH_SDPA / "attention_backward.metal", [FLASH_SDPA]),
    "features": (ROOT / "tests" / "msl_cpu" / "kernels" / "features.metal", []),
    # the simdgroup_matrix lowering itself (thread_elements(): the proxy only), test_gpu.py
    "simdgroup_mma": (ROOT / "tests" / "metal_cuda" / "kernels" / "simdgroup_mma.metal", []),
    # Metal 4 tensors and matmul2d (the emulator's kernels, unchanged), test_tensor_ops_gpu.py
    "tensor_ops": (ROOT / "tests" / "msl_cpu" / "kernels" / "tensor_ops.metal", []),
    # the forward on tensor ops (flash_sdpa/attention_tensor_ops.h: the 64-row kernel the package routes to where
    # tensor ops are on, and the 32-row one kept to compare), to time beside attention_varlen
    "attention_tensor_ops": (FLASH_SDPA / "tensor_ops_library.h", [FLASH_SDPA]),
}


def _sources_hash(path: Path, include_dirs) -> str:
    """The raw text of a target's .metal file, the headers beside it and the CUDA target itself."""
    h = hashlib.sha256()
    files = [path] + sorted(f for d in [path.parent, *include_dirs] for f in Path(d).glob("*") if f.suffix in
                            (".h", ".metal"))
    for f in files + [*compiler.TOOLCHAIN, Path(__file__)]:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def index_path(simdgroup_mma: int) -> Path:
    return compiler.cache_dir() / ("index.json" if simdgroup_mma == 1 else f"index-mma{simdgroup_mma}.json")


def build_all(jobs: int = 2, fast_math: bool = True, simdgroup_mma: Optional[int] = None,
              names: Optional[List[str]] = None) -> Dict[str, Path]:
    """Builds every target (or those named) and records them in the lowering's index (index_path), so that a machine
    without clang-19 (the GPU machine) can use the PTX built here: load_all() there."""
    mma = compiler.default_simdgroup_mma() if simdgroup_mma is None else simdgroup_mma
    chosen = {name: TARGETS[name] for name in (names or TARGETS)}
    built = {name: compiler.build(path, [str(d) for d in inc], fast_math=fast_math, jobs=jobs,
                         kernel_flags=TARGET_KERNEL_FLAGS.get(name), min_blocks=TARGET_MIN_BLOCKS.get(name),
                         simdgroup_mma=mma)
             for name, (path, inc) in chosen.items()}
    # Merged into the lowering's index: a target built alone (--only) keeps the others' entries, which load_all
    # checks against their sources anyway.
    index = json.loads(index_path(mma).read_text()) if names and index_path(mma).exists() else {}
    index.update({name: {"path": built[name].name, "sources": _sources_hash(path, inc), "fast_math": fast_math,
                         "simdgroup_mma": mma} for name, (path, inc) in chosen.items()})
    index_path(mma).write_text(json.dumps(index, indent=1))
    return built


def load_all(simdgroup_mma: Optional[int] = None, names: Optional[List[str]] = None) -> Dict[str, Path]:
    """The PTX folders of the lowering's index when they match the sources (the GPU machine has no clang-19: carry
    .cache/metal_cuda), else build_all(). names: only these targets (a benchmark that runs one kernel family)."""
    mma = compiler.default_simdgroup_mma() if simdgroup_mma is None else simdgroup_mma
    wanted = list(names) if names else list(TARGETS)
    index_path_ = index_path(mma)
    if index_path_.exists():
        index = json.loads(index_path_.read_text())
        out = {name: compiler.cache_dir() / index[name]["path"] for name in wanted if name in index and
               index[name]["sources"] == _sources_hash(*TARGETS[name]) and
               (compiler.cache_dir() / index[name]["path"] / "manifest.json").exists()}
        if len(out) == len(wanted):
            return out
    try:
        compiler.clang()
    except compiler.MetalCompileError as e:
        if not index_path_.exists():
            raise compiler.MetalCompileError(f"no prebuilt PTX in {index_path_}, and {e}") from None
        # Sources edited after the PTX was built (a shared working tree): run it, but say so loudly.
        index = json.loads(index_path_.read_text())
        missing = [n for n in wanted if n not in index]
        if missing:
            raise compiler.MetalCompileError(f"no prebuilt PTX for {missing} in {index_path_}, and {e}") from None
        print(f"WARNING: metal_cuda: prebuilt PTX is STALE for "
              f"{[n for n in wanted if index[n]['sources'] != _sources_hash(*TARGETS[n])]} (no clang-19 to rebuild)")
        return {name: compiler.cache_dir() / index[name]["path"] for name in wanted}
    return build_all(simdgroup_mma=mma, names=names)


def prune() -> List[str]:
    """Removes the cache folders that no lowering's index names (older builds), so that the cache carried to the GPU
    machine holds only what it loads."""
    keep = {"index.json"} | {index_path(m).name for m in compiler.SIMDGROUP_MMA_MODES}
    for m in compiler.SIMDGROUP_MMA_MODES:
        if index_path(m).exists():
            keep |= {e["path"] for e in json.loads(index_path(m).read_text()).values()}
    removed = []
    for d in compiler.cache_dir().iterdir():
        if d.name not in keep and d.is_dir():  # older builds, and unfinished ones (no manifest)
            shutil.rmtree(d)
            removed.append(d.name)
    return removed


def ptxas_usage(ptx: Path, arch: str = compiler.ARCH) -> Dict[str, int]:
    """ptxas -v of one PTX file (CUDA toolkit, no GPU): registers, spill stores / loads and stack frame bytes."""
    import subprocess

    exe = shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas"
    r = subprocess.run([exe, "-v", f"-arch={arch}", str(ptx), "-o", "/dev/null"], capture_output=True, text=True)
    if r.returncode != 0:
        raise compiler.MetalCompileError(f"ptxas {ptx.name}: {r.stderr.strip()[-2000:]}")
    out = {}
    for key, pat in (("registers", r"Used (\d+) registers"), ("stack", r"(\d+) bytes stack frame"),
                     ("spill_stores", r"(\d+) bytes spill stores"), ("spill_loads", r"(\d+) bytes spill loads")):
        m = re.search(pat, r.stderr)
        out[key] = int(m.group(1)) if m else 0
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--precise", action="store_true", help="compile without fast math")
    ap.add_argument("--mma", type=int, choices=compiler.SIMDGROUP_MMA_MODES, help="simdgroup_matrix lowering")
    ap.add_argument("--ptxas", action="store_true", help="print ptxas -v figures of the varlen and decode kernels")
    ap.add_argument("--prune", action="store_true", help="then remove cache folders no index names")
    ap.add_argument("--only", nargs="+", choices=list(TARGETS), help="build (and index) only these targets")
    a = ap.parse_args()
    for name, path in build_all(a.jobs, fast_math=not a.precise, simdgroup_mma=a.mma, names=a.only).items():
        m = json.loads((path / "manifest.json").read_text())
        print(f"{name}: {len(m['kernels'])} kernels -> {path}")
        if a.ptxas and name in ("attention_varlen", "attention_backward", "paged_decode_attention", "tensor_ops",
                                   "attention_tensor_ops"):
            for host, info in sorted(m["kernels"].items()):
                u = ptxas_usage(path / info["ptx"])
                print(f"  {host}: {u['registers']} registers, {u['stack']} B stack, spill "
                      f"{u['spill_stores']} / {u['spill_loads']} B")
    if a.prune:
        print(f"pruned {len(prune())} cache folders")
