"""Tensors past 2^31 and 2^32 elements: every offset a kernel computes must be 64-bit where a product can pass 2^31.

A wrapped 32-bit offset reads or writes the wrong place without any error on a GPU (pytorch#179352, pytorch#188756
are such bugs in PyTorch's MPS backend). Here the real kernels run on the emulator over tensors of 4-9 GB that are
mostly never touched: the caller's untouched pages and the emulator's copies of them cost no memory (the emulator
copies and saves only non-zero 4 KB chunks of a bound buffer), so CI can afford them. The few blocks, rows and
sequences the calls use sit on both sides of element offsets 2^31 and 2^32; a wrapped offset would read zeros or
another block and fail the float64 comparison (FlashAttention's rule), or leave the emulator's bound buffer.

What needs real data past 2^31 (the score count B x H x Sq x Sk past 2^32, the backward's scratch past 2^31) is
compute, not addressing: those cases are in the GPU suite (tests/metal_cuda/test_gpu.py, "large").
"""

import math

import pytest
import torch
from reference import attention_one, check_lse
from test_paged_kernels import check_fa2

pytestmark = pytest.mark.usefixtures("emulator_only")

TWO_31 = 1 << 31
TWO_32 = 1 << 32
H, HKV, D, BLOCK = 8, 2, 64, 256
PER_BLOCK = BLOCK * HKV * D  # elements of one cache block


@pytest.fixture(scope="module")
def emulator_only():
    if torch.backends.mps.is_available():
        pytest.skip("sparse multi-GB tensors are an emulator technique; a Mac would allocate them for real")


