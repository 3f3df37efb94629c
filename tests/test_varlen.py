"""flash_attention_varlen, flash_attn_varlen_func and flash_attn_func against the float64 reference.

Tolerance: FlashAttention's rule, max|out - ref| <= 2 * max|out_torch - ref| + 1e-5, where out_torch is the same
reference math run by torch in the input dtype (tests/reference.py). LSE is fp32 and checked against float64.
"""

import itertools

import pytest
import reference as ref
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [32, 64, 72, 80, 96, 128, 192, 256]  # the kernel's list; test_supported_head_dims checks they agree
WIDE_HEAD_DIMS = [512]  # flash_attn_varlen_wide: 8-row tiles, the head dim split across simdgroups
HEADS = {"mha": (4, 4), "gqa": (6, 2), "mqa": (4, 1)}

# (query lengths, key lengths, extra q rows past cu_seqlens_q[-1])
LAYOUTS = {
    "sq<sk": ([7, 20], [19, 45], 0),
    "sq=sk": ([33, 16], [33, 16], 0),
    "sq>sk": ([40, 9], [17, 3], 0),
    "empty": ([0, 12, 5, 0], [0, 0, 14, 6], 0),
    "ragged": ([1, 31, 33], [8, 65, 17], 0),
    "long_among_short": ([3, 100, 2], [3, 130, 5], 0),
    "padded_tail": ([10, 20], [15, 25], 7),
}
WINDOWS = [(-1, -1), (6, 3)]


def cu(lengths, device):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def make_inputs(seqlens_q, seqlens_k, heads, kv_heads, head_dim, dtype, device, pad_q=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(seqlens_q) + pad_q, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(sum(seqlens_k), kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(sum(seqlens_k), kv_heads, head_dim, generator=g).to(dtype)
    return q.to(device), k.to(device), v.to(device), cu(seqlens_q, device), cu(seqlens_k, device)


def extras(heads, alibi, sinks, device, batch=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (heads,) if batch is None else (batch, heads)
    slopes = (0.05 + 0.45 * torch.rand(shape, generator=g)).to(device) if alibi else None
    s_aux = torch.randn(heads, generator=g).to(device) if sinks else None
    return slopes, s_aux


def run_varlen_case(kernel, device, dtype, head_dim, heads, layout, causal=False, window=(-1, -1), softcap=0.0,
                    alibi=False, sinks=False, seed=0):
    """Runs flash_attn_varlen_func on one case and checks out and LSE. Returns (out error, lse error)."""
    h, hkv = HEADS[heads] if isinstance(heads, str) else heads
    lq, lk, pad = LAYOUTS[layout] if isinstance(layout, str) else layout
    q, k, v, cu_q, cu_k = make_inputs(lq, lk, h, hkv, head_dim, dtype, device, pad, seed)
    slopes, s_aux = extras(h, alibi, sinks, device)
    scale = head_dim**-0.5
    inputs = [t.clone() for t in (q, k, v, cu_q, cu_k)]
    out, lse, none = kernel.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lq), max(lk), softmax_scale=scale, causal=causal, window_size=window,
        softcap=softcap, alibi_slopes=slopes, return_attn_probs=True, s_aux=s_aux)
    assert none is None
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (h, q.shape[0]) and lse.dtype == torch.float32
    for before, after in zip(inputs, (q, k, v, cu_q, cu_k)):
        assert torch.equal(before, after), "an input was modified"

    kw = dict(scale=scale, causal=causal, window=window, softcap=softcap,
              alibi_slopes=None if slopes is None else slopes.cpu(), sinks=None if s_aux is None else s_aux.cpu())
    cq, ck = cu_q.tolist(), cu_k.tolist()
    out_ref, lse_ref = ref.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cq, ck, **kw)
    out_pt, _ = ref.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cq, ck, dtype=dtype, **kw)
    n = cq[-1]  # rows past cu_seqlens_q[-1] are unspecified
    err = ref.check_close(out[:n].cpu(), out_ref[:n], out_pt[:n])
    lse_err = ref.check_lse(lse[:, :n].cpu(), lse_ref[:, :n])
    return err, lse_err


