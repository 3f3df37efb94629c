#!/usr/bin/env python3
"""Compile-checks the Mac-only glue on Linux: every flash_sdpa/*.mm and torch-ext/torch_binding.cpp's Metal branch.

    python tests/objc_check/check.py [-v] [--mm FILE ...] [--binding FILE]

`clang-19 -fsyntax-only` against PyTorch's own headers (the CPU wheel ships ATen/mps/*.h) and the stub headers in
stubs/ (the Foundation / Metal / dispatch / MPS subset the glue and MPSStream.h use, declared from Apple's
documentation). The .mm files are Objective-C++ without ARC, as kernel-builder builds them; torch_binding.cpp is
C++ without METAL_FLASH_SDPA_EMULATED (its MPS branch). Warnings are errors: a misspelled selector is only a warning
in Objective-C ("instance method not found"). kernel-builder's embedded-metallib header is generated here in the
same shape (namespace <target>_metal, createLibrary(device, &error)) with EMBEDDED_METALLIB_HEADER/_NAMESPACE set.

Exit status 0 when everything compiles; the clang diagnostics otherwise.
"""

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[2]
STUBS = Path(__file__).resolve().parent / "stubs"
KERNEL_DIR = ROOT / "flash_sdpa"
TORCH_EXT = ROOT / "torch-ext"
METALLIB_NAMESPACE = "_metal_flash_sdpa_check_metal"

# What kernel-builder gives a torch-ext source: registration.h (op library + Python module init).
REGISTRATION_H = """#pragma once
#include <Python.h>
#define _CONCAT(A, B) A##B
#define CONCAT(A, B) _CONCAT(A, B)
#define _STRINGIFY(A) #A
#define STRINGIFY(A) _STRINGIFY(A)
#define TORCH_LIBRARY_EXPAND(NAME, MODULE) TORCH_LIBRARY(NAME, MODULE)
#define REGISTER_EXTENSION(NAME)                                                                   \\
  PyMODINIT_FUNC CONCAT(PyInit_, NAME)() {                                                         \\
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, STRINGIFY(NAME), nullptr, 0,    \\
                                        nullptr, nullptr, nullptr, nullptr, nullptr};              \\
    return PyModule_Create(&module);                                                               \\
  }
"""

# The shape of the header kernel-builder generates from the linked metallib (bytes replaced by a 4-byte stand-in).
METALLIB_H = """#pragma once
#include <cstddef>
#include <Metal/Metal.h>

namespace NAMESPACE {
static const unsigned char metallib_data[] = {0x4d, 0x54, 0x4c, 0x42};
static const size_t metallib_data_len = sizeof(metallib_data);

inline id<MTLLibrary> createLibrary(id<MTLDevice> device, NSError** error = nullptr) {
  dispatch_data_t data = dispatch_data_create(metallib_data, metallib_data_len, dispatch_get_main_queue(), ^{});
  NSError* local = nil;
  id<MTLLibrary> library = [device newLibraryWithData:data error:&local];
  if (error) {
    *error = local;
  }
  return library;
}
}  // namespace NAMESPACE
"""


def clang() -> str:
    for c in ("clang++-19", "clang-19", "clang++"):
        if shutil.which(c):
            return c
    raise FileNotFoundError("clang-19 not found (apt-get install clang-19)")


def torch_includes() -> List[str]:
    from torch.utils.cpp_extension import include_paths

    flags = []
    for p in include_paths():
        flags += ["-isystem", p]
    return flags


def common_flags(gen: Path) -> List[str]:
    import torch

    return [
        "-fsyntax-only",
        "-std=c++20",  # what kernel-builder builds host code (.cpp and .mm) with for torch >= 2.12
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
        "-Wall",
        "-Wextra",
        "-Wno-unused-parameter",
        "-Werror",
        "-I", str(STUBS),
        "-I", str(gen),
        "-I", str(KERNEL_DIR),
        "-I", str(TORCH_EXT),
        f"--embed-dir={KERNEL_DIR}",  # #embed resolves beside the including file, as kernel-builder builds it
        *torch_includes(),
        "-isystem", sysconfig.get_paths()["include"],
    ]


