"""benchmarks/mac_report.py, the command that turns a Mac into a measurement: its logic runs here on the loaded build
(the emulated one on Linux) with tiny shapes and a fake timer. The report's format is asserted, never a time."""

import os
import re

import pytest
import reference
import torch

from benchmarks import apple, mac_report

M = {m.key: m for m in mac_report.MODELS}
TINY = mac_report.Grid(
    models=(M["llama-3-8b"], M["gemma-2-9b"], M["gpt-oss-20b"]),
    contexts=(16,),
    batches=(1, 2),
    prefill_lengths=(16,),
    backward_lengths=(12,),
)


class Planted:
    """The real kernel, except: decode of Gemma-2 (16 heads) at B=2 returns a wrong output, and prefill of gpt-oss
    (64 heads) raises."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def flash_attn_with_kvcache(self, q, *args, **kwargs):
        out = self.kernel.flash_attn_with_kvcache(q, *args, **kwargs)
        return out + 0.5 if q.shape[0] == 2 and q.shape[2] == 16 else out

    def flash_attn_varlen_func(self, q, *args, **kwargs):
        if q.shape[1] == 64:
            raise RuntimeError("planted error")
        return self.kernel.flash_attn_varlen_func(q, *args, **kwargs)


class FakeTimer:
    """Calls fn once and answers 100, 200, 300, ... us: deterministic cells, no clock."""

    def __init__(self):
        self.n = 0

    def __call__(self, fn):
        fn()
        self.n += 1
        return 100.0 * self.n


def _row_lines(report: str, section_title: str):
    body = report.split(f"## {section_title}")[1].split("\n## ")[0]
    return [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("| model")]


@pytest.fixture(scope="module")
def planted_run(kernel, device):
    runner = mac_report.Runner(Planted(kernel), device, torch.float16, timer=FakeTimer())
    results = runner.run(TINY)
    env = mac_report.environment(kernel, "test", device, torch.float16, "fake timer", emulated=True)
    report = mac_report.format_report(env, results, suite=None, emulated=True)
    print("\n" + report)
    return results, report


def test_report_sections_and_environment(planted_run):
    _, report = planted_run
    assert report.startswith("# metal-flash-sdpa: Mac report (EMULATED")
    assert mac_report.EMULATED_BANNER in report
    heads = re.findall(r"^## (.*)$", report, flags=re.M)
    assert heads == ["Environment", "Test suite", *mac_report.SECTION_TITLES.values(), "Failures (2)"]
    for section, cells in mac_report.HEADERS.items():
        assert "| " + " | ".join(cells) + " |" in report, section
    for key in ("chip", "GPU cores", "OS", "Python", "kernels", "transformers", "mlx", "kernel", "device, dtype",
                "timing", "date"):
        assert re.search(rf"^\| {re.escape(key)} \| .+ \|$", report, flags=re.M), key
    assert f"| torch | {torch.__version__} |" in report
    assert "not run (pass `--tests`)" in report


def test_one_row_per_shape_and_checks_pass(planted_run):
    results, report = planted_run
    decode = _row_lines(report, mac_report.SECTION_TITLES["decode"])
    assert len(decode) == len(TINY.decode_shapes()) == 6
    for m, b, s in TINY.decode_shapes():
        prefix = f"| {m.name} | {m.heads()} | {m.features()} | {b} | {s} |"
        assert sum(line.startswith(prefix) for line in decode) == 1, prefix
    for section, shapes in (("prefill", TINY.prefill_shapes()), ("backward", TINY.backward_shapes())):
        lines = _row_lines(report, mac_report.SECTION_TITLES[section])
        assert len(lines) == len(shapes)
        for (m, s), line in zip(shapes, lines):
            assert line.startswith(f"| {m.name} | {m.heads()} | {m.features()} | 1 | {s} |"), line
    # Every row the plant leaves alone passed its check against the float32 reference and was timed.
    clean = [r for r in results.rows if not (r.section == "decode" and r.B == 2 and r.model.H == 16)
             and not (r.section == "prefill" and r.model.H == 64)]
    assert len(clean) == len(results.rows) - 2
    for r in clean:
        assert r.status == "ok" and r.err is not None and r.err <= mac_report.TOLERANCE[torch.float16], r.label()
        assert r.ours_us is not None and r.sdpa_us is not None
    # The ratio cell is the baseline's time over ours (fake timer values).
    r = results.rows[0]
    assert f"| {r.ours_us:,.1f} | {r.sdpa_us:,.1f} | {r.sdpa_us / r.ours_us:.2f} |" in decode[0]
    assert "†" not in decode[0] and "†" in [line for line in decode if "softcap" in line][0]


def test_planted_failures_are_reported_not_dropped(planted_run):
    results, report = planted_run
    bad = [r for r in results.rows if r.section == "decode" and r.B == 2 and r.model.H == 16]
    assert len(bad) == 1 and bad[0].status == "FAIL" and bad[0].ours_us is None and bad[0].err > 0.4
    err = [r for r in results.rows if r.section == "prefill" and r.model.H == 64]
    assert len(err) == 1 and err[0].status == "error" and err[0].ours_us is None
    failures = report.split("## Failures (2)")[1]
    assert "- KERNEL check: decode Gemma-2-9B (H/Hkv/D 16/8/256) B=2 context=16: output: max error" in failures
    assert "- KERNEL ours: prefill gpt-oss-20b (H/Hkv/D 64/8/64) B=1 S=16: RuntimeError: planted error" in failures
    decode = _row_lines(report, mac_report.SECTION_TITLES["decode"])
    assert [line.split(" | ")[-1] for line in decode].count("FAIL |") == 1
    assert "2 kernel failures" in report


def test_reference_matches_the_float64_reference():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 8, 32, generator=g)
    k, v = torch.randn(2, 9, 2, 32, generator=g), torch.randn(2, 9, 2, 32, generator=g)
    sinks = torch.randn(8, generator=g)
    for kw in (dict(causal=True), dict(causal=False, softcap=5.0), dict(causal=True, sinks=sinks)):
        want, _ = reference.attention_dense(q, k, v, scale=32**-0.5, **kw)
        got = mac_report.reference_attention(q, k, v, max_elems=8 * 9 * 2, **kw)  # 2 query rows per block
        assert (got.double() - want).abs().max() < 1e-5, kw
    # Gradients, one block of query rows at a time, against autograd through the float64 reference.
    k, v = k[:, :5], v[:, :5]
    dout = torch.randn(q.shape, generator=g)
    for kw in (dict(causal=True), dict(causal=True, softcap=5.0, sinks=sinks)):
        leaves = [x.double().requires_grad_(True) for x in (q, k, v)]
        want, _ = reference.attention_dense(*leaves, scale=32**-0.5, **kw)
        want = torch.autograd.grad(want, leaves, dout.double())
        got = mac_report.reference_grads(q, k, v, dout, rows=2, **kw)
        for name, a, b in zip("qkv", got, want):
            assert (a.double() - b).abs().max() < 1e-4, (name, kw)


def test_parse_pytest_summary():
    out = "\n".join([
        "....F..s",
        "FAILED tests/test_kvcache.py::test_x[16] - AssertionError: 0.3",
        "ERROR tests/test_varlen.py::test_y - RuntimeError",
        "=== 3 failed, 700 passed, 20 skipped, 1 error, 2 warnings in 612.5s (0:10:12) ===",
    ])
    r = mac_report.parse_pytest(out, 1, "python3 -m pytest tests")
    assert r.counts == {"failed": 3, "passed": 700, "skipped": 20, "error": 1, "warning": 2}
    assert r.seconds == 612.5
    assert r.failed == ["FAILED tests/test_kvcache.py::test_x[16] - AssertionError: 0.3",
                        "ERROR tests/test_varlen.py::test_y - RuntimeError"]
    text = mac_report.format_report([], mac_report.Results(), suite=r)
    assert "`python3 -m pytest tests`: 3 failed, 700 passed, 20 skipped, 1 error, 2 warning in 612.5 s" in text
    assert "- `FAILED tests/test_kvcache.py::test_x[16] - AssertionError: 0.3`" in text


def test_chip_facts():
    profile = "      Chipset Model: Apple M3 Max\n      Type: GPU\n      Total Number of Cores: 40\n"
    assert apple.parse_gpu_cores(system_profiler=profile) == 40
    assert apple.parse_gpu_cores(ioreg='    | |   "gpu-core-count" = 30\n') == 30
    assert apple.parse_gpu_cores() == 0
    assert apple.detect_bandwidth("Apple M3 Max", cores=30) == 300.0
    assert apple.detect_bandwidth("Apple M3 Max", cores=40) == 400.0
    assert apple.detect_bandwidth("Apple M2", cores=10) == 100.0
    assert apple.detect_bandwidth("Apple M4 Pro", cores=20) == 273.0
    assert apple.detect_bandwidth("Intel(R) Xeon(R)", cores=0) is None


def test_grid_matches_the_issue():
    grid = mac_report.MAC_GRID
    heads = {m.name: (m.H, m.Hkv, m.D) for m in grid.models}
    assert heads == {"Llama-3-8B": (32, 8, 128), "Llama-3-70B": (64, 8, 128), "Qwen2.5-7B": (28, 4, 128),
                     "Qwen2.5-14B": (40, 8, 128), "Mistral-7B": (32, 8, 128), "Gemma-2-9B": (16, 8, 256),
                     "Gemma-3-27B": (32, 16, 128), "gpt-oss-20b": (64, 8, 64), "Phi-3-mini": (32, 32, 96),
                     "SmolLM2-1.7B": (32, 32, 64)}
    assert M["gemma-2-9b"].softcap == 50.0 and M["gpt-oss-20b"].sinks
    assert grid.contexts == (1000, 4096, 32768) and grid.batches == (1, 8)
    assert len(grid.decode_shapes()) == 60 and grid.prefill_lengths == (512, 2048, 8192)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="--emulated needs the emulated build (Linux)")
def test_command_line_emulated(kernel, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_KERNELS", os.environ.get("LOCAL_KERNELS", ""))  # main() points it at this checkout
    out = tmp_path / "report.md"
    code = mac_report.main(["--emulated", "--models", "smollm2-1.7b", "--contexts", "16", "--batches", "1",
                            "--prefill", "none", "--backward", "none", "--output", str(out),
                            "--tests", "--pytest-args", "tests/test_op_schemas.py"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert printed == out.read_text()
    assert mac_report.EMULATED_BANNER in printed and "| device, dtype | cpu, float16 |" in printed
    assert len(_row_lines(printed, mac_report.SECTION_TITLES["decode"])) == 1
    assert mac_report.SECTION_TITLES["prefill"] not in printed and "## Failures (0)" in printed
    # the suite ran in a subprocess against the same build (LOCAL_KERNELS pointed at this checkout)
    assert re.search(r"`python3 -m pytest -q -rfE tests/test_op_schemas.py`: [1-9]\d* passed in [\d.]+ s "
                     r"\(exit code 0\)", printed), printed


def test_inputs_that_cannot_be_made_are_listed_as_skipped(kernel, device, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("MPS backend out of memory (planted)")

    monkeypatch.setattr(mac_report.cases, "make_prefill", out_of_memory)
    runner = mac_report.Runner(kernel, device, torch.float16, timer=FakeTimer())
    grid = mac_report.Grid(models=(M["smollm2-1.7b"],), contexts=(), batches=(), prefill_lengths=(8192,),
                           backward_lengths=())
    results = runner.run(grid)
    assert [r.status for r in results.rows] == ["skipped"]
    report = mac_report.format_report([], results)
    assert "0 kernel failures, 0 baseline errors, 1 skipped." in report
    assert "- skipped inputs: prefill SmolLM2-1.7B (H/Hkv/D 32/32/64) B=1 S=8192: RuntimeError: MPS backend out of " \
           "memory (planted)" in report
    assert len(_row_lines(report, mac_report.SECTION_TITLES["prefill"])) == 1


def test_timer_warms_up_then_takes_the_median(monkeypatch):
    """A fake clock (each call takes 0.1 s of it): at least warmup_s of warm-up calls, then batches sized to the
    budget, and the median per call. No wall clock is read."""
    now = [0.0]
    monkeypatch.setattr(apple.time, "perf_counter", lambda: now[0])
    calls = []

    def fn():
        calls.append(now[0])
        now[0] += 0.1

    timer = apple.Timer(warmup_s=1.0, budget_s=2.0)
    assert timer(fn) == pytest.approx(0.1e6)
    warmup = [t for t in calls if t < 1.0 - 1e-9]
    assert len(warmup) == 10 and len(calls) == 11 + 20  # 1 s of warm-up (+ the call that crosses it), 20 batches
    assert timer.plan(50e-6) == (50, 10) and timer.plan(0.2) == (10, 1) and timer.plan(5.0) == (5, 1)
    assert apple.Timer(warmup_s=0, runs=3, calls=1).plan(1e-6) == (3, 1)
    assert "warm-up >= 1 s" in timer.describe() and "no warm-up" in apple.Timer(warmup_s=0).describe()


def test_kernel_folder_in_every_layout(tmp_path, kernel):
    """--tests points LOCAL_KERNELS at the folder holding build/<variant>/ of the loaded kernel, whichever layout
    kernels loaded it from (variant/__init__.py, variant/<package>/__init__.py, variant/<id>.zip/__init__.py)."""
    from types import SimpleNamespace

    variant = tmp_path / "snapshot" / "build" / "torch213-metal-aarch64-darwin"
    for file in ("__init__.py", "metal_flash_sdpa/__init__.py", "metal_flash_sdpa_ab12.zip/__init__.py"):
        fake = SimpleNamespace(__file__=str(variant / file))
        assert mac_report.variant_dir(fake) == variant.resolve()
        assert mac_report.kernel_root(fake) == (tmp_path / "snapshot").resolve()
    assert mac_report.kernel_root(SimpleNamespace(__file__=str(tmp_path / "elsewhere" / "__init__.py"))) is None
    assert mac_report.kernel_root(kernel) is not None  # the build the tests loaded


def test_suite_without_a_summary_shows_its_output():
    r = mac_report.parse_pytest("/usr/bin/python3: No module named pytest\n", 1, "python3 -m pytest tests")
    assert r.counts == {} and r.failed == []
    text = mac_report.format_report([], mac_report.Results(), suite=r)
    assert "`python3 -m pytest tests`: no summary line (exit code 1)" in text and "No module named pytest" in text