def test_supported_head_dims(kernel):
    assert list(kernel.supported_head_dims()) == HEAD_DIMS + WIDE_HEAD_DIMS


def test_api_surface(kernel):
    import inspect

    assert set(kernel.__all__) >= {"flash_attention_varlen", "flash_attn_varlen_func", "flash_attn_func"}
    params = list(inspect.signature(kernel.flash_attn_varlen_func).parameters)
    assert params[:15] == ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                           "dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes",
                           "deterministic", "return_attn_probs"]
    assert "s_aux" in params
    params = list(inspect.signature(kernel.flash_attn_func).parameters)
    assert params[:11] == ["q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size", "softcap",
                           "alibi_slopes", "deterministic", "return_attn_probs"]


# --- The cheap subset: every dtype x head dim once, every feature and layout once. ---------------------------


@pytest.mark.kernels_ci
@pytest.mark.parametrize("head_dim", HEAD_DIMS + WIDE_HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtype_head_dim(kernel, device, dtype, head_dim):
    run_varlen_case(kernel, device, dtype, head_dim, "gqa", ([5, 37], [9, 37], 0), causal=True)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("feature", ["window", "softcap", "sinks", "alibi", "layout", "nan_row"])
def test_wide_head_dim(kernel, device, emulator, feature):
    """D = 512 (Gemma's global layers) on the wide kernel: features, a ragged layout, a NaN row kept to itself, under
    the race detector with a random schedule."""
    emulator(schedule="random", seed=5, check_races=True)
    kw = dict(causal=True)
    if feature == "window":
        kw["window"] = (6, 0)
    if feature in ("softcap", "sinks", "alibi"):
        kw[feature] = 2.0 if feature == "softcap" else True
    layout = "ragged" if feature == "layout" else ([9, 20], [30, 20], 3)
    if feature != "nan_row":
        run_varlen_case(kernel, device, torch.float16, 512, "gqa", layout, **kw)
        return
    q, k, v, cu_q, cu_k = make_inputs([12], [12], 2, 1, 512, torch.float16, device)
    q = q.clone()
    q[5, 1] = float("nan")
    out = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 12, 12, causal=True)
    assert torch.isnan(out[5, 1]).all()
    keep = torch.ones(12, 2, dtype=torch.bool)
    keep[5, 1] = False
    assert torch.isfinite(out.cpu()[keep]).all()


@pytest.mark.kernels_ci
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts(kernel, device, layout):
    for causal in (False, True):
        run_varlen_case(kernel, device, torch.float16, 64, "gqa", layout, causal=causal)


@pytest.mark.kernels_ci
@pytest.mark.parametrize(
    "feature",
    [
        dict(causal=True),
        dict(window=(6, 3)),
        dict(window=(0, 0)),
        dict(causal=True, window=(6, -1)),
        dict(softcap=2.0),
        dict(sinks=True),
        dict(alibi=True),
        dict(causal=True, window=(6, 3), softcap=2.0, sinks=True, alibi=True),
    ],
    ids=lambda f: "+".join(f"{k}={v}" for k, v in f.items()),
)
@pytest.mark.parametrize("heads", list(HEADS))
def test_features(kernel, device, feature, heads):
    run_varlen_case(kernel, device, torch.float16, 64, heads, "sq<sk", **feature)
    run_varlen_case(kernel, device, torch.bfloat16, 128, heads, "sq>sk", **feature)


@pytest.mark.kernels_ci
def test_alibi_per_batch(kernel, device):
    lq, lk = [7, 13], [9, 20]
    q, k, v, cu_q, cu_k = make_inputs(lq, lk, 4, 2, 64, torch.float32, device)
    slopes, _ = extras(4, True, False, device, batch=2)
    out, lse, _ = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 13, 20, causal=True, alibi_slopes=slopes,
                                                return_attn_probs=True)
    for b in range(2):
        o, l = ref.attention_one(q[cu_q[b]:cu_q[b + 1]].cpu(), k[cu_k[b]:cu_k[b + 1]].cpu(),
                                 v[cu_k[b]:cu_k[b + 1]].cpu(), scale=64**-0.5, causal=True,
                                 alibi_slopes=slopes[b].cpu())
        torch.testing.assert_close(out[cu_q[b]:cu_q[b + 1]].cpu().double(), o, atol=1e-5, rtol=1e-5)
        ref.check_lse(lse[:, cu_q[b]:cu_q[b + 1]].cpu(), l)


