"""Long prompts bounded: a prefill whose work passes one command buffer's budget is planned as several dispatches over
interleaved query tiles (dispatch k of n: tiles k, k + n, ...), with the command buffer committed after each
(flash_sdpa/planner_common.h: macOS terminates a command buffer that runs longer than the system allows, mlx#3302).
Here the budget is scaled down with METAL_FLASH_SDPA_COMMAND_BUFFER_FLOPS so that small prompts split; a split call
must give bit for bit the result of the unsplit one (the rows are the same computation, only spread over dispatches),
and FlashAttention's rule against float64. The 128K-token prompt itself is in the GPU suite
(tests/metal_cuda/test_gpu.py::test_prefill_128k).
"""

from pathlib import Path

import pytest
import torch
from reference import attention_varlen, check_close, check_lse

from msl import cpu as metal_cpu

H, HKV, D = 4, 2, 64


@pytest.fixture(scope="module")
def stats_runtime(kernel):
    if torch.backends.mps.is_available():
        pytest.skip("counts the emulator's dispatches")
    return metal_cpu.Runtime(Path(kernel.__file__).parent / "libmetal_cpu.so")


def _varlen_case(lengths_q, lengths_k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths_q), H, D, generator=g).half()
    k = torch.randn(sum(lengths_k), HKV, D, generator=g).half()
    v = torch.randn(sum(lengths_k), HKV, D, generator=g).half()
    cu = [torch.tensor([0] + torch.tensor(x).cumsum(0).tolist(), dtype=torch.int32) for x in (lengths_q, lengths_k)]
    return q, k, v, cu[0], cu[1]


def _dispatches(stats_runtime, monkeypatch, budget, fn, kernel_prefix):
    """fn() under a command-buffer budget of `budget` FLOPs (None: the default); returns (result, its dispatches of
    kernels named kernel_prefix...)."""
    if budget is None:
        monkeypatch.delenv("METAL_FLASH_SDPA_COMMAND_BUFFER_FLOPS", raising=False)
    else:
        monkeypatch.setenv("METAL_FLASH_SDPA_COMMAND_BUFFER_FLOPS", str(budget))
    stats_runtime.reset_stats()
    result = fn()
    return result, [s for s in stats_runtime.stats() if s.kernel.startswith(kernel_prefix)]


def _stored(dispatches) -> int:
    """Bytes the dispatches stored: each row once, however the rows are split."""
    return sum(sum(s.stored.values()) for s in dispatches)


def _run(kernel, stats_runtime, monkeypatch, budget, fn):
    """fn() under a budget; returns (result, its varlen dispatches)."""
    return _dispatches(stats_runtime, monkeypatch, budget, fn, "flash_attn_varlen")


