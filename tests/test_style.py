"""Style is checked where the tests run: ruff over the Python (ruff.toml) and clang-format over the C++,
Objective-C++ and MSL sources (.clang-format). scripts/setup.sh installs both; elsewhere the checks skip with that
reason."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.kernels_ci


def _tracked(*patterns):
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in out.stdout.split() if not f.startswith("tests/objc_check/stubs/")]


def test_ruff():
    try:
        import ruff  # noqa: F401
    except ImportError:
        pytest.skip("ruff is not installed (bash scripts/setup.sh)")
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_clang_format():
    exe = shutil.which("clang-format-19")
    if exe is None:
        pytest.skip("clang-format-19 is not installed (bash scripts/setup.sh)")
    files = _tracked("*.h", "*.cpp", "*.mm", "*.metal")
    run = subprocess.run([exe, "--dry-run", "--Werror", *files], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, "run clang-format-19 -i on these files:\n" + run.stderr[-4000:]
