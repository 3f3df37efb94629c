"""One command that turns an Apple-Silicon Mac into a measurement of metal-flash-sdpa: one markdown report to paste
into an issue.

    python3 -m benchmarks.mac_report                      # Hub kernel (kernels-community/metal-flash-sdpa, v2)
    python3 -m benchmarks.mac_report --local [PATH]       # a kernel-builder build: PATH/build/<variant>/
    python3 -m benchmarks.mac_report --tests              # also run the pytest suite on mps against that kernel
    python3 -m benchmarks.mac_report --emulated           # Linux: this checkout's emulated build on the CPU

It loads the kernel through kernels.get_kernel (as transformers does), then for every shape of the grid (model-zoo
heads, contexts 1000/4096/32768, batch 1 and 8) checks the kernel's output against a float32 reference and times
  decode    flash_attn_with_kvcache on a paged cache (page size 16, new token appended in place),
  prefill   flash_attn_varlen_func, causal,
  backward  flash_attn_func forward + backward, causal,
against torch.nn.functional.scaled_dot_product_attention (enable_gqa) on the same device, and against MLX's
mx.fast.scaled_dot_product_attention when mlx is importable. Each measurement warms up for at least one second (a
cold Apple GPU reads up to 4x slow) and reports the median of several batches timed with torch.mps events. Failed
checks and errors are collected, never dropped: a failed check is reported and that kernel path is not timed.

--emulated (the default where there is no MPS device) runs the same code on this checkout's emulated build (the
.metal kernels executed on the CPU by the Metal-on-CPU emulator) with scaled-down shapes and a short timer: it tests
the command, its figures are the emulator's, not Apple's.
"""

import argparse
import datetime
import importlib.metadata
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

if not __package__:  # run as a file (python3 benchmarks/mac_report.py): the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import apple, cases  # noqa: E402
from benchmarks.cases import MODELS, Model  # noqa: E402

# ---- the shape grid ----




@dataclass(frozen=True)
class Grid:
    models: Tuple[Model, ...]
    contexts: Tuple[int, ...]  # decode: tokens cached before the step
    batches: Tuple[int, ...]  # decode batch sizes
    prefill_lengths: Tuple[int, ...]  # tokens per sequence
    backward_lengths: Tuple[int, ...]
    prefill_batch: int = 1  # sequences packed into one varlen call (and the backward's batch)

    def decode_shapes(self):
        return [(m, b, s) for m in self.models for s in self.contexts for b in self.batches]

    def prefill_shapes(self):
        return [(m, s) for m in self.models for s in self.prefill_lengths]

    def backward_shapes(self):
        return [(m, s) for m in self.models for s in self.backward_lengths]


MAC_GRID = Grid(MODELS, contexts=(1000, 4096, 32768), batches=(1, 8), prefill_lengths=(512, 2048, 8192),
                backward_lengths=(512, 2048))
# The emulator runs every GPU thread as a fiber on the CPU: same models and code paths, shapes scaled down.
EMULATED_GRID = Grid(MODELS, contexts=(16, 64, 256), batches=(1, 2), prefill_lengths=(32, 64),
                     backward_lengths=(16, 32))

# max |out - reference| allowed (outputs; gradients: relative to max |reference gradient|)
TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 4e-2, torch.float32: 2e-3}
GRAD_TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 2e-3}


# ---- float32 reference (chunked: no [H, S, S] matrix, no K/V expanded to H heads) ----


