"""The forward on Metal 4 tensor ops as the package runs it: the source the Mac glue compiles at run time, the choice
between it and the simdgroup_matrix forward (torch-ext/metal_flash_sdpa/_tensor_ops.py: GPU family, self-test,
METAL_FLASH_SDPA_TENSOR_OPS) and the routed calls, on the emulated build.

The emulated build models a GPU of Apple family METAL_FLASH_SDPA_EMULATED_GPU_FAMILY (default 9: no tensor-ops path)
and runs the tensor-ops library compiled from the glue's source (msl/cpu/launch_cpu.cpp);
METAL_FLASH_SDPA_EMULATED_TENSOR_OPS_LIBRARY swaps in another build of it, here one with a planted cooperative-tensor
layout bug: a GPU whose tensor-ops results are wrong, which the self-test must catch.
"""

import ctypes
import re
import warnings
from pathlib import Path

import dispatch_stats
import pytest
import reference as ref
import torch
from test_backward import check_grad, reference_grads

from msl import cpu as metal_cpu
from scripts import build_manifest

ROOT = Path(__file__).resolve().parent.parent
LENS_Q, LENS_K = [5, 40, 33], [9, 40, 70]  # a short, a whole-tile and a partial tile, more keys than queries


@pytest.fixture(autouse=True)
def emulated_only(device):
    if device.type != "cpu":
        pytest.skip("the emulated build's GPU family and library switches (on a Mac: tests on the real GPU)")


@pytest.fixture
def choose(kernel, monkeypatch):
    """choose(**env) -> whether the package's first forward picks tensor ops under these METAL_FLASH_SDPA_* variables
    (the process-wide choice is made again, and undone after the test)."""
    state = kernel._tensor_ops

    def run(**env):
        for name in ("TENSOR_OPS", "EMULATED_GPU_FAMILY", "EMULATED_TENSOR_OPS_LIBRARY"):
            monkeypatch.delenv(f"METAL_FLASH_SDPA_{name}", raising=False)
        for name, value in env.items():
            monkeypatch.setenv(f"METAL_FLASH_SDPA_{name}", str(value))
        kernel.ops.set_tensor_ops(False)
        state._decided = False
        state.select("cpu")
        return tensor_ops_on(kernel)

    yield run
    kernel.ops.set_tensor_ops(False)
    state._decided = False


def tensor_ops_on(kernel) -> bool:
    """Whether forwards run on the tensor-ops kernels now: the kernel a small varlen forward dispatches."""
    q, k, v, cu_q, cu_k = varlen_inputs(torch.float16, 64, seed=0)
    names = kernel_names(lambda: kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K)))
    assert len(names) == 1, names
    return names[0].startswith("flash_attn_varlen_tops_")


def kernel_names(fn):
    return [s.kernel.decode() for s in dispatch_stats.recorded(fn)]


def varlen_inputs(dtype, D, seed, H=4, Hkv=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(LENS_Q), H, D, generator=g).to(dtype)
    k = torch.randn(sum(LENS_K), Hkv, D, generator=g).to(dtype)
    v = torch.randn(sum(LENS_K), Hkv, D, generator=g).to(dtype)
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)  # noqa: E731
    return q, k, v, cu(LENS_Q), cu(LENS_K)


# ---- the run-time source ---------------------------------------------------------------------------------------


def test_embedded_files_in_include_order():
    """The glue embeds tensor_ops_library.h and every file it reaches, each after the files it includes (the
    assembled source drops the quoted includes), and nothing else."""
    files = build_manifest.tensor_ops_files(ROOT)
    assert files[-1] == "flash_sdpa/tensor_ops_library.h"
    reached, todo = set(), ["flash_sdpa/tensor_ops_library.h"]
    while todo:
        rel = todo.pop()
        if rel in reached:
            continue
        reached.add(rel)
        for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', (ROOT / rel).read_text(), re.M):
            if inc != "planner_common.h":  # attention_options.h's host half (#ifndef __METAL_VERSION__) only
                todo.append(f"flash_sdpa/{inc}")
                assert f"flash_sdpa/{inc}" in files[:files.index(rel)], f"{rel} includes {inc}, embedded after it"
    assert set(files) == reached


