"""The tensor-ops backward (flash_sdpa/attention_backward_tensor_ops.h: dK/dV and dQ on Metal 4 matmul2d), emulated.

Each case runs the launch plan the backward planner makes with tensor_ops on (the C++ planner as a CPU torch extension,
tests/metal_cuda/planner_ext.py): the delta pre-pass from the metallib's attention_backward.metal, the dK/dV and dQ
passes from the tensor-ops library (tensor_ops_library.h), so the kernels are checked against the simdgroup passes'
contract: same buffers, params, function constants and grid order. The forward's out and LSE come from the float64
reference. Gradients (dq, dk, dv, and d s_aux with sinks) against float64 autograd through tests/reference.py under
FlashAttention's rule: max|g - g_ref| <= 3 * max|g_torch - g_ref| + 1e-5, g_torch being the same math in the input
dtype. Every case runs under two emulator schedules whose seeds give the cooperative tensors different element
ownership (msl/README.md, "Tensor operations").
"""

import zlib

import pytest
import reference as ref
import torch

# The dtypes, the two schedules (seeds that move cooperative-tensor ownership) and the library are the forward tests'.
from test_tensor_ops_attention import DTYPES, KERNELS, ROOT, SCHEDULE_IDS, SCHEDULES, cu

from msl import cpu as metal_cpu


@pytest.fixture(scope="module")
def lib():
    return metal_cpu.compile(KERNELS, include_dirs=[str(ROOT / "flash_sdpa")])


@pytest.fixture(scope="module")
def planner():
    from tests.metal_cuda import planner_ext

    return planner_ext.load()


@pytest.fixture(scope="module")
def metallib(tmp_path_factory):
    """The delta pre-pass the tensor-ops plan keeps from the metallib: attention_backward.h's flash_attn_bwd_delta under
    attention_backward.metal's names, alone (its simdgroup passes, tested by test_backward.py, would cost a compile)."""
    src = tmp_path_factory.mktemp("delta") / "backward_delta.metal"
    src.write_text('#include "attention_backward.h"\n' + "".join(
        f'template [[host_name("flash_attn_bwd_delta_{name}")]] [[kernel]] '
        f"decltype(flash_attn_bwd_delta<{t}>) flash_attn_bwd_delta<{t}>;\n"
        for t, name in (("float", "float32"), ("half", "float16"), ("bfloat", "bfloat16"))))
    return metal_cpu.compile(src, include_dirs=[str(ROOT / "flash_sdpa")])


def run_plan(libs, plan, sched):
    for d in plan:
        lib = libs[0] if d["tensor_ops_library"] else libs[1]
        lib.dispatch(d["kernel"], d["threadgroups"], d["threads_per_threadgroup"], buffers=dict(d["buffers"]),
                     bytes=dict(d["bytes"]), constants={i: bits != 0 for i, _, bits in d["constants"]}, **sched)


def check_grad(g, g_ref, g_same, what):
    """FlashAttention's rule; returns max|g - g_ref|."""
    assert torch.isfinite(g).all(), f"{what}: non-finite gradient"
    err = (g.double() - g_ref).abs().max().item()
    base = (g_same.double() - g_ref).abs().max().item()
    assert err <= 3 * base + 1e-5, f"{what}: max error {err:.3g} > 3 * {base:.3g} + 1e-5 (torch in the dtype)"
    return err


