#!/usr/bin/env python3
"""Builds the emulated variant of metal-flash-sdpa: build/<variant>/, loadable by kernels.get_kernel.

The variant is the Linux CPU build that `kernels` resolves for this torch (e.g. torch213-cxx11-cpu-x86_64-linux):
  metadata.json, __init__.py (+ the package's other modules), _ops.py   the Python package, ops in a unique namespace
  _metal_flash_sdpa_<hash>.so     torch_binding.cpp + planners + msl/cpu/launch_cpu.cpp, ops on kCPU
  libmetal_cpu.so                 the Metal-on-CPU runtime
  metal_cpu_kernels/<name>.so     every listed .metal, compiled by the emulator with fast math (Metal's default)
  metal_cpu_tensor_ops/tensor_ops_library.so   the source the Mac glue compiles at run time (tensor ops, family 10)
  symbols.json                    the public API, recorded by loading the variant through kernels (describe-api)
  emulated_build.json             the source digest of the checkout it was built from (the tests warn when stale)

It builds from build/.stage, a copy of only what kernel-builder sees (scripts/build_manifest.py): the files build.toml
lists, its include directories, the Python package. A source the listed files include but build.toml does not list
fails here as it would on the Mac. metal_launch.mm is replaced by msl/cpu/launch_cpu.cpp (the emulator's launcher).

Usage: python scripts/build_emulated.py [--jobs N]. Object files are cached in build/.cache by content hash.
"""

import argparse
import concurrent.futures
import fcntl
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
METAL_CPU = ROOT / "msl" / "cpu"
CACHE = ROOT / "build" / ".cache"
STAGE = ROOT / "build" / ".stage"

# Run as a file (python3 scripts/build_emulated.py): the repository root on the path, for the msl package.
sys.path.insert(0, str(ROOT))

from scripts import build_manifest  # noqa: E402


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


def host_sources(m: build_manifest.Manifest):
    """C++ sources of the extension: the listed .cpp files (bindings, planners) from the stage, and the emulator's
    launcher in place of the listed Objective-C++ (metal_launch.mm)."""
    return [*(STAGE / p for p in m.sources(".cpp")), METAL_CPU / "launch_cpu.cpp"]


def content_hash(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(set(paths)):
        h.update(p.relative_to(ROOT).as_posix().encode())
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


def compile_object(src: Path, flags, headers, obj_dir: Path) -> Path:
    # Keyed by the flags, the source and every header it can include.
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


def build_extension(m: build_manifest.Manifest, out: Path, namespace: str, jobs: int) -> None:
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
        *[f for d in m.include_dirs() for f in ("-I", str(STAGE / d))],  # build.toml's include directories
        "-I", str(METAL_CPU),
        "-isystem", sysconfig.get_paths()["include"],
    ]
    headers = [*(STAGE / p for p in m.sources(".h")), *(METAL_CPU / "runtime").glob("*.h")]
    for p in include_paths():
        flags += ["-isystem", p]
    obj_dir = CACHE / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        # Only the binding names the op namespace: the other objects survive a rename.
        objs = list(pool.map(
            lambda s: compile_object(
                s, flags + ([f"-DTORCH_EXTENSION_NAME={namespace}"] if s.name == "torch_binding.cpp" else []),
                headers, obj_dir),
            host_sources(m)))
    target = out / f"{namespace}.so"
    cmd = [cxx(), "-shared", "-fPIC", *map(str, objs), "-o", str(target),
           "-L", str(out), "-lmetal_cpu", "-Wl,-rpath,$ORIGIN",
           "-L", str(torch_lib), "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{torch_lib}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"linking {target} failed:\n{' '.join(cmd)}\n{r.stderr}")


def build_kernels(m: build_manifest.Manifest, out: Path, jobs: int) -> None:
    from msl import cpu as metal_cpu

    kdir = out / "metal_cpu_kernels"
    kdir.mkdir(parents=True, exist_ok=True)
    # kernel-builder hands each [kernel.*] section's .metal files to the Metal compiler with that section's includes.
    jobs_list = [(STAGE / p, [str(STAGE / d) for d in s.include])
                 for s in m.sections if s.name.startswith("kernel.") for p in s.src if p.endswith(".metal")]

    def one(job) -> None:
        metal, include_dirs = job
        # Compiled once per preprocessed source (the emulator's cache), then copied into the variant.
        so = metal_cpu.compiler.compile_cached(metal, include_dirs=include_dirs, fast_math=True)
        shutil.copyfile(so, kdir / f"{metal.stem}.so")

    metals = [metal for metal, _ in jobs_list]
    stems = [metal.stem for metal in metals]
    dupes = {s for s in stems if stems.count(s) > 1}
    if dupes:
        sys.exit(f"every .metal basename must be unique: {sorted(dupes)}")
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, jobs_list))
    # The tensor-ops library, from the one source the Mac glue compiles at run time (no include directories: the
    # source must stand alone), as a library of its own (msl/cpu/launch_cpu.cpp).
    src = CACHE / "tensor_ops_library.metal"
    src.parent.mkdir(parents=True, exist_ok=True)
    text = build_manifest.tensor_ops_source(STAGE)
    if not src.exists() or src.read_text() != text:
        src.write_text(text)
    tdir = out / "metal_cpu_tensor_ops"
    tdir.mkdir(parents=True, exist_ok=True)
    so = metal_cpu.compiler.compile_cached(src, include_dirs=[], fast_math=True)
    shutil.copyfile(so, tdir / "tensor_ops_library.so")


