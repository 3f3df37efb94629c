"""Test setup: the kernel is loaded the way users load it, kernels.get_kernel, from this checkout's build/.

On a Mac the tests run the kernel-builder build on MPS; on Linux they run the emulated build (scripts/setup.sh
builds it) whose .metal kernels execute on the CPU through the Metal-on-CPU emulator (msl/cpu).

Options: `--full` (or METAL_FLASH_SDPA_FULL=1) runs the whole test matrix; by default a subset runs, and
`-m kernels_ci` selects a quick subset for iterating (about 1.5 minutes on two cores; CI runs the default set).

Tests of the toolchain itself (the Metal-on-CPU emulator, the CUDA proxy's PTX build, the kernels driven through the
emulator directly) need Linux x86-64 and Debian's clang-19: elsewhere, a Mac above all, they are skipped with that
reason and the package's tests run on MPS. METAL_FLASH_SDPA_PRETEND_MAC=1 collects as a Mac would (CI checks that the
Mac collection works, tests/test_mac_collection.py).
"""

import ctypes
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import pytest

from scripts import build_manifest

ROOT = Path(__file__).resolve().parent.parent
REPO_ID = "kernels-community/metal-flash-sdpa"
KERNEL_VERSION = 2  # build.toml [general] version

# Before huggingface_hub is imported: HF_HUB_OFFLINE is read once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LOCAL_KERNELS", f"{REPO_ID}={ROOT}")

import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False, help="run the full test matrix (slow)")


def pytest_configure(config):
    config.addinivalue_line("markers", "kernels_ci: a quick subset for iterating (about 1.5 minutes on two cores, not "
                            "under one); CI runs the default set")
    config.addinivalue_line("markers", "full: part of the full matrix only (--full or METAL_FLASH_SDPA_FULL=1)")


def pytest_report_header(config):
    """The stack under test (CI runs two: the newest and the oldest supported transformers + kernels pair)."""
    from importlib import metadata

    versions = []
    for dist in ("torch", "transformers", "kernels"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} missing")
    return "metal-flash-sdpa stack: " + ", ".join(versions) + f", Python {platform.python_version()}"


def full_matrix(config) -> bool:
    return config.getoption("--full") or os.environ.get("METAL_FLASH_SDPA_FULL", "0") == "1"


ON_MAC = sys.platform == "darwin" or os.environ.get("METAL_FLASH_SDPA_PRETEND_MAC", "0") == "1"
# What only the Linux toolchain can run (paths relative to tests/).
TOOLCHAIN_TESTS = ("msl_cpu/", "metal_cuda/test_ptx_build.py", "test_paged_kernels.py", "test_benchmark_report.py",
                   "test_tensor_ops_attention.py", "test_tensor_ops_backward.py")


def toolchain_missing() -> str:
    """Why the emulator / PTX toolchain cannot run here ("" when it can)."""
    if ON_MAC:
        return "needs the Metal-on-CPU emulator and Debian's clang-19 (Linux); on a Mac the package runs on MPS"
    if platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        return f"the Metal-on-CPU emulator's fibers exist for x86-64 and AArch64, this is {platform.machine()}"
    if not (os.environ.get("METAL_CPU_CLANG") or shutil.which("clang-19")):
        return "needs clang-19 (Debian packages clang-19 and libclang-rt-19-dev: bash scripts/setup.sh)"
    return ""


def pytest_collection_modifyitems(config, items):
    missing = toolchain_missing()
    if missing:
        skip = pytest.mark.skip(reason=missing)
        tests_dir = Path(__file__).resolve().parent
        for item in items:
            rel = Path(str(item.fspath)).resolve().relative_to(tests_dir).as_posix()
            if rel.startswith(TOOLCHAIN_TESTS):
                item.add_marker(skip)
    if full_matrix(config):
        return
    # Deselected rather than skipped: 16k skips would drown the report.
    kept = [item for item in items if "full" not in item.keywords]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if "full" in item.keywords])
        items[:] = kept


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


@pytest.fixture(scope="session")
def kernel():
    import kernels

    try:
        module = kernels.get_kernel(REPO_ID, version=KERNEL_VERSION)
    except FileNotFoundError as e:
        pytest.exit(f"no build of {REPO_ID} for this system in {ROOT / 'build'}: run `bash scripts/setup.sh`\n{e}", 2)
    # An emulated build older than the sources would test yesterday's kernels: say so (the tests still run).
    stale = build_manifest.stale_build(Path(module.__file__).parent, ROOT)
    if stale:
        warnings.warn(StaleBuildWarning(stale), stacklevel=1)
    return module


class StaleBuildWarning(UserWarning):
    """The emulated build under test was built from other sources than the checkout's."""


class _Options(ctypes.Structure):
    _fields_ = [("schedule", ctypes.c_uint32), ("seed", ctypes.c_uint64), ("check_races", ctypes.c_uint32)]


@pytest.fixture
def emulator(kernel):
    """Sets the Metal-on-CPU runtime options of the loaded emulated build: emulator(schedule=..., check_races=...),
    restored after the test. Skips on a Mac (real Metal)."""
    if torch.backends.mps.is_available() or ON_MAC:
        pytest.skip("real Metal: no emulator")
    lib_path = Path(kernel.__file__).parent / "libmetal_cpu.so"
    lib = ctypes.CDLL(str(lib_path))  # the instance the extension already loaded (same soname)
    lib.mcpu_get_options.argtypes = [ctypes.POINTER(_Options)]
    lib.mcpu_set_options.argtypes = [ctypes.POINTER(_Options)]
    saved = _Options()
    lib.mcpu_get_options(ctypes.byref(saved))
    schedules = {"forward": 0, "reverse": 1, "random": 2}

    def set_options(schedule="forward", seed=0, check_races=False):
        lib.mcpu_set_options(ctypes.byref(_Options(schedules[schedule], seed, int(check_races))))

    yield set_options
    lib.mcpu_set_options(ctypes.byref(saved))
