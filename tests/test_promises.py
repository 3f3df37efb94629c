"""Promises kept where a hostile caller looked (issue 20): max_seqlen_q sizes the launch only, a key a row cannot see
never changes that row (NaN in k or v included, forward and backward), the backward refuses to be differentiated
and to run on cu_seqlens changed since the forward, and calls from several threads at once give the serial results.
"""

import threading

import pytest
import reference as ref
import torch
from test_backward import check_grad, leaf, reference_grads
from test_varlen import cu, make_inputs

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
