"""CI (no GPU): the proxy's simdgroup_matrix -> mma.sync lowering, checked on the host. mma_layout_check.cpp runs
the lane maps, the B join and the float split of msl/cuda/shim/simdgroup_layout.h (the header the NVPTX shim uses)
against a model of mma.sync written from the PTX ISA's fragment tables, and compares every 8x8 product with a plain
matmul: exact for half and bfloat, within a few fp32 roundings for the float split."""

import subprocess
from pathlib import Path

from msl.cuda import compiler
from msl.frontend import clang

HERE = Path(__file__).resolve().parent


def test_mma_lowering_matches_matmul(tmp_path):
    exe = tmp_path / "mma_layout_check"
    subprocess.run([clang(), "-x", "c++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror",
                    "-I", str(compiler.SHIM_LAYOUT.parent), str(HERE / "mma_layout_check.cpp"), "-o", str(exe),
                    "-lm"], check=True)
    r = subprocess.run([str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("ok (0 failures)"), r.stdout


def test_ptx_uses_tensor_cores_by_lowering(tmp_path):
    """One kernel per type pair: mode 1 issues mma.sync for half, bfloat and float fragments, mode 2 for half and
    bfloat only, mode 0 never."""
    src = tmp_path / "sgm.metal"
    src.write_text("""#include <metal_stdlib>
using namespace metal;
template <typename T>
kernel void sgm(device T* x [[buffer(0)]], device float* y [[buffer(1)]]) {
  simdgroup_matrix<T, 8, 8> a, b;
  simdgroup_matrix<float, 8, 8> c;
  simdgroup_load(a, x);
  simdgroup_load(b, x + 64, 8, ulong2(0, 0), true);
  simdgroup_load(c, y);
  simdgroup_multiply_accumulate(c, a, b, c);
  simdgroup_store(c, y);
}
template [[host_name("sgm_half")]] [[kernel]] decltype(sgm<half>) sgm<half>;
template [[host_name("sgm_bfloat")]] [[kernel]] decltype(sgm<bfloat>) sgm<bfloat>;
template [[host_name("sgm_float")]] [[kernel]] decltype(sgm<float>) sgm<float>;
""")
    expect = {0: set(), 1: {"half", "bfloat", "float"}, 2: {"half", "bfloat"}}
    for mode, on in expect.items():
        out = compiler.build(src, simdgroup_mma=mode, out_dir=tmp_path / f"mma{mode}")
        for t in ("half", "bfloat", "float"):
            ptx = (out / f"mcu_sgm_{t}.ptx").read_text()
            assert ("mma.sync" in ptx) == (t in on), (mode, t)
