"""The tensor-op forward kernels (flash_sdpa/attention_tensor_ops.h: Metal 4 matmul2d, the M5 path) on the emulator.

flash_sdpa/tensor_ops_library.h instantiates them (the package compiles that library at run time on Apple family 10
and routes forwards to it: tests/test_tensor_ops_route.py). Each case runs the launch plan the varlen planner makes for
flash_attn_varlen_func (the C++ planner as a CPU torch extension, tests/metal_cuda/planner_ext.py): for the routed
kernel (flash_attn_varlen_tops, 64-row query tiles) the planner's tensor-ops plan, for the 32-row kernel kept to
compare (flash_attn_varlen_tops32) the simdgroup forward's plan with the kernel names changed; so each kernel is
checked against the varlen kernel's contract: same buffers, params, function constants and grid order. Results
against a float64 reference under FlashAttention's rule (max|out - ref| <= 2 * max|torch in the same dtype - ref| +
1e-5), LSE within 1e-3. Every case runs under two emulator schedules whose seeds give the cooperative tensors
different element ownership, and the row reductions and left inputs different layouts and answers (msl/README.md).
"""

import zlib
from pathlib import Path

import pytest
import reference as ref
import torch
from test_paged_varlen import make_paged

from msl import cpu as metal_cpu

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "flash_sdpa" / "tensor_ops_library.h"
DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
# The seed also moves which thread holds which element of a cooperative tensor, and the row reductions' layouts and
# the API's answers (msl/README.md, "Tensor operations"): seed 0 takes the 64-row kernels' threadgroup-memory paths
# (no row reduction maps onto O, and at 32-key tiles none onto S; P through threadgroup memory at 16 and 32 keys in
# half, D = 128 and the D-split), seed 157 their register paths (every row reduction maps; P converts at D = 64, 96,
# 128 and in the D-split).
SCHEDULES = [dict(schedule="forward", seed=0), dict(schedule="random", seed=157)]
SCHEDULE_IDS = ["forward", "random157"]


@pytest.fixture(scope="module")
def lib():
    return metal_cpu.compile(KERNELS, include_dirs=[str(ROOT / "flash_sdpa")])


@pytest.fixture(scope="module")
def planner():
    from tests.metal_cuda import planner_ext

    return planner_ext.load()


def cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def plan_for(planner, kernel, *args, **kw):
    """The plan of `kernel`: "tops" (the tensor-ops plan: the planner names the kernel) or "tops32" (the simdgroup
    forward's plan, each dispatch renamed to the 32-row tensor-op kernel of its dtype and head dim)."""
    plan = planner.plan_varlen(*args, **kw, tensor_ops=kernel == "tops")
    assert plan, "empty plan"
    for d in plan:
        if kernel == "tops":
            assert d["kernel"].startswith("flash_attn_varlen_tops_"), d["kernel"]
        else:
            assert d["kernel"].startswith("flash_attn_varlen_") and "tops" not in d["kernel"]
            d["kernel"] = d["kernel"].replace("flash_attn_varlen_", "flash_attn_varlen_tops32_", 1)
    return plan


def run_plan(lib, plan, sched):
    for d in plan:
        lib.dispatch(d["kernel"], d["threadgroups"], d["threads_per_threadgroup"], buffers=dict(d["buffers"]),
                     bytes=dict(d["bytes"]), constants={i: bits != 0 for i, _, bits in d["constants"]}, **sched)