def write_python(m: build_manifest.Manifest, out: Path, namespace: str) -> None:
    for py in sorted((STAGE / "torch-ext" / m.package).glob("*.py")):
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


def write_metadata(out: Path, namespace: str, digest=None) -> None:
    metadata = {
        "id": namespace,
        "name": "metal-flash-sdpa",
        "version": package_version(),
        "license": "apache-2.0",
        "python-depends": [],
        "backend": {"type": "cpu"},
        "build-layout": "files",
    }
    if digest is not None:
        metadata["digest"] = digest
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")


# Run in a fresh interpreter on the finished variant: load it the way kernel-builder's get_kernel check does (through
# kernels, from the variant directory) and record the public functions and layers `kernels describe-api` reads
# (schema_version 1: {"functions": [{"name"}], "layers": [{"name", "attributes": {has_backward, can_torch_compile}}]}).
_SYMBOLS_SCRIPT = r"""
import inspect, json, sys
from pathlib import Path
import kernels, torch
variant = Path(sys.argv[1])
try:
    module = kernels.get_local_kernel(variant)
except TypeError:  # kernels < 0.19: get_local_kernel(repo_path, package_name)
    module = kernels.get_local_kernel(variant, sys.argv[2])
names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
functions = []
for name in sorted(names):
    obj = getattr(module, name)
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        try:
            signature = str(inspect.signature(obj))
        except (TypeError, ValueError):
            signature = None
        functions.append({"name": name, "signature": signature})
layers = []
layer_module = getattr(module, "layers", None)
for name, obj in sorted(vars(layer_module).items() if layer_module is not None else []):
    if inspect.isclass(obj) and issubclass(obj, torch.nn.Module) and not name.startswith("_"):
        layers.append({"name": name, "attributes": {a: getattr(obj, a, None)
                                                     for a in ("has_backward", "can_torch_compile")}})
symbols = {"schema_version": 1, "functions": functions, "layers": layers}
(variant / "symbols.json").write_text(json.dumps(symbols, indent=2) + "\n")
"""


def write_symbols(out: Path, package: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("LOCAL_KERNELS", None)
    r = subprocess.run([sys.executable, "-c", _SYMBOLS_SCRIPT, str(out), package], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        sys.exit(f"loading the new variant through kernels (for symbols.json) failed:\n{r.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()

    from msl import cpu as metal_cpu

    # What kernel-builder would see: build.toml's list, checked, then copied alone into the stage.
    manifest = build_manifest.read(ROOT)
    problems = build_manifest.unresolved_includes(manifest)
    if problems:
        sys.exit("build.toml does not list files that its sources include (kernel-builder copies only listed files, "
                 "so the Mac build would fail):\n  " + "\n  ".join(problems))
    (ROOT / "build").mkdir(exist_ok=True)
    with open(ROOT / "build" / ".stage.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one stage: concurrent builds take turns
        build_manifest.stage(manifest, STAGE)
        build(manifest, metal_cpu, args.jobs)


def build(manifest: build_manifest.Manifest, metal_cpu, jobs: int) -> None:
    # The op namespace is unique per native source tree, so two builds can be loaded side by side.
    tree = [*(STAGE / p for p in manifest.listed), METAL_CPU / "launch_cpu.cpp", *(METAL_CPU / "runtime").iterdir()]
    tree_hash = content_hash([p for p in tree if p.is_file()])
    namespace = f"_metal_flash_sdpa_{tree_hash[:10]}"

    # Built beside the variant and swapped in at the end: a process loading build/ never sees half a variant.
    final = ROOT / "build" / variant_name()
    out = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    metal_cpu.build_runtime(out)
    build_kernels(manifest, out, jobs)
    build_extension(manifest, out, namespace, jobs)
    write_python(manifest, out, namespace)
    (out / "emulated_build.json").write_text(json.dumps(
        {"source-digest": build_manifest.source_digest(ROOT), "staged-from": "build.toml"}, indent=2) + "\n")
    write_metadata(out, namespace)
    write_symbols(out, manifest.package)
    # Last: the digest of every file (what kernels >= 0.19 verifies on load), then the metadata that records it.
    write_metadata(out, namespace, build_manifest.variant_digest(out))
    old = final.with_name(f".{final.name}.{os.getpid()}.old")
    if final.exists():
        os.replace(final, old)
    os.replace(out, final)
    shutil.rmtree(old, ignore_errors=True)
    print(f"built {final.relative_to(ROOT)} (ops namespace {namespace})")


if __name__ == "__main__":
    main()