@pytest.mark.kernels_ci
def test_rows_without_keys(kernel, device):
    # sq > sk causal: the first sq - sk rows see nothing; sk = 0: no row sees anything. Sinks do not change that.
    lq, lk = [6, 4], [2, 0]
    q, k, v, cu_q, cu_k = make_inputs(lq, lk, 2, 2, 32, torch.float32, device)
    _, s_aux = extras(2, False, True, device)
    out, lse, _ = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 2, causal=True, return_attn_probs=True,
                                                s_aux=s_aux)
    assert torch.equal(out[:4].cpu(), torch.zeros(4, 2, 32)) and torch.equal(out[6:].cpu(), torch.zeros(4, 2, 32))
    assert torch.isneginf(lse[:, :4]).all() and torch.isneginf(lse[:, 6:]).all()
    assert torch.isfinite(lse[:, 4:6]).all() and torch.isfinite(out).all()


@pytest.mark.kernels_ci
def test_huge_scores(kernel, device):
    # Scores around +-1e4: no overflow in the online softmax, no NaN.
    lq = [20]
    q, k, v, cu_q, cu_k = make_inputs(lq, lq, 2, 2, 64, torch.float32, device)
    q = q * 300
    out, lse, _ = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 20, 20, causal=True, return_attn_probs=True)
    o, l = ref.attention_varlen(q.cpu(), k.cpu(), v.cpu(), [0, 20], [0, 20], scale=64**-0.5, causal=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu().double(), o, atol=2e-4, rtol=1e-3)
    ref.check_lse(lse.cpu(), l)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("head_dim", [64, 512])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("order", ["rising", "falling"])
def test_running_max_moves(kernel, device, dtype, head_dim, order):
    # Key norms that grow along the sequence (or shrink): the row max keeps passing the kernel's running max by more
    # than its rescale slack (the accumulator is rescaled many times) or never does (probabilities up to the slack).
    lq, lk = [5, 70], [90, 70]
    q, k, v, cu_q, cu_k = make_inputs(lq, lk, 4, 2, head_dim, dtype, device)
    growth = torch.cat([torch.linspace(0.2, 12.0, n) for n in lk])
    if order == "falling":
        growth = torch.cat([g.flip(0) for g in growth.split(lk)])
    k = (k.cpu().float() * growth[:, None, None]).to(dtype).to(device)
    for causal in (False, True):
        out, lse, _ = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal,
                                                    return_attn_probs=True)
        kw = dict(scale=head_dim**-0.5, causal=causal)
        cq, ck = cu_q.tolist(), cu_k.tolist()
        out_ref, lse_ref = ref.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cq, ck, **kw)
        out_pt, _ = ref.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cq, ck, dtype=dtype, **kw)
        ref.check_close(out.cpu(), out_ref, out_pt)
        ref.check_lse(lse.cpu(), lse_ref)


@pytest.mark.kernels_ci
def test_shared_cu_seqlens_and_strided_views(kernel, device):
    # One tensor as both cu_seqlens; q/k/v as head slices of packed qkv (row stride != H * D).
    lengths = [9, 30, 1]
    total, h, d = sum(lengths), 4, 64
    qkv = torch.randn(total, 3 * h, d, dtype=torch.float16).to(device)
    q, k, v = qkv[:, :h], qkv[:, h:2 * h], qkv[:, 2 * h:]
    cu_s = cu(lengths, device)
    before = (qkv.clone(), cu_s.clone())
    out = kernel.flash_attn_varlen_func(q, k, v, cu_s, cu_s, 30, 30, causal=True)
    assert torch.equal(before[0], qkv) and torch.equal(before[1], cu_s)
    cs = cu_s.tolist()
    o_ref, _ = ref.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cs, cs, scale=d**-0.5, causal=True)
    o_pt, _ = ref.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cs, cs, scale=d**-0.5, causal=True, dtype=q.dtype)
    ref.check_close(out.cpu(), o_ref, o_pt)