def grads(fn, tensors, dout, dtype):
    """(out, [grads]) of fn(*leaves) in `dtype` (None entries stay None)."""
    leaves = [None if t is None else t.detach().clone().to(dtype).requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(dout.to(dtype))
    return out, [None if t is None else t.grad for t in leaves]


def bwd_case(libs, planner, sched, lens_q, lens_k, *, H=2, Hkv=1, D=64, dtype=torch.float16, causal=False,
             window=(-1, -1), softcap=0.0, alibi=False, sinks=False, extra_rows=0, strided=False, seed=0, inputs=None,
             check=True, max_seqlen=None):
    """flash_attn_varlen_func's backward (q/dout [total_q + extra_rows, H, D], k/v [total_k, Hkv, D]) on the tensor-ops
    plan; checked against the reference unless check is False. strided: q/k/v are head slices of one packed qkv tensor
    and dout a head slice of a wider one ("unaligned": every input's rows start at odd elements). Returns (dq, dk, dv,
    dsinks)."""
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q) + extra_rows, sum(lens_k)
    if inputs is not None:
        q, k, v, dout = inputs
    elif strided == "unaligned":  # rows start off multiples of 4 elements: the one-element staging loops
        q, k, v, dout = (torch.randn(rows, heads, D + 1, generator=g).to(dtype)[:, :, 1:]
                         for rows, heads in ((tq, H), (tk, Hkv), (tk, Hkv), (tq, H)))
    elif strided:
        qkv = torch.randn(max(tq, tk), H + 2 * Hkv, D, generator=g).to(dtype)
        q, k, v = qkv[:tq, :H], qkv[:tk, H:H + Hkv], qkv[:tk, H + Hkv:]
        dout = torch.randn(tq, H + 1, D, generator=g).to(dtype)[:, 1:]
    else:
        q = torch.randn(tq, H, D, generator=g).to(dtype)
        k = torch.randn(tk, Hkv, D, generator=g).to(dtype)
        v = torch.randn(tk, Hkv, D, generator=g).to(dtype)
        dout = torch.randn(tq, H, D, generator=g).to(dtype)
    slopes = 0.05 + 0.4 * torch.rand(len(lens_q), H, generator=g) if alibi else None  # [B, H]
    s_aux = torch.randn(H, generator=g) if sinks else None
    cq, ck = cu(lens_q), cu(lens_k)
    scale = D**-0.5
    kw = dict(scale=scale, causal=causal, window=window, softcap=softcap, alibi_slopes=slopes)
    out_ref, lse_ref = ref.attention_varlen(q.double(), k.double(), v.double(), cq, ck, sinks=s_aux, **kw)
    out = out_ref.to(dtype)
    lse = lse_ref.float()
    dq = torch.full((tq, H, D), 7.0, dtype=dtype)  # rows past cu_seqlens_q[-1] must stay untouched
    dk = torch.zeros(tk, Hkv, D, dtype=dtype)
    dv = torch.zeros(tk, Hkv, D, dtype=dtype)
    dsinks = torch.zeros(H if sinks else 0)
    delta = torch.zeros(H, tq)
    left, right = (window[0], 0) if causal else window
    plan = planner.plan_backward(dout, q, k, v, out, lse, delta, dq, dk, dv, dsinks, cq, ck, slopes, s_aux,
                                 *(max_seqlen or (max(lens_q + [1]), max(lens_k + [1]))), scale, softcap, left, right,
                                 gpu_cores=0, tensor_ops=True)
    kernels = [d["kernel"] for d in plan]
    assert kernels[0].startswith("flash_attn_bwd_delta_") and all("_tops_" in name for name in kernels[1:]), kernels
    run_plan(libs, plan, sched)
    n = sum(lens_q)
    assert (dq[n:] == 7.0).all(), "rows past cu_seqlens_q[-1] were written"
    if check:
        def fn(dt):
            return lambda q_, k_, v_, s_: ref.attention_varlen(q_, k_, v_, cq, ck, sinks=s_, dtype=dt, **kw)[0]

        tensors = (q, k, v, s_aux)
        _, g_ref = grads(fn(torch.float64), tensors, dout, torch.float64)
        _, g_same = grads(fn(dtype), tensors, dout, dtype)
        for name, mine, r, s in zip(("dq", "dk", "dv"), (dq[:n], dk, dv), g_ref, g_same):
            check_grad(mine, r[:mine.shape[0]], s[:mine.shape[0]], name)
        if sinks:
            check_grad(dsinks, g_ref[3], g_same[3], "ds_aux")
    return dq, dk, dv, dsinks


