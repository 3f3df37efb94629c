"""Turns a .metal file into PTX for an NVIDIA GPU: the same pre-pass as the Metal-on-CPU emulator, target "cuda".

clang-19 -E (Metal headers replaced by empty stand-ins) -> metal_cpu.compiler.prepass(target="cuda") -> one
`extern "C" __global__` entry point per kernel, generated here -> clang-19 -x cuda --cuda-device-only
--cuda-gpu-arch=sm_90 -nocudainc -nocudalib -S with shim/metal_stdlib.h. No CUDA toolkit is needed here; the GPU
machine's driver JIT-compiles the PTX.

One PTX file per kernel (so the driver compiles only what a run uses) and a manifest.json with, per kernel, the
entry symbol, its parameters ([[buffer]] / [[threadgroup]] indices resolved by the compiler, read back from the
PTX) and max_total_threads_per_threadgroup, and the function constants (index, type, symbol).
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
from metal_cpu.compiler import BUILTINS, FC_TYPES, MetalCompileError, _preprocess, clang, prepass  # noqa: E402

SHIM = HERE / "shim" / "metal_stdlib.h"
SHIM_CORE = HERE.parent / "metal_cpu" / "shim" / "msl_types.h"  # the part shared with the CPU shim
ARCH = "sm_90"
CUDA_FLAGS = ["-x", "cuda", "--cuda-device-only", f"--cuda-gpu-arch={ARCH}", "-nocudainc", "-nocudalib",
              "-std=c++17", "-O3", "-S", "-Wall", "-Wno-unused-parameter", "-Wno-unused-variable",
              "-Wno-unused-function", "-Wno-unknown-attributes", "-Wno-unused-but-set-variable",
              "-Wno-unknown-cuda-version", "-Wno-unused-local-typedef", "-Wno-nan-infinity-disabled",
              # GPU compilers unroll constant-trip loops over per-lane arrays (o[ROWS][D / 32]...) so they stay in
              # registers; at clang's default threshold they land in local memory.
              "-mllvm", "-unroll-threshold=5000"]

# Builtin parameter -> (x, y, z) expressions over the PTX special registers (Metal dispatchThreadgroups semantics;
# warps are formed from the linear thread index, x fastest, as Metal forms simdgroups).
_TID = "__nvvm_read_ptx_sreg_tid_{}()"
_NTID = "__nvvm_read_ptx_sreg_ntid_{}()"
_CTAID = "__nvvm_read_ptx_sreg_ctaid_{}()"
_NCTAID = "__nvvm_read_ptx_sreg_nctaid_{}()"
_LINEAR = "(t_x + n_x * (t_y + n_y * t_z))"
BUILTIN_EXPRS = {
    "thread_position_in_grid": ("c_x * n_x + t_x", "c_y * n_y + t_y", "c_z * n_z + t_z"),
    "thread_position_in_threadgroup": ("t_x", "t_y", "t_z"),
    "threadgroup_position_in_grid": ("c_x", "c_y", "c_z"),
    "threadgroups_per_grid": ("g_x", "g_y", "g_z"),
    "threads_per_threadgroup": ("n_x", "n_y", "n_z"),
    "threads_per_grid": ("g_x * n_x", "g_y * n_y", "g_z * n_z"),
    "thread_index_in_threadgroup": (_LINEAR, "0", "0"),
    "simdgroup_index_in_threadgroup": (_LINEAR + " / 32u", "0", "0"),
    "thread_index_in_simdgroup": (_LINEAR + " % 32u", "0", "0"),
    "simdgroups_per_threadgroup": ("(n_x * n_y * n_z + 31u) / 32u", "0", "0"),
}


def entry_symbol(host_name: str) -> str:
    return "mcu_" + re.sub(r"\W", "_", host_name)


def _entry(host: str, callee: str, kd, fcs, min_blocks: int = 0) -> str:
    sym = entry_symbol(host)
    args = []
    meta = [str(len(kd.params))]
    for i, p in enumerate(kd.params):
        ptype = f"mcpu_param_t<{i}, decltype({callee})>"
        if p.kind == "buffer":
            args.append(f"mcu_bind<{ptype}>(a.buffers[{p.index}])")
            meta += ["0", f"(unsigned)({p.index})"]
        elif p.kind == "threadgroup":
            args.append(f"mcu_bind<{ptype}>(mcu_dynamic_threadgroup_memory + a.threadgroup_offsets[{p.index}])")
            meta += ["1", f"(unsigned)({p.index})"]
        else:
            canonical = BUILTINS[p.kind]
            xyz = ("32u", "0", "0") if canonical is None else BUILTIN_EXPRS[canonical]
            args.append(f"mcu_builtin<{ptype}>({', '.join(xyz)})")
            meta += ["2", "0"]
    bounds = ""
    if kd.max_threads:
        extra = f", {min_blocks}" if min_blocks else ""
        bounds = f"__attribute__((launch_bounds({kd.max_threads}{extra}))) "
    regs = "; ".join(f"const uint32_t {v}_{a} = {tmpl.format(a)}"
                     for v, tmpl in (("t", _TID), ("n", _NTID), ("c", _CTAID), ("g", _NCTAID)) for a in "xyz")
    return (f'extern "C" __global__ void {bounds}{sym}(const mcu_args a) {{\n'
            f"  {regs};\n"
            f"  (void)t_x; (void)t_y; (void)t_z; (void)n_x; (void)n_y; (void)n_z; (void)c_x; (void)c_y; (void)c_z;"
            f" (void)g_x; (void)g_y; (void)g_z;\n"
            # The kernel body inlined into the entry: a call through the ABI would pass the per-lane state on the
            # stack (ptxas spilled kilobytes per thread on the decode kernel that way).
            f"  [[clang::always_inline]] {callee}({', '.join(args)});\n}}\n"
            f'extern "C" __device__ unsigned mcu_meta_{sym}[] = {{{", ".join(meta)}}};\n')


def _fc_globals(fcs) -> str:
    return "".join(f'extern "C" __device__ unsigned mcu_fc_{name}[] = {{(unsigned)({idx}), {FC_TYPES[ty]}u}};\n'
                   for ty, name, idx in fcs)


def _function_constants(text: str):
    return [(m.group(1), m.group(2), " ".join(m.group(3).split())) for m in
            re.finditer(r"\bconstant\s+(\w+)\s+(\w+)\s*\[\[\s*function_constant\s*\((.+?)\)\s*\]\]\s*;", text)]


def _ptx_u32_array(ptx: str, name: str) -> List[int]:
    """Initial value of a `.global` u32 array in PTX: clang prints it as .u32 or as little-endian .b8 bytes, drops
    trailing zeros and leaves out an all-zero initializer."""
    m = re.search(r"\.global\s+\.align\s+\d+\s+\.(u32|b32|b8)\s+" + re.escape(name) +
                  r"\[(\d+)\](?:\s*=\s*\{([^}]*)\})?\s*;", ptx)
    if not m:
        raise MetalCompileError(f"{name} not found in the PTX")
    n = int(m.group(2))
    vals = [int(v.strip(), 0) for v in m.group(3).split(",")] if m.group(3) else []
    vals += [0] * (n - len(vals))
    if m.group(1) == "b8":
        vals = [int.from_bytes(bytes(vals[i:i + 4]), "little") for i in range(0, len(vals), 4)]
    return vals


def _run(cmd: Sequence[str], what: str) -> None:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if r.returncode != 0:
        raise MetalCompileError(f"{what} failed:\n{r.stderr.strip()[:6000]}\ncommand: {' '.join(cmd)}")


def cache_dir() -> Path:
    d = Path(os.environ.get("METAL_CUDA_CACHE", ROOT / ".cache" / "metal_cuda"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def build(metal_path, include_dirs: Sequence[str] = (), defines: Optional[Dict[str, str]] = None,
          fast_math: bool = True, out_dir=None, kernels: Optional[Sequence[str]] = None, jobs: int = 2,
          extra_flags: Sequence[str] = (), kernel_flags=None, min_blocks=None) -> Path:
    """Compiles every kernel of `metal_path` (or those named in `kernels`) to PTX; returns the folder holding
    manifest.json and one <entry symbol>.ptx per kernel. Cached by the preprocessed source, flags and this target."""
    metal_path = Path(metal_path)
    text = _preprocess(metal_path, include_dirs, defines or {})
    pre = prepass(text, target="cuda")
    fcs = _function_constants(text)
    selected = [k for k in pre.kernels if kernels is None or k[0] in kernels]
    if kernels is not None and len(selected) != len(set(kernels)):
        missing = set(kernels) - {k[0] for k in selected}
        raise MetalCompileError(f"{metal_path.name}: no kernel named {sorted(missing)}")

    h = hashlib.sha256()
    for part in (text, repr((fast_math, sorted((defines or {}).items()), [k[0] for k in selected], list(extra_flags),
                       [list(kernel_flags(k[0])) for k in selected] if kernel_flags else None,
                       [min_blocks(k[0]) for k in selected] if min_blocks else None)),
                 SHIM.read_text(), SHIM_CORE.read_text(), Path(__file__).read_text(),
                 (HERE.parent / "metal_cpu" / "compiler.py").read_text()):
        h.update(part.encode())
    out = Path(out_dir) if out_dir else cache_dir() / f"{metal_path.stem}-{h.hexdigest()[:16]}"
    if (out / "manifest.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)

    flags = CUDA_FLAGS + ["-include", str(SHIM)] + (["-ffast-math", "-DMCU_FAST_MATH"] if fast_math else [])
    flags += list(extra_flags)
    body = pre.check_source + "\n#line 1 \"<mcu-generated>\"\n" + _fc_globals(fcs)

    def one(kernel):
        host, callee, kd = kernel
        sym = entry_symbol(host)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / f"{sym}.cu"
            src.write_text(body + _entry(host, callee, kd, fcs, min_blocks(host) if min_blocks else 0))
            ptx = Path(tmp) / f"{sym}.ptx"
            per_kernel = list(kernel_flags(host)) if kernel_flags else []
            _run([clang(), *flags, *per_kernel, str(src), "-o", str(ptx)],
                 f"compiling {metal_path.name}:{host} to PTX")
            text_ptx = ptx.read_text()
        meta = _ptx_u32_array(text_ptx, f"mcu_meta_{sym}")
        params = [{"name": p.name, "kind": ("buffer", "threadgroup", p.kind)[meta[1 + 2 * i]],
                   "index": meta[2 + 2 * i]} for i, p in enumerate(kd.params)]
        fc_used = []
        for ty, name, _ in fcs:
            if re.search(r"\b" + re.escape(name) + r"\b", text_ptx):
                idx, _ = _ptx_u32_array(text_ptx, f"mcu_fc_{name}")
                fc_used.append({"name": name, "type": ty, "index": idx,
                                "defined_symbol": f"mcpu_fc_defined_{name}"})
        (out / f"{sym}.ptx").write_text(text_ptx)
        return host, {"symbol": sym, "ptx": f"{sym}.ptx", "max_threads": kd.max_threads, "params": params,
                      "function_constants": fc_used}

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        entries = dict(pool.map(one, selected))
    manifest = {"source": str(metal_path.resolve().relative_to(ROOT)) if metal_path.resolve().is_relative_to(ROOT)
                else str(metal_path), "arch": ARCH, "fast_math": fast_math, "kernels": entries}
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    return out


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
# occupancy. The decode's small row tiles (R <= 4: every GQA <= 4 and MHA decode) are built for 512 threads per SM
# (256-thread threadgroups: launch_bounds(256, 2), at most 128 registers; R = 1: 768 threads, at most 85), as an
# Apple core would keep them resident; the split planner counts the same (decode_threadgroups_per_core).
def decode_min_blocks(host: str) -> int:
    m = re.search(r"_r(\d+)$", host)
    r = int(m.group(1)) if m else 0
    return 3 if r == 1 else (2 if r in (2, 4) else 0)


TARGET_MIN_BLOCKS = {"paged_decode_attention": decode_min_blocks}

# The project's kernels and the emulator's feature kernels, as the GPU suite and the CI check build them.
FLASH_SDPA = ROOT / "flash_sdpa"
TARGETS = {
    "kv_paged_write": (FLASH_SDPA / "kv_paged_write.metal", [FLASH_SDPA]),
    "paged_decode_attention": (FLASH_SDPA / "paged_decode_attention.metal", [FLASH_SDPA]),
    "attention_varlen": (FLASH_SDPA / "attention_varlen.metal", [FLASH_SDPA]),
    "attention_backward": (FLASH_SDPA / "attention_backward.metal", [FLASH_SDPA]),
    "features": (ROOT / "tests" / "metal_cpu" / "kernels" / "features.metal", []),
}


def _sources_hash(path: Path, include_dirs) -> str:
    """The raw text of a target's .metal file, the headers beside it and the CUDA target itself."""
    h = hashlib.sha256()
    files = [path] + sorted(f for d in [path.parent, *include_dirs] for f in Path(d).glob("*") if f.suffix in
                            (".h", ".metal"))
    for f in files + [SHIM, SHIM_CORE, Path(__file__), HERE.parent / "metal_cpu" / "compiler.py"]:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def build_all(jobs: int = 2, fast_math: bool = True) -> Dict[str, Path]:
    """Builds every target and records them in <cache>/index.json, so that a machine without clang-19 (the GPU
    machine) can use the PTX built here: load_all() there."""
    built = {name: build(path, [str(d) for d in inc], fast_math=fast_math, jobs=jobs,
                         kernel_flags=TARGET_KERNEL_FLAGS.get(name), min_blocks=TARGET_MIN_BLOCKS.get(name))
             for name, (path, inc) in TARGETS.items()}
    index = {name: {"path": built[name].name, "sources": _sources_hash(path, inc), "fast_math": fast_math}
             for name, (path, inc) in TARGETS.items()}
    (cache_dir() / "index.json").write_text(json.dumps(index, indent=1))
    return built