def options(H, B, *, softcap=0.0, alibi=False, sinks=False, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    slopes = 0.05 + 0.4 * torch.rand(B, H, generator=g) if alibi else None  # [B, H]: per-sequence slopes
    s_aux = torch.randn(H, generator=g) if sinks else None
    return slopes, s_aux


def varlen_case(lib, planner, sched, lens_q, lens_k, *, H=2, Hkv=1, D=64, dtype=torch.float16, causal=False,
                window=(-1, -1), softcap=0.0, alibi=False, sinks=False, extra_rows=0, seed=0, strided=False,
                block_table=None, inputs=None, kernel="tops"):
    """flash_attn_varlen_func's plan (q [total_q + extra_rows, H, D], k/v [total_k, Hkv, D]) on the tensor-op kernel,
    checked against the reference. strided: q/k/v are head slices of one packed qkv tensor (row stride != H * D)."""
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q) + extra_rows, sum(lens_k)
    if inputs is not None:
        q, k, v, k_ref, v_ref = inputs
    elif strided:
        qkv = torch.randn(max(tq, tk), H + 2 * Hkv, D, generator=g).to(dtype)
        q, k, v = qkv[:tq, :H], qkv[:tk, H:H + Hkv], qkv[:tk, H + Hkv:]
        k_ref, v_ref = k, v
    else:
        q = torch.randn(tq, H, D, generator=g).to(dtype)
        k = torch.randn(tk, Hkv, D, generator=g).to(dtype)
        v = torch.randn(tk, Hkv, D, generator=g).to(dtype)
        k_ref, v_ref = k, v
    slopes, s_aux = options(H, len(lens_q), softcap=softcap, alibi=alibi, sinks=sinks, seed=seed)
    cq, ck = cu(lens_q), cu(lens_k)
    out = torch.full((tq, H, D), 7.0, dtype=dtype)  # rows past cu_seqlens_q[-1] must stay untouched
    lse = torch.full((H, tq), 7.0)
    scale = D**-0.5
    left, right = (window[0], 0) if causal else window
    plan = plan_for(planner, kernel, q, k, v, out, lse, cq, ck, slopes, s_aux, max(lens_q + [1]), scale, softcap,
                    left, right, block_table, 0)
    run_plan(lib, plan, sched)
    kw = dict(scale=scale, causal=causal, window=window, softcap=softcap, alibi_slopes=slopes, sinks=s_aux)
    out_ref, lse_ref = ref.attention_varlen(q.double(), k_ref.double(), v_ref.double(), cq, ck, **kw)
    out_same, _ = ref.attention_varlen(q, k_ref, v_ref, cq, ck, dtype=dtype, **kw)
    n = sum(lens_q)
    ref.check_close(out[:n], out_ref[:n], out_same[:n])
    ref.check_lse(lse[:, :n], lse_ref[:, :n])
    assert (out[n:] == 7.0).all() and (lse[:, n:] == 7.0).all(), "rows past cu_seqlens_q[-1] were written"
    return out, lse


# Ragged lengths, none a multiple of the 64- or 32-row query tile or of the key tiles; a sequence of 1 query and one
# of 0.
LENS_Q = [1, 37, 0, 70]
LENS_K = [9, 37, 5, 83]


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
def test_varlen(lib, planner, dtype, D, causal, sched):
    varlen_case(lib, planner, sched, LENS_Q, LENS_K, D=D, dtype=dtype, causal=causal, extra_rows=3,
                seed=zlib.crc32(f"{dtype}{D}{causal}".encode()) % 1000)


FEATURES = {
    "window": dict(window=(20, 6)),
    "causal_window": dict(causal=True, window=(16, -1)),
    "softcap": dict(softcap=5.0, causal=True),
    "alibi": dict(alibi=True, causal=True),
    "sinks": dict(sinks=True),
    "sinks_window": dict(sinks=True, causal=True, window=(8, -1)),  # early rows see few keys: the sink dominates
    "gqa4": dict(H=8, Hkv=2, causal=True),
    "strided": dict(strided=True, H=3, Hkv=1, causal=True),
    "all": dict(H=4, Hkv=1, causal=True, window=(30, -1), softcap=8.0, alibi=True, sinks=True),
}


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_features(lib, planner, feature, sched):
    kw = FEATURES[feature]
    D = 128 if feature in ("gqa4", "all") else 64
    dtype = torch.bfloat16 if feature in ("alibi", "all") else torch.float16
    varlen_case(lib, planner, sched, LENS_Q, LENS_K, D=D, dtype=dtype, seed=zlib.crc32(feature.encode()) % 1000, **kw)


# The other instantiated head dims (the 64-row kernel's layouts: Q staged with 32- or 16-key tiles, Q read from device
# memory for float at 96 / 128 and half / bfloat at 256).
@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("dtype,D", [(torch.float32, 32), (torch.float16, 96), (torch.float32, 96),
                                     (torch.float16, 256), (torch.bfloat16, 256)], ids=lambda x: DTYPES.get(x, x))
def test_head_dims(lib, planner, dtype, D, sched):
    varlen_case(lib, planner, sched, LENS_Q, LENS_K, D=D, dtype=dtype, causal=True, extra_rows=1, sinks=True,
                seed=D)