# Ragged lengths, none a multiple of the 16- or 32-row tiles; a sequence of 1 query and one of 0.
LENS_Q = [1, 37, 0, 70]
LENS_K = [9, 37, 5, 83]


@pytest.fixture(scope="module")
def libs(lib, metallib):
    return (lib, metallib)


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
def test_varlen(libs, planner, dtype, causal, sched):
    bwd_case(libs, planner, sched, LENS_Q, LENS_K, D=64, dtype=dtype, causal=causal, extra_rows=3,
             seed=zlib.crc32(f"{dtype}{causal}".encode()) % 1000)


FEATURES = {
    "window": dict(window=(20, 6)),
    "causal_window": dict(causal=True, window=(16, -1)),
    "softcap": dict(softcap=5.0, causal=True),
    "alibi": dict(alibi=True, causal=True),
    "sinks": dict(sinks=True),
    "gqa4": dict(H=8, Hkv=2, causal=True),
    "strided": dict(strided=True, H=3, Hkv=1, causal=True),
    "unaligned": dict(strided="unaligned", H=2, Hkv=2, window=(9, 4)),
    "all": dict(H=4, Hkv=2, causal=True, window=(30, -1), softcap=8.0, alibi=True, sinks=True),
}


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_features(libs, planner, feature, sched):
    dtype = torch.bfloat16 if feature in ("alibi", "all", "strided") else torch.float16
    bwd_case(libs, planner, sched, LENS_Q, LENS_K, D=64, dtype=dtype, seed=zlib.crc32(feature.encode()) % 1000,
             **FEATURES[feature])


# The other tile shapes (backward_params.h, bwd_tops_*): (BT, BS, NBUF) = (32, 16, 2) at half D = 128 / float D = 64,
# (16, 16, 2) at float D = 96, (16, 16, 1) (Q / dO and K / V staged in turn) at half / bfloat D = 256 and float
# D = 128; (32, 32, 2) at D = 32. Each with every option at once.
HEAD_DIMS = [(torch.float32, 32), (torch.float32, 64), (torch.float16, 96), (torch.bfloat16, 128), (torch.float32, 96),
             (torch.float32, 128), (torch.float16, 256), (torch.bfloat16, 256)]


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("dtype,D", HEAD_DIMS, ids=lambda x: DTYPES.get(x, x))
def test_head_dims(libs, planner, dtype, D, sched):
    lens_q, lens_k = [37, 5], [45, 5]
    bwd_case(libs, planner, sched, lens_q, lens_k, H=4, Hkv=2, D=D, dtype=dtype, causal=True, window=(24, -1),
             softcap=5.0, alibi=True, sinks=True, extra_rows=1, seed=D)


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_dense(libs, planner, dtype, sched):
    """Dense mode (flash_attn_func's layout: q [B, Sq, H, D], k/v [B, Sk, Hkv, D], lse [B, H, Sq]), causal with more
    keys than queries, GQA 2."""
    B, Sq, Sk, H, Hkv, D = 2, 45, 61, 4, 2, 64
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, Sq, H, D, generator=g).to(dtype)
    k = torch.randn(B, Sk, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, Sk, Hkv, D, generator=g).to(dtype)
    dout = torch.randn(B, Sq, H, D, generator=g).to(dtype)
    kw = dict(scale=D**-0.5, causal=True)
    out_ref, lse_ref = ref.attention_dense(q.double(), k.double(), v.double(), **kw)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    plan = planner.plan_backward(dout, q, k, v, out_ref.to(dtype), lse_ref.float(), torch.zeros(B, H, Sq), dq, dk, dv,
                                 torch.empty(0), None, None, None, None, Sq, Sk, D**-0.5, 0.0, -1, 0, gpu_cores=0,
                                 tensor_ops=True)
    assert all("_tops_" in d["kernel"] for d in plan[1:])
    run_plan(libs, plan, sched)

    def fn(dt):
        return lambda q_, k_, v_: ref.attention_dense(q_, k_, v_, dtype=dt, **kw)[0]

    _, g_ref = grads(fn(torch.float64), (q, k, v), dout, torch.float64)
    _, g_same = grads(fn(dtype), (q, k, v), dout, dtype)
    for name, mine, r, s in zip(("dq", "dk", "dv"), (dq, dk, dv), g_ref, g_same):
        check_grad(mine, r, s, name)


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
def test_rows_without_keys(libs, planner, sched):
    """Rows that see no key (LSE -inf) have dq 0 and add nothing to dk, dv or d s_aux: a sequence with no keys, and a
    causal one with more queries than keys (its first 30 rows see nothing)."""
    dq, _, _, _ = bwd_case(libs, planner, sched, [3, 40], [0, 10], H=2, causal=True, sinks=True)
    assert (dq[:33] == 0).all()


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
def test_split_dispatches(libs, planner, sched, monkeypatch):
    """A backward the planner splits into interleaved dispatches (tile_offset / tile_stride): every key and query tile
    computed once, by the dispatch whose turn it is."""
    monkeypatch.setenv("METAL_FLASH_SDPA_COMMAND_BUFFER_FLOPS", "1e5")
    bwd_case(libs, planner, sched, [150], [150], causal=True, seed=11)