def misalign(t, how):
    """A copy of t whose rows do not all start at multiples of 4 elements: at storage offset 2, or with a row stride
    (dim 0) 2 elements longer than packed."""
    if how == "offset":
        buf = torch.zeros(t.numel() + 2, dtype=t.dtype, device=t.device)
        out = buf[2:].view(t.shape)
    else:
        row = t[0].numel() + 2
        buf = torch.zeros(t.shape[0] * row, dtype=t.dtype, device=t.device)
        out = buf.as_strided(t.shape, (row, *t.stride()[1:]))
    out.copy_(t)
    return out


@pytest.mark.kernels_ci
@pytest.mark.parametrize("d", [64, 256])  # 256: the resident-Q layout's own staging loops
@pytest.mark.parametrize("how", ["offset", "row_stride"])
@pytest.mark.parametrize("which", ["q", "k", "v", "paged"])
def test_rows_not_4_aligned(kernel, device, which, how, d):
    # The kernels read rows 4 elements at a time only where every row starts at a multiple of 4 (the planner's
    # aligned_rows bits); the emulator reports any misaligned vector access, so a wrong bit fails here.
    lq, lk, h, hkv = [7, 33], [19, 45], 4, 2
    q, k, v, cu_q, cu_k = make_inputs(lq, lk, h, hkv, d, torch.float16, device)
    kw = dict(scale=d**-0.5, causal=True)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    out_ref, _ = ref.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cq, ck, **kw)
    out_pt, _ = ref.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cq, ck, dtype=torch.float16, **kw)
    table = None
    if which == "paged":  # block size 8: blocks 0..2 sequence 0, 3..8 sequence 1, in order
        table = torch.tensor([[0, 1, 2, -1, -1, -1], [3, 4, 5, 6, 7, 8]], dtype=torch.int32, device=device)
        caches = []
        for t in (k, v):
            c = torch.zeros(9, 8, hkv, d, dtype=t.dtype, device=device)
            c[:3].view(-1, hkv, d)[:19] = t[:19]
            c[3:].view(-1, hkv, d)[:45] = t[19:]
            caches.append(misalign(c, how))
        k, v = caches
    else:
        q, k, v = (misalign(t, how) if name == which else t for name, t in zip("qkv", (q, k, v)))
    out = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=True, block_table=table)
    ref.check_close(out.cpu(), out_ref, out_pt)


@pytest.mark.kernels_ci
def test_flash_attention_varlen_legacy(kernel, device):
    lq, lk = [5, 17], [12, 17]
    q, k, v, cu_q, cu_k = make_inputs(lq, lk, 4, 2, 64, torch.float16, device)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for softcapping, softcap in ((1.0, 0.0), (3.0, 3.0)):
        out = torch.full_like(q, 7.0)
        res = kernel.flash_attention_varlen(out, q, k, v, cu_q, cu_k, 17, 17, True, 0.125, softcapping)
        assert res is None
        o_ref, _ = ref.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cq, ck, scale=0.125, causal=True, softcap=softcap)
        o_pt, _ = ref.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cq, ck, scale=0.125, causal=True, softcap=softcap,
                                       dtype=q.dtype)
        ref.check_close(out.cpu(), o_ref, o_pt)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flash_attn_func_decode_transposed_cache(kernel, device, dtype):
    # transformers generate(): q [B, 1, H, D], k/v the transpose of a [B, Hkv, Sk, D] cache.
    b, sk, h, hkv, d = 3, 37, 8, 2, 128
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, 1, h, d, generator=g).to(dtype).to(device)
    k_cache = torch.randn(b, hkv, sk, d, generator=g).to(dtype).to(device)
    v_cache = torch.randn(b, hkv, sk, d, generator=g).to(dtype).to(device)
    k, v = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    assert k.stride() == (sk * hkv * d, d, sk * d, 1)
    out, lse, _ = kernel.flash_attn_func(q, k, v, causal=True, softmax_scale=d**-0.5, return_attn_probs=True)
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (b, h, 1)
    o_ref, l_ref = ref.attention_dense(q.cpu(), k.cpu(), v.cpu(), scale=d**-0.5, causal=True)
    o_pt, _ = ref.attention_dense(q.cpu(), k.cpu(), v.cpu(), scale=d**-0.5, causal=True, dtype=dtype)
    ref.check_close(out.cpu(), o_ref, o_pt)
    ref.check_lse(lse.cpu(), l_ref)


