"""Promises kept where a hostile caller looked (issue 20): max_seqlen_q sizes the launch only, a key a row cannot see
never changes that row (NaN in k or v included, forward and backward), the backward refuses to be differentiated
and to run on cu_seqlens changed since the forward, and calls from several threads at once give the serial results.
"""

import threading

import pytest
import reference as ref
import torch
from test_backward import check_grad, leaf, reference_grads
from test_varlen import make_inputs, misalign

pytestmark = pytest.mark.kernels_ci


def _varlen_ref(q, k, v, cq, ck, dtype, **kw):
    out_ref, lse_ref = ref.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cq, ck, **kw)
    out_pt, _ = ref.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cq, ck, dtype=dtype, **kw)
    return out_ref, lse_ref, out_pt


# ---- 4. Double backward raises -------------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["varlen", "dense"])
def test_double_backward_raises(kernel, device, api):
    q, k, v, cu_q, cu_k = make_inputs([5, 9], [7, 9], 4, 2, 32, torch.float32, device)
    ql, kl, vl = leaf(q), leaf(k), leaf(v)
    if api == "varlen":
        out = kernel.flash_attn_varlen_func(ql, kl, vl, cu_q, cu_k, 9, 9, causal=True)
    else:
        out = kernel.flash_attn_func(ql[None, :5], kl[None, :7], vl[None, :7], causal=True)
    (dq,) = torch.autograd.grad(out.square().sum(), ql, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|double backward"):
        dq.sum().backward()


# ---- 5. cu_seqlens (and the ALiBi slopes) changed in place before the backward ---------------------------------------


@pytest.mark.parametrize("what", ["cu_seqlens_q", "cu_seqlens_k", "alibi_slopes"])
def test_inputs_changed_before_backward_raise(kernel, device, what):
    q, k, v, cu_q, cu_k = make_inputs([5, 9], [7, 9], 4, 2, 32, torch.float32, device)
    cu_q, cu_k = cu_q.clone(), cu_k.clone()
    slopes = torch.rand(4, device=device)
    out = kernel.flash_attn_varlen_func(leaf(q), leaf(k), leaf(v), cu_q, cu_k, 9, 9, causal=True,
                                        alibi_slopes=slopes)
    {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "alibi_slopes": slopes}[what].add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_shared_cu_seqlens_backward(kernel, device):
    """One tensor as both cu_seqlens (saved twice) still gives FlashAttention-2's gradients."""
    q, k, v, cu_q, _ = make_inputs([5, 9], [5, 9], 4, 2, 32, torch.float32, device)
    ql, kl, vl = leaf(q), leaf(k), leaf(v)
    out = kernel.flash_attn_varlen_func(ql, kl, vl, cu_q, cu_q, 9, 9, causal=True)
    dout = torch.randn_like(out)
    out.backward(dout)
    c = cu_q.tolist()

    def fn(dt):
        return lambda q, k, v: ref.attention_varlen(q, k, v, c, c, scale=32**-0.5, causal=True, dtype=dt)[0]

    _, g_ref = reference_grads(fn(torch.float64), (q, k, v), dout, torch.float64)
    _, g_pt = reference_grads(fn(torch.float32), (q, k, v), dout, torch.float32)
    for name, g, gr, gp in zip(("dq", "dk", "dv"), (ql.grad, kl.grad, vl.grad), g_ref, g_pt):
        check_grad(g, gr, gp, name)


# ---- 1. max_seqlen_q sizes the launch only, also at 1 (the decode route) ----------------------------------------


@pytest.mark.parametrize("case", ["issue", "gqa_window", "empty_and_long", "decode"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_understated_max_seqlen_q(kernel, device, case, dtype):
    lq, lk, heads, kw = {
        "issue": ([1, 2, 1], [9, 12, 20], (4, 2), dict(causal=True)),  # the call
        "gqa_window": ([3, 1, 5], [7, 30, 5], (6, 2), dict(window=(4, 1))),
        "empty_and_long": ([0, 40, 1, 0], [3, 45, 8, 2], (4, 4), dict(causal=True)),
        "decode": ([1, 1, 1], [9, 1, 33], (8, 2), dict(causal=True)),  # transformers' left-padded decode
    }[case]
    q, k, v, cu_q, cu_k = make_inputs(lq, lk, *heads, 64, dtype, device, pad_q=2)
    window = kw.get("window", (-1, -1))
    out, lse, _ = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, max(lk), return_attn_probs=True,
                                                causal=kw.get("causal", False), window_size=window)
    out_ref, lse_ref, out_pt = _varlen_ref(q, k, v, cu_q.tolist(), cu_k.tolist(), dtype, scale=64**-0.5,
                                           causal=kw.get("causal", False), window=window)
    rows = int(cu_q[-1])
    ref.check_close(out[:rows].cpu(), out_ref[:rows], out_pt[:rows])
    ref.check_lse(lse[:, :rows].cpu(), lse_ref[:, :rows])
    assert (out[rows:] == 0).all() and (lse[:, rows:] == float("-inf")).all()
    # The same bits as a call whose max_seqlen_q is right (the varlen kernel).
    out_c, lse_c, _ = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), return_attn_probs=True,
                                                    causal=kw.get("causal", False), window_size=window)
    multi = torch.zeros(q.shape[0], dtype=torch.bool)
    for b, n in enumerate(lq):
        multi[int(cu_q[b]) : int(cu_q[b]) + n] = n >= 2
    assert torch.equal(out[multi], out_c[multi]) and torch.equal(lse[:, multi], lse_c[:, multi])