def test_max_seqlen_only_sizes_the_grid(libs, planner):
    """max_seqlen_q / max_seqlen_k below the longest sequence: the kernels loop over the query and key tiles past the
    grid (row_tile_slot); the same bits as with the exact values."""
    sched = SCHEDULES[1]
    exact = bwd_case(libs, planner, sched, [70, 3], [90, 9], H=4, Hkv=2, causal=True, sinks=True, seed=5)
    small = bwd_case(libs, planner, sched, [70, 3], [90, 9], H=4, Hkv=2, causal=True, sinks=True, seed=5,
                     max_seqlen=(2, 1), check=False)
    for a, b in zip(exact, small):
        assert torch.equal(a, b)


def test_non_finite(libs, planner):
    """attention_backward.h's NaN rules: a row whose forward LSE is NaN (it saw a NaN score: q row 10 of head 0, and
    the rows 18-22 whose window sees the NaN key 20) is inactive (dq 0, nothing added to dk / dv); the operands summed
    over rows are staged with non-finite elements as 0, so the NaN q row (summed by dK = dS^T Q) and the NaN key (by
    dQ = dS K, in the staged blocks of rows that do not see it) change no other gradient."""
    g = torch.Generator().manual_seed(4)
    S, H, D = 40, 2, 64
    q = torch.randn(S, H, D, generator=g).half()
    k = torch.randn(S, 1, D, generator=g).half()
    v = torch.randn(S, 1, D, generator=g).half()
    dout = torch.randn(S, H, D, generator=g).half()
    q[10, 0, 3] = float("nan")
    k[20, 0, 7] = float("nan")
    window = (2, 2)
    dq, dk, dv, _ = bwd_case(libs, planner, SCHEDULES[1], [S], [S], D=D, window=window, inputs=(q, k, v, dout),
                             check=False)
    inactive = torch.zeros(S, H, dtype=torch.bool)
    inactive[10, 0] = True
    inactive[18:23] = True
    for name, x in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(x).all(), f"{name}: non-finite"
    assert (dq[inactive] == 0).all() and (dk[20] == 0).all() and (dv[20] == 0).all()
    # The rest: the reference over the clean inputs with the inactive rows' dout 0 (they add nothing).
    q0, k0, d0 = q.clone(), k.clone(), dout.clone()
    q0[10, 0, 3] = 0
    k0[20, 0, 7] = 0
    d0[inactive] = 0

    def fn(dt):
        return lambda q_, k_, v_: ref.attention_varlen(q_, k_, v_, [0, S], [0, S], scale=D**-0.5, window=window,
                                                       dtype=dt)[0]

    _, g_ref = grads(fn(torch.float64), (q0, k0, v), d0, torch.float64)
    _, g_same = grads(fn(torch.float16), (q0, k0, v), d0, torch.float16)
    for name, mine, r, s in zip(("dq", "dk", "dv"), (dq, dk, dv), g_ref, g_same):
        check_grad(mine, r, s, name)


