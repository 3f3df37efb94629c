"""Shared by the GPU suite (test_gpu.py) and the benchmark (bench.py): libraries, the planner, paged-cache cases and
float64 references computed on the GPU."""

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from msl.cuda import launch

from . import targets

_LIBS: Optional[Dict[str, launch.Library]] = None


def libraries() -> Dict[str, launch.Library]:
    """The project's kernels and the feature kernels, from the PTX cache (built here by targets.py and carried, or
    built on the spot when clang-19 is there)."""
    global _LIBS
    if _LIBS is None:
        _LIBS = {name: launch.Library(path) for name, path in targets.load_all().items()}
    return _LIBS


def planner():
    """The C++ planners as a torch extension (planner_ext.py)."""
    from . import planner_ext

    return planner_ext.load()


# ---- paged decode --------------------------------------------------------------------------------------------------

@dataclass
class PagedCase:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    storage: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    k_new: Optional[torch.Tensor]
    v_new: Optional[torch.Tensor]
    seqlens: list
    max_seqlen_k: int


def make_paged_case(B, S, H, Hkv, D, dtype, block_size, *, sq=1, sk_new=1, layout="interleaved", seed=0,
                    padded_rows=True, full_length=False, device="cuda") -> PagedCase:
    """A paged cache as transformers' continuous batching lays it out: k/v pages of one buffer (interleaved: v one
    page after k; or halves), a permuted block table with -1 past each request, NaN in every slot not yet written.
    Request lengths (before the new tokens) are random in [S/2, S - sk_new], one is S - sk_new; with padded_rows
    and B >= 3, request 1 is padding (-1) and request 2 is empty (0)."""
    g = torch.Generator().manual_seed(seed)
    if full_length:
        seqlens = [S - sk_new] * B
    else:
        seqlens = [int(x) for x in torch.randint(S // 2, S - sk_new + 1, (B,), generator=g)]
        seqlens[0] = S - sk_new
        if padded_rows and B >= 3:
            seqlens[1], seqlens[2] = -1, 0
    need = [math.ceil((L + sk_new) / block_size) if L >= 0 else 0 for L in seqlens]
    max_blocks = max(need + [1]) + 1
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g)
    bt = torch.full((B, max_blocks), -1, dtype=torch.int32)
    k = 0
    for b in range(B):
        bt[b, :need[b]] = perm[k:k + need[b]].int()
        k += need[b]
    storage = torch.full((2 * num_blocks, block_size, Hkv, D), float("nan"), dtype=dtype, device=device)
    if layout == "interleaved":
        k_cache, v_cache = storage[0::2], storage[1::2]
    else:
        k_cache, v_cache = storage[:num_blocks], storage[num_blocks:]
    bt_dev = bt.to(device)
    # Fill the valid slots: token t of request b at block bt[b, t // bs], row t % bs.
    gd = torch.Generator(device=device).manual_seed(seed)
    for b in range(B):
        L = max(seqlens[b], 0)
        if L == 0:
            continue
        t = torch.arange(L, device=device)
        blk, row = bt_dev[b, t // block_size].long(), t % block_size
        k_cache[blk, row] = torch.randn(L, Hkv, D, generator=gd, device=device).to(dtype)
        v_cache[blk, row] = torch.randn(L, Hkv, D, generator=gd, device=device).to(dtype)
    q = torch.randn(B, sq, H, D, generator=gd, device=device).to(dtype)
    k_new = torch.randn(B, sk_new, Hkv, D, generator=gd, device=device).to(dtype) if sk_new else None
    v_new = torch.randn(B, sk_new, Hkv, D, generator=gd, device=device).to(dtype) if sk_new else None
    return PagedCase(q, k_cache, v_cache, storage, bt_dev, torch.tensor(seqlens, dtype=torch.int32, device=device),
                     k_new, v_new, seqlens, S)


# The planner's wide path for short one-token splits (PagedKVCacheAttention::decode_wide): -1 its choice, 0 off
# (bench_peers --zoo times each row that takes it a second time with it off).
DECODE_WIDE = -1


def plan_paged(case: PagedCase, out, lse=None, *, scale, window=(-1, 0), softcap=0.0, alibi=None, sinks=None,
               num_splits=0, with_new=True, target_threadgroups=0, gpu_cores=None, simdgroup_partials=-1):
    """gpu_cores None: this GPU's SM count (the planner's device description on the proxy); 0: the Apple default.
    simdgroup_partials: 1 / 0 forces whether each decode simdgroup writes its own split partial (-1: the planner's)."""
    if gpu_cores is None:
        gpu_cores = torch.cuda.get_device_properties(0).multi_processor_count
    return planner().plan_paged(case.q, case.k_cache, case.v_cache, case.block_table, case.cache_seqlens,
                                case.k_new if with_new else None, case.v_new if with_new else None, out, lse, alibi,
                                sinks, scale, softcap, window[0], window[1], num_splits, case.max_seqlen_k,
                                target_threadgroups, gpu_cores, simdgroup_partials, -1, DECODE_WIDE)


def plan_dense_decode(q, k, v, out, *, scale, softcap=0.0, sinks=None, gpu_cores=None):
    """flash_attn_func's decode as routing.cpp plans it: k / v [B, S, Hkv, D] (row b is request b's, all S keys
    valid), no block table or length tensor."""
    if gpu_cores is None:
        gpu_cores = torch.cuda.get_device_properties(0).multi_processor_count
    S = k.shape[1]
    return planner().plan_paged(q, k, v, None, None, None, None, out, None, None, sinks, scale, softcap, -1, 0, 0, S,
                                0, gpu_cores, -1, S, DECODE_WIDE)


def reference_write(case: PagedCase) -> torch.Tensor:
    """The storage after kv_paged_write, on a copy."""
    st = case.storage.clone()
    if case.k_new is None:
        return st
    num_blocks, bs = case.k_cache.shape[0], case.k_cache.shape[1]
    kc, vc = (st[0::2], st[1::2]) if case.k_cache.stride(0) != case.k_cache[0].numel() else (
        st[:num_blocks], st[num_blocks:])
    bt = case.block_table.cpu()
    for b, L in enumerate(case.seqlens):
        if L < 0:
            continue
        for i in range(case.k_new.shape[1]):
            t = L + i
            if t >= bt.shape[1] * bs:
                continue
            blk = int(bt[b, t // bs])
            if 0 <= blk < num_blocks:
                kc[blk, t % bs] = case.k_new[b, i]
                vc[blk, t % bs] = case.v_new[b, i]
    return st


def reference_attention(case: PagedCase, k_cache, v_cache, *, scale, window=(-1, 0), softcap=0.0, alibi=None,
                        sinks=None, dtype=torch.float64):
    """Attention over the written cache, per request, in `dtype` on the GPU: out [B, sq, H, D], lse [B, H, sq]
    (float64). Rows with no visible key: 0 and -inf."""
    B, sq, H, D = case.q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    sk_new = 0 if case.k_new is None else case.k_new.shape[1]
    dev = case.q.device
    out = torch.zeros(B, sq, H, D, dtype=dtype, device=dev)
    lse = torch.full((B, H, sq), -math.inf, dtype=torch.float64, device=dev)
    for b, L in enumerate(case.seqlens):
        if L < 0 or L + sk_new == 0:
            continue
        sk = L + sk_new
        t = torch.arange(sk, device=dev)
        blk = case.block_table[b, t // bs].long()
        K = k_cache[blk, t % bs].to(dtype)  # [sk, Hkv, D]
        V = v_cache[blk, t % bs].to(dtype)
        qb = case.q[b].to(dtype).view(sq, Hkv, G, D)
        s = torch.einsum("ikgd,jkd->kgij", qb, K) * scale  # [Hkv, G, sq, sk]
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        pos = (torch.arange(sq, device=dev) + sk - sq)[:, None]
        j = torch.arange(sk, device=dev)[None, :]
        if alibi is not None:
            s = s - alibi.to(dtype).view(Hkv, G)[:, :, None, None] * (pos - j).abs().to(dtype)
        vis = torch.ones(sq, sk, dtype=torch.bool, device=dev)
        if window[0] >= 0:
            vis &= j >= pos - window[0]
        if window[1] >= 0:
            vis &= j <= pos + window[1]
        s = s.masked_fill(~vis, -math.inf)
        if sinks is not None:
            s = torch.cat([s, sinks.to(dtype).view(Hkv, G, 1, 1).expand(Hkv, G, sq, 1)], dim=-1)
        m = s.amax(-1, keepdim=True).clamp(min=-1e30)
        p = torch.exp(s - m)
        denom = p.sum(-1, keepdim=True)
        rl = (torch.log(denom.double()) + m.double()).squeeze(-1)  # [Hkv, G, sq]
        if sinks is not None:
            p = p[..., :-1]
        o = torch.einsum("kgij,jkd->ikgd", (p / denom).to(dtype), V).reshape(sq, H, D)
        seen = vis.any(1)
        o[~seen] = 0
        rl = rl.reshape(H, sq)
        rl[:, ~seen] = -math.inf
        out[b] = o
        lse[b] = rl
    return out, lse


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