# ---- 2. A NaN in k or v where a row cannot see it changes nothing of that row (forward) ------------------------------


def _poisoned(kernel, q, k, v, cu_q, cu_k, spots, max_q, max_k, block_table=None, misaligned=False, **kw):
    """Runs flash_attn_varlen_func with NaN planted in k or v at `spots` [(tensor, row, kv head, column)]; misaligned:
    k and v at row strides that are not multiples of 4 elements (the staging loops that read one element at a time)."""
    k, v = k.clone(), v.clone()
    for name, row, h, d in spots:
        (k if name == "k" else v)[row, h, d] = float("nan")
    if misaligned:
        k, v = misalign(k, "row_stride"), misalign(v, "row_stride")
    return kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, block_table=block_table,
                                         return_attn_probs=True, **kw)


def _sees(cu_q, cu_k, n_rows, key, **kw):
    """[n_rows] bool: query rows (of all sequences) that see packed key `key` (bottom-right causal / window)."""
    left, right = kw.get("window_size", (-1, -1))
    right = 0 if kw.get("causal") else right
    sees = torch.zeros(n_rows, dtype=torch.bool)
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if not k0 <= key < k1:
            continue
        j = key - k0
        for i in range(q1 - q0):
            pos = i + (k1 - k0) - (q1 - q0)
            sees[q0 + i] = (left < 0 or j >= pos - left) and (right < 0 or j <= pos + right)
    return sees


@pytest.mark.parametrize("where", ["causal_future", "window", "other_sequence", "wide_d512", "dense", "d256",
                                   "d256_misaligned"])
