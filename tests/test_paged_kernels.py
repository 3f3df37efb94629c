"""The paged KV-cache kernels (kv_paged_write, paged_decode_attention, paged_decode_combine), driven directly
through the Metal-on-CPU emulator against a float64 reference.

Parameters are packed by a ctypes mirror of flash_sdpa/paged_params.h (sizes checked against its static_asserts);
the supported dtypes / head dims come from the header's lists. The package-level API is tested in test_kvcache.py.
"""

import ctypes
import math
import re
from pathlib import Path

import pytest
import torch

from msl import cpu as metal_cpu

TESTS = Path(__file__).resolve().parent

ROOT = TESTS.parent
FS = ROOT / "flash_sdpa"
HEADER = (FS / "paged_params.h").read_text()


# ---- the header: supported configurations, indices, layout -------------------------------------------------------


def _macro_body(name):
    m = re.search(r"#define " + name + r"\([^)]*\)((?:[^\n]*\\\n)*[^\n]*)", HEADER)
    assert m, name
    return m.group(1)


def _define(name):
    m = re.search(r"#define " + name + r"\s+(\d+)", HEADER)
    assert m, name
    return int(m.group(1))


def _enum(name):
    m = re.search(r"\b" + name + r"\s*=\s*(\w+)", HEADER)
    assert m, name
    v = m.group(1)
    return int(v) if v.isdigit() else _define(v)


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPES = [n for _, n in re.findall(r"X\((\w+), (\w+)\)", _macro_body("FLASH_SDPA_PAGED_DTYPES"))]
HEAD_DIMS = [int(d) for d in re.findall(r"X\((\d+),", _macro_body("FLASH_SDPA_PAGED_HEAD_DIMS"))]
MAX_ROWS = {int(d): int(r) for d, r in re.findall(r"X\((\d+), (\d+),", _macro_body("FLASH_SDPA_PAGED_HEAD_DIMS"))}
WRITE_THREADS = _define("FLASH_SDPA_PAGED_WRITE_THREADS")
DECODE_THREADS = _define("FLASH_SDPA_PAGED_DECODE_THREADS")
COMBINE_THREADS = _define("FLASH_SDPA_PAGED_COMBINE_THREADS")
COMBINE_SIMDGROUPS = _enum("kCombineSimdgroups")
MAX_SPLITS = _enum("kMaxSplits")
B = {k: _define(k) for k in re.findall(r"#define (FLASH_SDPA_(?:WRITE|DECODE|COMBINE)_BUF_\w+)", HEADER)}
FC = {k: _define(k) for k in re.findall(r"#define (FLASH_SDPA_FC_\w+)", HEADER)}


def rows_per_threadgroup(d, rows_needed):
    """The planner's row tile: the smallest power of two >= rows_needed, capped at the head dim's max_rows."""
    r = 1
    while r < rows_needed and r < MAX_ROWS[d]:
        r *= 2
    return r


def kv_rows_aligned(t):
    """Mirrors the planner's FLASH_SDPA_FC_DECODE_KV_ALIGNED: 16-byte aligned K/V rows."""
    n = 16 // t.element_size()
    return t.storage_offset() % n == 0 and all(st % n == 0 for st in t.stride()[:3])


i64, i32, f32 = ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class KVPagedWriteParams(ctypes.Structure):
    _fields_ = [(n, i64) for n in ("k_new_stride_b", "k_new_stride_s", "k_new_stride_h", "v_new_stride_b",
                                   "v_new_stride_s", "v_new_stride_h", "k_cache_stride_block", "k_cache_stride_slot",
                                   "k_cache_stride_h", "v_cache_stride_block", "v_cache_stride_slot",
                                   "v_cache_stride_h", "block_table_stride_b")] + \
               [(n, i32) for n in ("batch", "seqlen_new", "num_kv_heads", "head_dim", "block_size", "num_blocks",
                                   "max_blocks_per_seq", "pad0")]