# flash_attn_func with up to 16 query rows runs on the decode kernel (K/V as a contiguous cache): every feature,
# GQA/MQA, row tiles up to 16 (group x sq) and beyond (several row blocks), sq > sk, splits for a longer context.
DECODE_CASES = [  # (sq, sk, heads, hkv, head_dim, dtype, features)
    (1, 37, 8, 2, 64, torch.float16, dict(causal=True)),
    (1, 300, 32, 4, 128, torch.bfloat16, dict(causal=True, softcap=5.0)),
    (2, 50, 4, 4, 32, torch.float32, dict(causal=True, window=(7, 0), alibi=True)),
    (3, 29, 16, 1, 96, torch.float16, dict(causal=False, sinks=True)),
    (16, 40, 8, 2, 256, torch.bfloat16, dict(causal=True, window=(5, 3), sinks=True, alibi=True)),
    (9, 4, 6, 3, 72, torch.float32, dict(causal=True)),
    (1, 1100, 8, 8, 80, torch.float16, dict(causal=True, window=(-1, -1), sinks=True)),
]


@pytest.mark.kernels_ci
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"sq{c[0]}_sk{c[1]}_h{c[2]}_{c[3]}_d{c[4]}")
def test_flash_attn_func_decode_kernel(kernel, device, case):
    sq, sk, h, hkv, d, dtype, f = case
    g = torch.Generator().manual_seed(sq * 1000 + sk)
    q = torch.randn(2, sq, h, d, generator=g).to(dtype).to(device)
    k = torch.randn(2, sk, hkv, d, generator=g).to(dtype).to(device)
    v = torch.randn(2, sk, hkv, d, generator=g).to(dtype).to(device)
    slopes, s_aux = extras(h, f.get("alibi", False), f.get("sinks", False), device, batch=2)
    kw = dict(causal=f["causal"], window=f.get("window", (-1, -1)), softcap=f.get("softcap", 0.0))
    out, lse, _ = kernel.flash_attn_func(q, k, v, causal=kw["causal"], window_size=kw["window"], softcap=kw["softcap"],
                                         alibi_slopes=slopes, return_attn_probs=True, s_aux=s_aux)
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (2, h, sq)
    extra = dict(alibi_slopes=None if slopes is None else slopes.cpu(), sinks=None if s_aux is None else s_aux.cpu())
    o_ref, l_ref = ref.attention_dense(q.cpu(), k.cpu(), v.cpu(), scale=d**-0.5, **kw, **extra)
    o_pt, _ = ref.attention_dense(q.cpu(), k.cpu(), v.cpu(), scale=d**-0.5, dtype=dtype, **kw, **extra)
    ref.check_close(out.cpu(), o_ref, o_pt)
    ref.check_lse(lse.cpu(), l_ref)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("sq,sk", [(19, 19), (40, 23), (5, 50)])
