"""Turns a .metal file into a shared object the metal_cpu runtime can run.

msl.frontend (clang-19 -E with the Metal headers replaced by empty stand-ins, the pre-pass) -> the entry points
generated here -> clang-19 as C++ with shim/metal_stdlib.h, SanitizerCoverage load/store hooks and line tables
pointing at the .metal source.
"""

import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence

from .. import frontend
from ..frontend import BUILTINS, FC_TYPES, Prepassed, clang, param_type, prepass, preprocess, run

HERE = Path(__file__).resolve().parent
SHIM = HERE / "shim" / "metal_stdlib.h"
RUNTIME_SOURCES = [HERE / "runtime" / "runtime.cpp", HERE / "runtime" / "fiber.h", HERE / "runtime" / "mcpu_abi.h",
                   HERE / "runtime" / "metal_cpu.h"]
# What a compiled kernel library depends on besides its preprocessed source (cache keys).
TOOLCHAIN = [SHIM, HERE / "shim" / "metal_tensor_ops.h", frontend.SHIM_TENSORS, frontend.SHIM_CORE,
             Path(frontend.__file__), Path(__file__), HERE / "runtime" / "mcpu_abi.h"]


def cache_dir() -> Path:
    return frontend.cache_dir("metal_cpu", "METAL_CPU_CACHE")


def entry_points(pre: Prepassed) -> str:
    """The C++ appended to the pre-passed source: one entry point per kernel that binds buffers, threadgroup
    arguments and builtins from the runtime's thread arguments, the kernel and parameter tables, the function-constant
    setter and the mcpu_library record the runtime opens (runtime/mcpu_abi.h)."""
    kernels = pre.kernels
    gen = ['\n#line 1 "<mcpu-generated>"']
    for i, (host, callee, kd) in enumerate(kernels):
        args = []
        for p_i, p in enumerate(kd.params):
            ptype = param_type(p_i, callee)
            if p.kind == "buffer":
                args.append(f"mcpu_bind<{ptype}>(a->buffers[{p.index}])")
            elif p.kind == "threadgroup":
                args.append(f"mcpu_bind<{ptype}>(a->threadgroup_args[{p.index}])")
            elif BUILTINS[p.kind] is None:
                args.append(f"({ptype})32")
            else:
                args.append(f"mcpu_builtin<{ptype}>(a->{BUILTINS[p.kind]})")
        gen.append(f"static void mcpu_entry_{i}(const mcpu_thread_args* a) {{ metal::mcpu_thread_fp_mode(); "
                   f"{callee}({', '.join(args)}); }}")
        pinfo = ", ".join(
            f'{{{0 if p.kind == "buffer" else 1 if p.kind == "threadgroup" else 2}, (uint32_t)({p.index}), "{p.name}", '
            f'{f"mcpu_bind_align<{param_type(p_i, callee)}>()" if p.kind == "buffer" else "0"}}}'
            for p_i, p in enumerate(kd.params))
        pinfo = pinfo or '{2, 0, "", 0}'
        gen.append(f"static const mcpu_param_info mcpu_params_{i}[] = {{ {pinfo} }};")
    table = ", ".join(f'{{"{host}", mcpu_entry_{i}, (uint32_t)({kd.max_threads}), {len(kd.params)}, mcpu_params_{i}}}'
                      for i, (host, _, kd) in enumerate(kernels))
    table = table or "{nullptr, nullptr, 0, 0, nullptr}"
    gen.append(f"static const mcpu_kernel_info mcpu_kernel_table[] = {{ {table} }};")
    cases = []
    for ty, name, idx in pre.function_constants:
        cast = {"bool": "bits != 0", "int": "(int)bits", "uint": "bits", "float": "__builtin_bit_cast(float, bits)"}[ty]
        cases.append(f"if (index == (uint32_t)({idx})) {{ if (type != {FC_TYPES[ty]}) return -2; {name} = {cast}; "
                     f"mcpu_fc_defined_{name} = true; return 0; }}")
    resets = " ".join(f"{name} = {ty}(); mcpu_fc_defined_{name} = false;" for ty, name, _ in pre.function_constants)
    gen.append("static MCPU_TRAMPOLINE int mcpu_set_fc(uint32_t index, uint32_t type, uint32_t bits) {"
               f" (void)type; (void)bits; if (index == UINT32_MAX) {{ {resets} return 0; }} {' '.join(cases)}"
               " return -1; }")
    gen.append('extern "C" __attribute__((visibility("default"))) const mcpu_library_info mcpu_library = '
               f'{{ MCPU_ABI_VERSION, {len(kernels)}, mcpu_kernel_table, mcpu_set_fc, mcpu_bind_runtime, '
               'MCPU_SOURCE_PATH };')
    return "\n".join(gen) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Compilation.