class PagedDecodeParams(ctypes.Structure):
    _fields_ = [(n, i64) for n in ("q_stride_b", "q_stride_s", "q_stride_h", "k_stride_block", "k_stride_slot",
                                   "k_stride_h", "v_stride_block", "v_stride_slot", "v_stride_h",
                                   "block_table_stride_b")] + \
               [(n, i32) for n in ("batch", "seqlen_q", "num_heads", "num_kv_heads", "head_dim", "row_blocks",
                                   "block_size", "num_blocks", "max_blocks_per_seq", "seqlen_new", "num_splits",
                                   "window_left", "window_right", "alibi_stride_b", "total_q", "total_k")] + \
               [("scale", f32), ("softcap", f32)]


class PagedCombineParams(ctypes.Structure):
    _fields_ = [(n, i32) for n in ("batch", "seqlen_q", "num_heads", "head_dim", "num_splits", "total_q")]


def test_param_layout_matches_header():
    for cls in (KVPagedWriteParams, PagedDecodeParams, PagedCombineParams):
        m = re.search(r"sizeof\(" + cls.__name__ + r"\) == (\d+)", HEADER)
        assert ctypes.sizeof(cls) == int(m.group(1)), cls.__name__
    for cls, field in ((KVPagedWriteParams, "batch"), (KVPagedWriteParams, "max_blocks_per_seq"),
                       (PagedDecodeParams, "batch"), (PagedDecodeParams, "scale")):
        m = re.search(r"__builtin_offsetof\(" + cls.__name__ + ", " + field + r"\) == (\d+)", HEADER)
        assert getattr(cls, field).offset == int(m.group(1)), (cls.__name__, field)


def test_supported_lists(kernel):
    # The lists parsed from paged_params.h are the ones the host was built from.
    assert DTYPES == ["float32", "float16", "bfloat16"]
    assert HEAD_DIMS == list(kernel._ops.ops.kvcache_head_dims())


# ---- running the kernels ---------------------------------------------------------------------------------------

_LIBS = {}


def _runtime():
    """The emulator runtime kernel objects will bind to: the tests' own if it is loaded already, else one already in
    this process (the package build's, loaded by test_kvcache.py), else the tests' own. Two runtime copies in one
    process do not mix (a kernel object binds to the first copy in the global scope)."""
    if getattr(metal_cpu, "_default_runtime", None) is not None:
        return metal_cpu.runtime()
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if "libmetal_cpu" in path and path.endswith(".so"):
            return metal_cpu.Runtime(path)
    return metal_cpu.runtime()


def lib(name):
    if name not in _LIBS:
        so = metal_cpu.compiler.compile_cached(str(FS / f"{name}.metal"), [str(FS)], None, True)
        _LIBS[name] = metal_cpu.Library(so, _runtime())
    return _LIBS[name]


def dtype_name(dtype):
    return {v: k for k, v in TORCH_DTYPES.items()}[dtype]


