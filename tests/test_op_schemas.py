"""The op schemas are a contract: torch.library.opcheck checks each op against its schema (mutation annotations:
only `out` and the KV cache are written; aliasing; autograd registration) on small calls."""

import pytest
import torch


def options(q, causal, softcap=0.0, alibi_slopes=None, s_aux=None):
    """The trailing option group of every op: [softmax_scale, softcap], [causal, window_left, window_right],
    [alibi_slopes, s_aux] (the package's _op_options builds it from the public arguments)."""
    return [0.125, softcap], [int(causal), -1, -1], [alibi_slopes, s_aux]


def run_opcheck(op, args):
    # test_schema runs the op and compares what it mutated with the schema's (a!) annotations; the fake-tensor and
    # AOT checks need meta kernels, which this inference package does not register (torch.compile is untested).
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.kernels_ci
def test_varlen_ops(kernel, device):
    ops = kernel._ops.ops
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(7, 4, 64, generator=g).to(device) for _ in range(3))
    k, v = k[:, :2].contiguous(), v[:, :2].contiguous()
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    causal = options(q, True)  # the option group every op ends with
    run_opcheck(ops.varlen_fwd.default, (q, k, v, cu, cu, 4, 4, None, *causal))
    out = torch.empty_like(q)
    run_opcheck(ops.flash_attention_varlen.default, (out, q, k, v, cu, cu, 4, 4, *causal))
    qd, kd, vd = q.view(1, 7, 4, 64), k.view(1, 7, 2, 64), v.view(1, 7, 2, 64)
    run_opcheck(ops.fwd.default, (qd[:, :1], kd, vd, *causal))  # decode route
    run_opcheck(ops.fwd.default, (qd, kd, vd, *options(q, False)))  # varlen kernel


@pytest.mark.kernels_ci
def test_kvcache_op(kernel, device):
    ops = kernel._ops.ops
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 1, 4, 32, generator=g).to(device)
    k_cache, v_cache = (torch.randn(6, 16, 2, 32, generator=g).to(device) for _ in range(2))
    k_new, v_new = (torch.randn(2, 1, 2, 32, generator=g).to(device) for _ in range(2))
    seqlens = torch.tensor([5, 20], dtype=torch.int32, device=device)
    table = torch.tensor([[4, 1], [0, 3]], dtype=torch.int32, device=device)
    run_opcheck(ops.kvcache_fwd.default, (q, k_cache, v_cache, k_new, v_new, seqlens, table, None, None, 0, True, 0,
                                          [0.17, 0.0], [1, -1, -1], [None, None]))
