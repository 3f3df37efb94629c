"""CI: the project's C++ planners built as a CPU torch extension (planner_ext.py; no GPU).

- The command-buffer budget of a long prefill and backward grows with the GPU's cores (planner_common.h). A 32K-token
  causal prompt: an unknown device plans like an M1 (8 cores), a GPU of 10x the cores plans about a tenth of the
  command buffers, and METAL_FLASH_SDPA_COMMAND_BUFFER_FLOPS overrides the core count.
- The decode's split count is in whole threadgroup steps (paged_planner.cpp): no split has more steps than it must,
  and no fewer splits would give every split as few steps."""

import math
import struct

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
        # Interleaved dispatches are near equal, and their count is whole: at most one past the budget ratio.
        assert len(grids) <= math.ceil(len(m1[kernel]) / 10) + 1 < len(m1[kernel]), kernel
        # Every split pass's grid is (heads, B, its row tiles) (row_tile_slot, attention_device.h).
        assert sum(g[2] for g in grids) == sum(g[2] for g in m1[kernel]), f"{kernel}: every tile planned once"
    monkeypatch.setenv("METAL_FLASH_SDPA_COMMAND_BUFFER_FLOPS", "2.5e11")
    assert _passes(plan(planner, 80)) == m1, "the override wins over the core count"


