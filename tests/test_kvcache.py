"""flash_attn_with_kvcache through the package (kernels.get_kernel) against a float64 reference.

Tolerance: FlashAttention's rule with k = 3: max|out - ref| <= 3 * max|out_torch_same_dtype - ref| + 1e-5. The
cache after the call must equal the reference cache bit for bit; slots not written hold NaN and must stay NaN, and
no byte of the cache buffer outside the written slots may change. The kernel-level tests (direct dispatches,
traffic) are in test_paged_kernels.py; its scenario builder and reference are reused here.
"""

import inspect
import itertools
import random

import dispatch_stats
import pytest
import torch
from test_paged_kernels import bits, check_fa2, make_case, reference_attention, reference_write

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [32, 64, 72, 80, 96, 128, 192, 256, 512]  # test_supported_head_dims checks the package agrees
GROUPS = [1, 4, 8]
BLOCK_SIZES = [1, 5, 16, 32, 256]
CACHES = [f"paged{bs}" for bs in BLOCK_SIZES] + ["contiguous"]
FEATURES = {
    "causal": dict(causal=True),
    "window": dict(window_size=(6, 2)),
    "softcap": dict(causal=True, softcap=3.0),
    "sinks": dict(causal=True, sinks=True),
    "alibi": dict(causal=True, alibi=True),
}
SQS = [1, 2, 16]
NEW_KV = [True, False]
STRICT = "METAL_FLASH_SDPA_STRICT"


def contiguous_case(*, Bsz=3, H=8, Hkv=2, D=64, sq=1, sk_new=1, dtype=torch.float16, S=48, seed=0):
    """A contiguous cache [B_cache, S, Hkv, D] (B_cache > B), rows picked by a permuted cache_batch_idx; expressed
    for the reference as a paged cache with block_size = S and block_table[b] = [cache_batch_idx[b]]."""
    g = torch.Generator().manual_seed(seed)
    b_cache = Bsz + 2
    seqlens = [int(x) for x in torch.randint(0, S - sk_new, (Bsz,), generator=g)]
    if Bsz >= 3:
        seqlens[1], seqlens[2] = -1, 0
    idx = torch.randperm(b_cache, generator=g)[:Bsz].to(torch.int32)
    storage = torch.full((2 * b_cache, S, Hkv, D), float("nan"), dtype=dtype)
    k_cache, v_cache = storage[:b_cache], storage[b_cache:]
    for b in range(Bsz):
        n = max(seqlens[b], 0)
        k_cache[int(idx[b]), :n] = torch.randn(n, Hkv, D, generator=g).to(dtype)
        v_cache[int(idx[b]), :n] = torch.randn(n, Hkv, D, generator=g).to(dtype)
    q = torch.randn(Bsz, sq, H, D, generator=g).to(dtype)
    k_new = torch.randn(Bsz, sk_new, Hkv, D, generator=g).to(dtype) if sk_new else None
    v_new = torch.randn(Bsz, sk_new, Hkv, D, generator=g).to(dtype) if sk_new else None
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, storage=storage, block_table=idx.view(Bsz, 1),
                cache_batch_idx=idx, cache_seqlens=torch.tensor(seqlens, dtype=torch.int32), k_new=k_new,
                v_new=v_new, gen=g)


def to_device(c, device):
    """Moves a case to `device`, keeping k_cache / v_cache views of one buffer."""
    if device.type == "cpu":
        return c
    d = dict(c)
    storage = c["storage"].to(device)
    n = c["k_cache"].shape[0]
    d["storage"], d["k_cache"], d["v_cache"] = storage, storage[:n], storage[n:]
    for key in ("q", "block_table", "cache_batch_idx", "cache_seqlens", "k_new", "v_new"):
        if d.get(key) is not None:
            d[key] = d[key].to(device)
    return d