def run_kvcache(q, k_cache, v_cache, block_table, cache_seqlens, k_new=None, v_new=None, *, scale, window=(-1, -1),
                softcap=0.0, alibi=None, sinks=None, num_splits=1, return_lse=True, **dispatch_kw):
    """Mirrors paged_planner.cpp (with an explicit split count): returns (out, lse, [DispatchStats])."""
    Bsz, sq, H, D = q.shape
    num_blocks, bs, Hkv, _ = k_cache.shape
    max_blocks = block_table.shape[1]
    name = dtype_name(q.dtype)
    stats = []
    sk_new = 0 if k_new is None else k_new.shape[1]
    if sk_new:
        wp = KVPagedWriteParams(*k_new.stride()[:3], *v_new.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
                                block_table.stride(0), Bsz, sk_new, Hkv, D, bs, num_blocks, max_blocks, 0)
        stats.append(lib("kv_paged_write").dispatch(
            f"kv_paged_write_{name}", threadgroups=(math.ceil(Hkv * D / WRITE_THREADS), sk_new, Bsz),
            threads_per_threadgroup=(WRITE_THREADS, 1, 1),
            buffers={B["FLASH_SDPA_WRITE_BUF_K_NEW"]: k_new, B["FLASH_SDPA_WRITE_BUF_V_NEW"]: v_new,
                     B["FLASH_SDPA_WRITE_BUF_K_CACHE"]: k_cache, B["FLASH_SDPA_WRITE_BUF_V_CACHE"]: v_cache,
                     B["FLASH_SDPA_WRITE_BUF_BLOCK_TABLE"]: block_table,
                     B["FLASH_SDPA_WRITE_BUF_CACHE_SEQLENS"]: cache_seqlens},
            bytes={B["FLASH_SDPA_WRITE_BUF_PARAMS"]: wp}, **dispatch_kw))

    group = H // Hkv
    rows = rows_per_threadgroup(D, group * sq)
    row_blocks = math.ceil(group * sq / rows)
    split = num_splits > 1
    out = torch.full((Bsz, sq, H, D), float("nan"), dtype=q.dtype)
    lse = torch.full((Bsz, H, sq), float("nan"), dtype=torch.float32)
    o_part = torch.full((num_splits, Bsz, H, sq, D), float("nan"))
    ml_part = torch.full((num_splits, Bsz, H, sq, 2), float("nan"))
    none = cache_seqlens
    ap = PagedDecodeParams(*q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
                           Bsz, sq, H, Hkv, D, row_blocks, bs, num_blocks, max_blocks, sk_new, num_splits,
                           window[0], window[1], H if alibi is not None and alibi.dim() == 2 else 0, 0, 0, scale,
                           softcap)
    stats.append(lib("paged_decode_attention").dispatch(
        f"paged_decode_{name}_d{D}_r{rows}", threadgroups=(num_splits, Hkv * row_blocks, Bsz),
        threads_per_threadgroup=(DECODE_THREADS, 1, 1),
        buffers={B["FLASH_SDPA_DECODE_BUF_Q"]: q, B["FLASH_SDPA_DECODE_BUF_K_CACHE"]: k_cache,
                 B["FLASH_SDPA_DECODE_BUF_V_CACHE"]: v_cache, B["FLASH_SDPA_DECODE_BUF_BLOCK_TABLE"]: block_table,
                 B["FLASH_SDPA_DECODE_BUF_CACHE_SEQLENS"]: cache_seqlens,
                 B["FLASH_SDPA_DECODE_BUF_OUT"]: none if split else out,
                 B["FLASH_SDPA_DECODE_BUF_LSE"]: lse if return_lse and not split else none,
                 B["FLASH_SDPA_DECODE_BUF_ALIBI"]: none if alibi is None else alibi,
                 B["FLASH_SDPA_DECODE_BUF_SINKS"]: none if sinks is None or split else sinks,
                 B["FLASH_SDPA_DECODE_BUF_O_PARTIAL"]: o_part if split else none,
                 B["FLASH_SDPA_DECODE_BUF_ML_PARTIAL"]: ml_part if split else none,
                 B["FLASH_SDPA_DECODE_BUF_CU_SEQLENS_Q"]: none, B["FLASH_SDPA_DECODE_BUF_CU_SEQLENS_K"]: none,
                 B["FLASH_SDPA_DECODE_BUF_CACHE_LEFTPAD"]: none},
        bytes={B["FLASH_SDPA_DECODE_BUF_PARAMS"]: ap},
        constants={FC["FLASH_SDPA_FC_DECODE_VARLEN"]: False,
                   FC["FLASH_SDPA_FC_DECODE_WRITE_LSE"]: return_lse,
                   FC["FLASH_SDPA_FC_DECODE_ALIBI"]: alibi is not None,
                   FC["FLASH_SDPA_FC_DECODE_SINKS"]: sinks is not None,
                   FC["FLASH_SDPA_FC_DECODE_SOFTCAP"]: softcap > 0,
                   FC["FLASH_SDPA_FC_DECODE_KV_ALIGNED"]: kv_rows_aligned(k_cache) and kv_rows_aligned(v_cache)},
        **dispatch_kw))
    if split:
        cp = PagedCombineParams(Bsz, sq, H, D, num_splits, 0)
        stats.append(lib("paged_decode_attention").dispatch(
            f"paged_decode_combine_{name}", threadgroups=(Bsz * H * sq, 1, 1),
            threads_per_threadgroup=(COMBINE_THREADS, 1, 1),
            buffers={B["FLASH_SDPA_COMBINE_BUF_O_PARTIAL"]: o_part, B["FLASH_SDPA_COMBINE_BUF_ML_PARTIAL"]: ml_part,
                     B["FLASH_SDPA_COMBINE_BUF_SINKS"]: none if sinks is None else sinks,
                     B["FLASH_SDPA_COMBINE_BUF_OUT"]: out,
                     B["FLASH_SDPA_COMBINE_BUF_LSE"]: lse if return_lse else none,
                     B["FLASH_SDPA_COMBINE_BUF_CU_SEQLENS_Q"]: none},
            bytes={B["FLASH_SDPA_COMBINE_BUF_PARAMS"]: cp},
            constants={FC["FLASH_SDPA_FC_COMBINE_WRITE_LSE"]: return_lse,
                       FC["FLASH_SDPA_FC_COMBINE_SINKS"]: sinks is not None,
                       FC["FLASH_SDPA_FC_COMBINE_VARLEN"]: False},
            **dispatch_kw))
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