def reference_attention(q, k, v, *, causal: bool, softcap: float = 0.0, sinks=None, scale: Optional[float] = None,
                        first_row: int = 0, total_rows: Optional[int] = None, max_elems: int = 1 << 25):
    """float32 attention of q [B, Sq, H, D] over k, v [B, Sk, Hkv, D] -> [B, Sq, H, D] (float32). Causal is bottom-
    right aligned for a query block of rows first_row.. of total_rows queries; softcap on the scaled scores; sinks [H]
    join the softmax denominator only. Differentiable."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    total_rows = Sq if total_rows is None else total_rows
    scale = D**-0.5 if scale is None else scale
    rows = max(1, max_elems // (H * Sk))
    per_batch = []
    for b in range(B):
        kb = k[b].float().transpose(0, 1)  # [Hkv, Sk, D]
        vb = v[b].float().transpose(0, 1)
        blocks = []
        for i0 in range(0, Sq, rows):
            qb = q[b, i0 : i0 + rows].float()  # [r, H, D]
            r = qb.shape[0]
            s = (qb.permute(1, 0, 2).reshape(Hkv, G * r, D) @ kb.transpose(1, 2)) * scale  # [Hkv, G*r, Sk]
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            s = s.view(Hkv, G, r, Sk)
            if causal:
                last = torch.arange(first_row + i0, first_row + i0 + r, device=q.device) + (Sk - total_rows)
                s = s.masked_fill(torch.arange(Sk, device=q.device)[None, :] > last[:, None], float("-inf"))
            if sinks is not None:
                sink = sinks.float().view(Hkv, G, 1, 1).expand(Hkv, G, r, 1)
                p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :Sk]
            else:
                p = torch.softmax(s, dim=-1)
            o = p.reshape(Hkv, G * r, Sk) @ vb  # [Hkv, G*r, D]
            blocks.append(o.view(H, r, D).permute(1, 0, 2))
        per_batch.append(torch.cat(blocks))
    return torch.stack(per_batch)


def reference_grads(q, k, v, dout, *, causal: bool, softcap: float = 0.0, sinks=None, rows: int = 256):
    """float32 (dq, dk, dv) of reference_attention, one block of query rows at a time (bounded memory)."""
    kf = k.detach().float().requires_grad_(True)
    vf = v.detach().float().requires_grad_(True)
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    Sq = q.shape[1]
    for i0 in range(0, Sq, rows):
        qc = q[:, i0 : i0 + rows].detach().float().requires_grad_(True)
        out = reference_attention(qc, kf, vf, causal=causal, softcap=softcap, sinks=sinks, first_row=i0,
                                  total_rows=Sq)
        out.backward(dout[:, i0 : i0 + rows].float())
        dq[:, i0 : i0 + rows] = qc.grad
    return dq, kf.grad, vf.grad


# ---- the runner ----


@dataclass
class Row:
    section: str  # decode | prefill | backward
    model: Model
    B: int
    S: int
    dtype: torch.dtype = torch.float16
    ours_us: Optional[float] = None
    sdpa_us: Optional[float] = None
    mlx_us: Optional[float] = None
    err: Optional[float] = None  # max |ours - reference| (backward: relative, worst of dq, dk, dv)
    status: str = "ok"  # ok | FAIL (check failed) | error (ours raised) | skipped (inputs could not be made)

    def label(self) -> str:
        what = "context" if self.section == "decode" else "S"
        return f"{self.section} {self.model.name} (H/Hkv/D {self.model.heads()}) B={self.B} {what}={self.S}"


@dataclass
class Failure:
    row: str
    what: str  # which path: "check", "ours", "torch SDPA", "MLX"
    message: str
    kernel: bool  # a failure of the kernel (check or error), not of a baseline


@dataclass
class Results:
    rows: List[Row] = field(default_factory=list)
    failures: List[Failure] = field(default_factory=list)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class Runner:
    """Runs the grid on `kernel`. timer(fn) -> us per call times torch paths, mlx_timer(fn) MLX paths (fn returns
    the lazy arrays); both are injectable, as is `log` (progress lines). mlx: the mlx.core module or None."""

    def __init__(self, kernel, device, dtype=torch.float16, timer: Optional[Callable] = None, mlx=None,
                 mlx_timer: Optional[Callable] = None, log: Callable[[str], None] = lambda line: None):
        self.kernel, self.device, self.dtype = kernel, torch.device(device), dtype
        self.timer = timer or (apple.MpsTimer(budget_s=2.0) if self.device.type == "mps" else apple.Timer())
        self.mlx, self.mlx_timer = mlx, mlx_timer or apple.MlxTimer(budget_s=2.0)
        self.log = log
        self.results = Results()

    # -- helpers --
    def _fail(self, row: Row, what: str, e: BaseException, kernel: bool) -> None:
        if kernel:
            row.status = "error"
        self.results.failures.append(Failure(row.label(), what, _first_line(e), kernel))

    def _skip(self, row: Row, e: BaseException) -> Row:
        """The inputs could not be made (e.g. out of memory at the largest shapes): listed, not a kernel failure."""
        row.status = "skipped"
        self.results.failures.append(Failure(row.label(), "inputs", _first_line(e), False))
        return self._done(row)

    def _check(self, row: Row, got, ref, tol: float, relative: bool = False, what: str = "output") -> bool:
        err = (got.float() - ref.float()).abs().max().item()
        if relative:
            err /= max(ref.abs().max().item(), 1e-12)
        row.err = err if row.err is None or not err <= row.err else row.err
        if math.isfinite(err) and err <= tol:
            return True
        row.status = "FAIL"
        self.results.failures.append(
            Failure(row.label(), "check", f"{what}: max {'relative ' if relative else ''}error {err:.3g} > "
                    f"tolerance {tol:.0e} against the float32 reference", True))
        return False

    def _sinks(self, m: Model):
        if not m.sinks:
            return None
        return torch.randn(m.H, generator=torch.Generator().manual_seed(7)).to(self.device)

    def _options(self, m: Model, sinks) -> Dict[str, object]:
        return {**({"softcap": m.softcap} if m.softcap else {}), **({"s_aux": sinks} if sinks is not None else {})}

    def _to_mlx(self, t):
        mx = self.mlx
        dtype = {torch.float16: mx.float16, torch.bfloat16: mx.bfloat16, torch.float32: mx.float32}[t.dtype]
        return mx.array(t.detach().float().cpu().numpy()).astype(dtype)

    def _mlx_sdpa(self, q, k, v, m: Model, sinks, causal: bool):
        """A closure calling mx.fast.scaled_dot_product_attention on [B, H, S, D] copies of q, k, v (torch)."""
        mx = self.mlx
        qm, km, vm = self._to_mlx(q), self._to_mlx(k), self._to_mlx(v)
        kw = {"scale": m.D**-0.5, "mask": "causal" if causal else None}
        if sinks is not None:
            kw["sinks"] = self._to_mlx(sinks.to(q.dtype))
        return lambda: mx.fast.scaled_dot_product_attention(qm, km, vm, **kw), (qm, km, vm, kw)

    def _check_mlx(self, row: Row, fn, ref) -> None:
        """MLX's output [B, H, S, D] against the reference [B, S, H, D] (not where MLX lacks the model's softcap): a
        baseline that computes something else is reported, not silently timed."""
        if row.model.softcap or ref is None:
            return
        import numpy as np

        got = torch.from_numpy(np.array(fn().astype(self.mlx.float32))).transpose(1, 2)
        err = (got - ref.float().cpu()).abs().max().item()
        if not err <= TOLERANCE[self.dtype]:
            self.results.failures.append(Failure(row.label(), "MLX", f"MLX's output differs from the float32 "
                                                 f"reference by {err:.3g}", False))

    def _baselines(self, row: Row, sdpa: Callable, mlx: Callable[[], float]) -> None:
        """Times torch SDPA (one call: sdpa()) and, when MLX is importable, MLX (mlx() checks its output and returns
        its time). A baseline that raises is listed under Failures, never as a kernel failure."""
        try:
            row.sdpa_us = self.timer(sdpa)
        except Exception as e:
            self._fail(row, "torch SDPA", e, kernel=False)
        if self.mlx is not None:
            try:
                row.mlx_us = mlx()
            except Exception as e:
                self._fail(row, "MLX", e, kernel=False)

    def _sync(self):
        if self.device.type == "mps":
            torch.mps.synchronize()
            torch.mps.empty_cache()

    def _done(self, row: Row) -> Row:
        self._sync()
        self.results.rows.append(row)
        fmt = lambda us: "-" if us is None else f"{us:.1f} us"  # noqa: E731
        self.log(f"{row.label()}: {row.status}; ours {fmt(row.ours_us)}, SDPA {fmt(row.sdpa_us)}, "
                 f"MLX {fmt(row.mlx_us)}")
        return row

    # -- the three sections --
    def decode(self, m: Model, B: int, S: int) -> Row:
        row = Row("decode", m, B, S, self.dtype)
        c = cases.DecodeCase(f"{m.key}_b{B}_s{S}", B, m.H, m.Hkv, m.D, S)
        try:
            t = cases.make_decode(c, self.device, self.dtype, packed=False)
        except Exception as e:
            return self._skip(row, e)
        sinks = self._sinks(m)
        opts = self._options(m, sinks)
        ref = None
        try:
            ref = reference_attention(t["q"], t["k_contig"].transpose(1, 2), t["v_contig"].transpose(1, 2),
                                      causal=True, softcap=m.softcap, sinks=sinks)
            out = cases.paged_decode(self.kernel, c, t, **opts)
            if self._check(row, out, ref, TOLERANCE[self.dtype]):
                row.ours_us = self.timer(lambda: cases.paged_decode(self.kernel, c, t, **opts))
        except Exception as e:
            self._fail(row, "ours", e, kernel=True)

        def mlx():
            fn, _ = self._mlx_sdpa(t["q"].transpose(1, 2), t["k_contig"], t["v_contig"], m, sinks, causal=False)
            self._check_mlx(row, fn, ref)
            return self.mlx_timer(fn)

        self._baselines(row, lambda: cases.contiguous_sdpa_decode(None, c, t), mlx)
        return self._done(row)

    def prefill(self, m: Model, S: int, B: int = 1) -> Row:
        row = Row("prefill", m, B, S, self.dtype)
        c = cases.PrefillCase(f"{m.key}_s{S}", B, m.H, m.Hkv, m.D, S)
        try:
            t = cases.make_prefill(c, self.device, self.dtype)
        except Exception as e:
            return self._skip(row, e)
        sinks = self._sinks(m)
        opts = self._options(m, sinks)
        q, k, v = t["q"].view(B, S, m.H, m.D), t["k"].view(B, S, m.Hkv, m.D), t["v"].view(B, S, m.Hkv, m.D)

        def ours():
            return self.kernel.flash_attn_varlen_func(t["q"], t["k"], t["v"], t["cu_seqlens"], t["cu_seqlens"], S, S,
                                                      causal=True, **opts)

        ref = None
        try:
            ref = reference_attention(q, k, v, causal=True, softcap=m.softcap, sinks=sinks)
            if self._check(row, ours().view(B, S, m.H, m.D), ref, TOLERANCE[self.dtype]):
                row.ours_us = self.timer(ours)
        except Exception as e:
            self._fail(row, "ours", e, kernel=True)

        def mlx():
            fn, _ = self._mlx_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), m, sinks, causal=True)
            self._check_mlx(row, fn, ref)
            return self.mlx_timer(fn)

        self._baselines(row, lambda: cases.sdpa_prefill(None, c, t), mlx)
        return self._done(row)

    def backward(self, m: Model, S: int, B: int = 1) -> Row:
        row = Row("backward", m, B, S, self.dtype)
        g = torch.Generator().manual_seed(3)
        try:
            q, dout = (torch.randn(B, S, m.H, m.D, generator=g).to(self.device, self.dtype) for _ in range(2))
            k, v = (torch.randn(B, S, m.Hkv, m.D, generator=g).to(self.device, self.dtype) for _ in range(2))
        except Exception as e:
            return self._skip(row, e)
        for x in (q, k, v):
            x.requires_grad_(True)
        sinks = self._sinks(m)
        opts = self._options(m, sinks)

        def ours():
            return torch.autograd.grad(self.kernel.flash_attn_func(q, k, v, causal=True, **opts), (q, k, v), dout)

        def sdpa():
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=m.H != m.Hkv)
            return torch.autograd.grad(out, (q, k, v), dout.transpose(1, 2))

        try:
            refs = reference_grads(q, k, v, dout, causal=True, softcap=m.softcap, sinks=sinks)
            ok = True
            for name, got, ref in zip(("dq", "dk", "dv"), ours(), refs):
                ok = self._check(row, got, ref, GRAD_TOLERANCE[self.dtype], relative=True, what=name) and ok
            if ok:
                row.ours_us = self.timer(ours)
        except Exception as e:
            self._fail(row, "ours", e, kernel=True)

        def mlx():
            mx = self.mlx
            _, (qm, km, vm, kw) = self._mlx_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), m, sinks,
                                                 causal=True)
            dm = self._to_mlx(dout.transpose(1, 2))
            f = lambda a, b, c: mx.fast.scaled_dot_product_attention(a, b, c, **kw)  # noqa: E731
            return self.mlx_timer(lambda: mx.vjp(f, [qm, km, vm], [dm])[1])

        self._baselines(row, sdpa, mlx)
        return self._done(row)

    def run(self, grid: Grid, sections: Sequence[str] = ("decode", "prefill", "backward")) -> Results:
        if "decode" in sections:
            for m, b, s in grid.decode_shapes():
                self.decode(m, b, s)
        if "prefill" in sections:
            for m, s in grid.prefill_shapes():
                self.prefill(m, s, grid.prefill_batch)
        if "backward" in sections:
            for m, s in grid.backward_shapes():
                self.backward(m, s, grid.prefill_batch)
        return self.results


# ---- the pytest suite ----


@dataclass
class SuiteResult:
    command: str
    returncode: int
    counts: Dict[str, int]
    seconds: Optional[float]
    failed: List[str]  # "FAILED tests/...::test - message" lines
    tail: List[str] = field(default_factory=list)  # the output's last lines, shown when there is no summary line


_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)\b")


def parse_pytest(output: str, returncode: int, command: str) -> SuiteResult:
    """Counts from pytest's closing summary line, and its FAILED / ERROR lines (-rfE)."""
    counts, seconds = {}, None
    for line in reversed(output.splitlines()):
        found = _COUNT.findall(line)
        if found:
            counts = {("error" if k.startswith("error") else "warning" if k.startswith("warning") else k): int(n)
                      for n, k in found}
            m = re.search(r" in ([\d.]+)s", line)
            seconds = float(m.group(1)) if m else None
            break
    failed = [line.strip() for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    tail = [line for line in output.splitlines() if line.strip()][-8:]
    return SuiteResult(command, returncode, counts, seconds, failed, tail)


def variant_dir(kernel) -> Path:
    """build/<variant>/ of the loaded kernel: kernels puts its __init__.py in the variant folder, in a package folder
    inside it, or in a zip archive inside it."""
    path = Path(kernel.__file__).resolve()
    for parent in path.parents:
        if parent.parent.name == "build":
            return parent
    return path.parent


def kernel_root(kernel) -> Optional[Path]:
    """The folder holding build/<variant>/ of the loaded kernel (a Hub snapshot or a local checkout)."""
    variant = variant_dir(kernel)
    return variant.parent.parent if variant.parent.name == "build" else None


def run_test_suite(root: Path, pytest_args: Sequence[str] = ()) -> SuiteResult:
    """This checkout's tests/ against the kernel in root/build/ (LOCAL_KERNELS, offline), on the default device."""
    env = dict(os.environ, LOCAL_KERNELS=f"{cases.REPO_ID}={root}", HF_HUB_OFFLINE="1")
    # pytest_args naming test files or folders replace the default target, tests/
    named = any(not a.startswith("-") and (cases.ROOT / a.split("::")[0]).exists() for a in pytest_args)
    args = [*([] if named else ["tests"]), "-q", "-rfE", *pytest_args]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cases.ROOT, env=env,
                          capture_output=True, text=True)
    shown = "python3 -m pytest " + " ".join(shlex.quote(a) for a in args)
    return parse_pytest(proc.stdout + "\n" + proc.stderr, proc.returncode, shown)


