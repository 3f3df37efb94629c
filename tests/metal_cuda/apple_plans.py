"""What the decode planner launches on Apple GPUs at the model-zoo rows (issue 19): the real C++ planner
(planner_ext, built on the CPU, no GPU needed) with each device's GPU core count, on meta tensors.

    python3 -m tests.metal_cuda.apple_plans          # prints the markdown table RESULTS.md holds
"""

import torch

from . import planner_ext
from .zoo import ZOO, zoo_rows

# GPU cores of the Apple devices the table covers (the core-count provider of metal_launch.mm reports these).
DEVICES = {"M1": 8, "M2 Max": 38, "M3 Max": 40, "M4 Max": 40, "M5 Max": 40}
PAGE = 16


def plan(name, B, S, dtype, cores):
    H, Hkv, D, opts = ZOO[name]
    meta = dict(device="meta", dtype=dtype)
    q = torch.empty(B, 1, H, D, **meta)
    blocks = B * ((S + PAGE - 1) // PAGE)
    k_cache = torch.empty(blocks, PAGE, Hkv, D, **meta)
    bt = torch.empty(B, (S + PAGE - 1) // PAGE, device="meta", dtype=torch.int32)
    seqlens = torch.empty(B, device="meta", dtype=torch.int32)
    sinks = torch.empty(H, device="meta") if opts.get("sinks") else None
    dispatches = planner_ext.load().plan_paged(q, k_cache, k_cache, bt, seqlens, None, None, torch.empty_like(q), None,
                                               None, sinks, D ** -0.5, opts.get("softcap", 0.0), -1, 0, 0, S, 0, cores)
    attn = next(d for d in dispatches if d["kernel"].startswith("paged_decode_") and "combine" not in d["kernel"])
    path = attn["kernel"].split("_")[2]  # "matrix", "wide" or the dtype (the lane-local path)
    rows = attn["kernel"].rsplit("_r", 1)[1]
    partials = planner_ext.combine_partials(dispatches)
    tgs = attn["threadgroups"][0] * attn["threadgroups"][1] * attn["threadgroups"][2]
    return attn["threadgroups"][0], rows, tgs, partials, path if path in ("matrix", "wide") else ""


def main():
    names = list(DEVICES)
    print("| model | B | S | R (row tile) | " + " | ".join(f"{n} ({c} cores): splits, threadgroups"
                                                for n, c in DEVICES.items()) + " |")
    # A split of <= 2 steps per simdgroup writes one partial per simdgroup (per key part on the wide path): "(Nx)"
    # after its split count, N partials per split; "wide": the wide path's kernel.
    print("|---|---:|---:|---:|" + "---:|" * len(names))
    for name, B, S, dtype in zoo_rows():
        if dtype != torch.float16:
            continue
        cells, paths = [], set()
        for n in names:
            splits, rows, tgs, partials, path = plan(name, B, S, dtype, DEVICES[n])
            paths.add(path)
            per_split = f" ({partials // splits}x)" if partials > splits else ""
            cells.append(f"{splits}{per_split}{' wide' if path == 'wide' else ''}, {tgs}")
        print(f"| {name} | {B} | {S} | {rows}{' (matrix)' if 'matrix' in paths else ''} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