def run_case(kernel, device, *, dtype, D, group, cache, feature, sq, new_kv, seed=0, num_splits=0, Hkv=2):
    sk_new = sq if new_kv else 0
    kw = dict(Bsz=3, H=group * Hkv, Hkv=Hkv, D=D, sq=sq, sk_new=sk_new, dtype=dtype, seed=seed)
    if cache == "contiguous":
        c = contiguous_case(**kw)
    else:
        c = make_case(block_size=int(cache[5:]), layout="halves", max_len=70, **kw)
    opts = dict(FEATURES[feature])
    g = c["gen"]
    H = group * Hkv
    alibi = (0.05 + 0.3 * torch.rand(H, generator=g)) if opts.pop("alibi", False) else None
    sinks = torch.randn(H, generator=g) if opts.pop("sinks", False) else None
    causal = opts.get("causal", False)
    window = opts.get("window_size", (-1, -1))
    softcap = opts.get("softcap", 0.0)
    scale = D ** -0.5

    cpu = c
    kc_ref, vc_ref = reference_write(cpu["k_cache"], cpu["v_cache"], cpu["block_table"], cpu["cache_seqlens"],
                                     cpu["k_new"], cpu["v_new"])
    storage_before = cpu["storage"].clone()
    k_before, v_before = cpu["k_cache"].clone(), cpu["v_cache"].clone()
    rkw = dict(scale=scale, window=(window[0], 0 if causal else window[1]), softcap=softcap, alibi=alibi,
               sinks=sinks)
    ref, ref_lse = reference_attention(cpu["q"], kc_ref, vc_ref, cpu["block_table"], cpu["cache_seqlens"], sk_new,
                                       **rkw)
    same, _ = reference_attention(cpu["q"], kc_ref, vc_ref, cpu["block_table"], cpu["cache_seqlens"], sk_new,
                                  dtype=dtype, **rkw)

    d = to_device(c, device)
    paged = cache != "contiguous"
    out, lse = kernel.flash_attn_with_kvcache(
        d["q"], d["k_cache"], d["v_cache"], d["k_new"], d["v_new"], cache_seqlens=d["cache_seqlens"],
        cache_batch_idx=None if paged else d["cache_batch_idx"], block_table=d["block_table"] if paged else None,
        softmax_scale=scale, causal=causal, window_size=window, softcap=softcap,
        alibi_slopes=None if alibi is None else alibi.to(device), num_splits=num_splits, return_softmax_lse=True,
        s_aux=None if sinks is None else sinks.to(device))
    out, lse = out.cpu(), lse.cpu()
    k_after, v_after, storage_after = d["k_cache"].cpu(), d["v_cache"].cpu(), d["storage"].cpu()

    assert out.is_contiguous() and out.shape == cpu["q"].shape and out.dtype == dtype
    assert torch.equal(bits(k_after), bits(kc_ref)), "k_cache differs from the reference cache"
    assert torch.equal(bits(v_after), bits(vc_ref)), "v_cache differs from the reference cache"
    changed = int((bits(storage_after) != bits(storage_before)).sum())
    written = int((bits(kc_ref) != bits(k_before)).sum() + (bits(vc_ref) != bits(v_before)).sum())
    assert changed == written, "bytes outside the written slots changed"
    assert not torch.isnan(out).any()
    err, base = check_fa2(out, ref, same)
    inf = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), inf), "LSE -inf rows differ"
    if (~inf).any():
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        assert (lse[~inf].double() - ref_lse[~inf]).abs().max().item() <= tol
    return err, base


# ---- the grid ----------------------------------------------------------------------------------------------------

GRID = list(itertools.product(DTYPES, HEAD_DIMS, GROUPS, CACHES, FEATURES, SQS, NEW_KV))


def _covering_subset(n, seed):
    """A seeded sample of the grid in which every value of every axis appears at least once."""
    rnd = random.Random(seed)
    picked = set(rnd.sample(range(len(GRID)), n))
    for axis in range(len(GRID[0])):
        for value in {row[axis] for row in GRID}:
            if not any(GRID[i][axis] == value for i in picked):
                picked.add(next(i for i in rnd.sample(range(len(GRID)), len(GRID)) if GRID[i][axis] == value))
    return sorted(picked)


CI = set(_covering_subset(12, seed=1))
DEFAULT = set(_covering_subset(60, seed=2)) | CI