@pytest.mark.parametrize("what", ["causal", "window", "noncausal", "understated_max_seqlen_q", "dense"])
def test_split_prefill_is_the_unsplit_result(kernel, stats_runtime, monkeypatch, what):
    lengths_q, lengths_k = [200, 131], [200, 170]
    q, k, v, cu_q, cu_k = _varlen_case(lengths_q, lengths_k)
    kw = dict(causal=what != "noncausal", window_size=(40, 0) if what == "window" else (-1, -1))
    max_q = 64 if what == "understated_max_seqlen_q" else max(lengths_q)
    keys = {"window": 41, "dense": 100}.get(what, 200)  # the most keys a row sees
    tiles = (max_q + 31) // 32 if what != "dense" else 2  # query tiles in the grid (32 rows each at D = 64)
    if what == "dense":
        qd, kd, vd = q[:128].view(2, 64, H, D), k[:200].view(2, 100, HKV, D), v[:200].view(2, 100, HKV, D)

        def call():
            return kernel.flash_attn_func(qd, kd, vd, causal=True, return_attn_probs=True)[:2]
    else:
        def call():
            return kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max(lengths_k), return_attn_probs=True,
                                                 **kw)[:2]

    (out, lse), one = _run(kernel, stats_runtime, monkeypatch, None, call)
    assert len(one) == 1
    # Below one tile's work: a tile per dispatch, each looping past the grid over its own tiles (max_seqlen_q only
    # sizes the launch). Two tiles' work (batch x heads x 32 rows x keys x 4 D FLOPs): fewer, larger dispatches.
    # (1e-300: the work over the budget overflows any integer count; the planner clamps it to one tile per dispatch.)
    (out_tiny, lse_tiny), per_tile = _run(kernel, stats_runtime, monkeypatch, 1e-300, call)
    assert len(per_tile) == tiles and torch.equal(out_tiny, out) and torch.equal(lse_tiny, lse)
    assert _stored(per_tile) == _stored(one), "a tile computed twice (or missed)"
    (out_split, lse_split), several = _run(kernel, stats_runtime, monkeypatch, 2 * 4 * D * 2 * H * 32 * keys, call)
    assert 1 <= len(several) < tiles or tiles <= 2, (len(several), tiles)
    assert torch.equal(out_split, out) and torch.equal(lse_split, lse)
    if what != "dense":
        ref_kw = dict(scale=D**-0.5, causal=kw["causal"], window=kw["window_size"])
        ref, lse_ref = attention_varlen(q, k, v, cu_q, cu_k, **ref_kw)
        same, _ = attention_varlen(q, k, v, cu_q, cu_k, dtype=torch.float16, **ref_kw)
        check_close(out_tiny, ref, same)
        check_lse(lse_tiny, lse_ref)


def test_causal_split_interleaves_tiles(kernel, stats_runtime, monkeypatch):
    """A causal prompt's work is about half the unmasked one's: with the same budget it splits into fewer dispatches.
    Each dispatch takes every n-th query tile, so each holds as many rows as any other (within one tile), short and
    long ones, where consecutive row ranges gave the first dispatch most of the rows and the last a few long ones."""
    S = 512
    q, k, v, cu_q, cu_k = _varlen_case([S], [S], seed=1)
    counts = {}
    for causal in (True, False):
        def call():
            return kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, S, S, causal=causal)
        dispatches = _run(kernel, stats_runtime, monkeypatch, 2 * 4 * D * H * 32 * S, call)[1]
        counts[causal] = len(dispatches)
        stored = [sum(d.stored.values()) for d in dispatches]
        one_tile = 32 * H * (D * q.element_size() + 4)  # a query tile's rows of out and lse
        assert max(stored) - min(stored) <= one_tile, (causal, stored)
    assert 1 < counts[True] < counts[False], counts


@pytest.mark.parametrize("causal", [True, False])
def test_split_backward_is_the_unsplit_result(kernel, stats_runtime, monkeypatch, causal):
    """The backward splits the same way (its dK/dV pass over interleaved key tiles, its dQ pass over interleaved query
    tiles, each committed): bit-identical gradients, d s_aux included (reduced once, by the threadgroup of tile 0)."""
    q, k, v, cu_q, cu_k = _varlen_case([150, 70], [170, 90], seed=2)
    s_aux = torch.randn(H, generator=torch.Generator().manual_seed(3))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).half()

    def call():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, s_aux)]
        out = kernel.flash_attn_varlen_func(*leaves[:3], cu_q, cu_k, 150, 170, causal=causal, s_aux=leaves[3])
        out.backward(dout)
        return [t.grad for t in leaves]

    whole, bwd_whole = _dispatches(stats_runtime, monkeypatch, 1e30, call, "flash_attn_bwd_")
    split, bwd_split = _dispatches(stats_runtime, monkeypatch, 1, call, "flash_attn_bwd_")  # one tile per dispatch
    assert len(bwd_whole) == 3 and len(bwd_split) > 6, (len(bwd_whole), len(bwd_split))
    assert _stored(bwd_split) == _stored(bwd_whole), "a tile computed twice (or missed)"
    for name, a, b in zip(("dq", "dk", "dv", "ds_aux"), split, whole):
        assert torch.equal(a, b), name
