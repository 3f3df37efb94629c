#!/usr/bin/env python3
"""Builds the emulated variant of metal-flash-sdpa: build/<variant>/, loadable by kernels.get_kernel.

The variant is the Linux CPU build that `kernels` resolves for this torch (e.g. torch213-cxx11-cpu-x86_64-linux):
  metadata.json, __init__.py (+ the package's other modules), _ops.py   the Python package, ops in a unique namespace
  _metal_flash_sdpa_<hash>.so     torch_binding.cpp + planners + msl/cpu/launch_cpu.cpp, ops on kCPU
  libmetal_cpu.so                 the Metal-on-CPU runtime
  metal_cpu_kernels/<name>.so     every flash_sdpa/*.metal, compiled by the emulator with fast math (Metal's default)

Usage: python scripts/build_emulated.py [--jobs N]. Object files are cached in build/.cache by content hash.
"""

import argparse
import concurrent.futures
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_DIR = ROOT / "flash_sdpa"
TORCH_EXT = ROOT / "torch-ext"
PACKAGE = TORCH_EXT / "metal_flash_sdpa"
METAL_CPU = ROOT / "msl" / "cpu"
CACHE = ROOT / "build" / ".cache"

# Run as a file (python3 scripts/build_emulated.py): the repository root on the path, for the msl package.
sys.path.insert(0, str(ROOT))


def variant_name() -> str:
    import torch

    version = torch.__version__.split("+")[0].split(".")
    abi = "cxx11" if torch.compiled_with_cxx11_abi() else "cxx98"
    return f"torch{version[0]}{version[1]}-{abi}-cpu-{platform.machine()}-linux"


def package_version() -> int:
    text = (ROOT / "build.toml").read_text()
    m = re.search(r"^\s*version\s*=\s*(\d+)", text, re.M)
    if not m:
        sys.exit("build.toml: [general] version not found")
    return int(m.group(1))


def host_sources():
    """C++ sources of the extension: the bindings (torch-ext/*.cpp), every planner in flash_sdpa/, the emulator
    backend."""
    return [*sorted(TORCH_EXT.glob("*.cpp")), *sorted(KERNEL_DIR.glob("*.cpp")), METAL_CPU / "launch_cpu.cpp"]


