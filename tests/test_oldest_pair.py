"""The oldest supported pair (transformers 5.22.2 + kernels 0.17.2): the transformers tests once more, in the
.venv-oldest environment scripts/setup.sh creates (the same torch and build, the older packages), so that the
README's test command covers both ends of the supported range."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv-oldest" / "bin" / "python"
OLDEST = {"transformers": "5.22.2", "kernels": "0.17.2"}


@pytest.mark.skipif(not PYTHON.exists(), reason="no .venv-oldest: bash scripts/setup.sh creates it (Linux)")
def test_transformers_with_the_oldest_pair():
    versions = subprocess.run([str(PYTHON), "-c", "import importlib.metadata as m; "
                               "print(m.version('transformers'), m.version('kernels'))"],
                              capture_output=True, text=True, check=True).stdout.split()
    assert versions == [OLDEST["transformers"], OLDEST["kernels"]]
    r = subprocess.run([str(PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_transformers.py"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout.splitlines()[-1], r.stdout[-2000:]
