"""Linux (no GPU): measured device traffic of each kernel path, from the Metal-on-CPU emulator, and a MODELED time.

The emulated package build runs the real .metal kernels on the CPU; its libmetal_cpu.so counts every byte a kernel
loads from and stores to each [[buffer(i)]]. Bytes of the setBytes parameter struct are left out (constant address
space: served by the constant cache, not by DRAM). torch SDPA cannot run in the emulator: the gather and contiguous
SDPA rows are computed analytically, assuming SDPA reads each K/V byte once (the best case).

The model: time = (bytes loaded + bytes stored) / chip bandwidth + dispatches x DISPATCH_US. It ignores compute,
caches and occupancy (a dispatch with fewer threadgroups than GPU cores cannot reach full bandwidth), so it is a
floor for memory-bound decode, not a measurement.
"""

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from benchmarks import cases

DISPATCH_US = 5.0  # assumed cost of one compute dispatch on an Apple GPU (encode + launch gap), microseconds
CHIPS = {"M2 Max": 400.0, "M3 Max 30c": 300.0, "M4 Max": 546.0, "M2 Ultra": 800.0}  # GB/s


@functools.lru_cache(maxsize=None)
def _defines() -> Dict[str, int]:
    """NAME -> value of every integer `#define FLASH_SDPA_NAME` of the params headers (the [[buffer(i)]] indices)."""
    text = "".join((cases.ROOT / "flash_sdpa" / h).read_text() for h in ("paged_params.h", "varlen_params.h"))
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"#define FLASH_SDPA_(\w+) (\d+)\b", text)}


def _params_buffer_indices() -> Dict[str, int]:
    """kernel-name prefix -> the [[buffer(i)]] index of its setBytes parameter struct."""
    index = _defines()
    return {
        "kv_paged_write_": index["WRITE_BUF_PARAMS"],
        "paged_decode_combine_": index["COMBINE_BUF_PARAMS"],
        "paged_decode_": index["DECODE_BUF_PARAMS"],
        "flash_attn_varlen_": index["VARLEN_BUFFER_PARAMS"],
    }


def _kv_buffer_indices() -> Dict[str, tuple]:
    index = _defines()
    return {
        "paged_decode_combine_": (),
        "paged_decode_": (index["DECODE_BUF_K_CACHE"], index["DECODE_BUF_V_CACHE"]),
        "flash_attn_varlen_": (index["VARLEN_BUFFER_K"], index["VARLEN_BUFFER_V"]),
        "kv_paged_write_": (),
    }


def _partial_buffer_indices() -> tuple:
    """The split-K combine's [[buffer(i)]] indices of the decode's partial outputs and (max, sum) pairs."""
    index = _defines()
    return index["COMBINE_BUF_O_PARTIAL"], index["COMBINE_BUF_ML_PARTIAL"]


def _prefix(kernel: str, table: Dict[str, object]):
    for prefix in table:  # ordered: paged_decode_combine_ before paged_decode_
        if kernel.startswith(prefix):
            return table[prefix]
    raise KeyError(f"unknown kernel {kernel}: add it to benchmarks/traffic_report.py")


@dataclass
class Row:
    case: str
    shape: str
    path: str
    measured: bool
    loaded: int  # device bytes per call
    stored: int
    kv_loaded: Optional[int]  # of `loaded`, from the K/V buffers (None: analytic)
    ideal: int  # valid K/V bytes once
    dispatches: int
    threadgroups: Optional[int]
    kernels: List[str] = field(default_factory=list)
    partials_loaded: int = 0  # of `loaded`, the split-K partials the combine reads back (fp32, from the decode)

    @property
    def ratio(self) -> float:
        return self.loaded / self.ideal

    def modeled_us(self, gbps: float) -> float:
        return (self.loaded + self.stored) / (gbps * 1e3) + self.dispatches * DISPATCH_US


def _runtime(kernel):
    from msl import cpu as metal_cpu

    rt = metal_cpu.Runtime(Path(kernel.__file__).parent / "libmetal_cpu.so")
    rt.set_options(check_races=False)  # traffic only: the test suite checks races
    return rt


def _measure(rt, fn) -> tuple:
    params = _params_buffer_indices()
    kv = _kv_buffer_indices()
    partial_buffers = _partial_buffer_indices()
    rt.reset_stats()
    fn()
    stats = rt.stats()
    loaded = stored = kv_loaded = partials_loaded = tgs = 0
    for s in stats:
        skip = _prefix(s.kernel, params)
        loaded += sum(n for i, n in s.loaded.items() if i != skip)
        stored += sum(n for i, n in s.stored.items() if i != skip)
        kv_loaded += sum(s.loaded.get(i, 0) for i in _prefix(s.kernel, kv))
        if s.kernel.startswith("paged_decode_combine_"):
            partials_loaded += sum(s.loaded.get(i, 0) for i in partial_buffers)
        tgs += s.threadgroups
    return loaded, stored, kv_loaded, partials_loaded, len(stats), tgs, [s.kernel for s in stats]


