"""Turns a .metal file into PTX for an NVIDIA GPU: the same pre-pass as the Metal-on-CPU emulator, target "cuda".

clang-19 -E (Metal headers replaced by empty stand-ins) -> msl.frontend.prepass(target="cuda") -> one
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
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .. import frontend
from ..frontend import BUILTINS, FC_TYPES, MetalCompileError, clang, param_type, prepass, preprocess, run

HERE = Path(__file__).resolve().parent
ROOT = frontend.ROOT
SHIM = HERE / "shim" / "metal_stdlib.h"
SHIM_CORE = frontend.SHIM_CORE  # the part shared with the CPU shim
# What a PTX build depends on besides the .metal sources (cache keys).
SHIM_LAYOUT = HERE / "shim" / "simdgroup_layout.h"
SHIM_TENSOR_OPS = HERE / "shim" / "metal_tensor_ops.h"
TOOLCHAIN = [SHIM, SHIM_LAYOUT, SHIM_TENSOR_OPS, frontend.SHIM_TENSORS, SHIM_CORE, Path(__file__),
             Path(frontend.__file__)]
ARCH = "sm_90"
CUDA_FLAGS = ["-x", "cuda", "--cuda-device-only", f"--cuda-gpu-arch={ARCH}", "-nocudainc", "-nocudalib",
              "-O3", "-S", "-Wall", "-Wno-unused-parameter", "-Wno-unused-variable",
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


def language_standard(text: str) -> str:
    """C++20 for sources that use MetalPerformancePrimitives (matmul2d takes its descriptor as a class-type template
    parameter; shim/metal_tensor_ops.h), C++17 for the rest, so that peers' sources compile as they always did."""
    return "-std=c++20" if re.search(r"\bmpp\s*::", text) else "-std=c++17"


def entry_symbol(host_name: str) -> str:
    return "mcu_" + re.sub(r"\W", "_", host_name)


def _max_threads(host: str, kd, override):
    """max_total_threads_per_threadgroup: the caller's number for this kernel if given (the attribute may be an
    expression of template parameters, `WM * WN * 32`, which the generated entry cannot name), else the attribute
    (a number, or a constant expression visible at global scope)."""
    if override is not None and override(host):
        return int(override(host))
    return kd.max_threads


def _entry(host: str, callee: str, kd, min_blocks: int = 0, max_threads=0) -> str:
    sym = entry_symbol(host)
    args = []
    meta = [str(len(kd.params))]
    for i, p in enumerate(kd.params):
        ptype = param_type(i, callee)
        if p.kind == "buffer":
            args.append(f"mcpu_bind<{ptype}>(a.buffers[{p.index}])")
            meta += ["0", f"(unsigned)({p.index})"]
        elif p.kind == "threadgroup":
            args.append(f"mcpu_bind<{ptype}>(mcu_dynamic_threadgroup_memory + a.threadgroup_offsets[{p.index}])")
            meta += ["1", f"(unsigned)({p.index})"]
        else:
            canonical = BUILTINS[p.kind]
            xyz = ("32u", "0", "0") if canonical is None else BUILTIN_EXPRS[canonical]
            args.append(f"mcpu_builtin<{ptype}>({', '.join(xyz)})")
            meta += ["2", "0"]
    bounds = ""
    if max_threads:
        extra = f", {min_blocks}" if min_blocks else ""
        bounds = f"__attribute__((launch_bounds({max_threads}{extra}))) "
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


# simdgroup_matrix multiply-accumulate lowering (shim/metal_stdlib.h, MCU_SIMDGROUP_MMA): 0 shuffles, 1 tensor cores
# (half / bfloat on mma.sync, float and mixed by the three-bfloat split), 2 tensor cores for half / bfloat only.
# METAL_CUDA_MMA sets the default, so one benchmark builds and runs either lowering.
SIMDGROUP_MMA_MODES = (0, 1, 2)


def default_simdgroup_mma() -> int:
    mode = int(os.environ.get("METAL_CUDA_MMA", "1"))
    if mode not in SIMDGROUP_MMA_MODES:
        raise MetalCompileError(f"METAL_CUDA_MMA={mode}: expected one of {SIMDGROUP_MMA_MODES}")
    return mode


def cache_dir() -> Path:
    return frontend.cache_dir("metal_cuda", "METAL_CUDA_CACHE")