def check_case(c, *, window=(-1, -1), softcap=0.0, use_alibi=False, use_sinks=False, num_splits=1, scale=None,
               **dispatch_kw):
    q, k_cache, v_cache = c["q"], c["k_cache"], c["v_cache"]
    Bsz, sq, H, D = q.shape
    g = c["gen"]
    scale = scale if scale is not None else D ** -0.5
    alibi = torch.rand(H, generator=g) * 0.3 if use_alibi else None
    sinks = torch.randn(H, generator=g) if use_sinks else None
    kc_ref, vc_ref = reference_write(k_cache, v_cache, c["block_table"], c["cache_seqlens"], c["k_new"], c["v_new"])
    storage_before = None if c["storage"] is None else c["storage"].clone()
    out, lse, stats = run_kvcache(q, k_cache, v_cache, c["block_table"], c["cache_seqlens"], c["k_new"], c["v_new"],
                                  scale=scale, window=window, softcap=softcap, alibi=alibi, sinks=sinks,
                                  num_splits=num_splits, **dispatch_kw)
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
    assert (lse[~inf].double() - ref_lse[~inf]).abs().max().item() <= tol if (~inf).any() else True
    return err, base, stats


# ---- tests -----------------------------------------------------------------------------------------------------


@pytest.mark.kernels_ci
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("group", [1, 4])  # row tiles R = 1 and 4: their lane layouts differ (DecodeLayout)
def test_dtypes_head_dims(dtype, D, group):
    c = make_case(D=D, dtype=TORCH_DTYPES[dtype], H=8, Hkv=8 // group, seed=D)
    check_case(c, num_splits=1 if D % 64 else 3)


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("sq", [1, 2, 16])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_gqa_sq_splits(group, sq, num_splits):
    c = make_case(H=2 * group, Hkv=2, sq=sq, sk_new=min(sq, 3), D=64, seed=group * 100 + sq, max_len=90)
    check_case(c, window=(-1, 0), num_splits=num_splits)


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
def test_features(feature, num_splits, sq):
    c = make_case(H=8, Hkv=2, sq=sq, sk_new=1, D=32, seed=len(feature) + sq, max_len=70)
    check_case(c, num_splits=num_splits, **FEATURES[feature])


@pytest.mark.parametrize("block_size", [1, 5, 16, 32, 256])
@pytest.mark.parametrize("layout,sk_new", [("halves", 2), ("separate", 2), ("interleaved", 0),
                                           ("interleaved", 2)])
def test_block_sizes_and_layouts(block_size, layout, sk_new):
    c = make_case(block_size=block_size, layout=layout, sk_new=sk_new, sq=2, seed=block_size, max_len=60)
    check_case(c, window=(-1, 0), num_splits=2)


@pytest.mark.kernels_ci
def test_no_new_tokens():
    c = make_case(sk_new=0, seed=5)
    check_case(c, num_splits=1)


@pytest.mark.kernels_ci
def test_fully_masked_rows_and_huge_scores():
    # window (0, -1) with sq > 1: early queries see only themselves; q * 100 gives scores ~1e3 in fp32.
    c = make_case(dtype=torch.float32, sq=3, sk_new=1, seed=9)
    c["q"] *= 100
    check_case(c, window=(0, 0), num_splits=2)


@pytest.mark.kernels_ci
def test_strided_q_and_new_kv():
    c = make_case(sq=2, sk_new=2, seed=11)
    big = torch.randn(3, 2, 8, 128).to(torch.float16)
    c["q"] = big[..., :64]  # strided view, last dim contiguous
    bigk = torch.randn(3, 2, 2, 2, 64).to(torch.float16)
    c["k_new"], c["v_new"] = bigk[:, :, :, 0], bigk[:, :, :, 1]
    check_case(c, window=(-1, 0))


@pytest.mark.kernels_ci
@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
def test_schedules_and_races(schedule):
    c = make_case(H=8, Hkv=1, sq=2, D=64, seed=3, max_len=100)
    check_case(c, window=(-1, 0), num_splits=3, use_sinks=True, schedule=schedule, seed=7, check_races=True)


@pytest.mark.parametrize("seed", [pytest.param(s, marks=[pytest.mark.full] if s >= 4 else []) for s in range(12)])
def test_fuzz_garbage_tables_never_overrun(seed):
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
        out, lse, _ = run_kvcache(q, k_cache, v_cache, block_table, cache_seqlens, kn, vn, scale=0.2,
                                  window=(-1, 0), num_splits=splits, check_races=True)
        assert torch.isfinite(out).all()


def test_traffic_gqa8_s2048():
    """GQA group 8, S = 2048: K/V bytes loaded <= 1.1 x the valid cache bytes; <= 3 dispatches."""
    D, Hkv, bs, S = 128, 1, 16, 2048
    c = make_case(Bsz=1, H=8 * Hkv, Hkv=Hkv, D=D, sq=1, sk_new=1, block_size=bs, seqlens=[S - 1], seed=1,
                  layout="separate", spare=4)
    for splits in (1, 8):
        err, base, stats = check_case(c if splits == 1 else make_case(
            Bsz=1, H=8 * Hkv, Hkv=Hkv, D=D, sq=1, sk_new=1, block_size=bs, seqlens=[S - 1], seed=1,
            layout="separate", spare=4), window=(-1, 0), num_splits=splits)
        assert len(stats) <= 3
        attn = stats[1]
        kv_loaded = attn.loaded.get(B["FLASH_SDPA_DECODE_BUF_K_CACHE"], 0) + attn.loaded.get(
            B["FLASH_SDPA_DECODE_BUF_V_CACHE"], 0)
        valid = 2 * S * Hkv * D * 2
        ratio = kv_loaded / valid
        print(f"splits={splits}: K/V loaded {kv_loaded} B, valid {valid} B, ratio {ratio:.4f}, "
              f"dispatches {len(stats)}, max err {err:.3g} (torch fp16 {base:.3g})")
        assert ratio <= 1.1


# ---- varlen mode (FLASH_SDPA_FC_DECODE_VARLEN): packed K/V, rows from cu_seqlens --------------------------------


def run_varlen_decode(q, k, v, cu_q, cu_k, *, scale, window=(-1, -1), softcap=0.0, alibi=None, sinks=None,
                      num_splits=1, **dispatch_kw):
    """Mirrors paged_planner.cpp in varlen mode: q [total_q, H, D], k / v [total_k, Hkv, D]; out / lse start NaN."""
    total_q, H, D = q.shape
    total_k, Hkv, _ = k.shape
    Bsz = cu_q.shape[0] - 1
    name = dtype_name(q.dtype)
    group = H // Hkv
    rows = rows_per_threadgroup(D, group)
    row_blocks = math.ceil(group / rows)
    split = num_splits > 1
    out = torch.full((total_q, H, D), float("nan"), dtype=q.dtype)
    lse = torch.full((H, total_q), float("nan"), dtype=torch.float32)
    o_part = torch.full((num_splits, Bsz, H, 1, D), float("nan"))
    ml_part = torch.full((num_splits, Bsz, H, 1, 2), float("nan"))
    none = cu_q
    ap = PagedDecodeParams(0, q.stride(0), q.stride(1), k.stride(0), 0, k.stride(1), v.stride(0), 0, v.stride(1), 0,
                           Bsz, 1, H, Hkv, D, row_blocks, 1, total_k, 0, 0, num_splits, window[0], window[1],
                           H if alibi is not None and alibi.dim() == 2 else 0, total_q, total_k, scale, softcap)
    stats = [lib("paged_decode_attention").dispatch(
        f"paged_decode_{name}_d{D}_r{rows}", threadgroups=(num_splits, Hkv * row_blocks, Bsz),
        threads_per_threadgroup=(DECODE_THREADS, 1, 1),
        buffers={B["FLASH_SDPA_DECODE_BUF_Q"]: q, B["FLASH_SDPA_DECODE_BUF_K_CACHE"]: k,
                 B["FLASH_SDPA_DECODE_BUF_V_CACHE"]: v, B["FLASH_SDPA_DECODE_BUF_BLOCK_TABLE"]: none,
                 B["FLASH_SDPA_DECODE_BUF_CACHE_SEQLENS"]: none,
                 B["FLASH_SDPA_DECODE_BUF_OUT"]: none if split else out,
                 B["FLASH_SDPA_DECODE_BUF_LSE"]: none if split else lse,
                 B["FLASH_SDPA_DECODE_BUF_ALIBI"]: none if alibi is None else alibi,
                 B["FLASH_SDPA_DECODE_BUF_SINKS"]: none if sinks is None or split else sinks,
                 B["FLASH_SDPA_DECODE_BUF_O_PARTIAL"]: o_part if split else none,
                 B["FLASH_SDPA_DECODE_BUF_ML_PARTIAL"]: ml_part if split else none,
                 B["FLASH_SDPA_DECODE_BUF_CU_SEQLENS_Q"]: cu_q, B["FLASH_SDPA_DECODE_BUF_CU_SEQLENS_K"]: cu_k,
                 B["FLASH_SDPA_DECODE_BUF_CACHE_LEFTPAD"]: none},
        bytes={B["FLASH_SDPA_DECODE_BUF_PARAMS"]: ap},
        constants={FC["FLASH_SDPA_FC_DECODE_VARLEN"]: True, FC["FLASH_SDPA_FC_DECODE_WRITE_LSE"]: True,
                   FC["FLASH_SDPA_FC_DECODE_ALIBI"]: alibi is not None,
                   FC["FLASH_SDPA_FC_DECODE_SINKS"]: sinks is not None,
                   FC["FLASH_SDPA_FC_DECODE_SOFTCAP"]: softcap > 0,
                   FC["FLASH_SDPA_FC_DECODE_KV_ALIGNED"]: kv_rows_aligned(k) and kv_rows_aligned(v)},
        **dispatch_kw)]
    if split:
        cp = PagedCombineParams(Bsz, 1, H, D, num_splits, total_q)
        stats.append(lib("paged_decode_attention").dispatch(
            f"paged_decode_combine_{name}", threadgroups=(Bsz * H, 1, 1),
            threads_per_threadgroup=(COMBINE_THREADS, 1, 1),
            buffers={B["FLASH_SDPA_COMBINE_BUF_O_PARTIAL"]: o_part, B["FLASH_SDPA_COMBINE_BUF_ML_PARTIAL"]: ml_part,
                     B["FLASH_SDPA_COMBINE_BUF_SINKS"]: none if sinks is None else sinks,
                     B["FLASH_SDPA_COMBINE_BUF_OUT"]: out, B["FLASH_SDPA_COMBINE_BUF_LSE"]: lse,
                     B["FLASH_SDPA_COMBINE_BUF_CU_SEQLENS_Q"]: cu_q},
            bytes={B["FLASH_SDPA_COMBINE_BUF_PARAMS"]: cp},
            constants={FC["FLASH_SDPA_FC_COMBINE_WRITE_LSE"]: True,
                       FC["FLASH_SDPA_FC_COMBINE_SINKS"]: sinks is not None,
                       FC["FLASH_SDPA_FC_COMBINE_VARLEN"]: True},
            **dispatch_kw))
    return out, lse, stats


def reference_varlen_decode(q, k, v, cu_q, cu_k, *, dtype=torch.float64, **kw):
    """Per sequence with a query row in [0, total_q): its keys clamped to [0, total_k], as a one-request cache of one
    block. Returns {q row: (out [H, D], lse [H])}."""
    total_q, total_k = q.shape[0], k.shape[0]
    res = {}
    for b in range(cu_q.shape[0] - 1):
        qs, qe = int(cu_q[b]), int(cu_q[b + 1])
        if not (qe > qs and 0 <= qs < total_q):
            continue
        ks = min(max(int(cu_k[b]), 0), total_k)
        ke = min(max(int(cu_k[b + 1]), ks), total_k)
        n = ke - ks
        kc = k[ks:ke].unsqueeze(0) if n else k[:0].new_zeros((1, 1) + k.shape[1:])
        vc = v[ks:ke].unsqueeze(0) if n else v[:0].new_zeros((1, 1) + v.shape[1:])
        alibi = kw.get("alibi")
        kw_b = dict(kw, alibi=None if alibi is None else (alibi[b:b + 1] if alibi.dim() == 2 else alibi))
        o, lse = reference_attention(q[qs].view(1, 1, *q.shape[1:]), kc, vc, torch.zeros(1, 1, dtype=torch.int32),
                                     torch.tensor([n], dtype=torch.int32), 0, dtype=dtype, **kw_b)
        res[qs] = (o[0, 0], lse[0, :, 0])
    return res


VARLEN_FEATURES = {
    "causal": dict(window=(-1, 0)),
    "window": dict(window=(9, 0)),
    "softcap_alibi_sinks": dict(window=(-1, 0), softcap=3.0, use_alibi=True, use_sinks=True),
}


@pytest.mark.kernels_ci
@pytest.mark.parametrize("feature", list(VARLEN_FEATURES))
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("group", [1, 4])
def test_varlen_mode(feature, num_splits, group):
    """Packed K/V with empty sequences, a sequence without a query, a garbage tail (cu_seqlens past total, negative,
    decreasing): every sequence with a query row matches the reference over its clamped keys; no other row of out
    or lse is written."""
    g = torch.Generator().manual_seed(num_splits * 10 + group + len(feature))
    Hkv, D, dtype = 2, 64, torch.float16
    H = Hkv * group
    lens = [37, 0, 70, 5, 1]
    total_k = sum(lens)
    cu_k = [0]
    for n in lens:
        cu_k.append(cu_k[-1] + n)
    cu_k += [total_k + 50, -4, 3]                 # garbage sequences 5..7: past the end, negative, decreasing
    cu_q = [0, 1, 2, 2, 3, 4, 5, 40, 41]          # sequence 2 has no query; the last starts past total_q (row 6 unused)
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
    out, lse, stats = run_varlen_decode(q, k, v, cu_q_t, cu_k_t, num_splits=num_splits, check_races=True, **kw)
    assert len(stats) == (2 if num_splits > 1 else 1)
    ref = reference_varlen_decode(q, k, v, cu_q_t, cu_k_t, **kw)
    same = reference_varlen_decode(q, k, v, cu_q_t, cu_k_t, dtype=torch.float16, **kw)
    assert sorted(ref) == [0, 1, 2, 3, 4, 5]
    for row in range(total_q):
        if row not in ref:
            assert torch.isnan(out[row]).all() and torch.isnan(lse[:, row]).all(), f"row {row} was written"
            continue
        o_ref, l_ref = ref[row]
        check_fa2(out[row], o_ref, same[row][0])
        inf = torch.isinf(l_ref)
        assert torch.equal(torch.isinf(lse[:, row]) & (lse[:, row] < 0), inf)
        if (~inf).any():
            assert (lse[~inf, row].double() - l_ref[~inf]).abs().max().item() <= 2e-2


def test_varlen_mode_traffic():
    """Varlen mode, GQA 8, two sequences of 1024 keys: K/V bytes loaded <= 1.1 x the valid bytes."""
    D, Hkv, S = 128, 1, 1024
    q = torch.randn(2, 8 * Hkv, D).half()
    k, v = torch.randn(2 * S, Hkv, D).half(), torch.randn(2 * S, Hkv, D).half()
    cu_q, cu_k = torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, S, 2 * S], dtype=torch.int32)
    for splits in (1, 4):
        out, lse, stats = run_varlen_decode(q, k, v, cu_q, cu_k, scale=D ** -0.5, window=(-1, 0),
                                            num_splits=splits)
        attn = stats[0]
        loaded = attn.loaded.get(B["FLASH_SDPA_DECODE_BUF_K_CACHE"], 0) + attn.loaded.get(
            B["FLASH_SDPA_DECODE_BUF_V_CACHE"], 0)
        assert loaded / (2 * 2 * S * Hkv * D * 2) <= 1.1
        ref = reference_varlen_decode(q, k, v, cu_q, cu_k, scale=D ** -0.5, window=(-1, 0))
        for row, (o_ref, _) in ref.items():
            assert (out[row].double() - o_ref).abs().max().item() < 5e-3