def test_flash_attn_func_prefill(kernel, device, sq, sk):
    b, h, hkv, d = 2, 4, 2, 80
    g = torch.Generator().manual_seed(sq)
    q = torch.randn(b, sq, h, d, generator=g).to(torch.bfloat16).to(device)
    k = torch.randn(b, sk, hkv, d, generator=g).to(torch.bfloat16).to(device)
    v = torch.randn(b, sk, hkv, d, generator=g).to(torch.bfloat16).to(device)
    slopes, s_aux = extras(h, True, True, device, batch=b)
    kw = dict(causal=True, window=(9, 0), softcap=4.0)
    out, lse, _ = kernel.flash_attn_func(q, k, v, causal=True, window_size=(9, 0), softcap=4.0, alibi_slopes=slopes,
                                         return_attn_probs=True, s_aux=s_aux)
    o_ref, l_ref = ref.attention_dense(q.cpu(), k.cpu(), v.cpu(), scale=d**-0.5, alibi_slopes=slopes.cpu(),
                                       sinks=s_aux.cpu(), **kw)
    o_pt, _ = ref.attention_dense(q.cpu(), k.cpu(), v.cpu(), scale=d**-0.5, alibi_slopes=slopes.cpu(),
                                  sinks=s_aux.cpu(), dtype=q.dtype, **kw)
    ref.check_close(out.cpu(), o_ref, o_pt)
    ref.check_lse(lse.cpu(), l_ref)


@pytest.mark.kernels_ci
def test_return_value_forms(kernel, device):
    q, k, v, cu_q, cu_k = make_inputs([4], [4], 2, 2, 32, torch.float32, device)
    out = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 4)
    assert isinstance(out, torch.Tensor)
    res = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 4, return_attn_probs=True)
    assert isinstance(res, tuple) and len(res) == 3 and res[2] is None and torch.equal(res[0], out)


# --- Bad input: a clear error naming the argument, before anything runs. -----------------------------------


def _bad_case(device, **over):
    q, k, v, cu_q, cu_k = make_inputs([5, 6], [5, 6], 4, 2, 64, torch.float16, device)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=6, max_seqlen_k=6)
    args.update(over)
    return args