# The D-split kernel (half / bfloat at D = 256: 8 simdgroups, two per 16 rows, partial S exchanged) under every option
# and paged K/V.
@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("feature", ["all", "window", "paged"])
def test_dsplit(lib, planner, feature, sched):
    if feature == "paged":
        lens_q, lens_k = [7, 33, 1, 0], [40, 33, 9, 4]
        c, k_packed, v_packed = make_paged(lens_q, lens_k, 4, 2, 256, 5, torch.bfloat16, "cpu", seed=3)
        varlen_case(lib, planner, sched, lens_q, lens_k, H=4, Hkv=2, D=256, dtype=torch.bfloat16, causal=True,
                    sinks=True, inputs=(c["q"], c["k"], c["v"], k_packed, v_packed), block_table=c["block_table"])
    else:
        varlen_case(lib, planner, sched, LENS_Q, LENS_K, D=256, dtype=torch.float16, extra_rows=2,
                    seed=zlib.crc32(feature.encode()) % 1000, **FEATURES[feature])


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_dense(lib, planner, dtype, sched):
    """Dense mode (flash_attn_func's layout: q [B, Sq, H, D], k/v [B, Sk, Hkv, D], lse [B, H, Sq]), causal with more
    keys than queries, GQA 2."""
    B, Sq, Sk, H, Hkv, D = 2, 45, 61, 4, 2, 64
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, Sq, H, D, generator=g).to(dtype)
    k = torch.randn(B, Sk, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, Sk, Hkv, D, generator=g).to(dtype)
    out = torch.full_like(q, 7.0)
    lse = torch.full((B, H, Sq), 7.0)
    plan = plan_for(planner, "tops", q, k, v, out, lse, None, None, None, None, Sq, D**-0.5, 0.0, -1, 0, None, 0)
    run_plan(lib, plan, sched)
    out_ref, lse_ref = ref.attention_dense(q.double(), k.double(), v.double(), scale=D**-0.5, causal=True)
    out_same, _ = ref.attention_dense(q, k, v, scale=D**-0.5, causal=True, dtype=dtype)
    ref.check_close(out, out_ref, out_same)
    ref.check_lse(lse, lse_ref)


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
def test_rows_without_keys(lib, planner, sched):
    """Rows that see no key are 0 with LSE -inf: a sequence with no keys, and a causal one with more queries than keys
    (its first 30 rows see nothing; the query tile of rows 0-63 holds both kinds), sinks on."""
    out, lse = varlen_case(lib, planner, sched, [3, 40], [0, 10], H=2, causal=True, sinks=True)
    assert (out[:33] == 0).all() and (lse[:, :33] == float("-inf")).all()


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
def test_paged(lib, planner, sched):
    """Paged K/V (fc_varlen_paged): caches [num_blocks, block_size, Hkv, D] through a permuted block table, chunked
    prefill (the queries are the last keys of each sequence)."""
    lens_q, lens_k = [7, 33, 1, 0], [40, 33, 9, 4]
    c, k_packed, v_packed = make_paged(lens_q, lens_k, 4, 2, 64, 5, torch.float16, "cpu", seed=3)
    inputs = (c["q"], c["k"], c["v"], k_packed, v_packed)
    varlen_case(lib, planner, sched, lens_q, lens_k, H=4, Hkv=2, causal=True, sinks=True, inputs=inputs,
                block_table=c["block_table"])


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
def test_split_dispatches(lib, planner, sched, monkeypatch):
    """A call the planner splits into interleaved dispatches (tile_offset / tile_stride): every query tile computed
    once, by the dispatch whose turn it is."""
    monkeypatch.setenv("METAL_FLASH_SDPA_COMMAND_BUFFER_FLOPS", "1e5")
    q = torch.empty(300, 2, 64, dtype=torch.float16)
    plan = plan_for(planner, "tops", q, q[:, :1], q[:, :1], q, torch.empty(2, 300), cu([300]), cu([300]), None, None,
                    300, 0.125, 0.0, -1, 0, None, 0)
    assert len(plan) > 1, "the budget splits the call"
    assert sum(d["threadgroups"][2] for d in plan) == 5, "64-row query tiles: 5 for 300 rows"
    varlen_case(lib, planner, sched, [300], [300], causal=True, seed=11)


@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
def test_rescale(lib, planner, sched):
    """Key norms that grow along the sequence: each key tile's max passes the running max, so O is rescaled through
    the row reductions (map_iterator, or threadgroup memory where the layouts do not fit) on nearly every tile."""
    g = torch.Generator().manual_seed(2)
    lens = [100]
    q = torch.randn(100, 2, 64, generator=g).to(torch.float16)
    growth = torch.linspace(0.2, 6.0, 100)[:, None, None]
    k = (torch.randn(100, 1, 64, generator=g) * growth).to(torch.float16)
    v = torch.randn(100, 1, 64, generator=g).to(torch.float16)
    varlen_case(lib, planner, sched, lens, lens, inputs=(q, k, v, k, v))