def test_forward_grid_tiles_slowest(planner):
    """The varlen forward's grid is (H, B, query tiles): the tile axis slowest, so the heaviest causal tiles of every
    head and sequence start first (row_tile_slot, attention_device.h). A grid's tile axis stops at CUDA's 65535 (the
    proxy's limit on grid z); the kernel loops over the tiles past it."""
    lengths = [320, 1216, 2944, 4992]
    total = sum(lengths)
    q = torch.empty(total, H, D, dtype=torch.float16)
    k = torch.empty(total, HKV, D, dtype=torch.float16)
    cu = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(4)], dtype=torch.int32)
    plan = planner.plan_varlen(q, k, k, torch.empty_like(q), torch.empty(H, total), cu, cu, None, None, max(lengths),
                               D ** -0.5, 0.0, -1, 0, None, 132)
    assert [d["threadgroups"] for d in plan] == [(H, 4, max(lengths) // 32)]
    # Dense, non-causal, one key: a single dispatch whose 8-row tiles (D = 512) pass 65535.
    rows, wide = 8 * 70000, 512
    meta = dict(device="meta", dtype=torch.float16)
    q = torch.empty(1, rows, 1, wide, **meta)
    k = torch.empty(1, 1, 1, wide, **meta)
    plan = planner.plan_varlen(q, k, k, torch.empty_like(q), torch.empty(1, 1, rows, device="meta"), None, None, None,
                               None, rows, wide ** -0.5, 0.0, -1, -1, None, 132)
    assert [d["threadgroups"] for d in plan] == [(1, 1, 65535)]


def test_backward_grid_tiles_slowest(planner):
    """The backward's dK/dV and dQ passes plan (heads, B, row tiles) grids too: dK/dV over (Hkv, B, key tiles), dQ
    over (H, B, query tiles), its kernel reversing the tiles, so both start their heaviest causal tiles first. The
    delta pass (every tile the same cost) keeps (row tiles, H, B)."""
    B, Sb = 3, 300
    q = torch.empty(B, Sb, H, D, dtype=torch.float16)
    k = torch.empty(B, Sb, HKV, D, dtype=torch.float16)
    lse = torch.empty(B, H, Sb)
    # 8 cores: 240 dK/dV threadgroups fill them without splitting the GQA group (test_backward_group_splits).
    plan = planner.plan_backward(q, q, k, k, q, lse, lse, q, k, k, torch.empty(0), None, None, None, None, Sb, Sb,
                                 D ** -0.5, 0.0, -1, 0, gpu_cores=8)
    grids = {d["kernel"].split("_")[3]: d["threadgroups"] for d in plan}
    assert len(plan) == 3
    assert grids["delta"] == (-(-Sb // 32), H, B)
    assert grids["dkdv"][:2] == (HKV, B) and grids["dq"][:2] == (H, B)
    # Tiles of 8, 16 or 32 rows (bwd_tile_rows, backward_params.h), the same for both passes.
    assert grids["dkdv"][2] == grids["dq"][2] in {-(-Sb // rows) for rows in (8, 16, 32)}


# (H, Hkv, S, D, cores, group splits): the GQA group's query heads split over dK/dV threadgroups until the grid
# (Hkv x B x key tiles) holds two per core (bwd_group_splits, backward_planner.h), a divisor of the group, at most 8.
GROUP_SPLITS = [(16, 4, 1024, 64, 132, 2), (16, 4, 1024, 128, 132, 2), (16, 4, 4096, 128, 132, 1),
                (16, 4, 16384, 128, 132, 1), (32, 32, 1024, 64, 132, 1), (16, 4, 1024, 128, 40, 1),
                (64, 1, 1024, 128, 132, 8), (12, 4, 256, 128, 40, 3)]


@pytest.mark.parametrize("h,hkv,s,d,cores,splits", GROUP_SPLITS, ids=str)
def test_backward_group_splits(planner, monkeypatch, h, hkv, s, d, cores, splits):
    """dK/dV over (Hkv x group splits, B, key tiles); with a split group a fourth dispatch, flash_attn_bwd_dkdv_sum,
    over (key-row tiles of 32, Hkv, B) after the dK/dV passes, given the fp32 parts (2 x splits x rows x Hkv x D) that
    the dK/dV pass writes. METAL_FLASH_SDPA_BWD_GROUP_SPLITS forces a count (a divisor of the group)."""
    q = torch.empty(1, s, h, d, dtype=torch.float16)
    k = torch.empty(1, s, hkv, d, dtype=torch.float16)
    lse = torch.empty(1, h, s)

    def plan():
        return planner.plan_backward(q, q, k, k, q, lse, lse, q, k, k, torch.empty(0), None, None, None, None, s, s,
                                     d ** -0.5, 0.0, -1, 0, gpu_cores=cores)

    def check(plan, splits):
        kernels = [x["kernel"] for x in plan]
        dkdv = [x for x in plan if x["kernel"].startswith("flash_attn_bwd_dkdv_float16")]
        assert dkdv and all(x["threadgroups"][:2] == (hkv * splits, 1) for x in dkdv)
        if splits == 1:
            assert not any("dkdv_sum" in name for name in kernels)
            return
        assert kernels.count("flash_attn_bwd_dkdv_sum_float16") == 1
        last_dkdv = max(i for i, name in enumerate(kernels) if name.startswith("flash_attn_bwd_dkdv_float16"))
        assert kernels[last_dkdv + 1] == "flash_attn_bwd_dkdv_sum_float16"
        sum_pass = plan[last_dkdv + 1]
        assert sum_pass["threadgroups"] == (-(-s // 32), hkv, 1)
        parts = [b for b in sum_pass["buffers"] if b[0] == 16]  # FLASH_SDPA_BWD_BUFFER_DKDV_PARTIAL
        assert len(parts) == 1 and tuple(parts[0][1].shape) == (2, splits, s, hkv, d)

    check(plan(), splits)
    monkeypatch.setenv("METAL_FLASH_SDPA_BWD_GROUP_SPLITS", "2")
    check(plan(), 2 if (h // hkv) % 2 == 0 else 3 if (h // hkv) % 3 == 0 else 1)


@pytest.mark.parametrize("window,splits", [((-1, -1), 1), ((-1, 0), 2), ((128, 0), 1)], ids=str)
def test_backward_group_splits_uneven_tiles(planner, monkeypatch, window, splits):
    """Only a grid whose key tiles' work is uneven (a window bounded on one side: causal) splits the group by
    itself: without a mask or with a sliding window the tiles are equal and keep one part (proxy: 1.13x the time with
    two at 16/4 heads, S = 1024, D = 128); a forced count applies to any call."""
    s, h, hkv, d = 1024, 16, 4, 64
    q = torch.empty(1, s, h, d, dtype=torch.float16)
    k = torch.empty(1, s, hkv, d, dtype=torch.float16)
    lse = torch.empty(1, h, s)

    def dkdv_heads():
        plan = planner.plan_backward(q, q, k, k, q, lse, lse, q, k, k, torch.empty(0), None, None, None, None, s, s,
                                     d ** -0.5, 0.0, *window, gpu_cores=132)
        return {x["threadgroups"][0] for x in plan if x["kernel"].startswith("flash_attn_bwd_dkdv_float16")}

    assert dkdv_heads() == {hkv * splits}
    monkeypatch.setenv("METAL_FLASH_SDPA_BWD_GROUP_SPLITS", "2")
    assert dkdv_heads() == {hkv * 2}


# The tensor-ops backward (tensor_ops_library.h, FLASH_SDPA_BWD_TOPS_HEAD_DIMS): (dtype, D, tile rows) where it
# serves (bwd_tops_tile_rows, backward_params.h), None where the simdgroup passes stay.
BWD_TOPS = [(torch.float16, 64, 32), (torch.bfloat16, 128, 32), (torch.float16, 256, 16), (torch.float32, 32, 32),
            (torch.float32, 96, 16), (torch.float32, 128, 16), (torch.float32, 256, None), (torch.float16, 80, None),
            (torch.bfloat16, 512, None)]


@pytest.mark.parametrize("dtype,d,rows", BWD_TOPS, ids=lambda x: str(x).replace("torch.", ""))
def test_backward_tensor_ops_plan(planner, dtype, d, rows):
    """tensor_ops=True plans dK/dV and dQ on the tensor-ops library (flash_attn_bwd_<pass>_tops_<dtype>_d<D>, the
    tops tile rows in both grids) where it serves the dtype and head dim, else the simdgroup passes; the delta pre-pass
    is the metallib's either way, and tensor_ops=False plans exactly as before."""
    B, Sb = 2, 100
    q = torch.empty(B, Sb, H, d, dtype=dtype)
    k = torch.empty(B, Sb, HKV, d, dtype=dtype)
    lse = torch.empty(B, H, Sb)

    def plan(tensor_ops):
        # 8 cores: no split GQA group on the simdgroup path either (the tensor-ops one never splits it).
        return planner.plan_backward(q, q, k, k, q, lse, lse, q, k, k, torch.empty(0), None, None, None, None, Sb, Sb,
                                     d ** -0.5, 0.0, -1, 0, gpu_cores=8, tensor_ops=tensor_ops)

    tops, simd = plan(True), plan(False)
    assert [x["kernel"].split("_")[3] for x in tops] == ["delta", "dkdv", "dq"]
    assert not any(x["tensor_ops_library"] for x in simd) and not any("tops" in x["kernel"] for x in simd)
    assert not tops[0]["tensor_ops_library"] and tops[0]["kernel"] == simd[0]["kernel"]
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    if rows is None:
        assert [(x["kernel"], x["threadgroups"]) for x in tops] == [(x["kernel"], x["threadgroups"]) for x in simd]
        assert not any(x["tensor_ops_library"] for x in tops)
        return
    for x, y, pass_ in zip(tops[1:], simd[1:], ("dkdv", "dq")):
        assert x["kernel"] == f"flash_attn_bwd_{pass_}_tops_{name}_d{d}" and x["tensor_ops_library"]
        assert x["threadgroups"] == y["threadgroups"][:2] + (-(-Sb // rows),)
        assert x["buffers"] == y["buffers"] and x["constants"] == y["constants"] and x["bytes"] == y["bytes"]


# (B, H, Hkv, S, D, dtype, keys per threadgroup step, partials per split in simdgroup-partials mode): paged_params.h's
# decode_step_keys (the matrix path: at R = 8, D = 128 two simdgroups per 8-key step; at R = 16 (GQA 12, 16) two at
# D = 64, four at D = 128) and the partials of the path that takes short splits: decode_wide_partials (8 / R, 1 from
# R = 8) in 2-byte types at D = 64 / 128, else one per simdgroup (8).
DECODE_SHAPES = [(1, 32, 8, 256, 128, torch.float16, 32, 2), (1, 64, 8, 256, 128, torch.float16, 32, 1),
                 (1, 96, 8, 32768, 128, torch.float16, 16, 1), (1, 128, 8, 1000, 128, torch.bfloat16, 16, 1),
                 (1, 64, 4, 700, 64, torch.float16, 32, 1), (1, 48, 4, 300, 64, torch.bfloat16, 32, 1),
                 (1, 28, 4, 1000, 128, torch.float16, 32, 1), (1, 32, 8, 1000, 128, torch.float16, 32, 2),
                 (1, 32, 8, 16384, 128, torch.float16, 32, 2), (1, 32, 32, 8192, 128, torch.float16, 32, 8),
                 (1, 16, 16, 3000, 64, torch.float32, 32, 8), (2, 32, 8, 700, 256, torch.bfloat16, 16, 8),
                 (1, 64, 8, 256, 64, torch.float16, 64, 1)]


def _plan_decode(planner, shape, cores):
    """The paged planner's plan for a decode step of `shape` (DECODE_SHAPES) on a GPU of `cores` cores."""
    B, H, Hkv, S, D, dtype = shape[:6]
    page = 16
    blocks = (S + page - 1) // page
    q = torch.empty(B, 1, H, D, dtype=dtype)
    k = torch.empty(B * blocks, page, Hkv, D, dtype=dtype)
    table = torch.arange(B * blocks, dtype=torch.int32).view(B, blocks)
    return planner.plan_paged(q, k, k, table, torch.full((B,), S, dtype=torch.int32), None, None, torch.empty_like(q),
                              None, None, None, D ** -0.5, 0.0, -1, 0, 0, S, 0, cores)


def test_dense_decode_binds_no_index_tensors(planner):
    """flash_attn_func's decode (routing.cpp): row b of the cache is request b's and every request has all S keys, so
    the plan binds no int32 tensor (no block table, no lengths: none was built) and its params say where the kernel
    takes them from instead."""
    B, S, H, Hkv, D = 2, 300, 8, 2, 64
    q = torch.empty(B, 1, H, D, dtype=torch.float16)
    k = torch.empty(B, S, Hkv, D, dtype=torch.float16)
    plan = planner.plan_paged(q, k, k, None, None, None, None, torch.empty_like(q), None, None, None, D ** -0.5, 0.0,
                              -1, 0, 0, S, 0, 40, -1, S)
    decode = plan[0]
    assert decode["kernel"].startswith("paged_decode_")
    assert not [i for i, t in decode["buffers"] if t.dtype == torch.int32]
    params = decode["bytes"][0][1]
    # PagedDecodeParams: block_table_stride_b (int64 at 72), cache_row_is_request and fixed_seqlen after
    # simdgroup_partials (int32 13 of the counts).
    assert struct.unpack_from("<q", params, 72)[0] == 0
    assert struct.unpack_from("<ii", params, 80 + 14 * 4) == (1, S)


@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: f"B{s[0]}_H{s[1]}-{s[2]}_S{s[3]}_D{s[4]}")
@pytest.mark.parametrize("cores", [8, 40, 132])
def test_decode_splits_whole_steps(planner, shape, cores):
    S, step = shape[3], shape[6]
    splits = _plan_decode(planner, shape, cores)[0]["threadgroups"][0]
    steps = -(-S // step)
    most = -(-steps // splits)
    assert splits <= steps, "a split with no step"
    if splits > 1:
        assert -(-steps // (splits - 1)) > most, f"{splits - 1} splits would take {most} steps each as well"


@pytest.mark.parametrize("shape, cores, splits", [
    ((1, 28, 4, 1000, 128, torch.float16, 32, 4), 132, 32),  # 16 x 4 threadgroups for 132 cores: 32 of 1 step
    ((1, 28, 4, 1000, 128, torch.float16, 32, 4), 40, 16),  # 64 threadgroups fill 40 cores: 16 of 2 steps
    ((1, 32, 8, 1000, 128, torch.float16, 32, 8), 132, 16),  # 8 KV heads: 132 / 8 = 16 splits give one per core
    ((1, 8, 1, 1000, 128, torch.float16, 32, 4), 40, 32),  # one KV head: 32 of 1 step on 40 cores
    ((1, 8, 1, 1000, 128, torch.float16, 32, 4), 8, 16),
    ((1, 12, 2, 256, 128, torch.float16, 32, 4), 132, 8),  # 8 steps: one each already
    ((4, 16, 16, 50, 128, torch.float16, 32, 8), 132, 1),  # unsplit: a second split would add the combine
])
def test_decode_splits_fill_idle_cores(planner, shape, cores, splits):
    """Where the fewest splits of the most steps leave cores idle, a split call's splits get shorter, up to one
    threadgroup per core and one step each (paged_pick_num_splits); an unsplit one stays unsplit."""
    assert _plan_decode(planner, shape, cores)[0]["threadgroups"][0] == splits


@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: f"B{s[0]}_H{s[1]}-{s[2]}_S{s[3]}_D{s[4]}")
@pytest.mark.parametrize("cores", [8, 40, 132])
def test_decode_simdgroup_partials(planner, shape, cores):
    """A split of at most kSimdgroupPartialSteps (2) steps per simdgroup writes one partial per simdgroup (8 per
    threadgroup) or, in 2-byte types at D = 64 / 128 (one token), runs the wide path, one partial per key part (8 / R,
    1 from R = 8), so the combine reads that many times the splits; longer splits merge in the threadgroup (one
    partial each), the matrix path's always."""
    B, H, Hkv, S, D, dtype, step, per_split = shape
    plan = _plan_decode(planner, shape, cores)
    splits = plan[0]["threadgroups"][0]
    decode_params = plan[0]["bytes"][0][1]
    flag = struct.unpack_from("<i", decode_params, 80 + 13 * 4)[0]  # PagedDecodeParams::simdgroup_partials
    if splits == 1:
        assert len(plan) == 1 and flag == 0, "no split, no partials"
        return
    wide_config = dtype != torch.float32 and D in (64, 128)
    steps_per_simdgroup = -(-S // (splits * step))
    expected = steps_per_simdgroup <= 2 and splits * per_split <= 256
    assert flag == int(expected), f"{splits} splits of {steps_per_simdgroup} steps per simdgroup"
    assert planner_ext.combine_partials(plan) == splits * (per_split if expected else 1)
    assert plan[0]["kernel"].startswith("paged_decode_wide_") == (expected and wide_config), plan[0]["kernel"]