@pytest.mark.kernels_ci
@pytest.mark.parametrize(
    "name,make,match",
    [
        ("q dtype", lambda d: dict(q=torch.randn(11, 4, 64, dtype=torch.float64, device=d)), "q must be float32"),
        ("k dtype", lambda d: dict(k=torch.randn(11, 2, 64, device=d)), "k must have the dtype of q"),
        ("k device", lambda d: dict(k=torch.randn(11, 2, 64, dtype=torch.float16, device="meta")), "k must be on"),
        ("cu int64", lambda d: dict(cu_seqlens_q=torch.tensor([0, 5, 11], device=d)), "cu_seqlens_q must be int32"),
        ("cu_k int64", lambda d: dict(cu_seqlens_k=torch.tensor([0, 5, 11], device=d)), "cu_seqlens_k must be int32"),
        ("head dim", lambda d: dict(q=torch.randn(11, 4, 48, dtype=torch.float16, device=d),
                                    k=torch.randn(11, 2, 48, dtype=torch.float16, device=d),
                                    v=torch.randn(11, 2, 48, dtype=torch.float16, device=d)), "head dim 48"),
        ("v shape", lambda d: dict(v=torch.randn(11, 2, 32, dtype=torch.float16, device=d)), "v must have the shape"),
        ("k head dim", lambda d: dict(k=torch.randn(11, 2, 32, dtype=torch.float16, device=d),
                                      v=torch.randn(11, 2, 32, dtype=torch.float16, device=d)), "head dim of q"),
        ("q rank", lambda d: dict(q=torch.randn(1, 11, 4, 64, dtype=torch.float16, device=d)), "q must have shape"),
        ("gqa", lambda d: dict(k=torch.randn(11, 3, 64, dtype=torch.float16, device=d),
                               v=torch.randn(11, 3, 64, dtype=torch.float16, device=d)), "multiple of the number"),
        ("q last dim", lambda d: dict(q=torch.randn(11, 64, 4, dtype=torch.float16, device=d).transpose(1, 2)),
         "q must have a contiguous last dimension"),
        ("v last dim", lambda d: dict(v=torch.randn(11, 64, 2, dtype=torch.float16, device=d).transpose(1, 2)),
         "v must have a contiguous last dimension"),
        ("cu length", lambda d: dict(cu_seqlens_k=torch.tensor([0, 11], dtype=torch.int32, device=d)),
         "same length"),
        ("dropout", lambda d: dict(dropout_p=0.1), "dropout_p"),
        ("window", lambda d: dict(window_size=(-2, 0)), "window_size"),
        ("alibi dtype", lambda d: dict(alibi_slopes=torch.ones(3, device=d)), "alibi_slopes must have shape"),
        ("s_aux shape", lambda d: dict(s_aux=torch.ones(3, device=d)), "s_aux must have shape"),
        ("block_table", lambda d: dict(block_table=torch.zeros(2, 1, dtype=torch.int32, device=d)),
         r"k must have shape \[num_blocks"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_bad_input(kernel, device, name, make, match):
    args = _bad_case(device, **make(device))
    with pytest.raises((ValueError, TypeError, NotImplementedError), match=match):
        kernel.flash_attn_varlen_func(**args)


@pytest.mark.kernels_ci
def test_bad_input_legacy_out(kernel, device):
    q, k, v, cu_q, cu_k = make_inputs([5, 6], [5, 6], 4, 4, 64, torch.float16, device)
    for out in (q, q[:], k.view(q.shape) if k.shape == q.shape else q):
        with pytest.raises(ValueError, match="out must not overlap"):
            kernel.flash_attention_varlen(out, q, k, v, cu_q, cu_k, 6, 6, True, 0.125, 1.0)
    with pytest.raises(TypeError, match="out must have the dtype of q"):
        kernel.flash_attention_varlen(torch.empty(q.shape, device=device), q, k, v, cu_q, cu_k, 6, 6, True, 0.1, 1.0)
    with pytest.raises(ValueError, match="out must have the shape of q"):
        kernel.flash_attention_varlen(torch.empty_like(q)[:5], q, k, v, cu_q, cu_k, 6, 6, True, 0.1, 1.0)


@pytest.mark.kernels_ci
def test_bad_input_dense(kernel, device):
    q = torch.randn(2, 3, 4, 64, dtype=torch.float16, device=device)
    k = torch.randn(3, 5, 2, 64, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="k must have the batch size of q"):
        kernel.flash_attn_func(q, k, k)
    with pytest.raises(ValueError, match="dropout_p"):
        kernel.flash_attn_func(q, k[:2], k[:2], dropout_p=0.5)


# --- Emulator schedules and the race detector (Linux only). ----------------------------------------------


@pytest.mark.kernels_ci
@pytest.mark.parametrize("schedule", ["reverse", "random"])
def test_schedules_and_races(kernel, device, emulator, schedule):
    emulator(schedule=schedule, seed=7, check_races=True)
    run_varlen_case(kernel, device, torch.float16, 64, "gqa", ([3, 40], [9, 41], 2), causal=True, window=(20, 2),
                    softcap=3.0, sinks=True, alibi=True)
    run_varlen_case(kernel, device, torch.float32, 256, "mqa", ([17], [33], 0), causal=True)
    run_varlen_case(kernel, device, torch.bfloat16, 96, "mha", ([0, 9], [4, 0], 1))
    run_varlen_case(kernel, device, torch.float16, 256, "gqa", ([3, 40], [9, 41], 2), causal=True, window=(20, 2),
                    softcap=3.0, sinks=True, alibi=True)  # resident Q: K, then V, through one tile


# --- The full matrix (--full). -----------------------------------------------------------------------------


@pytest.mark.full
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("causal,window,softcap,sinks,alibi",
                         list(itertools.product([False, True], WINDOWS, [0.0, 2.0], [False, True], [False, True])))
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_full_matrix(kernel, device, dtype, head_dim, heads, causal, window, softcap, sinks, alibi, layout):
    run_varlen_case(kernel, device, dtype, head_dim, heads, layout, causal=causal, window=window, softcap=softcap,
                    sinks=sinks, alibi=alibi)


@pytest.mark.kernels_ci
def test_garbage_cu_seqlens_stay_in_bounds(kernel, device):
    # Decreasing, negative and out-of-range prefix sums: the kernel clamps them to the tensors (the emulator
    # reports any out-of-bounds access as an error). The output of such a call is unspecified.
    q, k, v, _, _ = make_inputs([10], [12], 2, 1, 64, torch.float16, device)
    cu_q = torch.tensor([0, 50, 3, -5, 10], dtype=torch.int32, device=device)
    cu_k = torch.tensor([-7, 4, 100, 2, 12], dtype=torch.int32, device=device)
    out = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 64, 64, causal=True)
    assert out.shape == q.shape
    # max_seqlen_q = 1 takes the decode kernel: its block table is built from the same garbage.
    out = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, 64, causal=True)
    assert out.shape == q.shape


@pytest.mark.kernels_ci
def test_varlen_decode_left_padding(kernel, device):
    # transformers generate() with left padding: one query per sequence, cu_seqlens_q = arange(B + 1).
    lk = [17, 1, 40, 9]
    q, k, v, cu_q, cu_k = make_inputs([1] * 4, lk, 8, 2, 128, torch.float16, device)
    assert torch.equal(cu_q.cpu(), torch.arange(5, dtype=torch.int32))
    out = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, max(lk), causal=True, softmax_scale=128**-0.5)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    o_ref, _ = ref.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cq, ck, scale=128**-0.5, causal=True)
    o_pt, _ = ref.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cq, ck, scale=128**-0.5, causal=True, dtype=q.dtype)
    ref.check_close(out.cpu(), o_ref, o_pt)