def _builtins_lib() -> Optional[str]:
    r = subprocess.run([clang(), "-rtlib=compiler-rt", "-print-libgcc-file-name"], capture_output=True, text=True)
    p = r.stdout.strip()
    return p if r.returncode == 0 and p and os.path.exists(p) else None


COMMON_FLAGS = ["-x", "c++", "-std=c++20", "-fno-exceptions", "-fno-rtti", "-Wall", "-Wextra", "-Werror",
                "-Wno-unused-parameter", "-Wno-unused-variable", "-Wno-unused-function", "-Wno-unknown-attributes",
                "-Wno-unused-but-set-variable", "-Xclang", "-ffloat16-excess-precision=none",
                "-Xclang", "-fbfloat16-excess-precision=none",
                # No memcpy / memset formed from loops or copies: SanitizerCoverage hooks only loads and stores, so a
                # copy into threadgroup or device memory would escape the race, overrun and uninitialised checks.
                "-fno-builtin-memcpy", "-fno-builtin-memmove", "-fno-builtin-memset",
                # Signed 32-bit overflow wraps, as the GPU's 32-bit integer units do: an int product meant to be a
                # 64-bit offset then reads the wrong place here too, instead of being silently widened by the
                # optimiser (which the overflow's undefined behaviour allows, and which would hide the bug).
                "-fwrapv"]


def compile_to(metal_path, out_path, include_dirs: Sequence[str] = (), defines: Optional[Dict[str, str]] = None,
               fast_math: bool = True, opt: str = "-O2", extra_flags: Sequence[str] = ()) -> Path:
    """Compiles one .metal file to a kernel library at `out_path` (uncached). fast_math (Metal's default) selects the
    fast:: math functions for the plain names, runs the threads with denormals flushed and computes divisions as
    x * (1 / y) (see shim/metal_stdlib.h, README "Fast math"). extra_flags go to the compiles of the preprocessed
    source with the shim (`defines` reach only the source's preprocessing): e.g. -DMSL_NAX_FRAGMENT_LAYOUT=1."""
    metal_path, out_path = Path(metal_path), Path(out_path)
    pre = prepass(preprocess(metal_path, include_dirs, defines or {}), "cpu")
    math = ["-ffast-math", "-DMCPU_FAST_MATH"] if fast_math else []
    with tempfile.TemporaryDirectory() as tmp:
        check = Path(tmp) / "check.cpp"
        check.write_text(pre.source)
        run([clang(), "-fsyntax-only", *COMMON_FLAGS, *math, *extra_flags, "-DMCPU_ADDRESS_SPACES", "-include",
             str(SHIM), str(check)], f"address-space check of {metal_path}")
        src = Path(tmp) / (metal_path.stem + ".mcpu.cpp")
        src.write_text(pre.source + entry_points(pre))
        # Front end only (no optimisation yet, so every division is still one), then the division model, then the
        # optimiser, SanitizerCoverage load/store hooks and code generation on the rewritten IR.
        ir = Path(tmp) / (metal_path.stem + ".ll")
        coverage = "-fsanitize-coverage=func,trace-loads,trace-stores"
        # Every access through a typed pointer checks the address against the type's alignment (a half4 read at an
        # odd element is undefined on an Apple GPU; x86 would read it silently): shim/metal_stdlib.h reports it.
        run([clang(), *COMMON_FLAGS, *math, *extra_flags, opt, "-gline-tables-only", "-fPIC", coverage,
             "-fsanitize=alignment", "-fvisibility=hidden",
              f'-DMCPU_SOURCE_PATH="{metal_path.resolve()}"', "-include", str(SHIM), "-S", "-emit-llvm",
              "-Xclang", "-disable-llvm-passes", str(src), "-o", str(ir)], f"compiling {metal_path}")
        ir.write_text(reciprocal_divisions(ir.read_text()))
        cmd = [clang(), *math[:1], opt, "-fPIC", "-shared", coverage, "-x", "ir", str(ir), "-o", str(out_path) + ".tmp"]
        lib = _builtins_lib()
        if lib:
            cmd += ["-x", "none", lib]  # compiler-rt: the bfloat conversions
        run(cmd, f"compiling {metal_path}")
        os.replace(str(out_path) + ".tmp", out_path)
    return out_path