def build(metal_path, include_dirs: Sequence[str] = (), defines: Optional[Dict[str, str]] = None,
          fast_math: bool = True, out_dir=None, kernels: Optional[Sequence[str]] = None, jobs: int = 2,
          extra_flags: Sequence[str] = (), kernel_flags=None, min_blocks=None,
          simdgroup_mma: Optional[int] = None, max_threads=None,
          baked_constants: Optional[Dict[str, object]] = None, cast_types: Optional[str] = None) -> Path:
    """Compiles every kernel of `metal_path` (or those named in `kernels`) to PTX; returns the folder holding
    manifest.json and one <entry symbol>.ptx per kernel. Cached by the preprocessed source, flags and this target.
    simdgroup_mma: the simdgroup_matrix lowering (SIMDGROUP_MMA_MODES; None: default_simdgroup_mma()).
    max_threads: host name -> max_total_threads_per_threadgroup, for kernels whose attribute is an expression of
    template parameters. baked_constants: function constants by name -> value, compiled in (one build per set of
    values, as Metal builds one pipeline per set); the others stay run-time values the launcher writes.
    cast_types: a regex of type names (beyond the vector types) whose C-style casts convert as MSL does."""
    mma = default_simdgroup_mma() if simdgroup_mma is None else int(simdgroup_mma)
    if mma not in SIMDGROUP_MMA_MODES:
        raise MetalCompileError(f"simdgroup_mma={mma}: expected one of {SIMDGROUP_MMA_MODES}")
    metal_path = Path(metal_path)
    text = preprocess(metal_path, include_dirs, defines or {})
    pre = prepass(text, target="cuda", baked=baked_constants, cast_types=cast_types)
    fcs = pre.function_constants
    selected = [k for k in pre.kernels if kernels is None or k[0] in kernels]
    if kernels is not None and len(selected) != len(set(kernels)):
        missing = set(kernels) - {k[0] for k in selected}
        raise MetalCompileError(f"{metal_path.name}: no kernel named {sorted(missing)}")

    h = hashlib.sha256()
    key = (fast_math, mma, sorted((baked_constants or {}).items()), cast_types, sorted((defines or {}).items()),
           [k[0] for k in selected], list(extra_flags))
    for part in (text, repr((*key,
                       [list(kernel_flags(k[0])) for k in selected] if kernel_flags else None,
                       [min_blocks(k[0]) for k in selected] if min_blocks else None,
                       [max_threads(k[0]) for k in selected] if max_threads else None)),
                 *(f.read_text() for f in TOOLCHAIN)):
        h.update(part.encode())
    out = Path(out_dir) if out_dir else cache_dir() / f"{metal_path.stem}-{h.hexdigest()[:16]}"
    if (out / "manifest.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)

    flags = CUDA_FLAGS + [language_standard(pre.source), "-include", str(SHIM), f"-DMCU_SIMDGROUP_MMA={mma}"]
    flags += ["-ffast-math", "-DMCU_FAST_MATH"] if fast_math else []
    flags += list(extra_flags)
    body = pre.source + "\n#line 1 \"<mcu-generated>\"\n" + _fc_globals(fcs)

    def one(kernel):
        host, callee, kd = kernel
        sym = entry_symbol(host)
        mt = _max_threads(host, kd, max_threads) if kd.max_threads else 0
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / f"{sym}.cu"
            src.write_text(body + _entry(host, callee, kd, min_blocks(host) if min_blocks else 0, mt))
            ptx = Path(tmp) / f"{sym}.ptx"
            per_kernel = list(kernel_flags(host)) if kernel_flags else []
            run([clang(), *flags, *per_kernel, str(src), "-o", str(ptx)],
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
        return host, {"symbol": sym, "ptx": f"{sym}.ptx", "max_threads": mt, "params": params,
                      "function_constants": fc_used}

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        entries = dict(pool.map(one, selected))
    manifest = {"source": str(metal_path.resolve().relative_to(ROOT)) if metal_path.resolve().is_relative_to(ROOT)
                else str(metal_path), "arch": ARCH, "fast_math": fast_math, "simdgroup_mma": mma,
                "kernels": entries}
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("metal", help="the .metal file")
    ap.add_argument("-I", dest="include", action="append", default=[], help="include directory (repeatable)")
    ap.add_argument("--out", help="output folder (default: the cache, keyed by the sources)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--precise", action="store_true", help="compile without fast math")
    ap.add_argument("--mma", type=int, choices=SIMDGROUP_MMA_MODES, help="simdgroup_matrix lowering (default: "
                    "METAL_CUDA_MMA or 1)")
    a = ap.parse_args()
    path = build(a.metal, a.include, fast_math=not a.precise, out_dir=a.out, jobs=a.jobs, simdgroup_mma=a.mma)
    m = json.loads((path / "manifest.json").read_text())
    print(f"{a.metal}: {len(m['kernels'])} kernels -> {path}")