def _grid_params():
    for i, row in enumerate(GRID):
        dtype, D, group, cache, feature, sq, new_kv = row
        marks = [pytest.mark.kernels_ci] if i in CI else [] if i in DEFAULT else [pytest.mark.full]
        name = f"{str(dtype)[6:]}-d{D}-g{group}-{cache}-{feature}-sq{sq}-{'new' if new_kv else 'nonew'}"
        yield pytest.param(*row, marks=marks, id=name)


@pytest.mark.parametrize("dtype,D,group,cache,feature,sq,new_kv", list(_grid_params()))
def test_grid(kernel, device, dtype, D, group, cache, feature, sq, new_kv):
    run_case(kernel, device, dtype=dtype, D=D, group=group, cache=cache, feature=feature, sq=sq, new_kv=new_kv,
             seed=hash((D, group, sq)) % 1000)


# ---- API ---------------------------------------------------------------------------------------------------------


@pytest.mark.kernels_ci
def test_signature(kernel):
    params = list(inspect.signature(kernel.flash_attn_with_kvcache).parameters.values())
    fa2 = ["q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin", "cache_seqlens", "cache_batch_idx",
           "cache_leftpad", "block_table", "softmax_scale", "causal", "window_size", "softcap", "rotary_interleaved",
           "alibi_slopes", "num_splits", "return_softmax_lse"]
    assert [p.name for p in params[: len(fa2)]] == fa2
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params[: len(fa2)])
    assert params[len(fa2)].name == "s_aux" and params[len(fa2)].kind == params[len(fa2)].KEYWORD_ONLY
    assert not any(p.kind == p.VAR_KEYWORD for p in params)


@pytest.mark.kernels_ci
def test_supported_head_dims(kernel):
    assert list(kernel._ops.ops.kvcache_head_dims()) == HEAD_DIMS