@pytest.mark.parametrize("what", ["v", "k"])
def test_nan_where_a_row_cannot_see_it(kernel, device, emulator, where, what):
    emulator(schedule="random", seed=3, check_races=True)
    # d256: the resident-Q layout's own non-finite V path, at a column of the 5th 32-column word
    D = {"wide_d512": 512, "d256": 256, "d256_misaligned": 256}.get(where, 64)
    lq, lk, kw, key = {
        "causal_future": ([40], [40], dict(causal=True), 35),
        "d256": ([40], [40], dict(causal=True), 35),
        "d256_misaligned": ([40], [40], dict(causal=True), 35),
        "window": ([37], [37], dict(window_size=(3, 2)), 20),
        "other_sequence": ([5, 12], [6, 12], dict(causal=True), 3),  # one 32-row tile holds both sequences' rows
        "wide_d512": ([12], [12], dict(causal=True), 10),
        "dense": ([40], [40], dict(causal=True), 35),
    }[where]
    q, k, v, cu_q, cu_k = make_inputs(lq, lk, 4, 2, D, torch.float16, device)
    col = 157 if D == 256 else 3
    if where == "dense":  # flash_attn_func with 40 query rows: the varlen kernel's dense mode
        kp, vp = k.clone(), v.clone()
        (kp if what == "k" else vp)[key, 1, col] = float("nan")
        out, lse, _ = kernel.flash_attn_func(q[None], kp[None], vp[None], return_attn_probs=True, **kw)
        out, lse = out[0], lse[0]
    else:
        out, lse, _ = _poisoned(kernel, q, k, v, cu_q, cu_k, [(what, key, 1, col)], max(lq), max(lk),
                                misaligned=where == "d256_misaligned", **kw)
    sees = _sees(cu_q.tolist(), cu_k.tolist(), q.shape[0], key, **kw)
    assert sees.any() and not sees.all()
    out_ref, lse_ref, out_pt = _varlen_ref(q, k, v, cu_q.tolist(), cu_k.tolist(), torch.float16, scale=D**-0.5,
                                           causal=kw.get("causal", False), window=kw.get("window_size", (-1, -1)))
    blind = ~sees  # rows that cannot see the key: exactly the clean result, every head, every column
    ref.check_close(out[blind].cpu(), out_ref[blind], out_pt[blind])
    ref.check_lse(lse[:, blind].cpu(), lse_ref[:, blind])
    poisoned = out[sees][:, 2:4]  # query heads 2, 3 read kv head 1
    if what == "k":  # a visible NaN score: the whole row is NaN (FlashAttention-2, torch)
        assert torch.isnan(poisoned).all() and torch.isnan(lse[2:4][:, sees]).all()
    else:  # a visible NaN in v: that column (torch: NaN there too), the other columns and the LSE are clean
        assert torch.isnan(poisoned[..., col]).all()
        keep = torch.ones(out.shape, dtype=torch.bool)
        keep[:, 2:4, col] = False
        keep &= sees[:, None, None]
        ref.check_close(out[keep].cpu(), out_ref[keep], out_pt[keep])
        ref.check_lse(lse.cpu(), lse_ref)
    assert torch.isfinite(out[:, :2]).all()  # the other kv head's query heads


