"""The emulator on AArch64 Linux (a Linux container on an Apple-Silicon Mac, where this package's users are): its fiber
context switch, runtime and MSL shim compile for aarch64-linux-gnu. CI is x86-64, so this is a compile check with
clang's --target against Debian's arm64 cross headers (scripts/setup.sh installs them); the x86-64 build runs the
whole suite."""

import subprocess
from pathlib import Path

import pytest

from msl import cpu as metal_cpu
from msl import frontend
from msl.cpu import compiler

HERE = Path(__file__).resolve().parent
RUNTIME = Path(compiler.__file__).resolve().parent / "runtime"
TARGET = ["--target=aarch64-linux-gnu"]
HAVE_CROSS_HEADERS = Path("/usr/aarch64-linux-gnu/include/stdio.h").exists()

pytestmark = [pytest.mark.kernels_ci,
              pytest.mark.skipif(not HAVE_CROSS_HEADERS, reason="needs libc6-dev-arm64-cross and "
                                 "libstdc++-12-dev-arm64-cross (bash scripts/setup.sh)")]


def _clang(*args, cwd=None):
    run = subprocess.run([compiler.clang(), *TARGET, *args], capture_output=True, text=True, cwd=cwd)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def test_fiber_switch_assembles(tmp_path):
    """The AArch64 context switch (top-level assembly) and frame builder assemble; the object is AArch64 code."""
    src = tmp_path / "fiber_probe.cpp"
    src.write_text('#include "fiber.h"\nvoid entry() {}\nvoid* probe(char* top) { return mcpu_fiber_frame(top, '
                   "&entry); }\n")
    obj = tmp_path / "fiber_probe.o"
    _clang("-ffreestanding", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-I", str(RUNTIME), "-c",
           str(src), "-o", str(obj))
    assert obj.read_bytes()[18] == 183  # ELF e_machine = EM_AARCH64


def test_runtime_compiles():
    _clang("-std=c++17", "-O2", "-fPIC", "-Wall", "-Wextra", "-Werror", "-I", str(RUNTIME), "-c",
           str(RUNTIME / "runtime.cpp"), "-o", "/dev/null")


@pytest.mark.parametrize("fast_math", [True, False])
def test_kernels_compile(tmp_path, fast_math):
    """A kernel file through the emulator's own front end and shim (fast math: the FPCR flush-to-zero mode)."""
    pre = frontend.prepass(frontend.preprocess(HERE / "kernels" / "fast_math.metal", [], {}), "cpu")
    src = tmp_path / "kernel.mcpu.cpp"
    src.write_text(pre.source + compiler.entry_points(pre))
    math = ["-ffast-math", "-DMCPU_FAST_MATH"] if fast_math else []
    _clang(*compiler.COMMON_FLAGS, *math, "-O1", "-fPIC", f'-DMCPU_SOURCE_PATH="{src}"', "-include",
           str(compiler.SHIM), "-c", str(src), "-o", str(tmp_path / "kernel.o"))


def test_x86_64_still_runs():
    """The same fiber header drives this machine's runtime: a dispatch with barriers switches between fibers."""
    lib = metal_cpu.compile(HERE / "kernels" / "planted_bugs.metal")
    import torch

    x, y = torch.randn(64), torch.zeros(64)
    lib.dispatch("barrier_ok", (1, 1, 1), (64, 1, 1), buffers={0: x, 1: y})
    assert torch.equal(y, x.flip(0))