_FDIV = re.compile(r"^(\s*)(%[-\w.$]+|%\"[^\"]*\") = fdiv ((?:(?:fast|reassoc|nnan|ninf|nsz|arcp|contract|afn) )*)"
                   r"(float|<(\d+) x float>) (.*)$", re.M)


def reciprocal_divisions(ir: str) -> str:
    """Fast math's division: every fp32 `fdiv` the compiler may turn into a reciprocal multiply (flag arcp, which fast
    math sets) becomes x * (1 / y), the reciprocal a correctly rounded IEEE division of its own. With denormals
    flushed, x / y is then 0 for |y| > 2^126 whatever x is, and inf for a denormal y, as on a GPU that divides this
    way. The new instructions carry no fast-math flags, so the optimiser cannot fold them back into one division."""
    counter = [0]

    def one(m: "re.Match[str]") -> str:
        indent, name, flags, ty, lanes, rest = m.groups()
        if "arcp" not in flags.split() and "fast" not in flags.split():
            return m.group(0)
        parts = frontend.split_top(rest)
        if len(parts) < 2 or parts[0].startswith("!") or parts[1].startswith("!"):
            return m.group(0)
        x, y, tail = parts[0], parts[1], "".join(", " + p for p in parts[2:])
        one_ = "1.000000e+00" if lanes is None else "<" + ", ".join(["float 1.000000e+00"] * int(lanes)) + ">"
        counter[0] += 1
        rcp = f"%mcpu.rcp.{counter[0]}"
        return f"{indent}{rcp} = fdiv {ty} {one_}, {y}{tail}\n{indent}{name} = fmul {ty} {x}, {rcp}{tail}"

    return _FDIV.sub(one, ir)


def compile_cached(metal_path, include_dirs: Sequence[str] = (), defines: Optional[Dict[str, str]] = None,
                   fast_math: bool = True, extra_flags: Sequence[str] = ()) -> Path:
    """Compiles (or reuses) a kernel library keyed by the preprocessed source, the flags and the emulator itself."""
    metal_path = Path(metal_path)
    text = preprocess(metal_path, include_dirs, defines or {})
    h = hashlib.sha256()
    h.update(text.encode())
    h.update(repr((fast_math, sorted((defines or {}).items()))).encode())
    if extra_flags:
        h.update(repr(list(extra_flags)).encode())
    h.update(frontend.file_hash(TOOLCHAIN).encode())
    out = cache_dir() / f"{metal_path.stem}{'-fastmath' if fast_math else ''}-{h.hexdigest()[:16]}.so"
    if not out.exists():
        compile_to(metal_path, out, include_dirs, defines, fast_math, extra_flags=extra_flags)
    return out


def build_runtime(out_dir=None) -> Path:
    """Builds libmetal_cpu.so (not instrumented) into `out_dir`, or into the cache keyed by its sources. The soname is
    the file name: the tests' cached runtime and a package build's libmetal_cpu.so stay two runtimes in one process
    (the dynamic linker would otherwise hand the package the first one loaded)."""
    if out_dir is None:
        out = cache_dir() / f"libmetal_cpu-{frontend.file_hash(RUNTIME_SOURCES)}.so"
        if out.exists():
            return out
    else:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        out = Path(out_dir) / "libmetal_cpu.so"
    tmp = str(out) + f".{os.getpid()}.tmp"
    run([clang(), "-x", "c++", "-std=c++17", "-O2", "-g", "-fPIC", "-shared", "-Wall", "-Wextra",
          f"-Wl,-soname,{out.name}", str(HERE / "runtime" / "runtime.cpp"), "-o", tmp, "-ldl", "-lstdc++"],
         "building the metal_cpu runtime")
    os.replace(tmp, out)
    return out
