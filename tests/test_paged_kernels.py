"""The paged KV-cache kernels (kv_paged_write, paged_decode_attention, paged_decode_combine) on the Metal-on-CPU
emulator, driven through the package's ops (so through the real C++ planner and params: nothing is re-implemented
here), against a float64 reference, with the emulator's per-dispatch byte counters, schedules and race detector.

The supported dtypes / head dims come from flash_sdpa/paged_params.h's lists; test_kvcache.py tests the API itself.
"""

import math
import re
from pathlib import Path

import pytest
import torch

from msl import cpu as metal_cpu

ROOT = Path(__file__).resolve().parent.parent
HEADER = (ROOT / "flash_sdpa" / "paged_params.h").read_text()


def _macro_body(name):
    m = re.search(r"#define " + name + r"\([^)]*\)((?:[^\n]*\\\n)*[^\n]*)", HEADER)
    assert m, name
    return m.group(1)


def _define(name):
    m = re.search(r"#define " + name + r"\s+(\d+)", HEADER)
    assert m, name
    return int(m.group(1))


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPES = [n for _, n in re.findall(r"X\((\w+), (\w+)\)", _macro_body("FLASH_SDPA_PAGED_DTYPES"))]
HEAD_DIMS = [int(d) for d in re.findall(r"X\((\d+),", _macro_body("FLASH_SDPA_PAGED_HEAD_DIMS"))]
KV_BUFFERS = (_define("FLASH_SDPA_DECODE_BUF_K_CACHE"), _define("FLASH_SDPA_DECODE_BUF_V_CACHE"))


def test_supported_lists(kernel):
    # The lists parsed from paged_params.h are the ones the host was built from.
    assert DTYPES == ["float32", "float16", "bfloat16"]
    assert HEAD_DIMS == list(kernel._ops.ops.kvcache_head_dims())


# ---- running the kernels through the ops -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stats_runtime(kernel):
    """The emulated build's runtime (the instance its extension loaded): per-dispatch byte counters."""
    return metal_cpu.Runtime(Path(kernel.__file__).parent / "libmetal_cpu.so")


@pytest.fixture
def run(kernel, emulator, stats_runtime):
    """run(fn, schedule=..., seed=..., check_races=...) -> (fn(kernel), [DispatchStats]): one package call under the
    given emulator options (races checked by default), with the dispatches it made."""

    def call(fn, schedule="forward", seed=0, check_races=True):
        emulator(schedule=schedule, seed=seed, check_races=check_races)
        stats_runtime.reset_stats()
        result = fn(kernel)
        return result, stats_runtime.stats()
    return call


def run_kvcache(run, q, k_cache, v_cache, block_table, cache_seqlens, k_new=None, v_new=None, *, scale,
                window=(-1, -1), softcap=0.0, alibi=None, sinks=None, num_splits=1, **options):
    """flash_attn_with_kvcache with an explicit split count: returns (out, lse, [DispatchStats])."""
    (out, lse), stats = run(lambda kernel: kernel.flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens, block_table=block_table,
        softmax_scale=scale, window_size=window, softcap=softcap, alibi_slopes=alibi, num_splits=num_splits,
        return_softmax_lse=True, s_aux=sinks), **options)
    return out, lse, stats


# ---- reference -------------------------------------------------------------------------------------------------


