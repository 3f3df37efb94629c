"""CI: the command-buffer budget of a long prefill and backward grows with the GPU's cores (planner_common.h), through
the project's C++ planners built as a CPU torch extension (planner_ext.py; no GPU). A 32K-token causal prompt:
an unknown device plans like an M1 (8 cores), a GPU of 10x the cores plans about a tenth of the command buffers,
and METAL_FLASH_SDPA_COMMAND_BUFFER_FLOPS overrides the core count."""

import math

import pytest
import torch

from . import planner_ext

S, H, HKV, D = 32768, 32, 8, 128


@pytest.fixture(scope="module")
def planner():
    return planner_ext.load()


def _forward_plan(planner, cores):
    q = torch.empty(S, H, D, dtype=torch.float16)
    k = torch.empty(S, HKV, D, dtype=torch.float16)
    cu = torch.tensor([0, S], dtype=torch.int32)
    return planner.plan_varlen(q, k, k, torch.empty_like(q), torch.empty(H, S), cu, cu, None, None, S, D ** -0.5, 0.0,
                               -1, 0, None, cores)


def _backward_plan(planner, cores):
    q = torch.empty(1, S, H, D, dtype=torch.float16)
    k = torch.empty(1, S, HKV, D, dtype=torch.float16)
    lse = torch.empty(1, H, S)
    return planner.plan_backward(q, q, k, k, q, lse, lse, q, k, k, torch.empty(0), None, None, None, None, S, S,
                                 D ** -0.5, 0.0, -1, 0, gpu_cores=cores)


def _passes(plan):
    """The plan's split passes (forward: the varlen kernel; backward: dK/dV and dQ), each a list of grids."""
    passes = {}
    for d in plan:
        if d["commit_after"]:
            passes.setdefault(d["kernel"], []).append(d["threadgroups"])
    return passes


@pytest.mark.parametrize("plan", [_forward_plan, _backward_plan], ids=["forward", "backward"])
def test_budget_grows_with_cores(planner, plan, monkeypatch):
    monkeypatch.delenv("METAL_FLASH_SDPA_COMMAND_BUFFER_FLOPS", raising=False)
    m1 = _passes(plan(planner, 8))
    assert m1 and all(len(grids) > 10 for grids in m1.values()), "a 32K prompt splits at an M1's budget"
    assert _passes(plan(planner, 0)) == m1, "an unknown device plans as an M1"
    assert _passes(plan(planner, 4)) == m1, "never below the M1's budget"
    ultra = _passes(plan(planner, 80))
    assert ultra.keys() == m1.keys()
    for kernel, grids in ultra.items():
        # Ranges are whole tiles, so a range can end up to one tile short of the budget.
        assert len(grids) <= math.ceil(len(m1[kernel]) / 10) + 1 < len(m1[kernel]), kernel
        assert sum(g[0] for g in grids) == sum(g[0] for g in m1[kernel]), f"{kernel}: every tile planned once"
    monkeypatch.setenv("METAL_FLASH_SDPA_COMMAND_BUFFER_FLOPS", "2.5e11")
    assert _passes(plan(planner, 80)) == m1, "the override wins over the core count"