def test_deterministic_and_layout_independent(libs, planner):
    """The same call twice under one seed and under other seeds (other cooperative-tensor ownerships) gives the same
    bits: one writer per gradient element, a fixed summation order, nothing that depends on which thread holds what."""
    results = []
    for seed in (1, 1, 2, 3):
        sched = dict(schedule="random", seed=seed)
        results.append(bwd_case(libs, planner, sched, LENS_Q, LENS_K, H=4, Hkv=2, D=128, dtype=torch.bfloat16,
                                causal=True, sinks=True, seed=9, check=seed == 1))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def planted_library(tmp_path, right, wrong):
    """The fp16 D = 64 tensor-ops passes compiled from attention_backward_tensor_ops.h with `right` (found once)
    replaced by `wrong`."""
    text = (ROOT / "flash_sdpa" / "attention_backward_tensor_ops.h").read_text()
    assert text.count(right) == 1
    (tmp_path / "attention_backward_tensor_ops.h").write_text(text.replace(right, wrong))
    src = tmp_path / "planted_bwd_tops.metal"
    src.write_text('#include "attention_backward_tensor_ops.h"\n' + "".join(
        f'template [[host_name("flash_attn_bwd_{p}_tops_float16_d64")]] [[kernel]] '
        f"decltype(flash_attn_bwd_{p}_tops<half, 64>) flash_attn_bwd_{p}_tops<half, 64>;\n" for p in ("dkdv", "dq")))
    return metal_cpu.compile(src, include_dirs=[str(tmp_path), str(ROOT / "flash_sdpa")])


PLANT_RIGHT = "const auto idx = acc.get_multidimensional_index(i);"
# A thread's slots assumed to lie in one row (its first slot's): in bounds, wrong rows.
PLANT_WRONG = "auto idx = acc.get_multidimensional_index(i); idx[1] = acc.get_multidimensional_index(0)[1];"


def test_planted_layout_assumption(planner, metallib, tmp_path):
    """Planted bug: the gradient write assumes that a thread's slots of a destination cooperative tensor all lie in
    the row of its first slot, instead of asking each slot's index. The implementation's layout differs (the
    emulator's moves with the seed), so the gradient checks fail under either schedule."""
    planted = planted_library(tmp_path, PLANT_RIGHT, PLANT_WRONG)
    for sched in SCHEDULES:
        with pytest.raises(AssertionError, match="max error"):
            bwd_case((planted, metallib), planner, sched, LENS_Q, LENS_K, D=64, causal=True, seed=3)


BARRIER_RIGHT = """      threadgroup_barrier(mem_flags::mem_threadgroup);

      dq_op.run(tds, tk, dq_acc);"""
BARRIER_WRONG = """
      dq_op.run(tds, tk, dq_acc);"""


def test_planted_missing_barrier(planner, metallib, tmp_path):
    """Planted bug: the dQ pass reads dS (dQ += dS K) without the barrier after the elementwise step that writes it.
    The emulator reports the race."""
    planted = planted_library(tmp_path, BARRIER_RIGHT, BARRIER_WRONG)
    with pytest.raises(metal_cpu.MetalCPUError, match="threadgroup memory race"):
        bwd_case((planted, metallib), planner, SCHEDULES[1], LENS_Q, LENS_K, D=64, causal=True, seed=3)