def reference_write(k_cache, v_cache, block_table, cache_seqlens, k_new, v_new):
    """The cache after kv_paged_write (same skip rules), on copies."""
    kc, vc = k_cache.clone(), v_cache.clone()
    if k_new is None:
        return kc, vc
    bs, max_blocks = kc.shape[1], block_table.shape[1]
    for b in range(block_table.shape[0]):
        L = int(cache_seqlens[b])
        for i in range(k_new.shape[1]):
            t = L + i
            if L < 0 or t >= max_blocks * bs:
                continue
            blk = int(block_table[b, t // bs])
            if 0 <= blk < kc.shape[0]:
                kc[blk, t % bs] = k_new[b, i]
                vc[blk, t % bs] = v_new[b, i]
    return kc, vc


def reference_attention(q, kc, vc, block_table, cache_seqlens, sk_new, *, scale, window=(-1, -1), softcap=0.0,
                        alibi=None, sinks=None, dtype=torch.float64):
    """Attention over the (already written) cache, computed in `dtype`: out [B, sq, H, D], lse float64 [B, H, sq].
    Rows with no visible key output 0 and LSE -inf; sinks join the denominator (and the LSE)."""
    Bsz, sq, H, D = q.shape
    bs, Hkv = kc.shape[1], kc.shape[2]
    G = H // Hkv
    out = torch.zeros(Bsz, sq, H, D, dtype=dtype)
    lse = torch.full((Bsz, H, sq), -math.inf, dtype=torch.float64)
    for b in range(Bsz):
        L = int(cache_seqlens[b])
        if L < 0:
            continue
        sk = L + sk_new
        if sk == 0:
            continue
        t = torch.arange(sk)
        blocks = block_table[b, t // bs].long()
        K = kc[blocks, t % bs].to(dtype).repeat_interleave(G, dim=1)  # [sk, H, D]
        V = vc[blocks, t % bs].to(dtype).repeat_interleave(G, dim=1)
        s = torch.einsum("ihd,jhd->hij", q[b].to(dtype), K) * scale  # [H, sq, sk]
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        pos = (torch.arange(sq) + sk - sq)[:, None]
        j = torch.arange(sk)[None, :]
        if alibi is not None:
            slopes = (alibi[b] if alibi.dim() == 2 else alibi).to(dtype)
            s = s - slopes[:, None, None] * (pos - j).abs().to(dtype)[None]
        visible = torch.ones(sq, sk, dtype=torch.bool)
        if window[0] >= 0:
            visible &= j >= pos - window[0]
        if window[1] >= 0:
            visible &= j <= pos + window[1]
        s = s.masked_fill(~visible[None], -math.inf)
        if sinks is not None:
            s = torch.cat([s, sinks.to(dtype)[:, None, None].expand(H, sq, 1)], dim=-1)
        p = torch.softmax(s, dim=-1)
        rl = torch.logsumexp(s.double(), dim=-1)
        if sinks is not None:
            p = p[..., :-1]
        o = torch.einsum("hij,jhd->ihd", p, V)
        seen = visible.any(dim=1)  # [sq]
        o[~seen] = 0
        rl[:, ~seen] = -math.inf
        out[b] = o
        lse[b] = rl
    return out, lse


def bits(t):
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def check_fa2(out, ref, ref_same):
    """FlashAttention's rule: max|out - ref| <= 3 max|torch_same_dtype - ref| + 1e-5."""
    err = (out.double() - ref.double()).abs().max().item()
    base = (ref_same.double() - ref.double()).abs().max().item()
    assert err <= 3 * base + 1e-5, f"max err {err:.3g} > 3 x {base:.3g} + 1e-5"
    return err, base


# ---- scenarios -------------------------------------------------------------------------------------------------


def make_case(*, Bsz=3, H=8, Hkv=2, D=64, sq=1, sk_new=1, block_size=16, dtype=torch.float16, seqlens=None,
              layout="halves", spare=3, seed=0, max_len=40):
    """A paged cache with a randomly permuted block table, spare blocks, NaN in every slot not yet written, and
    unused table entries -1. layout: "interleaved" (k/v pages alternate in one buffer, v one page after k),
    "halves" (k then v), "separate"."""
    g = torch.Generator().manual_seed(seed)
    if seqlens is None:
        seqlens = [int(x) for x in torch.randint(0, max_len, (Bsz,), generator=g)]
        if Bsz >= 3:
            seqlens[1] = -1
            seqlens[2] = 0
    lens = [L + sk_new if L >= 0 else 0 for L in seqlens]
    need = [math.ceil(n / block_size) for n in lens]
    max_blocks = max(need + [1]) + 1
    num_blocks = sum(need) + spare
    perm = torch.randperm(num_blocks, generator=g)
    block_table = torch.full((Bsz, max_blocks), -1, dtype=torch.int32)
    k = 0
    for b in range(Bsz):
        for c in range(need[b]):
            block_table[b, c] = int(perm[k])
            k += 1
    shape = (num_blocks, block_size, Hkv, D)
    nan = float("nan")
    if layout == "interleaved":
        storage = torch.full((2 * num_blocks,) + shape[1:], nan, dtype=dtype)
        k_cache, v_cache = storage[0::2], storage[1::2]
    elif layout == "halves":
        storage = torch.full((2 * num_blocks,) + shape[1:], nan, dtype=dtype)
        k_cache, v_cache = storage[:num_blocks], storage[num_blocks:]
    else:
        storage = None
        k_cache, v_cache = torch.full(shape, nan, dtype=dtype), torch.full(shape, nan, dtype=dtype)
    for b in range(Bsz):
        for t in range(max(seqlens[b], 0)):
            blk = int(block_table[b, t // block_size])
            k_cache[blk, t % block_size] = torch.randn(Hkv, D, generator=g).to(dtype)
            v_cache[blk, t % block_size] = torch.randn(Hkv, D, generator=g).to(dtype)
    q = torch.randn(Bsz, sq, H, D, generator=g).to(dtype)
    k_new = torch.randn(Bsz, sk_new, Hkv, D, generator=g).to(dtype) if sk_new else None
    v_new = torch.randn(Bsz, sk_new, Hkv, D, generator=g).to(dtype) if sk_new else None
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, storage=storage, block_table=block_table,
                cache_seqlens=torch.tensor(seqlens, dtype=torch.int32), k_new=k_new, v_new=v_new, gen=g)


def check_case(run, c, *, window=(-1, -1), softcap=0.0, use_alibi=False, use_sinks=False, num_splits=1, scale=None,
               **options):
    q, k_cache, v_cache = c["q"], c["k_cache"], c["v_cache"]
    Bsz, sq, H, D = q.shape
    g = c["gen"]
    scale = scale if scale is not None else D ** -0.5
    alibi = torch.rand(H, generator=g) * 0.3 if use_alibi else None
    sinks = torch.randn(H, generator=g) if use_sinks else None
    kc_ref, vc_ref = reference_write(k_cache, v_cache, c["block_table"], c["cache_seqlens"], c["k_new"], c["v_new"])
    storage_before = None if c["storage"] is None else c["storage"].clone()
    out, lse, stats = run_kvcache(run, q, k_cache, v_cache, c["block_table"], c["cache_seqlens"], c["k_new"],
                                  c["v_new"], scale=scale, window=window, softcap=softcap, alibi=alibi, sinks=sinks,
                                  num_splits=num_splits, **options)
    # The cache: bit for bit (NaN slots included), and nothing outside the views' written slots changed.
    assert torch.equal(bits(k_cache), bits(kc_ref)) and torch.equal(bits(v_cache), bits(vc_ref))
    if storage_before is not None:
        changed = (bits(c["storage"]) != bits(storage_before)).flatten(1).any(dim=1)
        n_written = sum(1 for b in range(Bsz) if int(c["cache_seqlens"][b]) >= 0) * (
            0 if c["k_new"] is None else c["k_new"].shape[1])
        assert int(changed.sum()) <= 2 * n_written
    sk_new = 0 if c["k_new"] is None else c["k_new"].shape[1]
    kw = dict(scale=scale, window=window, softcap=softcap, alibi=alibi, sinks=sinks)
    ref, ref_lse = reference_attention(q, kc_ref, vc_ref, c["block_table"], c["cache_seqlens"], sk_new, **kw)
    same, _ = reference_attention(q, kc_ref, vc_ref, c["block_table"], c["cache_seqlens"], sk_new,
                                  dtype=q.dtype if q.dtype != torch.float32 else torch.float32, **kw)
    assert not torch.isnan(out).any()
    err, base = check_fa2(out, ref, same)
    # LSE: -inf exactly where the reference has it, close elsewhere.
    inf = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), inf)
    tol = 1e-4 if q.dtype == torch.float32 else 2e-2
    if (~inf).any():
        assert (lse[~inf].double() - ref_lse[~inf]).abs().max().item() <= tol
    return err, base, stats


# ---- tests -----------------------------------------------------------------------------------------------------


@pytest.mark.kernels_ci
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("group", [1, 2, 4, 8])  # row tiles R = 1, 2, 4, 8: all-reduced and scattered scores
def test_dtypes_head_dims(run, dtype, D, group):
    c = make_case(D=D, dtype=TORCH_DTYPES[dtype], H=8, Hkv=8 // group, seed=D)
    check_case(run, c, num_splits=1 if D % 64 else 3)


@pytest.mark.parametrize("use_sinks", [False, True])
def test_combine_many_partials(run, use_sinks):
    """32 short splits of a one-token GQA 4 decode: each simdgroup writes a partial, 256 in all (the most the combine
    takes: one per thread for its row statistics, two batches of loads for the outputs at D = 64), the shorter
    sequence's last splits without a key (weight 0)."""
    c = make_case(Bsz=2, H=8, Hkv=2, D=64, seqlens=[600, 230], seed=5)
    _, _, stats = check_case(run, c, num_splits=32, use_sinks=use_sinks)
    combine = [s for s in stats if "combine" in s.kernel]
    assert len(combine) == 1 and combine[0].threads == 256 * combine[0].threadgroups


@pytest.mark.parametrize("group", [3, 5, 6, 7, 12, 16])
@pytest.mark.parametrize("num_splits", [1, 5])
def test_gqa_factors(run, group, num_splits):
    """Every GQA factor of real models, powers of two or not (Qwen2.5-7B: 7; -14B: 5): row tiles R = 4, 8 and 16
    with rows past the group masked, one KV pass for the whole group."""
    c = make_case(H=2 * group, Hkv=2, sq=1, sk_new=1, D=128, seed=group, max_len=200)
    check_case(run, c, window=(-1, 0), num_splits=num_splits)


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("sq", [1, 2, 16])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_gqa_sq_splits(run, group, sq, num_splits):
    c = make_case(H=2 * group, Hkv=2, sq=sq, sk_new=min(sq, 3), D=64, seed=group * 100 + sq, max_len=90)
    check_case(run, c, window=(-1, 0), num_splits=num_splits)


FEATURES = {
    "causal": dict(window=(-1, 0)),
    "window": dict(window=(7, 0)),
    "window_lr": dict(window=(5, 3)),
    "softcap": dict(softcap=2.0, scale=1.0),
    "sinks": dict(use_sinks=True, window=(-1, 0)),
    "alibi": dict(use_alibi=True, window=(-1, 0)),
    "alibi_noncausal": dict(use_alibi=True),
    "all": dict(use_alibi=True, use_sinks=True, softcap=5.0, window=(20, 0)),
}


@pytest.mark.kernels_ci
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("sq", [1, 4])
def test_features(run, feature, num_splits, sq):
    c = make_case(H=8, Hkv=2, sq=sq, sk_new=1, D=32, seed=len(feature) + sq, max_len=70)
    check_case(run, c, num_splits=num_splits, **FEATURES[feature])


# Scores of std ~8 (scale 1 at D = 64): the running max moves past the matrix path's rescale slack mid-sequence.
MATRIX_FEATURES = dict(FEATURES, wide_scores=dict(scale=1.0, window=(-1, 0)))


# Split counts for a one-token call over a 300-slot table row (the longest of three requests, one a padding row):
# unsplit and 2 long splits run the matrix path (its threadgroup merge; split, it writes one partial per split), 10
# short ones (<= 2 steps each) the wide path.
MATRIX_SPLITS = {1: "matrix", 2: "matrix", 10: "wide"}


def check_matrix_or_wide(run, num_splits, feature, **case):
    c = make_case(sq=1, sk_new=1, block_size=5, seqlens=[290, -1, 130], **case)
    _, _, stats = check_case(run, c, num_splits=num_splits, **MATRIX_FEATURES[feature])
    attn = next(st.kernel for st in stats if st.kernel.startswith("paged_decode_") and "combine" not in st.kernel)
    assert attn.split("_")[2] == MATRIX_SPLITS[num_splits], attn


@pytest.mark.parametrize("feature", list(MATRIX_FEATURES))
@pytest.mark.parametrize("num_splits", list(MATRIX_SPLITS))
@pytest.mark.parametrize("D,dtype,group", [(64, torch.float16, 8), (64, torch.bfloat16, 8), (64, torch.float16, 5),
                                           (64, torch.bfloat16, 7), (128, torch.float16, 8), (128, torch.bfloat16, 6)])
def test_features_matrix_rows(run, feature, num_splits, D, dtype, group):
    """The matrix path (one token, R = 8 in 2-byte types at D = 64 and 128: decode_matrix_rows in paged_params.h; at
    128 two simdgroups share a key step) and the wide path of its short splits, with every option, rows past the
    group masked, 5-slot pages (a step's 8 keys straddle pages), unsplit, long splits and short ones."""
    check_matrix_or_wide(run, num_splits, feature, H=2 * group, Hkv=2, D=D, dtype=dtype, seed=group + len(feature))


@pytest.mark.parametrize("feature", list(MATRIX_FEATURES))
@pytest.mark.parametrize("num_splits", list(MATRIX_SPLITS))
@pytest.mark.parametrize("D,dtype,group", [(64, torch.float16, 16), (64, torch.bfloat16, 12),
                                           (128, torch.float16, 12), (128, torch.bfloat16, 16)])
def test_features_matrix_rows16(run, feature, num_splits, D, dtype, group):
    """The matrix path at R = 16 (GQA 12 and 16: two 8-row tiles per simdgroup, 32 columns each, so two (D = 64) or
    four (D = 128) simdgroups share a key step) and the wide path (two rows per simdgroup) with every option, rows
    past the group masked (GQA 12: rows 12-15 of the second tile), 5-slot pages, unsplit, long and short splits."""
    check_matrix_or_wide(run, num_splits, feature, H=2 * group, Hkv=2, D=D, dtype=dtype, seed=group + len(feature))


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("group", [8, 16])
def test_matrix_rows_nan(run, num_splits, dtype, D, group):
    """The matrix path (GQA 8 and 16, one token) with non-finite values, against a clean run: a NaN query head makes
    only its own row NaN (LSE NaN); a NaN element of a visible V row makes that column NaN in every row of its KV group
    and leaves the other columns bit for bit; an inf in a visible K row makes every row of its KV group NaN. The other
    KV group's rows stay bit for bit (the 8x8 products share nothing across rows of S, or across columns of P V)."""
    c = make_case(Bsz=1, H=2 * group, Hkv=2, D=D, dtype=dtype, sq=1, sk_new=1, block_size=5, seqlens=[99], seed=4)
    bs = 5

    def call(**edit):
        q, kc, vc = c["q"].clone(), c["k_cache"].clone(), c["v_cache"].clone()
        for name, (t, h, d) in edit.items():
            if name == "q":
                q[0, 0, h, d] = float("nan")
            else:
                blk = int(c["block_table"][0, t // bs])
                (kc if name == "k" else vc)[blk, t % bs, h, d] = float("inf" if name == "k" else "nan")
        out, lse, _ = run_kvcache(run, q, kc, vc, c["block_table"], c["cache_seqlens"], c["k_new"], c["v_new"],
                                  scale=D ** -0.5, window=(-1, 0), num_splits=num_splits)
        return out[0, 0], lse[0, :, 0]

    clean, clean_lse = call()
    assert torch.isfinite(clean).all()
    bad_head = group - 3  # the second row tile at GQA 16
    out, lse = call(q=(None, bad_head, 17))
    assert torch.isnan(out[bad_head]).all() and torch.isnan(lse[bad_head])
    others = [h for h in range(2 * group) if h != bad_head]
    assert torch.equal(bits(out[others]), bits(clean[others])) and torch.equal(lse[others], clean_lse[others])
    out, _ = call(v=(10, 1, 7))
    assert torch.isnan(out[group:, 7]).all()
    keep = [d for d in range(D) if d != 7]
    assert torch.equal(bits(out[group:, keep]), bits(clean[group:, keep]))
    assert torch.equal(bits(out[:group]), bits(clean[:group]))
    out, _ = call(k=(20, 0, 5))
    assert torch.isnan(out[:group]).all() and torch.equal(bits(out[group:]), bits(clean[group:]))


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_matrix_instance_several_tokens_short_splits(run, dtype, D):
    """A matrix-path instance (R = 8 in a 2-byte type at D = 64 / 128) called with sq = 2 (group 4) runs the
    lane-local path, whose short splits write one partial per simdgroup (8, not the matrix path's 4 at D = 128): the
    planner must size and the combine read that many (decode_runs_matrix in paged_params.h), else the kernel writes
    past o_partial."""
    c = make_case(H=8, Hkv=2, sq=2, sk_new=2, D=D, dtype=dtype, seed=D + 21, max_len=20)
    check_case(run, c, window=(-1, 0), num_splits=3)


@pytest.mark.parametrize("block_size", [1, 5, 16, 32, 256])
@pytest.mark.parametrize("layout,sk_new", [("halves", 2), ("separate", 2), ("interleaved", 0),
                                           ("interleaved", 2)])
def test_block_sizes_and_layouts(run, block_size, layout, sk_new):
    c = make_case(block_size=block_size, layout=layout, sk_new=sk_new, sq=2, seed=block_size, max_len=60)
    check_case(run, c, window=(-1, 0), num_splits=2)


@pytest.mark.kernels_ci
def test_no_new_tokens(run):
    c = make_case(sk_new=0, seed=5)
    check_case(run, c, num_splits=1)


@pytest.mark.parametrize("group,D", [(1, 32), (4, 64), (2, 128)])  # row tiles R = 4, 16, 8
def test_nan_in_a_key_a_row_cannot_see(run, group, D):
    """Several query tokens (flash_attn_func's decode route): NaN in V and K at the last key, which only the last
    token sees (causal), must leave the other rows untouched (no 0 x NaN), while the last row becomes NaN."""
    g = torch.Generator().manual_seed(D + group)
    Hkv, sq, sk = 2, 4, 20
    q = torch.randn(1, sq, Hkv * group, D, generator=g).half()
    k = torch.randn(1, sk, Hkv, D, generator=g).half()
    v = torch.randn(1, sk, Hkv, D, generator=g).half()
    clean, _ = run(lambda kernel: kernel.flash_attn_func(q, k, v, causal=True))
    k_bad, v_bad = k.clone(), v.clone()
    v_bad[0, sk - 1, 0, 3] = float("nan")
    k_bad[0, sk - 1, 1, 5] = float("inf")
    out, stats = run(lambda kernel: kernel.flash_attn_func(q, k_bad, v_bad, causal=True))
    assert any(st.kernel.startswith("paged_decode_") for st in stats)
    assert torch.equal(out[:, :sq - 1], clean[:, :sq - 1])  # rows that cannot see key sk - 1: bit for bit
    assert torch.isnan(out[0, sq - 1, :group, 3]).all()  # the last token of KV head 0's group sees the NaN
    assert torch.isnan(out[0, sq - 1, group:]).all()  # ... and KV head 1's group the inf score


@pytest.mark.kernels_ci
def test_fully_masked_rows_and_huge_scores(run):
    # window (0, -1) with sq > 1: early queries see only themselves; q * 100 gives scores ~1e3 in fp32.
    c = make_case(dtype=torch.float32, sq=3, sk_new=1, seed=9)
    c["q"] *= 100
    check_case(run, c, window=(0, 0), num_splits=2)


@pytest.mark.kernels_ci
def test_strided_q_and_new_kv(run):
    c = make_case(sq=2, sk_new=2, seed=11)
    big = torch.randn(3, 2, 8, 128).to(torch.float16)
    c["q"] = big[..., :64]  # strided view, last dim contiguous
    bigk = torch.randn(3, 2, 2, 2, 64).to(torch.float16)
    c["k_new"], c["v_new"] = bigk[:, :, :, 0], bigk[:, :, :, 1]
    check_case(run, c, window=(-1, 0))


@pytest.mark.kernels_ci
@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
def test_schedules_and_races(run, schedule):
    c = make_case(H=8, Hkv=1, sq=2, D=64, seed=3, max_len=100)
    check_case(run, c, window=(-1, 0), num_splits=3, use_sinks=True, schedule=schedule, seed=7, check_races=True)


@pytest.mark.parametrize("schedule", ["reverse", "random"])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("group", [8, 12])
def test_matrix_rows_schedules_and_races(run, schedule, num_splits, group):
    """The matrix path at D = 128 (R = 8: two simdgroups per key step; R = 16: four; their parts of the scores
    exchanged through double-buffered strips) under other thread orders, with the race checks: a strip read by a
    partner after it is rewritten, or a unit that skips a step's barrier, fails here."""
    c = make_case(H=2 * group, Hkv=2, sq=1, sk_new=1, D=128, block_size=5, seed=5, max_len=120)
    check_case(run, c, window=(-1, 0), num_splits=num_splits, softcap=5.0, schedule=schedule, seed=11,
               check_races=True)


@pytest.mark.parametrize("seed", [pytest.param(s, marks=[pytest.mark.full] if s >= 4 else []) for s in range(12)])
def test_fuzz_garbage_tables_never_overrun(run, seed):
    """Garbage block ids, negative lengths, lengths beyond the table: every dispatch completes with no overrun."""
    g = torch.Generator().manual_seed(1000 + seed)
    Bsz, H, Hkv, D, bs = 4, 4, 2, 32, [1, 3, 16][seed % 3]
    num_blocks, max_blocks = 6, 5
    k_cache = torch.randn(num_blocks, bs, Hkv, D).half()
    v_cache = torch.randn(num_blocks, bs, Hkv, D).half()
    block_table = torch.randint(-5, 12, (Bsz, max_blocks), generator=g, dtype=torch.int32)
    block_table[0, 0] = 2 ** 31 - 1
    cache_seqlens = torch.randint(-3, max_blocks * bs + 10, (Bsz,), generator=g, dtype=torch.int32)
    cache_seqlens[-1] = 2 ** 31 - 2
    q = torch.randn(Bsz, 2, H, D).half()
    kn, vn = torch.randn(Bsz, 2, Hkv, D).half(), torch.randn(Bsz, 2, Hkv, D).half()
    for splits in (1, 3):
        out, lse, _ = run_kvcache(run, q, k_cache, v_cache, block_table, cache_seqlens, kn, vn, scale=0.2,
                                  window=(-1, 0), num_splits=splits, check_races=True)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_garbage_tables_wide_path(run, seed):
    """The wide path (one token, fp16, D = 64: short splits) under garbage block ids (huge, negative, past the
    cache), negative lengths and lengths beyond the table, with the race and bounds checks: every dispatch completes
    with no overrun and finite outputs."""
    g = torch.Generator().manual_seed(2000 + seed)
    Bsz, H, Hkv, D, bs = 3, 4 * (seed + 1), 2, 64, [1, 5, 16, 3][seed]
    num_blocks, max_blocks = 6, 40 // bs + 1
    k_cache = torch.randn(num_blocks, bs, Hkv, D, generator=g).half()
    v_cache = torch.randn(num_blocks, bs, Hkv, D, generator=g).half()
    block_table = torch.randint(-5, 12, (Bsz, max_blocks), generator=g, dtype=torch.int32)
    block_table[0, 0] = 2 ** 31 - 1
    cache_seqlens = torch.randint(-3, max_blocks * bs + 10, (Bsz,), generator=g, dtype=torch.int32)
    cache_seqlens[-1] = 2 ** 31 - 2
    q = torch.randn(Bsz, 1, H, D, generator=g).half()
    for splits in (3, 8):
        out, _, stats = run_kvcache(run, q, k_cache, v_cache, block_table, cache_seqlens, None, None, scale=0.2,
                                    window=(-1, 0), num_splits=splits, check_races=True,
                                    schedule=["forward", "reverse", "random"][seed % 3], seed=seed)
        assert any(st.kernel.startswith("paged_decode_wide_") for st in stats), [st.kernel for st in stats]
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("group", [8, 16])
def test_traffic_gqa8_s2048(run, D, group):
    """GQA group 8 and 16, S = 2048 (the matrix path; its key steps shared by 2 or 4 simdgroups): K/V bytes loaded <=
    1.1 x the valid cache bytes; <= 3 dispatches."""
    Hkv, bs, S = 1, 16, 2048
    c = make_case(Bsz=1, H=group * Hkv, Hkv=Hkv, D=D, sq=1, sk_new=1, block_size=bs, seqlens=[S - 1], seed=1,
                  layout="separate", spare=4)
    for splits in (1, 8):
        err, base, stats = check_case(run, c if splits == 1 else make_case(
            Bsz=1, H=group * Hkv, Hkv=Hkv, D=D, sq=1, sk_new=1, block_size=bs, seqlens=[S - 1], seed=1,
            layout="separate", spare=4), window=(-1, 0), num_splits=splits)
        assert len(stats) <= 3
        attn = stats[1]
        assert attn.kernel.startswith("paged_decode_"), [st.kernel for st in stats]
        kv_loaded = sum(attn.loaded.get(i, 0) for i in KV_BUFFERS)
        valid = 2 * S * Hkv * D * 2
        ratio = kv_loaded / valid
        print(f"splits={splits}: K/V loaded {kv_loaded} B, valid {valid} B, ratio {ratio:.4f}, "
              f"dispatches {len(stats)}, max err {err:.3g} (torch fp16 {base:.3g})")
        assert ratio <= 1.1


# ---- varlen mode (FLASH_SDPA_FC_VARLEN): packed K/V, rows from cu_seqlens ---------------------------------------


def run_varlen_decode(run, q, k, v, cu_q, cu_k, *, scale, window=(-1, -1), softcap=0.0, alibi=None, sinks=None,
                      max_seqlen_k=0, **options):
    """flash_attn_varlen_func with one query per sequence (the decode kernel's varlen mode: the router picks it at
    max_seqlen_q = 1): q [total_q, H, D], k / v [total_k, Hkv, D]. max_seqlen_k steers the planner's split count
    (an upper bound it may split by, in whole threadgroup steps of at least 32 keys). Returns (out, lse [H, total_q],
    [DispatchStats])."""
    (out, lse, _), stats = run(lambda kernel: kernel.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, 1, max_seqlen_k, softmax_scale=scale, window_size=window, softcap=softcap,
        alibi_slopes=alibi, return_attn_probs=True, s_aux=sinks), **options)
    return out, lse, stats


def reference_varlen_decode(q, k, v, cu_q, cu_k, *, dtype=torch.float64, **kw):
    """Per sequence, its query rows and keys clamped to [0, total_q] and [0, total_k] (as every varlen kernel clamps
    cu_seqlens), as a one-request cache of one block. The decode kernel computes the sequences with exactly one query
    row; the varlen kernel, dispatched after it (routing.h: plan_varlen_decode), those with two or more, all of their
    rows, over the same keys. Returns {q row: (out [H, D], lse [H])}."""
    total_q, total_k = q.shape[0], k.shape[0]
    res, rest = {}, {}
    for b in range(cu_q.shape[0] - 1):
        qs, qe = int(cu_q[b]), int(cu_q[b + 1])
        first = min(max(qs, 0), total_q)
        count = min(max(qe, first), total_q) - first
        if count == 0:
            continue
        qs, qe, target = first, first + count, (rest if count >= 2 else res)
        ks = min(max(int(cu_k[b]), 0), total_k)
        ke = min(max(int(cu_k[b + 1]), ks), total_k)
        n = ke - ks
        kc = k[ks:ke].unsqueeze(0) if n else k[:0].new_zeros((1, 1) + k.shape[1:])
        vc = v[ks:ke].unsqueeze(0) if n else v[:0].new_zeros((1, 1) + v.shape[1:])
        alibi = kw.get("alibi")
        kw_b = dict(kw, alibi=None if alibi is None else (alibi[b:b + 1] if alibi.dim() == 2 else alibi))
        o, lse = reference_attention(q[qs:qe].view(1, qe - qs, *q.shape[1:]), kc, vc,
                                     torch.zeros(1, 1, dtype=torch.int32), torch.tensor([n], dtype=torch.int32), 0,
                                     dtype=dtype, **kw_b)
        for i in range(qe - qs):
            target[qs + i] = (o[0, i], lse[0, :, i])
    res.update(rest)  # the varlen dispatch runs second: its rows win where garbage cu_seqlens overlap
    return res


VARLEN_FEATURES = {
    "causal": dict(window=(-1, 0)),
    "window": dict(window=(9, 0)),
    "softcap_alibi_sinks": dict(window=(-1, 0), softcap=3.0, use_alibi=True, use_sinks=True),
}


@pytest.mark.kernels_ci
@pytest.mark.parametrize("feature", list(VARLEN_FEATURES))
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_varlen_mode(run, feature, num_splits, group):
    """Packed K/V with empty sequences, a sequence without a query, a garbage tail (cu_seqlens past total, negative,
    decreasing): every sequence with a query row matches the reference over its clamped keys; the row no sequence
    covers is 0 with LSE -inf. The long sequence sets the planner's split count (one 64-key step a split)."""
    g = torch.Generator().manual_seed(num_splits * 10 + group + len(feature))
    Hkv, D, dtype = 2, 64, torch.float16
    H = Hkv * group
    longest = 40 if num_splits == 1 else 64 * num_splits  # one threadgroup step of 64 keys a split at D = 64
    lens = [37, 0, longest, 5, 1]
    total_k = sum(lens)
    cu_k = [0]
    for n in lens:
        cu_k.append(cu_k[-1] + n)
    cu_k += [total_k + 50, -4, 3]                 # garbage sequences 5..7: past the end, negative, decreasing
    cu_q = [0, 1, 2, 2, 3, 4, 5, 40, 41]          # sequence 2 has no query; 6 has rows 5, 6 (clamped), 7 none
    total_q = 7
    cu_q_t, cu_k_t = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    big = torch.randn(total_q, H, D + 16, generator=g).to(dtype)
    q = big[..., :D]  # strided rows
    k = torch.randn(total_k, Hkv, D, generator=g).to(dtype)
    v = torch.randn(total_k, Hkv, D, generator=g).to(dtype)
    f = dict(VARLEN_FEATURES[feature])
    alibi = torch.rand(len(cu_q) - 1, H, generator=g) * 0.3 if f.pop("use_alibi", False) else None
    sinks = torch.randn(H, generator=g) if f.pop("use_sinks", False) else None
    kw = dict(scale=D ** -0.5, alibi=alibi, sinks=sinks, **f)
    out, lse, stats = run_varlen_decode(run, q, k, v, cu_q_t, cu_k_t, max_seqlen_k=longest, **kw)
    # The decode kernel (and its combine), then the varlen kernel for sequence 6's two rows.
    # One-step splits run the wide path; unsplit, GQA 8 at D = 64 runs the matrix path's kernel.
    first = "wide" if num_splits > 1 else ("matrix" if group == 8 else "float16")
    decode = [first, "combine"] if num_splits > 1 else [first]
    assert [st.kernel.split("_")[2] for st in stats] == decode + ["varlen"]
    assert stats[0].threadgroups == num_splits * Hkv * (len(cu_q) - 1)
    ref = reference_varlen_decode(q, k, v, cu_q_t, cu_k_t, **kw)
    same = reference_varlen_decode(q, k, v, cu_q_t, cu_k_t, dtype=torch.float16, **kw)
    assert sorted(ref) == [0, 1, 2, 3, 4, 5, 6]
    for row in range(total_q):
        if row not in ref:
            assert (out[row] == 0).all() and (lse[:, row] == -math.inf).all(), f"row {row}"
            continue
        o_ref, l_ref = ref[row]
        check_fa2(out[row], o_ref, same[row][0])
        inf = torch.isinf(l_ref)
        assert torch.equal(torch.isinf(lse[:, row]) & (lse[:, row] < 0), inf)
        if (~inf).any():
            assert (lse[~inf, row].double() - l_ref[~inf]).abs().max().item() <= 2e-2


def test_varlen_mode_traffic(run):
    """Varlen mode, GQA 8, two sequences of 1024 keys (two threadgroups: the planner splits them into one-step splits
    for the emulator's default 80 cores, which run the wide path): K/V bytes loaded <= 1.1 x the valid bytes."""
    D, Hkv, S = 128, 1, 1024
    q = torch.randn(2, 8 * Hkv, D).half()
    k, v = torch.randn(2 * S, Hkv, D).half(), torch.randn(2 * S, Hkv, D).half()
    cu_q, cu_k = torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, S, 2 * S], dtype=torch.int32)
    out, lse, stats = run_varlen_decode(run, q, k, v, cu_q, cu_k, scale=D ** -0.5, window=(-1, 0), max_seqlen_k=S,
                                        check_races=False)
    assert [st.kernel for st in stats] == ["paged_decode_wide_float16_d128_r8", "paged_decode_combine_float16",
                                           "flash_attn_varlen_float16_d128"]
    # The varlen kernel's dispatch (sequences with several query rows: none here) reads and writes no tensor data.
    assert not any(stats[2].loaded.get(i, 0) for i in range(3)) and not any(stats[2].stored.values())
    loaded = sum(stats[0].loaded.get(i, 0) for i in KV_BUFFERS)
    assert loaded / (2 * 2 * S * Hkv * D * 2) <= 1.1
    ref = reference_varlen_decode(q, k, v, cu_q, cu_k, scale=D ** -0.5, window=(-1, 0))
    for row, (o_ref, _) in ref.items():
        assert (out[row].double() - o_ref).abs().max().item() < 5e-3
