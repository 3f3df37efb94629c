"""flash_attn_varlen_func with block_table (FlashAttention-2's paged varlen): k and v are paged caches
[num_blocks, block_size, Hkv, D], cu_seqlens_k gives each sequence's key count, block_table int32 [B, max_blocks] its
pages (anywhere, in any order, shared between sequences). Prefix caching and chunked prefill over a paged cache."""

import itertools

import pytest
import reference as ref
import torch
from test_varlen import cu

STRICT = "METAL_FLASH_SDPA_STRICT"


def make_paged(lens_q, lens_k, H, Hkv, D, block_size, dtype, device, share_prefix=0, seed=0):
    """Random q and per-sequence K/V, scattered into a paged cache through a permuted block table; the first
    `share_prefix` blocks of sequence 0 are shared by every sequence (a cached prompt prefix)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens_k)
    blocks = [(n + block_size - 1) // block_size for n in lens_k]
    max_blocks = max(blocks + [1]) + 1
    num_blocks = sum(blocks) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.full((B, max_blocks), -1, dtype=torch.int32)
    nxt = 0
    for b in range(B):
        for c in range(blocks[b]):
            if b > 0 and c < share_prefix:
                table[b, c] = table[0, c]
            else:
                table[b, c] = perm[nxt]
                nxt += 1
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
    q = torch.randn(sum(lens_q), H, D, generator=g).to(dtype)
    # The packed K/V each sequence sees (the reference's input).
    ks, vs = [], []
    for b, n in enumerate(lens_k):
        idx = [int(table[b, j // block_size]) for j in range(n)]
        slot = [j % block_size for j in range(n)]
        ks.append(k_cache[idx, slot] if n else k_cache[:0, 0])
        vs.append(v_cache[idx, slot] if n else v_cache[:0, 0])
    k_packed, v_packed = torch.cat(ks), torch.cat(vs)
    dev = dict(q=q.to(device), k=k_cache.to(device), v=v_cache.to(device), block_table=table.to(device),
               cu_seqlens_q=cu(lens_q, device), cu_seqlens_k=cu(lens_k, device))
    return dev, k_packed, v_packed


def run_case(kernel, device, lens_q, lens_k, *, H=4, Hkv=2, D=64, block_size=16, dtype=torch.float16,
             share_prefix=0, causal=True, window=(-1, -1), softcap=0.0, sinks=False, alibi=False, seed=0):
    c, k_packed, v_packed = make_paged(lens_q, lens_k, H, Hkv, D, block_size, dtype, device, share_prefix, seed)
    g = torch.Generator().manual_seed(seed + 1)
    s_aux = torch.randn(H, generator=g) if sinks else None
    slopes = 0.05 + 0.4 * torch.rand(H, generator=g) if alibi else None
    before = {n: t.clone() for n, t in c.items()}
    out, lse, _ = kernel.flash_attn_varlen_func(
        c["q"], c["k"], c["v"], c["cu_seqlens_q"], c["cu_seqlens_k"], max(lens_q), max(lens_k), causal=causal,
        window_size=window, softcap=softcap, return_attn_probs=True, block_table=c["block_table"],
        s_aux=None if s_aux is None else s_aux.to(device), alibi_slopes=None if slopes is None else slopes.to(device))
    for n, t in c.items():
        assert torch.equal(t, before[n]), f"{n} was modified"
    kw = dict(scale=D**-0.5, causal=causal, window=window, softcap=softcap, sinks=s_aux, alibi_slopes=slopes)
    cq, ck = c["cu_seqlens_q"].tolist(), c["cu_seqlens_k"].tolist()
    q = c["q"].cpu()
    out_ref, lse_ref = ref.attention_varlen(q, k_packed, v_packed, cq, ck, **kw)
    out_pt, _ = ref.attention_varlen(q, k_packed, v_packed, cq, ck, dtype=dtype, **kw)
    ref.check_close(out.cpu(), out_ref, out_pt)
    ref.check_lse(lse.cpu(), lse_ref)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("block_size", [1, 5, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_paged_varlen(kernel, device, block_size, dtype):
    # chunked prefill: each sequence's queries are the last keys of its cache (bottom-right causal)
    run_case(kernel, device, [7, 33, 1], [40, 33, 9], block_size=block_size, dtype=dtype)


@pytest.mark.kernels_ci
def test_shared_prefix_pages(kernel, device, emulator):
    emulator(schedule="random", seed=3, check_races=True)
    run_case(kernel, device, [5, 12, 3], [37, 45, 40], block_size=8, share_prefix=4)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("feature", ["window", "softcap", "sinks", "alibi", "noncausal", "empty"])
def test_paged_varlen_features(kernel, device, feature):
    kw = dict(window=(9, 0)) if feature == "window" else {}
    kw.update(softcap=2.0) if feature == "softcap" else None
    kw.update(sinks=True) if feature == "sinks" else None
    kw.update(alibi=True) if feature == "alibi" else None
    kw.update(causal=False) if feature == "noncausal" else None
    lens_q, lens_k = ([0, 6, 4], [12, 0, 20]) if feature == "empty" else ([6, 20], [30, 20])
    run_case(kernel, device, lens_q, lens_k, H=8, Hkv=2, block_size=16, **kw)


@pytest.mark.parametrize("head_dim,dtype", list(itertools.product([32, 80, 96, 128, 256], [torch.float16])))
def test_paged_varlen_head_dims(kernel, device, head_dim, dtype):
    run_case(kernel, device, [3, 17], [20, 17], D=head_dim, dtype=dtype, block_size=16)


@pytest.mark.kernels_ci
def test_garbage_block_table(kernel, device, emulator, monkeypatch):
    """Block ids outside k, -1 entries a sequence needs, lengths past the table: no out-of-bounds access (the
    emulator raises on any), invalid keys masked; strict mode raises a ValueError naming the entry."""
    emulator(schedule="reverse", seed=0, check_races=True)
    c, _, _ = make_paged([4, 4, 4], [20, 30, 9], 4, 2, 32, 8, torch.float16, device)
    table = c["block_table"].clone()
    table[0, 1] = 2**31 - 1
    table[1, 0] = -5
    cu_k = torch.tensor([0, 20, 2**31 - 1, 2**31 - 1], dtype=torch.int32, device=device)  # sequence 1: huge
    args = (c["q"], c["k"], c["v"], c["cu_seqlens_q"], cu_k, 4, 2**31 - 1)
    out = kernel.flash_attn_varlen_func(*args, causal=True, block_table=table)
    assert torch.isfinite(out).all()
    monkeypatch.setenv(STRICT, "1")
    with pytest.raises(ValueError, match="block_table|keys"):
        kernel.flash_attn_varlen_func(*args, causal=True, block_table=table)
    with pytest.raises(ValueError, match=r"block_table\[0, 1\]"):
        kernel.flash_attn_varlen_func(c["q"], c["k"], c["v"], c["cu_seqlens_q"], c["cu_seqlens_k"], 4, 30,
                                      block_table=table)


@pytest.mark.kernels_ci
def test_paged_varlen_bad_input(kernel, device):
    c, _, _ = make_paged([4, 4], [20, 30], 4, 2, 32, 8, torch.float16, device)
    base = (c["q"], c["k"], c["v"], c["cu_seqlens_q"], c["cu_seqlens_k"], 4, 30)
    with pytest.raises(TypeError, match="block_table must be int32"):
        kernel.flash_attn_varlen_func(*base, block_table=c["block_table"].long())
    with pytest.raises(ValueError, match="block_table must have shape"):
        kernel.flash_attn_varlen_func(*base, block_table=c["block_table"][:1])
    with pytest.raises(ValueError, match="k must have shape"):
        kernel.flash_attn_varlen_func(c["q"], c["k"][:, 0], c["v"][:, 0], *base[3:], block_table=c["block_table"])
