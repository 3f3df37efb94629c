"""CI (no GPU): the CUDA target of the pre-pass builds PTX for every kernel of the project's .metal files and the
emulator's feature kernels, with entry points and metadata that match the kernels' signatures."""

import json
import re

import pytest

from msl.cpu.compiler import entry_points
from msl.frontend import prepass, preprocess

from . import targets


@pytest.fixture(scope="module")
def built():
    return targets.build_all()


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_ptx_builds(built, name):
    path = built[name]
    manifest = json.loads((path / "manifest.json").read_text())
    src, inc = targets.TARGETS[name]
    pre = prepass(preprocess(src, [str(d) for d in inc], {}), target="cuda")
    assert sorted(manifest["kernels"]) == sorted(k[0] for k in pre.kernels)
    for host, callee, kd in pre.kernels:
        info = manifest["kernels"][host]
        ptx = (path / info["ptx"]).read_text()
        assert re.search(r"\.target sm_90\b", ptx)
        assert re.search(r"\.visible \.entry " + re.escape(info["symbol"]) + r"\(", ptx), host
        # Everything is defined in the module: no libdevice or libc call is left for the driver to resolve.
        assert ".extern .func" not in ptx, f"{host}: unresolved external function in the PTX"
        assert [p["name"] for p in info["params"]] == [p.name for p in kd.params]
        for p, q in zip(info["params"], kd.params):
            if q.kind in ("buffer", "threadgroup"):
                assert p["kind"] == q.kind and 0 <= p["index"] < 31
                if q.index.isdigit():
                    assert p["index"] == int(q.index)
        assert info["max_threads"] == kd.max_threads


def test_named_indices_resolve(built):
    """Buffer and function-constant indices given as named constants are resolved by the compiler."""
    m = json.loads((built["features"] / "manifest.json").read_text())
    fc = {f["name"]: f for f in m["kernels"]["function_constants"]["function_constants"]}
    assert (fc["use_scale"]["index"], fc["scale_value"]["index"], fc["offset_value"]["index"]) == (0, 1, 2)
    assert fc["scale_value"]["type"] == "float" and fc["offset_value"]["type"] == "int"
    assert m["kernels"]["function_constants"]["params"][0] == {"name": "out", "kind": "buffer", "index": 0}


def test_decode_kernel_keeps_state_in_registers(built):
    """The paged decode kernel's per-lane arrays (o[R][D/32], s, pr, the staged K registers...) must not spill to
    local memory, at every row tile R of D = 128 and the largest of D = 256: the benchmark would then measure clang's
    unroller, not the kernel."""
    path = built["paged_decode_attention"]
    for dtype in ("float16", "bfloat16", "float32"):
        for name in [f"d128_r{r}" for r in (1, 2, 4, 8, 16)] + ["d256_r8"]:
            ptx = (path / f"mcu_paged_decode_{dtype}_{name}.ptx").read_text()
            depot = [int(x) for x in re.findall(r"__local_depot\d+\[(\d+)\]", ptx)]
            assert max(depot, default=0) <= 16, f"{dtype} {name}: {depot} bytes of local memory"


def test_cpu_prepass_unchanged():
    """target='cpu' still gets the emulator's per-threadgroup allocations and, from msl.cpu, its entry points."""
    src, inc = targets.TARGETS["features"]
    text = preprocess(src, [str(d) for d in inc], {})
    cpu, cuda = prepass(text, target="cpu"), prepass(text, target="cuda")
    assert "mcpu_library" in entry_points(cpu) and "mcpu_threadgroup_alloc" in cpu.source
    assert "mcpu_threadgroup_alloc" not in cuda.source and "__shared__" in cuda.source
    assert "static bool mcpu_fc_defined_use_scale" in cpu.source
    assert "__constant__ bool mcpu_fc_defined_use_scale" in cuda.source
    with pytest.raises(ValueError):
        prepass(text, target="vulkan")