# ---- the environment ----


def show_path(path) -> str:
    """A path, shown as [checkout]/... when inside this checkout (reports are pasted into issues)."""
    text = str(Path(path).resolve())
    root = str(cases.ROOT)
    return "[checkout]" + text[len(root):] if text == root or text.startswith(root + os.sep) else text


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(kernel, source: str, device, dtype, timer_text: str, emulated: bool,
                argv: Sequence[str] = ()) -> List[Tuple[str, str]]:
    cores = apple.gpu_cores()
    chip = apple.chip_name()
    bandwidth = apple.detect_bandwidth(chip, cores)
    lines = [
        ("chip", chip + (" (the emulator's host CPU, not an Apple GPU)" if emulated else "")),
        ("GPU cores", str(cores) if cores else "unknown"),
        ("memory bandwidth", f"{bandwidth:g} GB/s (from the chip name)" if bandwidth else "unknown"),
        ("OS", apple.macos_version()),
        ("Python", sys.version.split()[0]),
        ("torch", torch.__version__),
        ("kernels", package_version("kernels")),
        ("transformers", package_version("transformers")),
        ("mlx", package_version("mlx")),
        ("kernel", f"{source}; variant {variant_dir(kernel).name}; loaded from {show_path(variant_dir(kernel))}"),
        ("device, dtype", f"{device}, {str(dtype).replace('torch.', '')}"),
        ("timing", timer_text),
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("command", " ".join(["python3 -m benchmarks.mac_report", *map(shlex.quote, argv)])),
    ]
    if os.environ.get("LOCAL_KERNELS"):
        lines.append(("LOCAL_KERNELS", os.environ["LOCAL_KERNELS"].replace(str(cases.ROOT), "[checkout]")))
    return lines