def test_source_stands_alone(tmp_path):
    """The assembled source compiles with no include directory and holds every kernel the routing names (the
    emulated build compiles the same text: scripts/build_emulated.py)."""
    src = tmp_path / "tensor_ops_library.metal"
    src.write_text(build_manifest.tensor_ops_source(ROOT))
    text = src.read_text()
    assert '#include "' not in text and "#pragma once" not in text
    lib = metal_cpu.compile(src, include_dirs=[])
    find = lib.runtime.lib.mcpu_find_kernel
    find.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_char_p]
    handles = (ctypes.c_void_p * 1)(lib.handle)
    for dtype in ("float32", "float16", "bfloat16"):
        for D in (32, 64, 96, 128) + ((256,) if dtype != "float32" else ()):
            for kernel in ("tops", "tops32"):
                assert find(handles, 1, f"flash_attn_varlen_{kernel}_{dtype}_d{D}".encode()) == 0, (kernel, dtype, D)


# ---- the choice ------------------------------------------------------------------------------------------------


def test_default_gpu_has_no_tensor_ops(kernel, choose):
    """An emulated M1-M4 (no family given): not supported, the simdgroup_matrix forward, nothing to warn about."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not choose()
    assert not kernel.ops.tensor_ops_supported()
    with pytest.raises(ValueError, match="no tensor-ops library"):
        kernel.ops.set_tensor_ops(True)


def test_family_10_self_tests_and_picks_tensor_ops(kernel, choose):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose(EMULATED_GPU_FAMILY=10)


def test_forced_off(choose):
    assert not choose(EMULATED_GPU_FAMILY=10, TENSOR_OPS=0)


def test_forced_on_without_support_warns(choose):
    with pytest.warns(UserWarning, match="no tensor-ops path"):
        assert not choose(TENSOR_OPS=1)


def test_unreadable_library_is_unsupported(choose, tmp_path):
    """A library that cannot be loaded (on a Mac: a compiler that rejects the source) leaves the simdgroup path."""
    assert not choose(EMULATED_GPU_FAMILY=10, EMULATED_TENSOR_OPS_LIBRARY=tmp_path / "missing.so")


def test_bad_setting_names_the_variable(choose):
    with pytest.raises(ValueError, match="METAL_FLASH_SDPA_TENSOR_OPS must be 0, 1 or auto"):
        choose(TENSOR_OPS="yes")


@pytest.fixture(scope="module")
def planted_library(tmp_path_factory):
    """The tensor-ops library with the routed kernel's O rescale assuming that a thread's first row-reduction slot
    holds the row of each of its O elements, instead of asking map_iterator or the row index: finite, wrong results
    under the emulator's layouts."""
    text = build_manifest.tensor_ops_source(ROOT)
    right = "o_acc[i] *= tops_row_value(o_acc, i, alpha, o_mapped, stage_x);"
    assert text.count(right) == 1
    src = tmp_path_factory.mktemp("planted") / "tensor_ops_library.metal"
    src.write_text(text.replace(right, "o_acc[i] *= alpha[0];"))
    return metal_cpu.compile(src, include_dirs=[]).path


def test_self_test_catches_a_wrong_library(kernel, choose, planted_library):
    """A GPU whose tensor-ops results are wrong: one warning, the simdgroup_matrix forward, correct results; forcing
    tensor ops (=1) skips the self-test and takes them anyway."""
    with pytest.warns(UserWarning, match="failed its self-test.*differs from the simdgroup_matrix forward"):
        assert not choose(EMULATED_GPU_FAMILY=10, EMULATED_TENSOR_OPS_LIBRARY=planted_library)
    check_varlen(kernel, torch.bfloat16, 64, causal=True)
    assert choose(EMULATED_GPU_FAMILY=10, EMULATED_TENSOR_OPS_LIBRARY=planted_library, TENSOR_OPS=1)


@pytest.fixture(scope="module")
def planted_backward_library(tmp_path_factory):
    """The tensor-ops library with the backward's gradient write assuming that a thread's slots of a destination
    cooperative tensor all lie in the row of its first slot (attention_backward_tensor_ops.h, bwd_tops_write): the
    forward right, the backward's dK/dV and dQ finite and wrong under the emulator's layouts."""
    text = build_manifest.tensor_ops_source(ROOT)
    right = "const auto idx = acc.get_multidimensional_index(i);"
    assert text.count(right) == 1
    src = tmp_path_factory.mktemp("planted_bwd") / "tensor_ops_library.metal"
    src.write_text(text.replace(right, "auto idx = acc.get_multidimensional_index(i); "
                                       "idx[1] = acc.get_multidimensional_index(0)[1];"))
    return metal_cpu.compile(src, include_dirs=[]).path


