"""Hostile inputs across the four entry points: whatever the arguments hold, a clear ValueError / TypeError that names
the argument, or the right result; never an out-of-bounds access (the emulator raises on any), uninitialised output,
a modified input, a hidden NaN or a NaN that leaks into another row."""

import pytest
import reference as ref
import torch
from test_varlen import cu, make_inputs

pytestmark = pytest.mark.kernels_ci

HUGE_WINDOWS = [((2**31 - 1, 0), (-1, 0)), ((2**40, 2**40), (-1, -1)), ((-1, 2**40), (-1, -1)),
                ((2**31 - 1, 2**31 - 1), (-1, -1))]
STRICT = "METAL_FLASH_SDPA_STRICT"


def _varlen_ref(q, k, v, cq, ck, **kw):
    out_ref, lse_ref = ref.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cq, ck, **kw)
    out_pt, _ = ref.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cq, ck, dtype=q.dtype, **kw)
    return out_ref, lse_ref, out_pt


def _paged_case(device, Bsz=3, H=4, Hkv=2, D=32, sq=1, lens=(5, -1, 37), page=8, dtype=torch.float16, seed=0):
    """A paged cache (non-consecutive pages, -1 for unused table slots and the padding row), new k/v of one token."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = 6
    table = torch.full((Bsz, max_blocks), -1, dtype=torch.int32)
    ids = torch.randperm(Bsz * max_blocks, generator=g).to(torch.int32)
    for b, n in enumerate(lens):
        used = (max(n, 0) + 1 + page - 1) // page if n >= 0 else 0
        table[b, :used] = ids[b * max_blocks : b * max_blocks + used]
    k_cache = torch.randn(Bsz * max_blocks, page, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(Bsz * max_blocks, page, Hkv, D, generator=g).to(dtype)
    q = torch.randn(Bsz, sq, H, D, generator=g).to(dtype)
    k = torch.randn(Bsz, 1, Hkv, D, generator=g).to(dtype)
    v = torch.randn(Bsz, 1, Hkv, D, generator=g).to(dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    return {n: t.to(device) for n, t in dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, block_table=table,
                                              cache_seqlens=seqlens).items()}


def _kvcache(kernel, case, **kw):
    c = {n: t.clone() for n, t in case.items()}  # the caches are written in place
    return kernel.flash_attn_with_kvcache(c["q"], c["k_cache"], c["v_cache"], c["k"], c["v"],
                                          cache_seqlens=c["cache_seqlens"], block_table=c["block_table"], **kw)


# ---- 1. Windows far past every key: the same result as an unbounded window, and no out-of-bounds access ----------


@pytest.mark.parametrize("huge,canonical", HUGE_WINDOWS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_huge_window_kvcache(kernel, device, emulator, huge, canonical, num_splits):
    emulator(schedule="random", seed=1, check_races=True)
    case = _paged_case(device)
    causal = canonical[1] == 0
    out, lse = _kvcache(kernel, case, window_size=huge, causal=causal, num_splits=num_splits, return_softmax_lse=True)
    out_c, lse_c = _kvcache(kernel, case, window_size=canonical, causal=causal, num_splits=num_splits,
                            return_softmax_lse=True)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    assert torch.isfinite(out).all() and (out[1] == 0).all()  # row 1 is padding


@pytest.mark.parametrize("huge,canonical", HUGE_WINDOWS)
def test_huge_window_func_and_varlen(kernel, device, huge, canonical):
    q, k, v, cu_q, cu_k = make_inputs([1, 1], [7, 40], 4, 2, 64, torch.float16, device)
    causal = canonical[1] == 0
    for max_q in (1, 40):  # the decode route (max_seqlen_q == 1), then the prefill kernel on the same data
        out = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, 40, causal=causal, window_size=huge)
        out_ref, _, out_pt = _varlen_ref(q, k, v, cu_q.tolist(), cu_k.tolist(), scale=64**-0.5, causal=causal,
                                         window=canonical)
        ref.check_close(out.cpu(), out_ref, out_pt)
    qp, kp, vp, cu_qp, cu_kp = make_inputs([20, 33], [9, 40], 4, 2, 64, torch.float16, device)
    out = kernel.flash_attn_varlen_func(qp, kp, vp, cu_qp, cu_kp, 33, 40, causal=causal, window_size=huge)
    out_ref, _, out_pt = _varlen_ref(qp, kp, vp, cu_qp.tolist(), cu_kp.tolist(), scale=64**-0.5, causal=causal,
                                     window=canonical)
    ref.check_close(out.cpu(), out_ref, out_pt)
    qd, kd = q.view(2, 1, 4, 64), k[:14].view(2, 7, 2, 64)  # flash_attn_func's decode route
    out = kernel.flash_attn_func(qd, kd, kd, causal=causal, window_size=huge)
    assert torch.equal(out, kernel.flash_attn_func(qd, kd, kd, causal=causal, window_size=canonical))


# ---- 2. max_seqlen_q / max_seqlen_k size the launch only -----------------------------------------------------------


@pytest.mark.parametrize("max_q", [0, 2, 31, 2**40])
@pytest.mark.parametrize("max_k", [0, 1, 2**40])
def test_max_seqlen_does_not_change_results(kernel, device, max_q, max_k):
    q, k, v, cu_q, cu_k = make_inputs([70, 5, 33], [70, 9, 40], 4, 2, 64, torch.float16, device, pad_q=3)
    out, lse, _ = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True,
                                                return_attn_probs=True)
    out_ref, lse_ref, out_pt = _varlen_ref(q, k, v, cu_q.tolist(), cu_k.tolist(), scale=64**-0.5, causal=True)
    ref.check_close(out.cpu(), out_ref, out_pt)  # every row, the 3 rows past cu_seqlens_q[-1] included (0)
    ref.check_lse(lse.cpu(), lse_ref)
    legacy = torch.full_like(q, float("nan"))
    kernel.flash_attention_varlen(legacy, q, k, v, cu_q, cu_k, max_q, max_k, True)
    ref.check_close(legacy[:108].cpu(), out_ref[:108], out_pt[:108])


@pytest.mark.parametrize("max_k", [1, 3, 2**40])
def test_varlen_decode_route_ignores_max_seqlen_k(kernel, device, max_k):
    q, k, v, cu_q, cu_k = make_inputs([1, 0, 1], [7, 3, 40], 8, 2, 64, torch.float16, device)
    out = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, max_k, causal=True)
    out_ref, _, out_pt = _varlen_ref(q, k, v, cu_q.tolist(), cu_k.tolist(), scale=64**-0.5, causal=True)
    ref.check_close(out.cpu(), out_ref, out_pt)


def test_strict_mode_checks_cu_seqlens(kernel, device, monkeypatch):
    monkeypatch.setenv(STRICT, "1")
    q, k, v, cu_q, cu_k = make_inputs([5, 9], [5, 9], 4, 2, 64, torch.float16, device)
    kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 9)  # valid input passes
    cases = [
        (dict(max_seqlen_q=4), "max_seqlen_q"),
        (dict(max_seqlen_k=2), "max_seqlen_k"),
        (dict(cu_seqlens_q=torch.tensor([0, 9, 5], dtype=torch.int32, device=device)), "non-decreasing"),
        (dict(cu_seqlens_k=torch.tensor([-2, 5, 14], dtype=torch.int32, device=device)), r"cu_seqlens_k\[0\]"),
        (dict(cu_seqlens_q=torch.tensor([0, 5, 15], dtype=torch.int32, device=device)), "exceeds"),
    ]
    for over, match in cases:
        args = {**dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=9, max_seqlen_k=9), **over}
        with pytest.raises(ValueError, match=match):
            kernel.flash_attn_varlen_func(q, k, v, **args)
        with pytest.raises(ValueError, match=match):
            kernel.flash_attention_varlen(torch.empty_like(q), q, k, v, **args)


# ---- 3. Index dtypes and ranges -----------------------------------------------------------------------------------


def test_index_dtypes(kernel, device, monkeypatch):
    case = _paged_case(device, lens=(5, 9, 12))
    expected = _kvcache(kernel, case, causal=True)
    as64 = dict(case, cache_seqlens=case["cache_seqlens"].long())
    assert torch.equal(_kvcache(kernel, as64, causal=True), expected)  # int64 accepted
    with pytest.raises(TypeError, match="cache_seqlens"):
        _kvcache(kernel, dict(case, cache_seqlens=case["cache_seqlens"].float()), causal=True)
    with pytest.raises(TypeError, match="cache_seqlens"):
        _kvcache(kernel, dict(case, cache_seqlens=case["cache_seqlens"] > 0), causal=True)
    # 2**32 + 3 must not wrap to 3: it is out of range (clamped to the table like INT32_MAX), and strict mode says so.
    wrapped = case["cache_seqlens"].long().clone()
    wrapped[0] = 2**32 + 3
    saturated = case["cache_seqlens"].clone()
    saturated[0] = 2**31 - 1
    assert torch.equal(_kvcache(kernel, dict(case, cache_seqlens=wrapped), causal=True),
                       _kvcache(kernel, dict(case, cache_seqlens=saturated), causal=True))
    three = case["cache_seqlens"].clone()
    three[0] = 3
    assert not torch.equal(_kvcache(kernel, dict(case, cache_seqlens=wrapped), causal=True),
                           _kvcache(kernel, dict(case, cache_seqlens=three), causal=True))
    monkeypatch.setenv(STRICT, "1")
    with pytest.raises(ValueError, match="cache_seqlens"):
        _kvcache(kernel, dict(case, cache_seqlens=wrapped), causal=True)


def test_cache_batch_idx_int64_does_not_wrap(kernel, device):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, 4, 32, generator=g).half().to(device)
    k_cache = torch.randn(3, 16, 2, 32, generator=g).half().to(device)
    idx = torch.tensor([2**32 + 1, 0], dtype=torch.int64, device=device)
    out = kernel.flash_attn_with_kvcache(q, k_cache, k_cache, cache_seqlens=10, cache_batch_idx=idx)
    assert (out[0] == 0).all()  # an invalid row reads nothing (row 1 would be the wrapped value's)
    ok = kernel.flash_attn_with_kvcache(q, k_cache, k_cache, cache_seqlens=10,
                                        cache_batch_idx=torch.tensor([1, 0], dtype=torch.int32, device=device))
    assert torch.equal(out[1], ok[1]) and not torch.equal(out[0], ok[0])
    with pytest.raises(TypeError, match="cache_batch_idx"):
        kernel.flash_attn_with_kvcache(q, k_cache, k_cache, cache_seqlens=10, cache_batch_idx=idx.float())


@pytest.mark.parametrize("value", [2**40, -2, 2**31])
def test_int_cache_seqlens_range(kernel, device, value):
    case = _paged_case(device)
    with pytest.raises(ValueError, match="cache_seqlens"):
        kernel.flash_attn_with_kvcache(case["q"], case["k_cache"], case["v_cache"], cache_seqlens=value,
                                       block_table=case["block_table"])


# ---- 4. Rotary tables -----------------------------------------------------------------------------------------------


def test_rotary_tables(kernel, device):
    case = _paged_case(device, lens=(5, 9, 12))
    capacity = case["block_table"].shape[1] * case["k_cache"].shape[1]
    good = torch.randn(capacity, 8, device=device)
    _kvcache(kernel, case, rotary_cos=good, rotary_sin=good)  # FA2's rule: a row per cache position
    bad = [
        (dict(rotary_cos=good[: capacity - 1], rotary_sin=good[: capacity - 1]), ValueError, "positions"),
        (dict(rotary_cos=good[:, 0], rotary_sin=good[:, 0]), ValueError, "rotary_cos must have shape"),
        (dict(rotary_cos=good, rotary_sin=good[:, :4]), ValueError, "rotary_sin must have the shape"),
        (dict(rotary_cos=torch.randn(capacity, 20, device=device),
              rotary_sin=torch.randn(capacity, 20, device=device)), ValueError, "exceeds the head dim"),
        (dict(rotary_cos=good.int(), rotary_sin=good.int()), TypeError, "floating point"),
    ]
    for over, exc, match in bad:
        with pytest.raises(exc, match=match):
            _kvcache(kernel, case, **over)


# ---- 5. Aliasing -----------------------------------------------------------------------------------------------------


def test_same_cache_tensor(kernel, device):
    case = _paged_case(device)
    c = {n: t.clone() for n, t in case.items()}
    with pytest.raises(ValueError, match="k_cache and v_cache must not be the same tensor"):
        kernel.flash_attn_with_kvcache(c["q"], c["k_cache"], c["k_cache"], c["k"], c["v"],
                                       cache_seqlens=c["cache_seqlens"], block_table=c["block_table"])
    # Without an append nothing is written: one tensor for both is legal.
    kernel.flash_attn_with_kvcache(c["q"], c["k_cache"], c["k_cache"], cache_seqlens=c["cache_seqlens"],
                                   block_table=c["block_table"])


def test_cache_overlapping_other_inputs(kernel, device):
    case = _paged_case(device, dtype=torch.float32)
    c = {n: t.clone() for n, t in case.items()}
    q_in_cache = c["k_cache"].view(-1)[: c["q"].numel()].view(c["q"].shape)
    with pytest.raises(ValueError, match="k_cache must not overlap q"):
        kernel.flash_attn_with_kvcache(q_in_cache, c["k_cache"], c["v_cache"], c["k"], c["v"],
                                       cache_seqlens=c["cache_seqlens"], block_table=c["block_table"])


def test_out_overlapping_cu_seqlens(kernel, device):
    q, k, v, cu_q, cu_k = make_inputs([5, 9], [5, 9], 4, 2, 64, torch.float32, device)
    out = torch.zeros_like(q)
    cu_in_out = out.view(-1)[:3].view(torch.int32)  # the same bytes as out's first elements
    cu_in_out.copy_(cu_q)
    with pytest.raises(ValueError, match="out must not overlap cu_seqlens_q"):
        kernel.flash_attention_varlen(out, q, k, v, cu_in_out, cu_k, 9, 9, True, 0.125, 1.0)
    assert torch.equal(cu_in_out, cu_q)  # not overwritten
    with pytest.raises(ValueError, match="out must not overlap s_aux"):
        kernel.flash_attention_varlen(out, q, k, v, cu_q, cu_k, 9, 9, s_aux=out.view(-1)[4:8])


# ---- 6. NaN stays in its row; a masked key never matters -----------------------------------------------------------


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_nonfinite_query_row_is_isolated(kernel, device, poison, dtype):
    q, k, v, cu_q, cu_k = make_inputs([37, 20], [37, 20], 4, 2, 64, dtype, device)
    q = q.clone()
    q[3, 1] = poison  # row 3, head 1: the varlen kernel's 8-row blocks hold rows 0..7 of every head together
    out, lse, _ = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 37, 37, causal=True, return_attn_probs=True)
    assert torch.isnan(out[3, 1]).all() and torch.isnan(lse[1, 3])  # FlashAttention-2 / torch: NaN in that row
    clean = q.clone()
    clean[3, 1] = 0
    out_ref, lse_ref, out_pt = _varlen_ref(clean, k, v, cu_q.tolist(), cu_k.tolist(), scale=64**-0.5, causal=True)
    keep = torch.ones(q.shape[:2], dtype=torch.bool)
    keep[3, 1] = False
    ref.check_close(out.cpu()[keep], out_ref[keep], out_pt[keep])
    assert torch.isfinite(lse.cpu().t()[keep]).all()


def test_masked_nan_key_is_ignored(kernel, device):
    q, k, v, cu_q, cu_k = make_inputs([40], [40], 4, 4, 64, torch.float16, device)
    k = k.clone()
    k[30] = float("nan")  # causal: rows 0..29 cannot see key 30
    out = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 40, causal=True)
    clean = k.clone()
    clean[30] = 0
    out_ref, _, out_pt = _varlen_ref(q, clean, v, [0, 40], [0, 40], scale=64**-0.5, causal=True)
    ref.check_close(out[:30].cpu(), out_ref[:30], out_pt[:30])
    assert torch.isnan(out[30:]).all()  # rows that see it: NaN, as in torch


@pytest.mark.parametrize("num_splits", [1, 3])
def test_nan_query_on_decode_paths(kernel, device, num_splits):
    case = _paged_case(device, lens=(5, 9, 70), H=8, Hkv=2)
    case["q"][2, 0, 5] = float("nan")
    out, lse = _kvcache(kernel, case, causal=True, num_splits=num_splits, return_softmax_lse=True)
    assert torch.isnan(out[2, 0, 5]).all() and torch.isnan(lse[2, 5, 0])  # not hidden as 0 / -inf
    clean = dict(case, q=case["q"].clone())
    clean["q"][2, 0, 5] = 0
    out_c, lse_c = _kvcache(kernel, clean, causal=True, num_splits=num_splits, return_softmax_lse=True)
    keep = torch.ones(out.shape[:3], dtype=torch.bool)
    keep[2, 0, 5] = False
    assert torch.equal(out[keep], out_c[keep])  # the other heads of the GQA group share the pass, not the NaN
    q, k, v, cu_q, cu_k = make_inputs([1, 1], [9, 30], 8, 2, 64, torch.float16, device)
    q = q.clone()
    q[0, 3] = float("nan")
    for out in (kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, 30),
                kernel.flash_attn_func(q[:1, None], k[None, :9], v[None, :9])[0]):
        assert torch.isnan(out[0, 3]).all() and torch.isfinite(out[0, :3]).all()


# ---- 7. Forward-only: backward raises; torch.compile traces the ops --------------------------------------------------


def test_backward_raises(kernel, device):
    q, k, v, cu_q, cu_k = make_inputs([5, 9], [5, 9], 4, 2, 64, torch.float32, device)
    q = q.clone().requires_grad_()
    # flash_attn_func and flash_attn_varlen_func have a backward (tests/test_backward.py); these do not.
    calls = [
        lambda: kernel.flash_attn_with_kvcache(q[None, :1], k[None], v[None], cache_seqlens=14),
        lambda: kernel.flash_attn_varlen_func(q, k[:, None], v[:, None], cu_q, cu_k, 9, 9,
                                              block_table=torch.arange(9, dtype=torch.int32, device=device).view(1, 9)
                                              .expand(2, 9).contiguous()),
    ]
    for call in calls:
        out = call()
        assert out.requires_grad
        with pytest.raises(NotImplementedError, match="forward-only"):
            out.sum().backward()
    out = torch.zeros(q.shape, device=device)
    kernel.flash_attention_varlen(out, q, k, v, cu_q, cu_k, 9, 9)
    with pytest.raises(NotImplementedError, match="forward-only"):
        out.sum().backward()
    with torch.no_grad():
        assert not kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 9).requires_grad


def test_torch_compile_fullgraph(kernel, device):
    q, k, v, cu_q, cu_k = make_inputs([5, 9], [5, 9], 4, 2, 64, torch.float16, device)

    def step(q, k, v, cu_q, cu_k):
        a = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 9, causal=True)
        b = kernel.flash_attn_func(q[None, :5], k[None, :5], v[None, :5], causal=True)
        c = kernel.flash_attn_with_kvcache(q[None, :1], k[None], v[None], cache_seqlens=14)
        return a, b, c

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(q, k, v, cu_q, cu_k), step(q, k, v, cu_q, cu_k)):
        assert torch.equal(got, want)


# ---- 8. Errors that name the problem; empty batches -----------------------------------------------------------------


def test_errors_name_the_argument(kernel, device):
    q, k, v, cu_q, cu_k = make_inputs([5, 9], [5, 9], 4, 2, 64, torch.float16, device)
    cases = [
        (lambda: kernel.flash_attn_varlen_func(None, k, v, cu_q, cu_k, 9, 9), TypeError, "q must be a torch.Tensor"),
        (lambda: kernel.flash_attn_func(q[None], None, v[None]), TypeError, "k must be a torch.Tensor"),
        (lambda: kernel.flash_attn_with_kvcache(None, k[None], v[None]), TypeError, "q must be a torch.Tensor"),
        (lambda: kernel.flash_attn_func(q[None, :, :, :0], k[None, :, :, :0], v[None, :, :, :0]), ValueError,
         "head dim"),
        (lambda: kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 9, window_size=None), TypeError,
         "window_size"),
        (lambda: kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 9, window_size=(1.5, 0)), TypeError,
         r"window_size\[0\]"),
        (lambda: kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9.0, 9), TypeError, "max_seqlen_q"),
        (lambda: kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, -1, 9), ValueError, "max_seqlen_q"),
        (lambda: kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 2**70), ValueError, "max_seqlen_k"),
        (lambda: kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 9, softmax_scale="x"), TypeError,
         "softmax_scale"),
        (lambda: kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 9, softmax_scale=float("nan")), ValueError,
         "softmax_scale"),
        (lambda: kernel.flash_attn_with_kvcache(q[None, :1], k[None], v[None], cache_seqlens=3, num_splits=1.5),
         TypeError, "num_splits"),
        (lambda: kernel.flash_attn_varlen_func(q, k, v, cu_q.tolist(), cu_k, 9, 9), TypeError,
         "cu_seqlens_q must be a torch.Tensor"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def test_empty_batches(kernel, device):
    q = torch.zeros(0, 4, 64, dtype=torch.float16, device=device)
    k = torch.randn(6, 2, 64, dtype=torch.float16, device=device)
    zeros = torch.zeros(3, dtype=torch.int32, device=device)
    for max_q in (1, 8):
        out, lse, _ = kernel.flash_attn_varlen_func(q, k, k, zeros, cu([3, 3], device), max_q, 3,
                                                    return_attn_probs=True)
        assert out.shape == (0, 4, 64) and lse.shape == (4, 0)
    out = kernel.flash_attn_with_kvcache(torch.zeros(0, 1, 4, 64, dtype=torch.float16, device=device),
                                         k.view(3, 2, 2, 64), k.view(3, 2, 2, 64), cache_seqlens=1)
    assert out.shape == (0, 1, 4, 64)


# ---- 9. The original op's signature ---------------------------------------------------------------------------------


def test_legacy_signature_defaults_sinks_window(kernel, device):
    q, k, v, cu_q, cu_k = make_inputs([5, 40], [5, 40], 4, 2, 64, torch.float16, device)
    s_aux = torch.randn(4, device=device)
    out = torch.empty_like(q)
    kernel.flash_attention_varlen(out, q, k, v, cu_q, cu_k, 40, 40)  # do_causal=False, scale=None, softcapping=1.0
    assert torch.equal(out, kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 40))
    kernel.flash_attention_varlen(out, q, k, v, cu_q, cu_k, 40, 40, do_causal=True, scale=0.1, softcapping=2.0,
                                  s_aux=s_aux, window_size=(8, 0))
    want = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 40, softmax_scale=0.1, causal=True,
                                         window_size=(8, 0), softcap=2.0, s_aux=s_aux)
    assert torch.equal(out, want)


# ---- 10. Apple's fast tanh: softcap of scores far past the cap stays finite ------------------------------------------


@pytest.mark.parametrize("max_q", [1, 40])
def test_softcap_of_huge_scores(kernel, device, max_q):
    """|s / softcap| ~ 400: Apple's fast tanh (through exp) is NaN there; the kernels clamp its argument. The emulated
    build compiles the kernels with the emulator's model of Apple's fast math, so an unclamped tanh fails here."""
    lens = [1, 1] if max_q == 1 else [40, 17]
    q, k, v, cu_q, cu_k = make_inputs(lens, [40, 17], 4, 2, 64, torch.float32, device)
    q = q * 30
    out = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, 40, softmax_scale=1.0, softcap=0.5)
    assert torch.isfinite(out).all()
    out_ref, _, out_pt = _varlen_ref(q, k, v, cu_q.tolist(), cu_k.tolist(), scale=1.0, softcap=0.5)
    ref.check_close(out.cpu(), out_ref, out_pt)


# ---- 11. Placeholder buffers are aligned for the type the kernel declares -----------------------------------------


def test_views_at_odd_offsets(kernel, device):
    """q at a 2-byte offset (fp16): legal for q's own binding. Unused optional slots (cu_seqlens int32, slopes and
    sinks float32) must not get q as a placeholder: Metal's validation rejects an offset not aligned to the slot's
    type, and so does the emulator."""
    g = torch.Generator().manual_seed(4)
    buf = torch.randn(1 + 2 * 40 * 4 * 64, generator=g).half().to(device)
    q = buf[1:].view(2, 40, 4, 64)
    k = torch.randn(2, 40, 2, 64, generator=g).half().to(device)
    v = torch.randn(2, 40, 2, 64, generator=g).half().to(device)
    out = kernel.flash_attn_func(q, k, v, causal=True)
    out_ref, _ = ref.attention_dense(q.cpu(), k.cpu(), v.cpu(), scale=64**-0.5, causal=True)
    out_pt, _ = ref.attention_dense(q.cpu(), k.cpu(), v.cpu(), scale=64**-0.5, causal=True, dtype=torch.float16)
    ref.check_close(out.cpu(), out_ref, out_pt)
