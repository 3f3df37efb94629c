"""Metal 4.0, the language kernel-builder compiles with (-std=metal4.0): the emulator's pre-pass takes the 4.0 branch
of __METAL_VERSION__ tests and rejects pre-4.0-only constructs (msl/frontend.py, REMOVED_IN_METAL4, says from which
sources), while the project's kernels pass."""

from pathlib import Path

import pytest
import torch

from msl import cpu as metal_cpu
from msl import frontend
from scripts import build_manifest

ROOT = Path(__file__).resolve().parents[2]
PLANTED = Path(__file__).parent / "kernels" / "pre_metal4.metal"


def test_planted_async_copy_is_rejected_with_place_and_reason():
    line = next(i for i, s in enumerate(PLANTED.read_text().splitlines(), 1) if "PRE-METAL-4" in s)
    with pytest.raises(metal_cpu.MetalCompileError) as e:
        metal_cpu.compile(PLANTED)
    msg = str(e.value)
    assert "pre-Metal-4.0 construct" in msg and "-std=metal4.0" in msg, msg
    # The first use is the declaration above the kernel; the message names the file and a line of it.
    assert "__metal_simdgroup_async_copy_1d" in msg or "_simdgroup_event_t" in msg, msg
    assert "pre_metal4.metal:" in msg and int(msg.split("pre_metal4.metal:")[1].split(":")[0]) <= line, msg


@pytest.mark.parametrize("construct", sorted(frontend.REMOVED_IN_METAL4))
def test_every_removed_construct_is_rejected(construct):
    with pytest.raises(frontend.MetalCompileError, match=f"{construct} .*pre-Metal-4.0"):
        frontend.check_metal4(f"void f() {{ {construct}(0); }}")
    frontend.check_metal4(f"void f() {{ my_{construct}(0); x.{construct}(0); }}")  # other names pass


def test_metal_version_is_4_0(tmp_path):
    src = tmp_path / "version.metal"
    src.write_text("#include <metal_stdlib>\nusing namespace metal;\n"
                   "kernel void v(device uint* out [[buffer(0)]]) {\n"
                   "#if __METAL_VERSION__ >= 400\n  out[0] = __METAL_VERSION__;\n#else\n  out[0] = 1;\n#endif\n}\n")
    out = torch.zeros(1, dtype=torch.int32)
    metal_cpu.compile(src).dispatch("v", (1, 1, 1), (1, 1, 1), buffers={0: out})
    assert out.item() == frontend.METAL_VERSION == 400


@pytest.mark.kernels_ci
def test_project_kernels_pass_the_metal4_rules():
    m = build_manifest.read(ROOT)
    for section in m.sections:
        for rel in (p for p in section.src if p.endswith(".metal")):
            text = frontend.preprocess(ROOT / rel, [str(ROOT / d) for d in section.include], {})
            frontend.prepass(text, "cpu")  # raises on a pre-4.0 construct