def test_self_test_catches_a_wrong_backward(kernel, choose, planted_backward_library):
    """A GPU whose tensor-ops forward is right and backward wrong: the self-test compares the backward too, so one
    warning and the simdgroup_matrix kernels."""
    with pytest.warns(UserWarning, match="failed its self-test.*d[qkv] differs from the simdgroup_matrix backward"):
        assert not choose(EMULATED_GPU_FAMILY=10, EMULATED_TENSOR_OPS_LIBRARY=planted_backward_library)


# ---- routed calls on tensor ops ----------------------------------------------------------------------------------


def check_varlen(kernel, dtype, D, causal, **options):
    q, k, v, cu_q, cu_k = varlen_inputs(dtype, D, seed=D)
    out, lse, _ = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K), causal=causal,
                                                return_attn_probs=True, **options)
    scale = D ** -0.5
    window = options.get("window_size", (-1, -1))
    out_ref, lse_ref = ref.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, scale=scale,
                                            causal=causal, window=window)
    out_same, _ = ref.attention_varlen(q, k, v, cu_q, cu_k, scale=scale, causal=causal, window=window, dtype=dtype)
    ref.check_close(out, out_ref, out_same)
    ref.check_lse(lse, lse_ref)


@pytest.mark.parametrize("dtype,D", [(torch.float16, 128), (torch.bfloat16, 256), (torch.float32, 32),
                                     (torch.bfloat16, 96)])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_on_tensor_ops(kernel, choose, dtype, D, causal):
    assert choose(EMULATED_GPU_FAMILY=10)
    names = kernel_names(lambda: check_varlen(kernel, dtype, D, causal, window_size=(24, 3) if causal else (-1, -1)))
    assert names == [f"flash_attn_varlen_tops_{str(dtype)[6:]}_d{D}"]


def test_dense_and_decode_routes(kernel, choose):
    """flash_attn_func's prefill takes tensor ops, its decode-shaped call keeps the decode kernel; a head dim the
    library lacks (80) keeps the simdgroup_matrix kernel; the backward's dK/dV and dQ passes take tensor ops too (their
    values: tests/test_tensor_ops_backward.py)."""
    assert choose(EMULATED_GPU_FAMILY=10)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 20, 4, 64, generator=g).half().requires_grad_()
    k, v = (torch.randn(2, 30, 2, 64, generator=g).half().requires_grad_() for _ in range(2))
    result = []
    names = kernel_names(lambda: result.append(kernel.flash_attn_func(q, k, v, causal=True)))
    assert names == ["flash_attn_varlen_tops_float16_d64"]
    out = result[0]
    out_ref, _ = ref.attention_dense(q.double(), k.double(), v.double(), scale=0.125, causal=True)
    out_same, _ = ref.attention_dense(q.detach(), k.detach(), v.detach(), scale=0.125, causal=True,
                                      dtype=torch.float16)
    ref.check_close(out, out_ref, out_same)
    names = kernel_names(lambda: out.sum().backward())
    assert names == ["flash_attn_bwd_delta_float16", "flash_attn_bwd_dkdv_tops_float16_d64",
                     "flash_attn_bwd_dq_tops_float16_d64"], names
    dout = torch.ones_like(out)

    def fn(dt):
        return lambda q_, k_, v_: ref.attention_dense(q_, k_, v_, scale=0.125, causal=True, dtype=dt)[0]

    _, grads_ref = reference_grads(fn(torch.float64), (q, k, v), dout, torch.float64)
    _, grads_pt = reference_grads(fn(torch.float16), (q, k, v), dout, torch.float16)
    for name, x, gr, gp in zip(("dq", "dk", "dv"), (q, k, v), grads_ref, grads_pt):
        check_grad(x.grad, gr, gp, name)
    assert kernel_names(lambda: kernel.flash_attn_func(q[:, :1].detach(), k.detach(), v.detach()))[0].startswith(
        "paged_decode_")
    q80 = torch.randn(1, 20, 4, 80, generator=g).half()
    k80 = torch.randn(1, 20, 2, 80, generator=g).half()
    assert kernel_names(lambda: kernel.flash_attn_func(q80, k80, k80)) == ["flash_attn_varlen_float16_d80"]