# ---- the report ----

EMULATED_BANNER = (
    "> **EMULATED, NOT APPLE FIGURES.** This report ran the emulated build (the `.metal` kernels executed on the CPU "
    "by the Metal-on-CPU emulator) with scaled-down shapes and a short timer. It checks the command and the kernels' "
    "correctness; its times measure the emulator and torch on the CPU, not an Apple GPU."
)
SECTION_TITLES = {
    "decode": "Decode: `flash_attn_with_kvcache`, paged cache (page size 16, new token appended in place)",
    "prefill": "Prefill: `flash_attn_varlen_func`, causal",
    "backward": "Backward: `flash_attn_func` forward + backward, causal",
}
HEADERS = {
    "decode": ["model", "H/Hkv/D", "features", "B", "context", "ours us", "SDPA us", "SDPA/ours", "MLX us",
               "MLX/ours", "ours GB/s", "max err", "check"],
    "prefill": ["model", "H/Hkv/D", "features", "B", "S", "ours us", "SDPA us", "SDPA/ours", "MLX us", "MLX/ours",
                "ours TFLOP/s", "max err", "check"],
    "backward": ["model", "H/Hkv/D", "features", "B", "S", "ours us", "SDPA us", "SDPA/ours", "MLX us", "MLX/ours",
                 "max rel err", "check"],
}