def _fill(t: torch.Tensor, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    t.copy_(torch.randn(t.shape, generator=g))


@pytest.fixture(scope="module")
def paged_cache():
    """A paged fp16 K/V cache of more than 2^32 elements each (8.6 GB of address space, untouched)."""
    num_blocks = TWO_32 // PER_BLOCK + 8
    k_cache = torch.empty(num_blocks, BLOCK, HKV, D, dtype=torch.float16)
    v_cache = torch.empty_like(k_cache)
    assert k_cache.numel() > TWO_32
    return k_cache, v_cache


def _block_at(element_offset: int) -> int:
    return element_offset // PER_BLOCK


def _gather(cache: torch.Tensor, blocks, length: int) -> torch.Tensor:
    """[length, Hkv, D]: the first `length` keys of a sequence whose block table row is `blocks`."""
    return torch.cat([cache[b] for b in blocks])[:length]


@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_decode_and_append_past_2_32(kernel, paged_cache, num_splits):
    k_cache, v_cache = paged_cache
    # Blocks straddling element offsets 2^31 and 2^32, and the cache's last block.
    tables = [[_block_at(TWO_31) - 1, _block_at(TWO_32)], [_block_at(TWO_32) - 1, k_cache.shape[0] - 1],
              [_block_at(TWO_31), 3]]
    seqlens = [300, 256, 511]  # the appended key lands in the second block of each (the first one's last slot too)
    for i, row in enumerate(tables):
        for j, block in enumerate(row):
            _fill(k_cache[block], 10 * i + j)
            _fill(v_cache[block], 100 + 10 * i + j)
    block_table = torch.tensor(tables, dtype=torch.int32)
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 1, H, D, generator=g).half()
    k_new = torch.randn(3, 1, HKV, D, generator=g).half()
    v_new = torch.randn(3, 1, HKV, D, generator=g).half()
    neighbours = {b: (k_cache[b].clone(), v_cache[b].clone()) for row in tables for b in (row[-1] - 1, row[-1] + 1)
                  if 0 <= b < k_cache.shape[0] and all(b not in r for r in tables)}

    out, lse = kernel.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens,
                                              block_table=block_table, num_splits=num_splits,
                                              return_softmax_lse=True)

    for b, (row, n) in enumerate(zip(tables, seqlens)):
        slot = n  # the appended key's position
        assert torch.equal(k_cache[row[slot // BLOCK], slot % BLOCK], k_new[b, 0]), "append: k slot"
        assert torch.equal(v_cache[row[slot // BLOCK], slot % BLOCK], v_new[b, 0]), "append: v slot"
        keys, values = _gather(k_cache, row, n + 1), _gather(v_cache, row, n + 1)
        ref, lse_ref = attention_one(q[b], keys, values, scale=D**-0.5)
        same, _ = attention_one(q[b], keys, values, scale=D**-0.5, dtype=torch.float16)
        check_fa2(out[b], ref, same)
        check_lse(lse[b], lse_ref)
    for b, (k_before, v_before) in neighbours.items():  # nothing written next to the sequences' blocks
        assert torch.equal(k_cache[b], k_before) and torch.equal(v_cache[b], v_before), f"block {b} changed"


def test_paged_varlen_prefill_past_2_32(kernel, paged_cache):
    """flash_attn_varlen_func over the same > 2^32-element paged cache (the varlen kernel's paged mode)."""
    k_cache, v_cache = paged_cache
    tables = [[_block_at(TWO_32) + 1, _block_at(TWO_31) + 1], [k_cache.shape[0] - 2, 5]]
    lengths_k, lengths_q = [400, 300], [40, 33]
    for i, row in enumerate(tables):
        for j, block in enumerate(row):
            _fill(k_cache[block], 200 + 10 * i + j)
            _fill(v_cache[block], 300 + 10 * i + j)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(sum(lengths_q), H, D, generator=g).half()
    cu_q = torch.tensor([0, lengths_q[0], sum(lengths_q)], dtype=torch.int32)
    cu_k = torch.tensor([0, lengths_k[0], sum(lengths_k)], dtype=torch.int32)

    out = kernel.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max(lengths_q), max(lengths_k),
                                        causal=True, block_table=torch.tensor(tables, dtype=torch.int32))

    for b, row in enumerate(tables):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        keys, values = _gather(k_cache, row, lengths_k[b]), _gather(v_cache, row, lengths_k[b])
        ref, _ = attention_one(q[rows], keys, values, scale=D**-0.5, causal=True)
        same, _ = attention_one(q[rows], keys, values, scale=D**-0.5, causal=True, dtype=torch.float16)
        check_fa2(out[rows], ref, same)


def test_contiguous_cache_past_2_31(kernel):
    """A contiguous cache [B_cache, S, Hkv, D] of more than 2^31 elements: rows picked by cache_batch_idx at the top,
    a two-token append (the decode kernel's several-query path), left padding."""
    seq = 1024
    rows = TWO_31 // (seq * HKV * D) + 4
    k_cache = torch.empty(rows, seq, HKV, D, dtype=torch.float16)
    v_cache = torch.empty_like(k_cache)
    assert k_cache.numel() > TWO_31
    picked = [rows - 1, rows // 2 + 1, 0]
    for i, r in enumerate(picked):
        _fill(k_cache[r], 400 + i)
        _fill(v_cache[r], 500 + i)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 2, H, D, generator=g).half()
    k_new = torch.randn(3, 2, HKV, D, generator=g).half()
    v_new = torch.randn(3, 2, HKV, D, generator=g).half()
    seqlens, leftpad = [1000, 37, 517], [0, 5, 100]

    out = kernel.flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=torch.tensor(seqlens, dtype=torch.int32),
        cache_batch_idx=torch.tensor(picked, dtype=torch.int32), cache_leftpad=torch.tensor(leftpad, dtype=torch.int32),
        causal=True)

    for b, r in enumerate(picked):
        end = seqlens[b] + 2
        assert torch.equal(k_cache[r, seqlens[b]:end], k_new[b]) and torch.equal(v_cache[r, seqlens[b]:end], v_new[b])
        keys, values = k_cache[r, leftpad[b]:end], v_cache[r, leftpad[b]:end]
        ref, _ = attention_one(q[b], keys, values, scale=D**-0.5, causal=True)
        same, _ = attention_one(q[b], keys, values, scale=D**-0.5, causal=True, dtype=torch.float16)
        check_fa2(out[b], ref, same)


@pytest.fixture(scope="module")
def flat():
    """One fp16 buffer of more than 2^32 elements (8.6 GB of address space, untouched) that strided q / k / v / out
    views spread across."""
    return torch.empty(TWO_32 // (H * D) + 1024, H, D, dtype=torch.float16)


def _spread(flat: torch.Tensor, rows: int, first: int, heads: int) -> torch.Tensor:
    """A [rows, heads, D] view of `flat` whose rows are spread evenly from row `first` (0-3) to past element 2^32.
    Its rows are `first` modulo 4, so views with different `first` never overlap."""
    step = (flat.shape[0] - 4) // (rows - 1) // 4 * 4
    view = flat[first::step][:rows, :heads]
    assert view.shape[0] == rows and view.storage_offset() + (rows - 1) * view.stride(0) > TWO_32
    return view


def test_varlen_forward_and_backward_views_past_2_32(kernel, flat):
    """q / k / v views whose rows lie up to past element 2^32 of one buffer (strides are free) and an `out` view
    like them in a second one: the forward into the caller's `out`, and the backward."""
    lengths_q, lengths_k = [23, 9], [41, 30]  # the second sequences start past element 2^31
    tq, tk = sum(lengths_q), sum(lengths_k)
    q, k, v = _spread(flat, tq, 0, H), _spread(flat, tk, 1, HKV), _spread(flat, tk, 2, HKV)
    out = _spread(torch.empty_like(flat), tq, 3, H)  # its own buffer: out may not overlap an input's extent
    for i, t in enumerate((q, k, v)):
        _fill(t, 600 + i)
    cu_q = torch.tensor([0, lengths_q[0], tq], dtype=torch.int32)
    cu_k = torch.tensor([0, lengths_k[0], tk], dtype=torch.int32)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))  # the same values, contiguous

    kernel.flash_attention_varlen(out, q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), do_causal=True)
    q_leaf, k_leaf, v_leaf = (t.detach().requires_grad_() for t in (q, k, v))  # leaves that alias flat
    o = kernel.flash_attn_varlen_func(q_leaf, k_leaf, v_leaf, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=True)
    dout = torch.randn(o.shape, generator=torch.Generator().manual_seed(7)).half()
    o.backward(dout)

    for b in range(2):
        rq = slice(int(cu_q[b]), int(cu_q[b + 1]))
        rk = slice(int(cu_k[b]), int(cu_k[b + 1]))
        ref, _ = attention_one(q[rq], k[rk], v[rk], scale=D**-0.5, causal=True)
        same, _ = attention_one(q[rq], k[rk], v[rk], scale=D**-0.5, causal=True, dtype=torch.float16)
        check_fa2(out[rq], ref, same)
        check_fa2(o[rq].detach(), ref, same)
    # Gradients against the float64 autograd of the same math, FlashAttention's backward rule (k = 3).
    grads = {}
    for dtype in (torch.float64, torch.float16):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (qr, kr, vr)]
        outs = [attention_one(leaves[0][int(cu_q[b]):int(cu_q[b + 1])], leaves[1][int(cu_k[b]):int(cu_k[b + 1])],
                              leaves[2][int(cu_k[b]):int(cu_k[b + 1])], scale=D**-0.5, causal=True, dtype=dtype)[0]
                for b in range(2)]
        torch.cat(outs).backward(dout.to(dtype))
        grads[dtype] = [t.grad for t in leaves]
    for name, ours, ref, same in zip("qkv", (q_leaf.grad, k_leaf.grad, v_leaf.grad), grads[torch.float64],
                                     grads[torch.float16]):
        assert ours.shape == ref.shape, name
        check_fa2(ours, ref, same)


def test_dense_batch_stride_past_2_32(kernel, flat):
    """flash_attn_func with batch strides that put the last batch past element 2^32."""
    batch, sq, sk = 3, 17, 29
    step = (flat.shape[0] - 3 * sk) // (batch - 1)
    views = [flat.as_strided((batch, n, h, D), (step * H * D, H * D, D, 1), offset) for n, h, offset in
             ((sq, H, 0), (sk, HKV, sk * H * D + D * H // 2), (sk, HKV, 2 * sk * H * D))]
    q, k, v = views
    assert all(t.storage_offset() + (batch - 1) * t.stride(0) > TWO_32 for t in views)
    for i, t in enumerate(views):
        _fill(t, 700 + i)

    out, lse, _ = kernel.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)

    for b in range(batch):
        ref, lse_ref = attention_one(q[b], k[b], v[b], scale=D**-0.5, causal=True)
        same, _ = attention_one(q[b], k[b], v[b], scale=D**-0.5, causal=True, dtype=torch.float16)
        check_fa2(out[b], ref, same)
        check_lse(lse[b], lse_ref)


def test_sizes_are_what_the_names_say(paged_cache, flat):
    # The fixtures are as large as the tests claim (a guard against someone shrinking them to save time).
    assert paged_cache[0].numel() > TWO_32 and flat.numel() > TWO_32
    assert math.prod(paged_cache[0].shape) * 2 > 8 * 2**30  # bytes
