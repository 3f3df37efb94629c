"""CI (no GPU): the pure parts of bench_prefill.py, the prefill table's launcher: the peers' launch geometry and
parameter structs as their host code builds them, and that every launch names a kernel peers_prefill.py builds."""

import ctypes
import math

import pytest

from . import bench_prefill as bp
from . import peers_prefill as pp


def test_rows_cover_the_grid():
    """Issue 21's grid: causal, B = 1 at S 512 / 2048 / 8192 / 32768 and a mixed-length varlen batch, H / Hkv 32/8
    and 32/32, D 64 / 128 / 256, fp16 and bf16."""
    rows = bp.rows()
    dense, mixed = [r for r in rows if not r.lengths], [r for r in rows if r.lengths]
    assert len(dense) == 2 * 3 * 4 * 2 and len(mixed) == 2 * 3 * 2
    assert {(r.H, r.Hkv) for r in rows} == {(32, 8), (32, 32)} and {r.B for r in rows} == {1}
    assert {r.D for r in rows} == {64, 128, 256} and {r.S for r in dense} == {512, 2048, 8192, 32768}
    assert all(r.causal for r in rows)
    assert all(len(r.lengths) == 4 and r.S == sum(r.lengths) and 300 <= min(r.lengths) and max(r.lengths) <= 5000
               for r in mixed)


def test_varlen_row_is_its_sequences():
    r = bp.Row(1, 32, 8, sum(bp.MIXED), 128, "fp16", True, bp.MIXED)
    seqs = r.sequences()
    assert [x.S for x in seqs] == list(bp.MIXED) and all(not x.lengths and x.B == 1 for x in seqs)
    assert bp.flops(r) == sum(bp.flops(x) for x in seqs) and "varlen 320+1216+2944+4992" in r.label()
    for x in seqs:  # the llama.cpp launcher takes each sequence (multiples of 64: no K/V padding pass)
        bp.ggml_plan(x, 0.1)


def test_flops():
    r = bp.Row(1, 16, 4, 1024, 128, "fp16", False)
    assert bp.flops(r) == 4 * 16 * 1024 * 1024 * 128
    c = bp.Row(1, 16, 4, 1024, 128, "fp16", True)
    assert bp.flops(c) == 4 * 16 * (1024 * 1025 / 2) * 128


def test_struct_layouts_match_the_headers():
    """AttnParams: 14 four-byte fields, then four int64[3] (152 B); ggml's args: its C layout (192 B)."""
    assert ctypes.sizeof(bp.MLXAttnParams) == 152
    assert [bp.MLXAttnParams.qL_off.offset, bp.MLXAttnParams.K_strides.offset] == [52, 80]
    g = bp.GGMLFlashAttnArgs
    assert [g.nb01.offset, g.ne11.offset, g.nb11.offset, g.ns20.offset, g.nb21.offset, g.ne31.offset,
            g.nb31.offset, g.ne1.offset, g.scale.offset, g.logit_softcap.offset] == \
        [16, 40, 56, 80, 88, 112, 128, 152, 164, 184]
    assert ctypes.sizeof(bp.GGMLBlkArgs) == 48 and bp.GGMLBlkArgs.nb31.offset == 24


