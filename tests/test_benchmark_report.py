"""The Linux benchmark path: the emulator traffic report runs and its numbers hang together (benchmarks/)."""

from pathlib import Path

import pytest
import torch

from benchmarks import cases, traffic_report

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

pytestmark = pytest.mark.skipif(torch.backends.mps.is_available(), reason="the traffic report runs on the emulator")

PAGED, VARLEN = "paged flash_attn_with_kvcache", "flash_attn_varlen_func (K/V pre-packed)"
GATHER, CONTIG = "gather + torch SDPA", "contiguous cache + torch SDPA"


@pytest.fixture(scope="module")
def rows(kernel):
    got = traffic_report.collect(names=["b4_h16_s50", "b1_gqa8_s16k"])
    print("\n" + traffic_report.format_table(got))
    return {(r.case, r.path): r for r in got}


@pytest.mark.kernels_ci
@pytest.mark.parametrize("case", ["b4_h16_s50", "b1_gqa8_s16k"])
def test_paged_decode_reads_kv_once(rows, case):
    r = rows[case, PAGED]
    c = cases.EMULATED[case]
    assert r.ideal == cases.kv_bytes(c, torch.float16)
    # K/V read once per KV head (GQA 8 shares it across the group): the DRAM-relevant figure. The rest is q and the
    # small tables, counted once per lane that reads them (the lanes of a key group read the same block-table entry,
    # which a GPU's cache serves once): bounded loosely, so that a K/V re-read counted elsewhere would still show. The
    # split-K partials the combine reads back are bounded on their own: a short split writes one per simdgroup (up to
    # paged::kMaxSplits = 256 per output row, fp32 D + 2 floats each), a latency-for-traffic trade of short contexts
    # whose partials stay in the GPU's cache.
    assert r.kv_loaded <= 1.02 * r.ideal, (r.kv_loaded, r.ideal)
    assert r.loaded - r.partials_loaded <= 1.5 * r.ideal, (r.loaded, r.partials_loaded, r.ideal)
    assert r.partials_loaded <= 256 * c.B * c.H * (c.D + 2) * 4, r.partials_loaded
    # append + attention (+ split-K combine): no gather, no copy
    assert 2 <= r.dispatches <= 3 and r.kernels[0].startswith("kv_paged_write_")
    assert r.threadgroups > 0


@pytest.mark.kernels_ci
def test_paged_decode_stores_output_and_new_tokens(rows):
    r = rows["b4_h16_s50", PAGED]
    c = cases.EMULATED["b4_h16_s50"]
    out_bytes = c.B * c.H * c.D * 2
    new_bytes = 2 * c.B * c.Hkv * c.D * 2
    if r.dispatches == 2:  # unsplit: exactly the output and the appended K/V
        assert r.stored == out_bytes + new_bytes
    assert r.stored >= out_bytes + new_bytes


@pytest.mark.kernels_ci
def test_paths_compare_as_expected(rows):
    for case in ("b4_h16_s50", "b1_gqa8_s16k"):
        paged, gather, contig = rows[case, PAGED], rows[case, GATHER], rows[case, CONTIG]
        assert 1.9 < gather.ratio < 2.2 and 0.99 < contig.ratio < 1.1  # analytic rows
        assert paged.loaded + paged.stored < gather.loaded + gather.stored
        for gbps in traffic_report.CHIPS.values():
            assert 0 < paged.modeled_us(gbps) < gather.modeled_us(gbps)
    # flash_attn_varlen_func with one query per sequence runs the decode kernel on the packed K/V: each K/V byte
    # once per KV head under GQA 8 too (the varlen kernel would read it H / Hkv = 4 times).
    varlen = rows["b1_gqa8_s16k", VARLEN]
    assert [k for k in varlen.kernels if k.startswith("paged_decode_")], varlen.kernels
    assert varlen.kv_loaded <= 1.02 * varlen.ideal
    assert rows["b4_h16_s50", VARLEN].kv_loaded <= 1.02 * rows["b4_h16_s50", VARLEN].ideal


@pytest.mark.kernels_ci
def test_torch_paths_match_reference(kernel):
    c = cases.EMULATED["b4_h16_s50"]
    t = cases.make_decode(c, "cpu")
    ref = cases.reference_decode(c, t).float()
    for path in (GATHER, CONTIG):
        out = cases.DECODE_PATHS[path](kernel, c, t)
        assert out.shape == (c.B, 1, c.H, c.D)
        assert (out.float() - ref).abs().max() < 2e-2, path


def test_report_text_labels_the_model():
    table = traffic_report.format_table([traffic_report.Row("x", "B=1", GATHER, False, 300, 100, None, 100, 5, None)])
    assert "us*" in table and "analytic" in table
    assert "MODELED" in traffic_report.legend() and f"{traffic_report.DISPATCH_US:g} us" in traffic_report.legend()


def _discover_benchmark_classes():
    """kernels' own discovery function: kernels.cli.benchmark up to 0.18, kernels._internals.cli.benchmark from 0.19
    (the CLI moved under _internals)."""
    try:
        from kernels._internals.cli.benchmark import discover_benchmark_classes
    except ModuleNotFoundError:
        from kernels.cli.benchmark import discover_benchmark_classes
    return discover_benchmark_classes


def test_kernels_benchmark_discovers_the_class():
    discover_benchmark_classes = _discover_benchmark_classes()
    classes = discover_benchmark_classes(BENCH / "benchmark_decode.py", BENCH.parent)
    assert len(classes) == 1
    methods = [m for m in dir(classes[0]) if m.startswith("benchmark_")]
    assert len(methods) == 4
    for m in methods:
        workload = m[len("benchmark_"):]
        assert hasattr(classes[0], f"setup_{workload}") and hasattr(classes[0], f"verify_{workload}")
