"""The model zoo of the decode benchmark (issue 19): real models' heads, KV heads and head dims, the contexts and
batches they run at. Used by bench_peers.py (timing, GPU machine) and apple_plans.py (the planner on Apple devices).

Its tables from bench_peers' JSON rows, here (no GPU needed): several commands' rows as one table, or two trees' rows
of the same shapes side by side (an A/B of a branch packed by alt_tree.py):

    python3 -m tests.metal_cuda.zoo table RUN.json [MORE.json ...]
    python3 -m tests.metal_cuda.zoo compare BASE.json OTHER.json
"""

import argparse
import json
import math
from pathlib import Path

import torch

from benchmarks.cases import MODELS, Model

# The GQA factors (query heads per KV head) the Mac report's models leave out, which issue 19 names: 3, 6, 12, 16
# (MODELS has 1, 2, 4, 5, 7, 8). Proxy table only: the Mac report's grid is its own issue's.
GQA_MODELS = (
    Model("Llama-3.2-3B", 24, 8, 128),  # GQA 3
    Model("Qwen2.5-1.5B", 12, 2, 128),  # GQA 6
    Model("Mistral-Large-2", 96, 8, 128),  # GQA 12
    Model("Llama-3.1-405B", 128, 8, 128),  # GQA 16
)

# name -> (H, Hkv, D, options), from benchmarks/cases.py's MODELS (one list for the Mac report and this table) and
# GQA_MODELS. Gemma-2 runs with its softcap and gpt-oss with its sinks on our side; MLX has no softcap, llama.cpp's
# kernels here neither softcap nor sinks, so those peers run without them.
ZOO = {m.name: (m.H, m.Hkv, m.D, {"softcap": m.softcap} if m.softcap else ({"sinks": True} if m.sinks else {}))
       for m in MODELS + GQA_MODELS}
ZOO_CONTEXTS = (256, 1000, 4096, 32768, 131072)
ZOO_BATCHES = (1, 8, 32)
ZOO_MAX_KV_BYTES = 2 << 30  # skip what does not fit the time of one run (K + V of the whole batch)
ZOO_EXTRA_DTYPES = {"Llama-3-8B": (torch.bfloat16, torch.float32), "Qwen2.5-7B": (torch.bfloat16,)}
ZOO_EXTRA_SHAPES = ((1, 1000), (1, 32768), (8, 4096))


def zoo_rows():
    rows = []
    for name, (H, Hkv, D, opts) in ZOO.items():
        for B in ZOO_BATCHES:
            for S in ZOO_CONTEXTS:
                if B * S * Hkv * D * 2 * 2 <= ZOO_MAX_KV_BYTES:
                    rows.append((name, B, S, torch.float16))
        for dtype in ZOO_EXTRA_DTYPES.get(name, ()):
            rows.extend((name, B, S, dtype) for B, S in ZOO_EXTRA_SHAPES)
    return rows


def _geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _ratio_summary(name, ratios) -> str:
    """One ratio column (x = peer time / ours): geometric mean, minimum and the rows at or above 1.0."""
    return (f"{name}: geometric mean {_geomean(ratios):.2f}, minimum {min(ratios):.2f}, "
            f"{sum(x >= 1.0 for x in ratios)} of {len(ratios)} rows >= 1.0")


def zoo_table(results) -> str:
    """bench_peers' zoo rows as a markdown table, then each ratio column's geometric mean, minimum and rows >= 1.0
    (x = peer time / ours)."""
    lines = ["| model | B | S | dtype | ours us (splits) | ours, dense cache | MLX launch | MLX best | llama.cpp | "
             "x MLX best | x llama.cpp | x best peer | x best peer, dense |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    cols = {"x MLX best": [], "x llama.cpp": [], "x best peer": [], "x best peer, dense": []}
    for r in results:
        xm = r["mlx_best_us"] / r["ours_us"] if "mlx_best_us" in r else None
        xg = r["ggml_us"] / r["ours_us"] if "ggml_us" in r else None
        xb, xc = r.get("x_best_peer"), r.get("x_best_peer_dense")
        for k, v in (("x MLX best", xm), ("x llama.cpp", xg), ("x best peer", xb), ("x best peer, dense", xc)):
            if v is not None:
                cols[k].append(v)
        note = (" (peers without " + ", ".join(r["options"]) + ")") if r.get("options") else ""
        x = [f"{v:.2f}" if v is not None else "-" for v in (xm, xg, xb, xc)]
        us = [f"{r[k]:.1f}" if k in r else "-" for k in ("ours_dense_us", "mlx_launch_us", "mlx_best_us", "ggml_us")]
        lines.append(f"| {r['model']}{note} | {r['B']} | {r['S']} | {r['dtype']} | {r['ours_us']:.1f} ({r['splits']}) "
                     f"| {' | '.join(us)} | {' | '.join(x)} |")
    lines.append("")
    lines.extend(_ratio_summary(k, v) for k, v in cols.items() if v)
    return "\n".join(lines)


def zoo_compare(base, other) -> str:
    """Two runs' rows of the same shapes (model, B, S, dtype) side by side: our time in each, other / base, and each
    run's x best peer (its own peers, timed in its own command); then the time ratio's geometric mean and range and
    each run's x best peer summary. Shapes only one run has are left out (counted in the last line)."""
    key = lambda r: (r["model"], r["B"], r["S"], r["dtype"])  # noqa: E731
    theirs = {key(r): r for r in other}
    lines = ["| model | B | S | dtype | base us (splits) | other us (splits) | other / base | x best peer, base | "
             "x best peer, other |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    ratios, xa, xb = [], [], []
    for r in base:
        o = theirs.get(key(r))
        if o is None:
            continue
        ratios.append(o["ours_us"] / r["ours_us"])
        pa, pb = r.get("x_best_peer"), o.get("x_best_peer")
        if pa is not None and pb is not None:
            xa.append(pa)
            xb.append(pb)
        x = [f"{v:.2f}" if v is not None else "-" for v in (pa, pb)]
        lines.append(f"| {r['model']} | {r['B']} | {r['S']} | {r['dtype']} | {r['ours_us']:.1f} ({r['splits']}) | "
                     f"{o['ours_us']:.1f} ({o['splits']}) | {ratios[-1]:.3f} | {x[0]} | {x[1]} |")
    lines.append("")
    if ratios:
        lines.append(f"time other / base: geometric mean {_geomean(ratios):.3f}, {min(ratios):.3f}-{max(ratios):.3f} "
                     f"over {len(ratios)} rows")
    lines.extend(_ratio_summary(f"x best peer, {name}", v) for name, v in (("base", xa), ("other", xb)) if v)
    lines.append(f"shapes in one run only: {len(base) + len(other) - 2 * len(ratios)}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description="the zoo's tables from bench_peers --zoo --json rows")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="one table from one or more runs' rows")
    t.add_argument("runs", nargs="+")
    c = sub.add_parser("compare", help="two runs of the same shapes side by side")
    c.add_argument("base")
    c.add_argument("other")
    a = ap.parse_args()
    load = lambda path: json.loads(Path(path).read_text())  # noqa: E731
    if a.cmd == "table":
        print(zoo_table([r for path in a.runs for r in load(path)]))
    else:
        print(zoo_compare(load(a.base), load(a.other)))


if __name__ == "__main__":
    main()