def _us(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:,.1f}"


def _ratio(base: Optional[float], ours: Optional[float], missing_feature: bool) -> str:
    if base is None or ours is None or ours <= 0:
        return "-"
    return f"{base / ours:.2f}" + ("†" if missing_feature else "")


def _throughput(row: Row) -> str:
    if row.ours_us is None:
        return "-"
    m = row.model
    if row.section == "decode":
        kv = cases.kv_bytes(cases.DecodeCase("", row.B, m.H, m.Hkv, m.D, row.S), row.dtype)
        return _num(kv / (row.ours_us * 1e3))
    flops = 4 * row.B * m.H * m.D * row.S * row.S / 2  # causal: half the score matrix
    return _num(flops / (row.ours_us * 1e6))


def _num(x: float) -> str:
    return f"{x:,.1f}" if x >= 10 else f"{x:.3g}"


def format_table(section: str, rows: List[Row], mlx_available: bool) -> str:
    lines = ["| " + " | ".join(HEADERS[section]) + " |", "|" + "---|" * len(HEADERS[section])]
    for r in rows:
        m = r.model
        sdpa_lacks = bool(m.softcap or m.sinks)  # torch SDPA applies neither
        mlx_lacks = bool(m.softcap)  # MLX takes sinks, not softcap
        mlx = _us(r.mlx_us) if mlx_available else "n/a"
        cells = [m.name, m.heads(), m.features(), str(r.B), str(r.S), _us(r.ours_us), _us(r.sdpa_us),
                 _ratio(r.sdpa_us, r.ours_us, sdpa_lacks), mlx, _ratio(r.mlx_us, r.ours_us, mlx_lacks)]
        if section != "backward":
            cells.append(_throughput(r))
        cells += ["-" if r.err is None else f"{r.err:.1e}", r.status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(env: List[Tuple[str, str]], results: Results, suite: Optional[SuiteResult] = None,
                  emulated: bool = False, mlx_available: bool = False) -> str:
    kernel_failures = [f for f in results.failures if f.kernel]
    out = ["# metal-flash-sdpa: Mac report" + (" (EMULATED on the CPU, not Apple figures)" if emulated else ""), ""]
    if emulated:
        out += [EMULATED_BANNER, ""]
    skipped = [f for f in results.failures if f.what == "inputs"]
    out += [f"{len(results.rows)} shapes measured, {len(kernel_failures)} kernel failures, "
            f"{len(results.failures) - len(kernel_failures) - len(skipped)} baseline errors, {len(skipped)} skipped.",
            ""]
    out += ["## Environment", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env] + [""]
    out += ["## Test suite", ""]
    if suite is None:
        out += ["not run (pass `--tests`)", ""]
    else:
        counts = ", ".join(f"{n} {k}" for k, n in suite.counts.items()) or "no summary line"
        secs = f" in {suite.seconds:g} s" if suite.seconds is not None else ""
        out += [f"`{suite.command}`: {counts}{secs} (exit code {suite.returncode})", ""]
        if not suite.counts:
            out += ["```", *suite.tail, "```", ""]
        out += [f"- `{line}`" for line in suite.failed[:40]]
        if len(suite.failed) > 40:
            out.append(f"- ... and {len(suite.failed) - 40} more")
        out += [""] if suite.failed else []
    for section in ("decode", "prefill", "backward"):
        rows = [r for r in results.rows if r.section == section]
        if rows:
            out += [f"## {SECTION_TITLES[section]}", "", format_table(section, rows, mlx_available), ""]
    out += [
        "us: median microseconds per call. X/ours: X's time / ours (> 1: ours is faster). † the baseline lacks the "
        "model's option (torch SDPA: softcap and sinks; MLX: softcap) and times plain attention of the same shape. "
        "GB/s: valid K/V bytes read once per step / time. max err: max |ours - float32 reference| (backward: relative "
        "to the largest reference gradient, worst of dq, dk, dv); a failed check (FAIL) or an error is not timed.",
        "",
        f"## Failures ({len(results.failures)})",
        "",
    ]
    if not results.failures:
        out.append("none")
    for f in results.failures:
        kind = "KERNEL" if f.kernel else "skipped" if f.what == "inputs" else "baseline"
        out.append(f"- {kind} {f.what}: {f.row}: {f.message}")
    return "\n".join(out) + "\n"


# ---- the command ----


def _ints(text: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip()) if text.lower() != "none" else ()


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.mac_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local", nargs="?", const=str(cases.ROOT), metavar="PATH",
                   help="a local kernel-builder build, PATH/build/<variant>/ (PATH: this checkout by default), "
                        "loaded through LOCAL_KERNELS instead of the Hub kernel")
    p.add_argument("--emulated", action="store_true",
                   help="an emulated build (this checkout's, or --local PATH's) on the CPU, scaled-down shapes, short "
                        "timer (Linux; the default where there is no MPS device)")
    p.add_argument("--tests", action="store_true", help="also run the pytest suite against the loaded kernel")
    p.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. \"-m kernels_ci\"")
    p.add_argument("--models", help="comma-separated model names (default: all): " + ", ".join(m.key for m in MODELS))
    p.add_argument("--contexts", type=_ints, help="decode contexts, e.g. 1000,4096,32768")
    p.add_argument("--batches", type=_ints, help="decode batch sizes, e.g. 1,8")
    p.add_argument("--prefill", type=_ints, help="prefill lengths (none: skip)")
    p.add_argument("--backward", type=_ints, help="backward lengths (none: skip)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per measurement (>= 1 on a GPU; default 1)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds per measurement after the warm-up")
    p.add_argument("--no-mlx", action="store_true", help="leave MLX out even if it is installed")
    p.add_argument("--output", help="also write the report to this file")
    args = p.parse_args(argv)
    if not args.emulated and not torch.backends.mps.is_available():
        print("no MPS device here: running --emulated (this checkout's emulated build on the CPU)", file=sys.stderr)
        args.emulated = True
    if not args.emulated and args.warmup is not None and args.warmup < 1.0:
        p.error("--warmup must be at least 1 s on a GPU: a cold Apple GPU reads up to 4x slow")
    return args


