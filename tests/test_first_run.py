"""What a newcomer runs before set-up ends with what to run, not a traceback: the example, the Mac report, the
decode benchmark's kernel loading."""

import os
import subprocess
import sys
from pathlib import Path

from benchmarks import cases, mac_report

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "generate_with_kernel.py"


def _run(args, env):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_example_without_a_build_says_what_to_run(tmp_path):
    env = dict(os.environ, LOCAL_KERNELS=f"{cases.REPO_ID}={tmp_path}", HF_HUB_OFFLINE="1")
    run = _run([str(EXAMPLE), "--prompts", "1", "--new-tokens", "1"], env)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert "could not load the kernel" in run.stderr and "bash scripts/setup.sh" in run.stderr, run.stderr


def test_example_without_packages_says_what_to_run():
    run = _run(["-S", str(EXAMPLE)], dict(os.environ))  # -S: no site-packages, so torch and transformers are absent
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "needs torch, transformers, kernels" in run.stderr and "bash scripts/setup.sh" in run.stderr, run.stderr


def test_mac_report_without_a_build_says_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_KERNELS", os.environ.get("LOCAL_KERNELS", ""))  # main() points it at --local
    assert mac_report.main(["--emulated", "--local", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"no usable build of {cases.REPO_ID} in {tmp_path / 'build'}" in err and "bash scripts/setup.sh" in err


def test_load_hints_name_the_remedy():
    hub = cases.load_hint(None, ValueError("no variant"))
    assert "macOS 26" in hub and "kernels >= 0.19" in hub and "no variant" in hub
    local = cases.load_hint(ROOT, FileNotFoundError("nothing"))
    assert "bash scripts/setup.sh" in local and "nix run .#build-and-copy" in local