def content_hash(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(set(paths)):
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def registration_header(include_dir: Path) -> None:
    """The registration.h kernel-builder provides to torch-ext sources: op library + Python module init."""
    include_dir.mkdir(parents=True, exist_ok=True)
    (include_dir / "registration.h").write_text(
        """#pragma once
#include <Python.h>
#define _CONCAT(A, B) A##B
#define CONCAT(A, B) _CONCAT(A, B)
#define _STRINGIFY(A) #A
#define STRINGIFY(A) _STRINGIFY(A)
#define TORCH_LIBRARY_EXPAND(NAME, MODULE) TORCH_LIBRARY(NAME, MODULE)
#define REGISTER_EXTENSION(NAME)                                                                   \\
  PyMODINIT_FUNC CONCAT(PyInit_, NAME)() {                                                         \\
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, STRINGIFY(NAME), nullptr, 0, nullptr}; \\
    return PyModule_Create(&module);                                                               \\
  }
"""
    )


def cxx() -> str:
    for c in ("clang++-19", "clang++", "g++"):
        if shutil.which(c):
            return c
    sys.exit("no C++ compiler found (install clang-19)")


def compile_object(src: Path, flags, obj_dir: Path) -> Path:
    # Keyed by the flags, the source and every header of the trees it can include.
    headers = [*KERNEL_DIR.glob("*.h"), *TORCH_EXT.glob("*.h"), *(METAL_CPU / "runtime").glob("*.h")]
    key = hashlib.sha256((repr(flags) + content_hash([src, *headers])).encode())
    obj = obj_dir / f"{src.stem}-{key.hexdigest()[:12]}.o"
    if obj.exists():
        return obj
    tmp = obj.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cxx(), *flags, "-c", str(src), "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"compiling {src} failed:\n{' '.join(cmd)}\n{r.stderr}")
    os.replace(tmp, obj)
    return obj


def build_extension(out: Path, namespace: str, jobs: int) -> None:
    import torch
    from torch.utils.cpp_extension import include_paths

    gen = CACHE / "include"
    registration_header(gen)
    torch_lib = Path(torch.__file__).parent / "lib"
    flags = [
        "-std=c++20",  # what kernel-builder builds host code with for torch >= 2.12
        "-O2",
        "-fPIC",
        "-fvisibility=hidden",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
        "-DMETAL_FLASH_SDPA_EMULATED",
        "-I", str(gen),
        "-I", str(KERNEL_DIR),
        "-I", str(TORCH_EXT),
        "-I", str(METAL_CPU),
        "-isystem", sysconfig.get_paths()["include"],
    ]
    for p in include_paths():
        flags += ["-isystem", p]
    obj_dir = CACHE / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        # Only the binding names the op namespace: the other objects survive a rename.
        objs = list(pool.map(
            lambda s: compile_object(
                s, flags + ([f"-DTORCH_EXTENSION_NAME={namespace}"] if s.name == "torch_binding.cpp" else []), obj_dir),
            host_sources()))
    target = out / f"{namespace}.so"
    cmd = [cxx(), "-shared", "-fPIC", *map(str, objs), "-o", str(target),
           "-L", str(out), "-lmetal_cpu", "-Wl,-rpath,$ORIGIN",
           "-L", str(torch_lib), "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{torch_lib}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"linking {target} failed:\n{' '.join(cmd)}\n{r.stderr}")


def build_kernels(out: Path, jobs: int) -> None:
    from msl import cpu as metal_cpu

    kdir = out / "metal_cpu_kernels"
    kdir.mkdir(parents=True, exist_ok=True)

    def one(metal: Path) -> None:
        # Compiled once per preprocessed source (the emulator's cache), then copied into the variant.
        so = metal_cpu.compiler.compile_cached(metal, include_dirs=[str(KERNEL_DIR)], fast_math=True)
        shutil.copyfile(so, kdir / f"{metal.stem}.so")

    metals = sorted(KERNEL_DIR.glob("*.metal"))
    stems = [m.stem for m in metals]
    dupes = {s for s in stems if stems.count(s) > 1}
    if dupes:
        sys.exit(f"every .metal basename must be unique: {sorted(dupes)}")
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, metals))


def write_python(out: Path, namespace: str) -> None:
    for py in sorted(PACKAGE.glob("*.py")):
        if py.name != "_ops.py":
            shutil.copyfile(py, out / py.name)
    (out / "_ops.py").write_text(
        f"""import torch
from . import {namespace}
ops = torch.ops.{namespace}


def add_op_namespace_prefix(op_name: str):
    \"\"\"Prefix op by namespace.\"\"\"
    return f"{namespace}::{{op_name}}"
"""
    )


def write_metadata(out: Path, namespace: str) -> None:
    metadata = {
        "id": namespace,
        "name": "metal-flash-sdpa",
        "version": package_version(),
        "license": "apache-2.0",
        "python-depends": [],
        "backend": {"type": "cpu"},
    }
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()

    from msl import cpu as metal_cpu

    # The op namespace is unique per native source tree, so two builds can be loaded side by side.
    tree = [*KERNEL_DIR.iterdir(), *TORCH_EXT.glob("*.cpp"), *TORCH_EXT.glob("*.h"),
            METAL_CPU / "launch_cpu.cpp", *(METAL_CPU / "runtime").iterdir()]
    tree_hash = content_hash([p for p in tree if p.is_file()])
    namespace = f"_metal_flash_sdpa_{tree_hash[:10]}"

    # Built beside the variant and swapped in at the end: a process loading build/ never sees half a variant.
    final = ROOT / "build" / variant_name()
    out = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    metal_cpu.build_runtime(out)
    build_kernels(out, args.jobs)
    build_extension(out, namespace, args.jobs)
    write_python(out, namespace)
    write_metadata(out, namespace)
    old = final.with_name(f".{final.name}.{os.getpid()}.old")
    if final.exists():
        os.replace(final, old)
    os.replace(out, final)
    shutil.rmtree(old, ignore_errors=True)
    print(f"built {final.relative_to(ROOT)} (ops namespace {namespace})")


if __name__ == "__main__":
    main()