def select_grid(args) -> Grid:
    grid = EMULATED_GRID if args.emulated else MAC_GRID
    if args.models:
        wanted = [w.strip().lower() for w in args.models.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in {m.key for m in MODELS}]
        if unknown:
            raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(m.key for m in MODELS)}")
        grid = replace(grid, models=tuple(m for m in MODELS if m.key in wanted))
    for name, attr in (("contexts", "contexts"), ("batches", "batches"), ("prefill", "prefill_lengths"),
                       ("backward", "backward_lengths")):
        if getattr(args, name) is not None:
            grid = replace(grid, **{attr: getattr(args, name)})
    return grid


def main(argv=None) -> int:
    args = parse_args(argv)
    local = Path(args.local) if args.local else (cases.ROOT if args.emulated else None)
    device = "cpu" if args.emulated else "mps"
    try:
        kernel = cases.load_kernel(local)
    except Exception as e:  # a missing build or an unusable Hub variant: say what to do
        print(cases.load_hint(local, e), file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    if args.emulated:
        timer = apple.Timer(warmup_s=args.warmup or 0.0, runs=3, calls=1)
        source = "emulated build"
    else:
        timer = apple.MpsTimer(warmup_s=args.warmup or 1.0, budget_s=args.budget)
        source = f"local build {show_path(local)}" if local else \
            f"{cases.REPO_ID} version {cases.KERNEL_VERSION} from the Hugging Face Hub"
    mlx = None
    if not args.no_mlx:
        try:
            import mlx.core as mlx
        except ImportError:
            mlx = None
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    runner = Runner(kernel, device, dtype, timer=timer, mlx=mlx,
                    mlx_timer=apple.MlxTimer(warmup_s=timer.warmup_s, budget_s=args.budget, runs=timer.runs,
                                             calls=timer.calls) if mlx else None, log=log)
    start = time.perf_counter()
    results = runner.run(select_grid(args))
    suite = None
    if args.tests:
        root = kernel_root(kernel)
        if root is None:
            results.failures.append(Failure("test suite", "tests", f"cannot locate the build folder of "
                                            f"{kernel.__file__}", True))
        else:
            log(f"running the test suite against {root} (this takes a while)")
            suite = run_test_suite(root, shlex.split(args.pytest_args))
    env = environment(kernel, source, device, dtype, timer.describe(), args.emulated,
                      sys.argv[1:] if argv is None else argv)
    env.append(("report run time", f"{time.perf_counter() - start:.0f} s"))
    report = format_report(env, results, suite, emulated=args.emulated, mlx_available=mlx is not None)
    print(report, end="")
    if args.output:
        Path(args.output).write_text(report)
    return 1 if any(f.kernel for f in results.failures) or (suite and suite.returncode not in (0, 5)) else 0


if __name__ == "__main__":
    sys.exit(main())