MEASURED_DECODE_PATHS = ("paged flash_attn_with_kvcache", "flash_attn_varlen_func (K/V pre-packed)")


def decode_rows(kernel, rt, c: cases.DecodeCase, dtype=torch.float16, paths=MEASURED_DECODE_PATHS) -> List[Row]:
    t = cases.make_decode(c, "cpu", dtype)
    ideal = cases.kv_bytes(c, dtype)
    es = cases.element_size(dtype)
    q_bytes = c.B * c.H * c.D * es
    new_bytes = 2 * c.B * c.Hkv * c.D * es
    rows = []
    for path in paths:
        out = None

        def call():
            nonlocal out
            out = cases.DECODE_PATHS[path](kernel, c, t)

        loaded, stored, kv_loaded, partials, n, tgs, names = _measure(rt, call)
        err = (out.float() - cases.reference_decode(c, t).float()).abs().max().item()
        assert err < 2e-2, f"{path} {c.label()}: max error {err}"
        rows.append(Row(c.name, c.label(), path, True, loaded, stored, kv_loaded, ideal, n, tgs, names, partials))
    # Analytic: append (2 index writes), gather (2: K and V: read the valid pages, write a contiguous copy), SDPA.
    rows.append(Row(c.name, c.label(), "gather + torch SDPA", False,
                    loaded=new_bytes + ideal + ideal + q_bytes, stored=new_bytes + ideal + q_bytes,
                    kv_loaded=None, ideal=ideal, dispatches=5, threadgroups=None))
    # Analytic: append (2 slice copies) + SDPA reading the contiguous cache once.
    rows.append(Row(c.name, c.label(), "contiguous cache + torch SDPA", False,
                    loaded=new_bytes + ideal + q_bytes, stored=new_bytes + q_bytes,
                    kv_loaded=None, ideal=ideal, dispatches=3, threadgroups=None))
    return rows


def prefill_rows(kernel, rt, c: cases.PrefillCase, dtype=torch.float16) -> List[Row]:
    t = cases.make_prefill(c, "cpu", dtype)
    es = cases.element_size(dtype)
    ideal = 2 * c.B * c.S * c.Hkv * c.D * es
    qo = 2 * c.B * c.S * c.H * c.D * es
    loaded, stored, kv_loaded, _, n, tgs, names = _measure(rt, lambda: cases.varlen_prefill(kernel, c, t))
    return [
        Row(c.name, c.label(), "varlen kernel", True, loaded, stored, kv_loaded, ideal, n, tgs, names),
        Row(c.name, c.label(), "torch SDPA (ideal traffic)", False, ideal + qo // 2, qo // 2, None, ideal, 1, None),
    ]


def collect(names=None, paths=MEASURED_DECODE_PATHS) -> List[Row]:
    """Rows of the EMULATED cases (all, or those in `names`); `paths`: the measured decode paths to run."""
    kernel = cases.load_kernel()
    rt = _runtime(kernel)
    rows = []
    for name, c in cases.EMULATED.items():
        if names is not None and name not in names:
            continue
        if isinstance(c, cases.DecodeCase):
            rows += decode_rows(kernel, rt, c, paths=paths)
        else:
            rows += prefill_rows(kernel, rt, c)
    return rows


def _kb(n: int) -> str:
    return f"{n / 1024:,.1f}"


def format_table(rows: List[Row]) -> str:
    chips = list(CHIPS)
    head = ["case (emulated shape)", "path", "src", "loaded KiB", "K/V KiB", "stored KiB", "ideal KiB",
            "loaded/ideal", "dispatches", "threadgroups", *[f"{c} us*" for c in chips]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [f"{r.case}: {r.shape}", r.path, "measured" if r.measured else "analytic", _kb(r.loaded),
                 _kb(r.kv_loaded) if r.kv_loaded is not None else "-", _kb(r.stored), _kb(r.ideal),
                 f"{r.ratio:.2f}", str(r.dispatches), str(r.threadgroups) if r.threadgroups is not None else "-",
                 *[f"{r.modeled_us(CHIPS[c]):.1f}" for c in chips]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def legend() -> str:
    return (f"* MODELED, not measured: (loaded + stored) / bandwidth + dispatches x {DISPATCH_US:g} us; bandwidths "
            + ", ".join(f"{c} {g:g} GB/s" for c, g in CHIPS.items())
            + ". Measured = counted by the Metal-on-CPU emulator running the real kernels (setBytes params excluded);"
            " every thread's access counts, so small tables many threads read (block table, seqlens) are counted"
            " each time, where a GPU's caches serve them: the K/V column is the DRAM-relevant one;"
            " analytic = torch ops, assuming SDPA reads each K/V byte once. Ideal = each valid K/V byte once"
            " (S cached + 1 new token). Shapes scaled down from the Mac benchmark (benchmarks/cases.py EMULATED);"
            " decode bytes per valid K/V byte hardly depend on S, the split-K choice can. Prefill is compute-bound:"
            " its modeled time is only the bandwidth floor.")


def report(names=None) -> str:
    rows = collect(names)
    return format_table(rows) + "\n\n" + legend()
