"""On a Mac, `python3 -m pytest tests` must collect every file and skip, with a reason, only what needs the Linux
toolchain (emulator, PTX build, clang-19). Checked here by collecting as a Mac would (METAL_FLASH_SDPA_PRETEND_MAC=1),
so that a new test file that imports or needs the toolchain unguarded fails in CI, not on a user's Mac."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _pytest(*args):
    env = dict(os.environ, METAL_FLASH_SDPA_PRETEND_MAC="1")
    return subprocess.run([sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider"], cwd=TESTS.parent, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.kernels_ci
@pytest.mark.skipif(sys.platform == "darwin", reason="on a Mac the real collection runs")
def test_collects_as_on_a_mac():
    run = _pytest("tests", "--collect-only", "-q")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert "collected" in summary and not re.search(r"\d+ errors?", summary), run.stdout[-3000:]


@pytest.mark.kernels_ci
@pytest.mark.skipif(sys.platform == "darwin", reason="on a Mac the real collection runs")
def test_toolchain_tests_skip_with_a_reason_on_a_mac():
    run = _pytest("tests/msl_cpu", "tests/metal_cuda/test_ptx_build.py", "tests/test_paged_kernels.py", "-q", "-rs",
                  "-m", "kernels_ci or not kernels_ci")
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-3000:]
    assert " passed" not in out and " failed" not in out and "skipped" in out, out[-3000:]
    assert "needs the Metal-on-CPU emulator and Debian's clang-19" in out