@pytest.mark.parametrize("head_dim", [64, 256])
def test_nan_in_a_paged_cache_where_a_row_cannot_see_it(kernel, device, emulator, head_dim):
    """Paged varlen: NaN in v and k at causal-future keys and in the stale slots past a sequence's length."""
    emulator(schedule="reverse", check_races=True)
    from test_paged_varlen import make_paged

    lens_q, lens_k, bs = [6, 20], [9, 20], 8
    d, k_packed, v_packed = make_paged(lens_q, lens_k, 4, 2, head_dim, bs, torch.float16, device)
    k_cache, v_cache, table = d["k"].clone(), d["v"].clone(), d["block_table"]
    # Sequence 1's key 17 (rows 0..16 cannot see it) and sequence 0's slots 9..15 (past its length).
    blk, slot = int(table[1, 17 // bs]), 17 % bs
    v_cache[blk, slot, 0, 5] = float("nan")
    k_cache[blk, slot, 1, 7] = float("nan")
    tail = int(table[0, 1])
    v_cache[tail, 1:] = float("nan")
    k_cache[tail, 1:] = float("nan")
    out, lse, _ = kernel.flash_attn_varlen_func(d["q"], k_cache, v_cache, d["cu_seqlens_q"], d["cu_seqlens_k"], 20,
                                                20, causal=True, block_table=table, return_attn_probs=True)
    cq, ck = d["cu_seqlens_q"].tolist(), d["cu_seqlens_k"].tolist()
    out_ref, lse_ref, out_pt = _varlen_ref(d["q"], k_packed, v_packed, cq, ck, torch.float16,
                                           scale=head_dim**-0.5, causal=True)
    blind = torch.ones(out.shape[0], dtype=torch.bool)
    blind[6 + 17 :] = False  # sequence 1's rows 17..19 see key 17
    ref.check_close(out[blind].cpu(), out_ref[blind], out_pt[blind])
    ref.check_lse(lse[:, blind].cpu(), lse_ref[:, blind])
    assert torch.isnan(out[~blind][:, 0:2, 5]).all() and torch.isnan(out[~blind][:, 2:4]).all()


# ---- 3. Backward: a NaN a row cannot see changes nothing of its gradients --------------------------------------------


@pytest.mark.parametrize("D", [64, 512])
@pytest.mark.parametrize("what", ["k", "v", "q", "dout"])
def test_backward_nan_where_a_row_cannot_see_it(kernel, device, what, D):
    """Causal, 40 rows: NaN in k / v at key 35 (rows 0..34 cannot see it: their dq must be clean), or in q / dO at
    row 2 (keys 3.. are invisible to it: their dk, dv must be clean). The 8x8 products sum over staged rows, where
    a 0 weight times NaN would still be NaN: D = 64 (one buffer per staged operand) and 512 (one shared buffer)."""
    q, k, v, cu_q, _ = make_inputs([40], [40], 4, 2, D, torch.float32, device)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(device)
    bad = {"k": k, "v": v, "q": q, "dout": dout}
    row = 35 if what in ("k", "v") else 2
    poisoned = {n: t.clone() for n, t in bad.items()}
    poisoned[what][row, 1, 6] = float("nan")
    ql, kl, vl = leaf(poisoned["q"]), leaf(poisoned["k"]), leaf(poisoned["v"])
    out = kernel.flash_attn_varlen_func(ql, kl, vl, cu_q, cu_q, 40, 40, causal=True)
    out.backward(poisoned["dout"])
    c = cu_q.tolist()

    def fn(dt):
        return lambda q, k, v: ref.attention_varlen(q, k, v, c, c, scale=D**-0.5, causal=True, dtype=dt)[0]

    _, g_ref = reference_grads(fn(torch.float64), (q, k, v), dout, torch.float64)  # the clean inputs
    _, g_pt = reference_grads(fn(torch.float32), (q, k, v), dout, torch.float32)
    if what in ("k", "v"):
        check_grad(ql.grad[:row], g_ref[0][:row], g_pt[0][:row], "dq of the rows that cannot see the NaN")
    else:
        for name, g, gr, gp in zip(("dk", "dv"), (kl.grad, vl.grad), g_ref[1:], g_pt[1:]):
            check_grad(g[row + 1 :], gr[row + 1 :], gp[row + 1 :], f"{name} of the keys row {row} cannot see")


# ---- 9. Several Python threads at once ---------------------------------------------------------------------------


def test_threads_give_the_serial_results(kernel, device):
    """Eight threads, each running the four entry points (three kernels) on its own inputs, give bit for bit what the
    same calls give one after another. The threads run first: in a fresh process they are the kernels' first use."""

    def calls(seed):
        q, k, v, cu_q, cu_k = make_inputs([3, 17], [9, 17], 4, 2, 32, torch.float16, device, seed=seed)
        kc = k[None, :9].clone()
        one = torch.tensor([0, 2], dtype=torch.int32, device=device)
        return [
            lambda: kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 17, 17, causal=True),
            lambda: kernel.flash_attn_varlen_func(q[:2], k, v, one, cu_k[:2], 1, 9),  # the decode route
            lambda: kernel.flash_attn_func(q[None, :5], k[None, :9], v[None, :9], causal=True),
            lambda: kernel.flash_attn_with_kvcache(q[None, :1], kc, kc.clone(), cache_seqlens=9),
        ]

    results, errors = [None] * 8, []
    barrier = threading.Barrier(8)

    def work(s):
        try:
            fs = calls(s)
            barrier.wait()
            results[s] = [f() for _ in range(3) for f in fs][-len(fs) :]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    serial = [[f() for f in calls(s)] for s in range(8)]
    for s in range(8):
        for a, b in zip(serial[s], results[s]):
            assert torch.equal(a, b)


# ---- 6. No finite score is taken for a masked key ------------------------------------------------------------------


@pytest.mark.parametrize("D", [64, 512])
def test_scores_near_minus_1e30_are_scores(kernel, device, D):
    """softmax_scale = 1e30 and every key equal: each causal row's visible scores are all -0.8125e30 (at or below the
    old masking sentinel's -7e29), so its softmax is uniform: out = the mean of the visible v rows, LSE = the score
    (log n is below float resolution there).
    Also scores spread over +-1e30 (one-hot softmax) and ALiBi / sinks on top."""
    g = torch.Generator().manual_seed(0)
    n = 40
    u = torch.zeros(D)
    u[[0, 5]] = torch.tensor([0.75, 0.5])  # exact products: every key's score is the same float
    k = u.expand(n, 1, D).clone()
    q = -u.expand(n, 1, D).clone()
    v = torch.randn(n, 1, D, generator=g)
    cq = torch.tensor([0, n], dtype=torch.int32)
    out, lse, _ = kernel.flash_attn_varlen_func(q.to(device), k.to(device), v.to(device), cq.to(device), cq.to(device),
                                                n, n, softmax_scale=1e30, causal=True, return_attn_probs=True)
    mean = v.double().cumsum(0) / torch.arange(1, n + 1, dtype=torch.float64)[:, None, None]
    assert torch.allclose(out.cpu().double(), mean, atol=1e-5, rtol=1e-5)
    expected_lse = torch.full((1, n), -0.8125e30, dtype=torch.float64)
    assert torch.isfinite(lse).all() and torch.allclose(lse.cpu().double(), expected_lse, rtol=1e-6)
    # Random scores of size 1e30: against the float64 reference.
    q2, k2, v2 = (torch.randn(n, 2, D, generator=g) for _ in range(3))
    slopes, s_aux = torch.rand(2, generator=g), torch.randn(2, generator=g) * 1e30
    kw = dict(scale=1e30 / D, causal=True, alibi_slopes=slopes, sinks=s_aux)
    out2, lse2, _ = kernel.flash_attn_varlen_func(q2.to(device), k2.to(device), v2.to(device), cq.to(device),
                                                  cq.to(device), n, n, softmax_scale=1e30 / D, causal=True,
                                                  alibi_slopes=slopes.to(device), s_aux=s_aux.to(device),
                                                  return_attn_probs=True)
    out_ref, lse_ref = ref.attention_varlen(q2, k2, v2, [0, n], [0, n], **kw)
    out_pt, lse_pt = ref.attention_varlen(q2, k2, v2, [0, n], [0, n], dtype=torch.float32, **kw)
    ref.check_close(out2.cpu(), out_ref, out_pt)
    # LSE is the max score (one-hot rows) or the sink: an fp32 dot product of D terms, so FlashAttention's rule
    # against fp32 torch, plus a few fp32 ulps of the largest value for the log2-domain round trip (a per-row rtol of
    # 1e-6 asks more of a 64-term fp32 sum than fp32 gives where it cancels).
    err = (lse2.cpu().double() - lse_ref).abs().max().item()
    base = (lse_pt.double() - lse_ref).abs().max().item()
    assert err <= 2 * base + 1e-6 * lse_ref.abs().max().item(), (err, base)


@pytest.mark.parametrize("Hq,sq,num_splits", [(1, 1, 1), (4, 1, 3), (8, 2, 1)])  # row tiles R = 1, 4, 16; split-K
def test_decode_scores_near_minus_1e30_are_scores(kernel, device, Hq, sq, num_splits):
    """The decode kernel (flash_attn_with_kvcache): with softmax_scale = 1e30 every visible score is -0.8125e30, at or
    below the old sentinel's -7e29, so each row's softmax is uniform: out = the mean of its visible v rows, LSE = the
    score. Before, those rows were taken for masked: out 0, LSE -inf."""
    g = torch.Generator().manual_seed(Hq)
    n, D = 40, 64
    u = torch.zeros(D)
    u[[0, 5]] = torch.tensor([0.75, 0.5])  # exact products: every key's score is the same float
    k_cache = u.expand(1, n, 1, D).clone()
    q = -u.expand(1, sq, Hq, D).clone()
    v_cache = torch.randn(1, n, 1, D, generator=g)
    out, lse = kernel.flash_attn_with_kvcache(q.to(device), k_cache.to(device), v_cache.to(device), cache_seqlens=n,
                                              softmax_scale=1e30, causal=True, num_splits=num_splits,
                                              return_softmax_lse=True)
    for i in range(sq):
        seen = n - sq + 1 + i  # bottom-right causal: query i sees keys 0 .. n - sq + i
        mean = v_cache[0, :seen, 0].double().mean(0)
        assert torch.allclose(out[0, i].cpu().double(), mean.expand(Hq, D), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(lse).all()
    assert torch.allclose(lse.cpu().double(), torch.full((1, Hq, sq), -0.8125e30, dtype=torch.float64), rtol=1e-6)