def load_all() -> Dict[str, Path]:
    """The PTX folders of index.json when they match the sources (the GPU machine has no clang-19: carry
    .cache/metal_cuda), else build_all()."""
    index_path = cache_dir() / "index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        out = {name: cache_dir() / index[name]["path"] for name in TARGETS if name in index and
               index[name]["sources"] == _sources_hash(*TARGETS[name]) and
               (cache_dir() / index[name]["path"] / "manifest.json").exists()}
        if len(out) == len(TARGETS):
            return out
    try:
        clang()
    except MetalCompileError as e:
        if not index_path.exists():
            raise MetalCompileError(f"no prebuilt PTX in {index_path}, and {e}") from None
        # Sources edited after the PTX was built (a shared working tree): run it, but say so loudly.
        index = json.loads(index_path.read_text())
        print(f"WARNING: metal_cuda: prebuilt PTX is STALE for "
              f"{[n for n in TARGETS if index[n]['sources'] != _sources_hash(*TARGETS[n])]} (no clang-19 to rebuild)")
        return {name: cache_dir() / index[name]["path"] for name in TARGETS}
    return build_all()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--precise", action="store_true", help="compile without fast math")
    a = ap.parse_args()
    for name, path in build_all(a.jobs, fast_math=not a.precise).items():
        m = json.loads((path / "manifest.json").read_text())
        print(f"{name}: {len(m['kernels'])} kernels -> {path.relative_to(ROOT)}")