@pytest.mark.parametrize("D", [64, 256], ids=["d64", "d256_dsplit"])
def test_non_finite(lib, planner, D):
    """The varlen kernel's NaN rules: a NaN query row is NaN (LSE NaN); a visible inf key makes NaN exactly the rows
    that see it; a NaN V element makes NaN exactly the (row, column) elements whose rows see it; nothing else moves."""
    g = torch.Generator().manual_seed(4)
    S, H = 70, 2
    q = torch.randn(S, H, D, generator=g).to(torch.float16)
    k = torch.randn(S, 1, D, generator=g).to(torch.float16)
    v = torch.randn(S, 1, D, generator=g).to(torch.float16)
    q[5, 0, 3] = float("nan")
    k[60, 0, 7] = float("inf")
    v[30, 0, 9] = float("nan")
    v[40, 0, D - 3] = float("inf")  # the second half of the head dim (D = 256: the other simdgroup of the pair)
    out = torch.zeros_like(q)
    lse = torch.zeros(H, S)
    plan = plan_for(planner, "tops", q, k, v, out, lse, cu([S]), cu([S]), None, None, S, D**-0.5, 0.0, -1, 0, None, 0)
    run_plan(lib, plan, SCHEDULES[1])
    rows = torch.arange(S)
    nan_rows = torch.zeros(S, H, dtype=torch.bool)
    nan_rows[5, 0] = True
    nan_rows[rows >= 60] = True  # causal: rows from 60 on see the inf key (its score is inf or NaN)
    expect = nan_rows[:, :, None].expand(S, H, D).clone()
    expect[rows >= 30, :, 9] = True
    expect[rows >= 40, :, D - 3] = True
    assert torch.equal(out.isnan(), expect)
    assert torch.equal(lse.t().isnan(), nan_rows)
    # The finite elements are those of attention over the finite inputs (masks unchanged: the bad rows are excluded).
    clean_k, clean_v = k.clone(), v.clone()
    clean_k[60, 0, 7] = 0
    clean_v[30, 0, 9] = 0
    clean_v[40, 0, D - 3] = 0
    out_ref, _ = ref.attention_varlen(q.double().nan_to_num(), clean_k.double(), clean_v.double(), [0, S], [0, S],
                                      scale=D**-0.5, causal=True)
    out_same, _ = ref.attention_varlen(q.nan_to_num(), clean_k, clean_v, [0, S], [0, S], scale=D**-0.5, causal=True,
                                       dtype=torch.float16)
    ok = ~expect
    ref.check_close(out[ok], out_ref[ok], out_same[ok])


def test_layout_independent(lib, planner):
    """The same call under several seeds (so several cooperative-tensor ownerships, row-reduction layouts and left-input
    answers: the mapped and the threadgroup paths) gives the same bits: no result depends on which thread holds what."""
    results = []
    for seed in (1, 2, 3, 4):
        sched = dict(schedule="random", seed=seed)
        out, lse = varlen_case(lib, planner, sched, LENS_Q, LENS_K, D=128, dtype=torch.bfloat16, causal=True, seed=9)
        results.append((out, lse))
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


PLANT_RIGHT = "o_acc[i] *= tops_row_value(o_acc, i, alpha, o_mapped, stage_x);"
PLANT_WRONG = "o_acc[i] *= alpha[0];"  # the thread's first row-reduction slot taken for each O element's row


def test_planted_layout_assumption(planner, tmp_path):
    """Planted bug: the O rescale assumes that the first slot of a thread's row reduction holds the row of each of its
    O elements, instead of asking map_iterator or the row index. The implementation's layout differs, so
    test_rescale's case fails, under either seed."""
    text = (ROOT / "flash_sdpa" / "attention_tensor_ops.h").read_text()
    assert text.count(PLANT_RIGHT) == 1
    (tmp_path / "attention_tensor_ops.h").write_text(text.replace(PLANT_RIGHT, PLANT_WRONG))
    src = tmp_path / "planted_tops.metal"
    src.write_text('#include "attention_tensor_ops.h"\n'
                   'template [[host_name("flash_attn_varlen_tops_float16_d64")]] [[kernel]] '
                   "decltype(flash_attn_varlen_tops<half, 64>) flash_attn_varlen_tops<half, 64>;\n")
    planted = metal_cpu.compile(src, include_dirs=[str(tmp_path), str(ROOT / "flash_sdpa")])
    for sched in SCHEDULES:
        with pytest.raises(AssertionError, match="max error"):
            test_rescale(planted, planner, sched)


# ---- the 32-row kernel kept to compare (flash_attn_varlen_tops32, on the simdgroup forward's plan) -----------------
@pytest.mark.parametrize("sched", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("dtype,D,kw", [(torch.float16, 64, dict(causal=True, window=(20, -1), alibi=True)),
                                        (torch.bfloat16, 256, dict(causal=True, sinks=True)),
                                        (torch.float32, 128, dict(softcap=5.0))],
                         ids=["float16_64", "bfloat16_256", "float32_128"])
def test_tops32(lib, planner, dtype, D, kw, sched):
    varlen_case(lib, planner, sched, LENS_Q, LENS_K, D=D, dtype=dtype, seed=D, kernel="tops32", **kw)