@pytest.mark.parametrize("D,bk,wn", [(64, 32, 1), (128, 16, 1), (256, bp.MLX_D256_BK, 2)])
def test_mlx_plan(D, bk, wn):
    r = bp.Row(1, 32, 8, 4096, D, "bf16", True)
    st = (4096 * 32 * D, D, 32 * D)  # [B, S, H, D] storage read as (B, H, L)
    p = bp.mlx_plan(r, st, st, st, st, D ** -0.5)
    assert p.kernel == f"steel_attention_bfloat16_bq32_bk{bk}_bd{D}_bv{D}_wm4_wn{wn}_maskbfloat16"
    assert p.grid == (4096 // 32, 32, 1) and p.threads == (32, 4, wn)
    assert p.params.gqa_factor == 4 and p.params.NK == 4096 // bk and p.params.qL_off == 0
    assert list(p.params.Q_strides) == list(st) and p.params.kL_rem == 0
    assert p.constants[301] is True and p.constants[200] and p.constants[201] and not p.constants[300]


def test_mlx_plan_remainders():
    r = bp.Row(1, 16, 4, 1000, 128, "fp16", False)
    p = bp.mlx_plan(r, (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), 0.1)
    assert (p.params.NQ, p.params.NQ_aligned, p.params.qL_rem) == (32, 31, 1000 - 31 * 32)
    assert p.constants[200] is False and p.constants[201] is False


@pytest.mark.parametrize("causal", [False, True])
def test_ggml_plan(causal):
    r = bp.Row(1, 32, 8, 4096, 128, "fp16", causal)
    p = bp.ggml_plan(r, 128 ** -0.5)
    assert p.kernel == "kernel_flash_attn_ext_f16_dk128_dv128" and p.variant == f"fa_d128_mask{int(causal)}"
    assert p.grid == (4096 // 8, 32, 1) and p.threads == (32, 4, 1)
    assert p.smem == 8 * (128 + 2 * 128 + 4 * 64) * 2
    a = p.args
    assert (a.ne01, a.ne02, a.nb01, a.nb02, a.ns10, a.nb11, a.nb12, a.ne_12_2) == \
        (4096, 32, 4 * 32 * 128, 4 * 128, 128, 2 * 128, 2 * 128 * 4096, 8)
    assert (a.ne1, a.ne2, a.n_head_log2, a.m0, a.max_bias) == (32, 4096, 32, 1.0, 0.0)
    assert math.isclose(a.scale, 128 ** -0.5, rel_tol=1e-7)
    assert (p.blk is not None) == causal
    if causal:
        assert p.blk["grid"] == (4096 // 64, 4096 // 8, 1) and p.blk["bytes"] == 64 * 512


def test_ggml_plan_needs_whole_key_blocks():
    with pytest.raises(ValueError, match="multiple of 64"):
        bp.ggml_plan(bp.Row(1, 16, 4, 1000, 64, "fp16", False), 0.1)


@pytest.mark.parametrize("D,wn", [(64, 1), (128, 1), (256, 2)])
def test_mlx_nax_plan(D, wn):
    """MLX's NAX host code: bq 64, bk 32, wm 4; D = 256 on the head-dim split kernel (wn 2)."""
    r = bp.Row(1, 32, 8, 4096 + 32, D, "fp16", True)
    st = (r.S * 32 * D, D, 32 * D)
    p = bp.mlx_nax_plan(r, st, st, st, st, D ** -0.5)
    split = "dsplit_" if wn == 2 else ""
    assert p.kernel == f"steel_attention_{split}float16_bq64_bk32_bd{D}_wm4_wn{wn}_maskfloat16"
    assert p.grid == (4096 // 64 + 1, 32, 1) and p.threads == (32, 4, wn)
    assert (p.params.NQ_aligned, p.params.qL_rem, p.params.NK, p.params.kL_rem) == (64, 32, 129, 0)
    assert p.constants[bp.MLX_FC["align_Q"]] is False and p.constants[bp.MLX_FC["align_K"]] is True
    with pytest.raises(ValueError):  # the host's kL widening (D = 256, causal, kL % 32) is not modelled
        bp.mlx_nax_plan(bp.Row(1, 32, 8, 100, 256, "fp16", True), st, st, st, st, 0.1)


def test_mlx_nax_harness_is_generated_only():
    """The NAX instances: fp16 / bf16 at D 64 / 128 / 256, in a harness under .peers (never the repository)."""
    names = [i["name"] for i in pp.mlx_nax_instances()]
    assert len(names) == 6 and len(set(names)) == 6
    text = pp.mlx_nax_harness()
    assert all(f'host_name("{n}")' in text for n in names) and "steel_attention_nax.h" in text
    cpu = pp.mlx_nax_harness(pp.mlx_nax_instances()[:1], cpu=True)
    assert "constexpr int WM = 4, WN = 1;" in cpu and "-Wnan-infinity-disabled" in cpu
    assert pp.NAX_FLAGS == ["-DMSL_NAX_FRAGMENT_LAYOUT=1"]


def test_every_launch_names_a_built_kernel():
    mlx = {i["name"] for i in pp.mlx_instances()}
    nax = {i["name"] for i in pp.mlx_nax_instances()}
    variants = {v["tag"]: set(v["kernels"]) for v in pp.ggml_variants()}
    for r in bp.rows():
        assert bp.mlx_plan(r, (0,) * 3, (0,) * 3, (0,) * 3, (0,) * 3, 0.1).kernel in mlx
        assert bp.mlx_nax_plan(r, (0,) * 3, (0,) * 3, (0,) * 3, (0,) * 3, 0.1).kernel in nax
        if r.D == 256:
            assert bp.mlx_plan(r, (0,) * 3, (0,) * 3, (0,) * 3, (0,) * 3, 0.1, bk=16).kernel in mlx
        g = bp.ggml_plan(r, 0.1)
        assert g.kernel in variants[g.variant]
        if g.blk:
            assert g.blk["kernel"] in variants["blk"]
    # the constants baked into the PTX are the ones the launch assumes
    for v in pp.ggml_variants():
        if v["tag"] != "blk":
            assert v["baked"]["FC_flash_attn_ext_nsg"] == bp.GGML_NSG and v["baked"]["FC_flash_attn_ext_ns10"] == v["D"]
        else:
            assert (v["baked"]["FC_flash_attn_ext_blk_nqptg"], v["baked"]["FC_flash_attn_ext_blk_ncpsg"]) == \
                (bp.GGML_NQPTG, bp.GGML_NCPSG)


def test_table_renders_ratios():
    r = bp.Row(1, 16, 4, 1024, 64, "fp16", True)
    res = dict(label=r.label(), flops=bp.flops(r), mma=1, ours_us=10.0, mlx_us=20.0, ggml_us=15.0, torch_us=5.0)
    slow = {k: v for k, v in res.items() if k != "ggml_us"}
    t = bp.table([res, dict(slow, mma=0, ours_us=40.0, ggml_error="CudaError: x")])
    assert "| 2.00 | 1.50 | 1.50 |" in t and "| CudaError: x | 5.0 (429.9) | 0.50 | - | 0.50 |" in t
    assert "mma=1 x best: geometric mean 1.50" in t and "mma=0 x mlx: geometric mean 0.50" in t
    # Two MLX instances timed (D = 256): the faster one is MLX's figure.
    t = bp.table([dict(res, mlx_us=20.0, mlx_bk16_us=8.0)])
    assert "| 8.0 (" in t and "| 0.80 | 1.50 | 0.80 |" in t
    # Ours on tensor ops against MLX's NAX attention (issue 23's bound): a summary line of its own.
    t = bp.table([dict(res, tops_us=4.0, mlx_nax_us=5.0), dict(res, tops_us=8.0, mlx_nax_us=6.0)])
    assert "mma=1 x NAX, tops: geometric mean 0.97, minimum 0.75 over 2 rows" in t