def objc_flags() -> List[str]:
    # Objective-C++ as on the Mac: Apple's runtime, blocks, no ARC (kernel-builder builds .mm files without it).
    return ["-x", "objective-c++", "-fobjc-runtime=macosx-14.0", "-fblocks", "-fno-objc-arc",
            f"-DEMBEDDED_METALLIB_HEADER=\"{METALLIB_NAMESPACE}.h\"",
            f"-DEMBEDDED_METALLIB_NAMESPACE={METALLIB_NAMESPACE}"]


def write_generated(gen: Path) -> None:
    gen.mkdir(parents=True, exist_ok=True)
    (gen / "registration.h").write_text(REGISTRATION_H)
    (gen / f"{METALLIB_NAMESPACE}.h").write_text(METALLIB_H.replace("NAMESPACE", METALLIB_NAMESPACE))


def compile_one(src: Path, flags: Sequence[str]) -> Tuple[bool, str]:
    cmd = [clang(), *flags, str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    return r.returncode == 0, r.stderr


def compile_all(mm_files: Sequence[Path], binding: Optional[Path], extra_flags: Sequence[str] = (),
                jobs: int = 2) -> List[Tuple[Path, bool, str, List[str]]]:
    """(source, ok, diagnostics, command) per file: each .mm as Objective-C++, the binding (if given) as C++."""
    with tempfile.TemporaryDirectory(prefix="objc_check_") as tmp:
        gen = Path(tmp)
        write_generated(gen)
        base = common_flags(gen)
        work = [(src, [*base, *objc_flags(), *extra_flags]) for src in mm_files]
        if binding is not None:
            work.append((binding, [*base, "-x", "c++", "-DTORCH_EXTENSION_NAME=_metal_flash_sdpa_check",
                                   *extra_flags]))
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = list(pool.map(lambda w: compile_one(*w), work))
    return [(src, ok, err, [clang(), *flags, str(src)]) for (src, flags), (ok, err) in zip(work, results)]


def run_check(mm_files: Optional[Sequence[Path]] = None, binding: Optional[Path] = None,
              extra_flags: Sequence[str] = (), verbose: bool = False, with_binding: bool = True) -> Tuple[bool, str]:
    """Compiles the .mm files (Objective-C++) and the binding's Metal branch (C++). Returns (ok, report)."""
    mm_files = sorted(KERNEL_DIR.glob("*.mm")) if mm_files is None else list(mm_files)
    binding = TORCH_EXT / "torch_binding.cpp" if binding is None else binding
    report, ok = [], bool(mm_files)
    if not mm_files:
        report.append(f"no .mm file in {KERNEL_DIR}")
    for src, good, err, cmd in compile_all(mm_files, binding if with_binding else None, extra_flags,
                                           jobs=min(2, os.cpu_count() or 1)):
        ok &= good
        name = src.relative_to(ROOT) if src.is_relative_to(ROOT) else src
        report.append(f"{'ok  ' if good else 'FAIL'} {name}")
        if err.strip() and (verbose or not good):
            report.append(err.rstrip())
        if verbose:
            report.append("  " + " ".join(cmd))
    return ok, "\n".join(report)


def glue_line_count(mm_files: Optional[Sequence[Path]] = None) -> int:
    mm_files = sorted(KERNEL_DIR.glob("*.mm")) if mm_files is None else mm_files
    return sum(len(p.read_text().splitlines()) for p in mm_files)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mm", type=Path, nargs="*", help="Objective-C++ files (default: flash_sdpa/*.mm)")
    parser.add_argument("--binding", type=Path, help="op binding (default: torch-ext/torch_binding.cpp)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the commands and any warnings")
    args = parser.parse_args()
    ok, report = run_check(args.mm, args.binding, verbose=args.verbose)
    print(report)
    mm = args.mm or sorted(KERNEL_DIR.glob("*.mm"))
    print(f"glue: {glue_line_count(mm)} lines in {', '.join(p.name for p in mm)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