# max_seqlen_q = 1 runs on the decode kernel (packed K/V as one-token pages): sequences with no query, sequences
# with no key, padded q rows, every feature, GQA/MQA, and the LSE in the varlen layout.
VARLEN_DECODE_CASES = [  # (seqlens_q, seqlens_k, pad_q, heads, dtype, head_dim, features)
    ([1, 1, 1], [17, 1, 40], 0, (8, 2), torch.float32, 64, dict(causal=True)),
    ([1, 0, 1, 1], [5, 9, 0, 33], 3, (4, 4), torch.float16, 128, dict(causal=True, window=(6, 0), softcap=3.0)),
    ([0, 1], [12, 300], 1, (6, 1), torch.bfloat16, 96, dict(causal=False, alibi=True, sinks=True)),
    ([1, 1], [64, 7], 0, (16, 2), torch.float16, 256, dict(causal=True, sinks=True)),
]


@pytest.mark.kernels_ci
@pytest.mark.parametrize("case", VARLEN_DECODE_CASES, ids=lambda c: f"q{len(c[0])}_d{c[5]}_{str(c[4])[6:]}")
def test_varlen_decode_kernel(kernel, device, case):
    lq, lk, pad, (h, hkv), dtype, d, f = case
    q, k, v, cu_q, cu_k = make_inputs(lq, lk, h, hkv, d, dtype, device, pad, seed=len(lk))
    slopes, s_aux = extras(h, f.get("alibi", False), f.get("sinks", False), device)
    kw = dict(causal=f["causal"], window=f.get("window", (-1, -1)), softcap=f.get("softcap", 0.0))
    inputs = [t.clone() for t in (q, k, v, cu_q, cu_k)]
    out, lse, _ = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, max(lk), softmax_scale=d**-0.5,
                                                causal=kw["causal"], window_size=kw["window"], softcap=kw["softcap"],
                                                alibi_slopes=slopes, return_attn_probs=True, s_aux=s_aux)
    for before, after in zip(inputs, (q, k, v, cu_q, cu_k)):
        assert torch.equal(before, after), "an input was modified"
    assert out.shape == q.shape and lse.shape == (h, q.shape[0]) and lse.is_contiguous()
    extra = dict(alibi_slopes=None if slopes is None else slopes.cpu(), sinks=None if s_aux is None else s_aux.cpu())
    cq, ck = cu_q.tolist(), cu_k.tolist()
    o_ref, l_ref = ref.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cq, ck, scale=d**-0.5, **kw, **extra)
    o_pt, _ = ref.attention_varlen(q.cpu(), k.cpu(), v.cpu(), cq, ck, scale=d**-0.5, dtype=dtype, **kw, **extra)
    n = cq[-1]
    ref.check_close(out[:n].cpu(), o_ref[:n], o_pt[:n])
    ref.check_lse(lse[:, :n].cpu(), l_ref[:, :n])