@pytest.mark.kernels_ci
@pytest.mark.parametrize("layout", ["halves", "shifted"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_transformers_decode_call(kernel, device, dtype, layout):
    """generate_batch's decode step: five positional arguments, k/v cache views of one buffer, non-consecutive pages,
    padded rows (-1), the result .view()-ed to [1, -1, H, D]. "shifted" is transformers' layout: one page buffer,
    k_cache = pages[:-1], v_cache = pages[1:] (v one page after k, the views overlap; K pages at even ids);
    "halves": v_cache after all of k_cache."""
    N, H, Hkv, D, page, num_pages = 4, 8, 2, 64, 16, 140
    g = torch.Generator().manual_seed(0)
    buf = torch.full((2 * num_pages, page, Hkv, D), float("nan"), dtype=dtype)

    def views(b):
        if layout == "shifted":
            return b[: 2 * num_pages - 1], b[1:]
        return b[:num_pages], b[num_pages:]

    k_cache, v_cache = views(buf)
    lens = [20, -1, 33, 5]
    table = torch.full((N, 4), -1, dtype=torch.int32)
    table[0, :2] = torch.tensor([132, 128])
    table[2, :3] = torch.tensor([124, 120, 116])
    table[3, :1] = torch.tensor([100])
    for b, L in enumerate(lens):
        for t in range(max(L, 0)):
            k_cache[int(table[b, t // page]), t % page] = torch.randn(Hkv, D, generator=g).to(dtype)
            v_cache[int(table[b, t // page]), t % page] = torch.randn(Hkv, D, generator=g).to(dtype)
    q = torch.randn(N, 1, H, D, generator=g).to(dtype)
    k = torch.randn(N, 1, Hkv, D, generator=g).to(dtype)
    v = torch.randn(N, 1, Hkv, D, generator=g).to(dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    kc_ref, vc_ref = reference_write(k_cache, v_cache, table, seqlens, k, v)
    ref, _ = reference_attention(q, kc_ref, vc_ref, table, seqlens, 1, scale=D ** -0.5, window=(-1, 0))
    same, _ = reference_attention(q, kc_ref, vc_ref, table, seqlens, 1, scale=D ** -0.5, window=(-1, 0), dtype=dtype)

    dbuf = buf.clone().to(device)
    dk, dv = views(dbuf)
    out = kernel.flash_attn_with_kvcache(q.to(device), dk, dv, k.to(device), v.to(device),
                                         cache_seqlens=seqlens.to(device), block_table=table.to(device), causal=True,
                                         softmax_scale=D ** -0.5)
    out = out[0] if isinstance(out, tuple) else out
    assert out.view(1, -1, H, D).shape == (1, N, H, D)
    check_fa2(out.cpu(), ref, same)
    assert (out[1].cpu() == 0).all()
    # The expected buffer: the new tokens written in place through views of one copy (the views may overlap).
    ref_buf = buf.clone()
    rk, rv = views(ref_buf)
    for b, L in enumerate(lens):
        if L >= 0:
            rk[int(table[b, L // page]), L % page] = k[b, 0]
            rv[int(table[b, L // page]), L % page] = v[b, 0]
    assert torch.equal(bits(dbuf.cpu()), bits(ref_buf))


@pytest.mark.kernels_ci
@pytest.mark.parametrize("num_splits", [0, 1, 5])
def test_cache_seqlens_int_and_splits(kernel, device, num_splits):
    c = make_case(Bsz=2, H=8, Hkv=1, D=64, sq=1, sk_new=1, seqlens=[300, 300], max_len=400, seed=4)
    kc_ref, vc_ref = reference_write(c["k_cache"], c["v_cache"], c["block_table"], c["cache_seqlens"], c["k_new"],
                                     c["v_new"])
    ref, _ = reference_attention(c["q"], kc_ref, vc_ref, c["block_table"], c["cache_seqlens"], 1, scale=0.125,
                                 window=(-1, 0))
    same, _ = reference_attention(c["q"], kc_ref, vc_ref, c["block_table"], c["cache_seqlens"], 1, scale=0.125,
                                  window=(-1, 0), dtype=torch.float16)
    d = to_device(c, device)
    out = kernel.flash_attn_with_kvcache(d["q"], d["k_cache"], d["v_cache"], d["k_new"], d["v_new"],
                                         cache_seqlens=300, block_table=d["block_table"], causal=True,
                                         softmax_scale=0.125, num_splits=num_splits)
    check_fa2(out.cpu(), ref, same)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("lengths", ["given", "whole"])
@pytest.mark.parametrize("num_splits", [0, 1, 3])
def test_contiguous_rows_without_index(kernel, device, lengths, num_splits):
    """A contiguous cache without block_table, cache_batch_idx or new tokens: request b's keys are row b (the decode
    reads no block table; with cache_seqlens=None, no length tensor either: every request sees the whole row). Rows
    past the batch and slots past a request's length hold NaN: read, they would make its output NaN."""
    B, S, H, Hkv, D = 3, 45, 8, 2, 64
    g = torch.Generator().manual_seed(11)
    seqlens = [45, 17, 1] if lengths == "given" else [S] * B
    k_cache = torch.full((B + 2, S, Hkv, D), float("nan"), dtype=torch.float16)
    v_cache = torch.full((B + 2, S, Hkv, D), float("nan"), dtype=torch.float16)
    for b, n in enumerate(seqlens):
        k_cache[b, :n] = torch.randn(n, Hkv, D, generator=g).half()
        v_cache[b, :n] = torch.randn(n, Hkv, D, generator=g).half()
    q = torch.randn(B, 1, H, D, generator=g).half()
    table = torch.arange(B, dtype=torch.int32).view(B, 1)
    lens = torch.tensor(seqlens, dtype=torch.int32)
    rkw = dict(scale=D ** -0.5, window=(-1, 0))
    ref, _ = reference_attention(q, k_cache, v_cache, table, lens, 0, **rkw)
    same, _ = reference_attention(q, k_cache, v_cache, table, lens, 0, dtype=torch.float16, **rkw)
    out = kernel.flash_attn_with_kvcache(q.to(device), k_cache.to(device), v_cache.to(device),
                                         cache_seqlens=lens.to(device) if lengths == "given" else None, causal=True,
                                         softmax_scale=D ** -0.5, num_splits=num_splits)
    check_fa2(out.cpu(), ref, same)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("interleaved", [True, False])
def test_rotary(kernel, device, interleaved):
    D, rd = 64, 32
    c = make_case(Bsz=2, H=4, Hkv=2, D=D, sq=2, sk_new=2, seqlens=[7, 12], seed=6)
    g = c["gen"]
    angles = torch.rand(64, rd // 2, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()

    def rotate(x, start):
        pos = start.long()[:, None] + torch.arange(x.shape[1])
        cc, ss = cos[pos][:, :, None].double(), sin[pos][:, :, None].double()
        xr = x[..., :rd].double()
        if interleaved:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            r = torch.stack((x1 * cc - x2 * ss, x1 * ss + x2 * cc), -1).flatten(-2)
        else:
            x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
            r = torch.cat((x1 * cc - x2 * ss, x1 * ss + x2 * cc), -1)
        return torch.cat((r.to(x.dtype), x[..., rd:]), -1)

    qr, kr = rotate(c["q"], c["cache_seqlens"]), rotate(c["k_new"], c["cache_seqlens"])
    kc_ref, vc_ref = reference_write(c["k_cache"], c["v_cache"], c["block_table"], c["cache_seqlens"], kr, c["v_new"])
    ref, _ = reference_attention(qr, kc_ref, vc_ref, c["block_table"], c["cache_seqlens"], 2, scale=D ** -0.5,
                                 window=(-1, 0))
    same, _ = reference_attention(qr, kc_ref, vc_ref, c["block_table"], c["cache_seqlens"], 2, scale=D ** -0.5,
                                  window=(-1, 0), dtype=torch.float16)
    d = to_device(c, device)
    out = kernel.flash_attn_with_kvcache(d["q"], d["k_cache"], d["v_cache"], d["k_new"], d["v_new"],
                                         rotary_cos=cos.to(device), rotary_sin=sin.to(device),
                                         cache_seqlens=d["cache_seqlens"], block_table=d["block_table"], causal=True,
                                         rotary_interleaved=interleaved)
    check_fa2(out.cpu(), ref, same)
    # The cache holds the rotated keys (rounded once to fp16, as the reference): within one fp16 ulp.
    assert (d["k_cache"].cpu().double() - kc_ref.double()).nan_to_num(0).abs().max() <= 4e-3


@pytest.mark.kernels_ci
def test_long_chunk_sq_above_16(kernel, device):
    """sq > 16 still works (K/V are read once per row block)."""
    run_case(kernel, device, dtype=torch.float16, D=64, group=2, cache="paged16", feature="causal", sq=20,
             new_kv=True)


# ---- errors, strict mode, fuzz -----------------------------------------------------------------------------------


def _small(device, **over):
    c = make_case(Bsz=2, H=4, Hkv=2, D=32, sq=1, sk_new=1, seqlens=[5, 9], seed=8)
    c = to_device(c, device)
    args = dict(q=c["q"], k_cache=c["k_cache"], v_cache=c["v_cache"], k=c["k_new"], v=c["v_new"],
                cache_seqlens=c["cache_seqlens"], block_table=c["block_table"], causal=True)
    args.update(over)
    return args


@pytest.mark.kernels_ci
@pytest.mark.parametrize("name,over,exc,match", [
    ("leftpad_paged", lambda a: dict(cache_leftpad=torch.zeros(2, dtype=torch.int32)), ValueError,
     "cache_leftpad cannot be combined with block_table"),
    ("k_without_v", lambda a: dict(v=None), ValueError, "k and v"),
    ("head_dim", lambda a: dict(q=torch.zeros(2, 1, 4, 48, dtype=torch.float16)), ValueError, "head dim"),
    ("dtype", lambda a: dict(q=a["q"].float()), TypeError, "k_cache must have the dtype of q"),
    ("table_dtype", lambda a: dict(block_table=a["block_table"].long()), TypeError, "block_table must be int32"),
    ("seqlens_shape", lambda a: dict(cache_seqlens=torch.zeros(3, dtype=torch.int32)), ValueError,
     "cache_seqlens must have shape"),
    ("heads", lambda a: dict(q=torch.zeros(2, 1, 3, 32, dtype=torch.float16)), ValueError, "multiple"),
    ("batch_idx_with_table", lambda a: dict(cache_batch_idx=torch.zeros(2, dtype=torch.int32)), ValueError,
     "cache_batch_idx"),
    ("num_splits", lambda a: dict(num_splits=-1), ValueError, "num_splits"),
    ("num_splits_over_max", lambda a: dict(num_splits=257), ValueError, "num_splits must be in"),  # FA2 raises too
])
def test_bad_input(kernel, device, name, over, exc, match):
    args = _small(device)
    args.update({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in over(args).items()})
    with pytest.raises(exc, match=match):
        kernel.flash_attn_with_kvcache(**args)


@pytest.mark.kernels_ci
def test_strict_mode_raises(kernel, device, monkeypatch):
    monkeypatch.setenv(STRICT, "1")
    good = _small(device)
    kernel.flash_attn_with_kvcache(**good)  # valid input passes strict mode
    bad_table = good["block_table"].clone()
    bad_table[0, 0] = 10 ** 6
    with pytest.raises(ValueError, match="block_table"):
        kernel.flash_attn_with_kvcache(**_small(device, block_table=bad_table))
    with pytest.raises(ValueError, match="capacity"):
        kernel.flash_attn_with_kvcache(**_small(device, cache_seqlens=torch.tensor([5, 10 ** 4], dtype=torch.int32,
                                                                                     device=device)))
    with pytest.raises(ValueError, match="cache_seqlens"):
        kernel.flash_attn_with_kvcache(**_small(device, cache_seqlens=torch.tensor([-7, 3], dtype=torch.int32,
                                                                                     device=device)))


@pytest.mark.parametrize("seed", [pytest.param(s, marks=[pytest.mark.kernels_ci] if s < 2 else []) for s in range(8)])
def test_fuzz_no_overrun(kernel, device, emulator, monkeypatch, seed):
    """Random block tables and lengths: without strict mode every call completes (the emulator raises on any
    out-of-bounds access, race or divergent barrier); with strict mode invalid ones raise ValueError."""
    emulator(schedule=["forward", "reverse", "random"][seed % 3], seed=seed, check_races=True)
    g = torch.Generator().manual_seed(seed)
    Bsz, H, Hkv, D, bs, num_blocks, max_blocks = 4, 4, 2, 32, [1, 3, 16, 5][seed % 4], 6, 5
    k_cache = torch.randn(num_blocks, bs, Hkv, D).half()
    v_cache = torch.randn(num_blocks, bs, Hkv, D).half()
    table = torch.randint(-4, 12, (Bsz, max_blocks), generator=g, dtype=torch.int32)
    table[0, 0] = 2 ** 31 - 1
    lens = torch.randint(-3, max_blocks * bs + 6, (Bsz,), generator=g, dtype=torch.int32)
    lens[-1] = 2 ** 31 - 2
    q = torch.randn(Bsz, 2, H, D).half()
    k, v = torch.randn(Bsz, 2, Hkv, D).half(), torch.randn(Bsz, 2, Hkv, D).half()
    args = dict(cache_seqlens=lens, block_table=table, causal=True, num_splits=[0, 1, 3][seed % 3])
    out = kernel.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, **args)
    assert torch.isfinite(out).all()
    monkeypatch.setenv(STRICT, "1")
    with pytest.raises(ValueError):
        kernel.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, **args)


# ---- dispatches and traffic (emulated build) ----------------------------------------------------------------------


@pytest.mark.kernels_ci
@pytest.mark.parametrize("num_splits,D,H", [(0, 128, 8), (1, 128, 8), (0, 512, 4), (64, 128, 4), (64, 64, 16)])
def test_dispatches_and_traffic(kernel, device, num_splits, D, H):
    """S = 2048, one KV head: at most 3 dispatches (write, attention, combine) and K/V bytes loaded <= 1.1 x the
    valid cache bytes: GQA 8 at D = 128 (row tile 8), GQA 4 at D = 512 (row tile 4: at D = 512 a threadgroup holds
    at most 4 rows, so GQA 8 reads K/V twice, once per row block); splits of one or two steps (the planner's for the
    emulator's default 80 cores, or 64) run the wide path at D = 128 and 64 (GQA 16), whose threads share each key's
    rows through threadgroup memory."""
    if device.type != "cpu":
        pytest.skip("traffic counters exist in the emulated build only")
    S, Hkv = 2048, 1
    c = make_case(Bsz=1, H=H, Hkv=Hkv, D=D, sq=1, sk_new=1, block_size=16, seqlens=[S - 1], seed=2, layout="separate")
    result = []
    stats = dispatch_stats.recorded(lambda: result.append(kernel.flash_attn_with_kvcache(
        c["q"], c["k_cache"], c["v_cache"], c["k_new"], c["v_new"], cache_seqlens=c["cache_seqlens"],
        block_table=c["block_table"], causal=True, num_splits=num_splits)))
    out = result[0]
    names = [s.kernel.decode() for s in stats]
    assert 2 <= len(stats) <= 3 and names[0].startswith("kv_paged_write") and names[1].startswith("paged_decode_")
    assert names[1].startswith("paged_decode_wide_") == (num_splits != 1 and D <= 128), names
    attn = stats[1]
    ratio = (attn.loaded[1] + attn.loaded[2]) / (2 * S * Hkv * D * 2)
    print(f"dispatches {names}, K/V loaded / valid = {ratio:.4f}")
    assert ratio <= 1.1
    assert torch.isfinite(out).all()


@pytest.mark.kernels_ci
def test_new_kv_with_different_layouts(kernel, device):
    """gpt-oss in transformers' continuous batching passes new k and v with different strides (k a transposed
    reshape, v contiguous), and the two cache views may differ too: each is read and written with its own strides."""
    g = torch.Generator().manual_seed(5)
    N, H, Hkv, D, page = 4, 4, 2, 32, 16
    q = torch.randn(N, 1, H, D, generator=g)
    k = torch.randn(1, Hkv, N, D, generator=g).transpose(1, 2).reshape(N, 1, Hkv, D)  # strides (32, 64, ...)-like
    v = torch.randn(N, 1, Hkv, D, generator=g)
    assert k.stride() != v.stride()
    k_cache = torch.randn(8, page, Hkv, D, generator=g)
    v_cache = torch.randn(8, Hkv, page, D, generator=g).transpose(1, 2)  # another layout of the same shape
    table = torch.arange(8, dtype=torch.int32).view(N, 2)
    lens = torch.tensor([0, 3, 5, 15], dtype=torch.int32)
    kc_ref, vc_ref = reference_write(k_cache, v_cache, table, lens, k, v)
    ref, _ = reference_attention(q, kc_ref, vc_ref, table, lens, 1, scale=D ** -0.5, window=(-1, 0))
    same, _ = reference_attention(q, kc_ref, vc_ref, table, lens, 1, scale=D ** -0.5, window=(-1, 0),
                                  dtype=torch.float32)
    dk, dv = k_cache.clone().to(device), v_cache.clone().to(device)
    out = kernel.flash_attn_with_kvcache(q.to(device), dk, dv, k.to(device), v.to(device),
                                         cache_seqlens=lens.to(device), block_table=table.to(device), causal=True)
    check_fa2(out.cpu(), ref, same)
    assert torch.equal(dk.cpu(), kc_ref) and torch.equal(dv.cpu(), vc_ref)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("sq,num_splits,window", [(1, 1, (-1, 0)), (3, 1, (-1, 0)), (1, 3, (-1, 0)), (2, 2, (5, 0))])
def test_cache_leftpad(kernel, device, emulator, sq, num_splits, window):
    """FlashAttention-2's cache_leftpad on a contiguous cache: row b's keys are slots cache_leftpad[b] ..
    cache_seqlens[b] + seqlen_new - 1 (the new tokens still land at cache_seqlens[b]); the slots before the padding
    hold NaN, so reading any of them would show."""
    emulator(schedule="random", seed=2, check_races=True)
    c = contiguous_case(Bsz=4, sq=sq, S=48, seed=4)
    g = torch.Generator().manual_seed(9)
    lens, idx = c["cache_seqlens"], c["cache_batch_idx"]
    pad = torch.tensor([int(torch.randint(0, max(int(n), 0) + 1, (1,), generator=g)) for n in lens], dtype=torch.int32)
    for b in range(len(lens)):
        c["k_cache"][int(idx[b]), : int(pad[b])] = float("nan")
        c["v_cache"][int(idx[b]), : int(pad[b])] = float("nan")
    kc_w, vc_w = reference_write(c["k_cache"], c["v_cache"], c["block_table"], lens, c["k_new"], c["v_new"])
    # The reference sees each row shifted left by its padding (logical key t = slot pad + t).
    kc_ref, vc_ref = kc_w.clone(), vc_w.clone()
    for b in range(len(lens)):
        row, p = int(idx[b]), int(pad[b])
        kc_ref[row] = torch.roll(kc_w[row], -p, dims=0)
        vc_ref[row] = torch.roll(vc_w[row], -p, dims=0)
    lens_ref = torch.where(lens >= 0, lens - pad, lens)
    kw = dict(scale=c["q"].shape[-1] ** -0.5, window=window)
    ref, lse_ref = reference_attention(c["q"], kc_ref, vc_ref, c["block_table"], lens_ref, 1, **kw)
    same, _ = reference_attention(c["q"], kc_ref, vc_ref, c["block_table"], lens_ref, 1, dtype=torch.float16, **kw)
    d = to_device(c, device)
    out, lse = kernel.flash_attn_with_kvcache(
        d["q"], d["k_cache"], d["v_cache"], d["k_new"], d["v_new"], cache_seqlens=d["cache_seqlens"],
        cache_batch_idx=d["cache_batch_idx"], cache_leftpad=pad.to(device), causal=window[1] == 0,
        window_size=window, num_splits=num_splits, return_softmax_lse=True)
    check_fa2(out.cpu(), ref, same)
    assert torch.equal(bits(d["k_cache"].cpu()), bits(kc_w)) and torch.equal(bits(d["v_cache"].cpu()), bits(vc_w))
    finite = torch.isfinite(lse_ref)
    assert torch.allclose(lse.cpu().double()[finite], lse_ref[finite], atol=1e-3)


@pytest.mark.kernels_ci
def test_cache_leftpad_errors(kernel, device, monkeypatch):
    c = to_device(contiguous_case(Bsz=3, seed=5), device)
    args = (c["q"], c["k_cache"], c["v_cache"], c["k_new"], c["v_new"])
    pad = torch.zeros(3, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="cache_leftpad cannot be combined with block_table"):
        kernel.flash_attn_with_kvcache(*args, cache_seqlens=c["cache_seqlens"], cache_leftpad=pad,
                                       block_table=c["block_table"])
    with pytest.raises(TypeError, match="cache_leftpad"):
        kernel.flash_attn_with_kvcache(*args, cache_seqlens=c["cache_seqlens"], cache_leftpad=pad.float(),
                                       cache_batch_idx=c["cache_batch_idx"])
    monkeypatch.setenv(STRICT, "1")
    bad = torch.tensor([0, 0, 50], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"cache_leftpad\[2\]"):
        kernel.flash_attn_with_kvcache(*args, cache_seqlens=c["cache_seqlens"], cache_leftpad=bad,
                                       cache_batch_idx=c["cache_batch_idx"])


@pytest.mark.kernels_ci
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sq,num_splits", [(1, 1), (3, 2)])
def test_head_dim_512(kernel, device, emulator, dtype, sq, num_splits):
    """D = 512 (Gemma's global layers) on the decode kernel: GQA 4, paged, appended tokens, split and unsplit."""
    emulator(schedule="random", seed=3, check_races=True)
    c = make_case(Bsz=3, H=8, Hkv=2, D=512, sq=sq, sk_new=1, block_size=16, dtype=dtype, seed=6, max_len=40)
    kc_w, vc_w = reference_write(c["k_cache"], c["v_cache"], c["block_table"], c["cache_seqlens"], c["k_new"],
                                 c["v_new"])
    kw = dict(scale=512**-0.5, window=(-1, 0))
    ref, _ = reference_attention(c["q"], kc_w, vc_w, c["block_table"], c["cache_seqlens"], 1, **kw)
    same, _ = reference_attention(c["q"], kc_w, vc_w, c["block_table"], c["cache_seqlens"], 1, dtype=dtype, **kw)
    d = to_device(c, device)
    out = kernel.flash_attn_with_kvcache(d["q"], d["k_cache"], d["v_cache"], d["k_new"], d["v_new"],
                                         cache_seqlens=d["cache_seqlens"], block_table=d["block_table"], causal=True,
                                         num_splits=num_splits)
    check_fa2(out.cpu(), ref, same)
