"""Where a short single-sequence decode spends its time on the proxy: each dispatch of ours (the decode, the combine)
and of MLX's 2-pass decode (pass 1, pass 2) timed alone and together, at the planner's and forced split counts, with
a one-threadgroup launch of the append kernel as the floor of one dispatch.

    python3 -m tests.metal_cuda.decode_latency build REV   # here: the decode PTX of git revision REV, as a baseline
    python3 -m tests.metal_cuda.decode_latency             # GPU machine; carry .cache/metal_cuda and .calib
    python3 -m tests.metal_cuda.decode_latency ab [REPS]   # GPU machine: planner's calls, tree / baseline alternating
    python3 -m tests.metal_cuda.decode_latency ab REPS 1   # ... the long shapes only

Timing as bench.py (a CUDA graph of 20 calls, median of 15 replays); the whole call is checked against SDPA first.
"""

import json
import subprocess
import sys
from pathlib import Path

from msl.cuda import compiler

from . import decode_variants, planner_ext

ROOT = Path(__file__).resolve().parents[2]
BASELINE = compiler.cache_dir() / "latency_baseline.json"

# (B, H, Hkv, S): GQA 4, 8 and 7 at the zoo's short contexts, fp16, D = 128.
SHAPES = [(1, 32, 8, 256), (1, 64, 8, 256), (1, 28, 4, 256), (1, 32, 8, 1000), (1, 64, 8, 1000), (1, 28, 4, 1000)]
SPLITS = (0, 1, 2, 4, 8, 16, 32, 64)  # 1: one dispatch, no combine
# Long contexts and batches, the planner's split count only: that a change for short ones costs them nothing.
LONG = [(1, 32, 8, 16384), (4, 64, 8, 8192), (1, 28, 4, 32768), (8, 32, 8, 4096), (64, 32, 8, 512),
        (1, 64, 8, 131072)]
D = 128


def build(rev):
    """PTX of the decode kernels at git revision `rev` (its flash_sdpa headers), timed beside the tree's."""
    rev = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    src = compiler.cache_dir() / f"src_{rev}"
    src.mkdir(parents=True, exist_ok=True)
    names = subprocess.run(["git", "ls-tree", "--name-only", rev, "flash_sdpa/"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        if name.endswith((".h", ".metal")):
            text = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, check=True, capture_output=True).stdout
            (src / Path(name).name).write_bytes(text)
    path = decode_variants.build_decode(src)  # its KERNELS: fp16, D = 128, every row tile, and the combine
    BASELINE.write_text(json.dumps({"rev": rev, "folder": path.name}))
    print(rev, "->", path)


def timed(prepared) -> float:
    from . import bench

    def fn():
        for p in prepared:
            p.launch()
    return bench.time_us(fn)


def floor_us(H, Hkv, sms) -> float:
    """The floor of one dispatch: the append kernel writing one token of one request (one threadgroup)."""
    import torch

    from msl.cuda import launch

    from . import gpu_common as gc

    small = gc.make_paged_case(1, 64, H, Hkv, D, torch.float16, 16, sk_new=1, padded_rows=False, seed=1)
    write = gc.plan_paged(small, torch.empty_like(small.q), None, scale=D ** -0.5, with_new=True, gpu_cores=sms)[0]
    return timed(launch.prepare_plan(gc.libraries(), [write]))


def ours(B, H, Hkv, S, sms, splits_list=SPLITS, simdgroup_partials=-1):
    """One line per split count (0: the planner's): the whole call and each dispatch alone, us. simdgroup_partials:
    1 / 0 forced (-1: the planner's)."""
    import torch

    from msl.cuda import launch

    from . import gpu_common as gc
    from .bench_peers import check

    case = gc.make_paged_case(B, S, H, Hkv, D, torch.float16, 16, sk_new=0, full_length=True, padded_rows=False,
                              seed=1)
    ref = gc.reference_attention(case, case.k_cache, case.v_cache, scale=D ** -0.5, window=(-1, 0),
                                 dtype=torch.float32)[0]
    rows = []
    for splits in splits_list:
        if splits * 16 > S:
            continue
        out = torch.full_like(case.q, float("nan"))
        plan = gc.plan_paged(case, out, None, scale=D ** -0.5, num_splits=splits, with_new=False, gpu_cores=sms,
                             simdgroup_partials=simdgroup_partials)
        prepared = launch.prepare_plan(gc.libraries(), plan)
        for p in prepared:
            p.launch()
        torch.cuda.synchronize()
        check(out, ref, f"splits={splits}", torch.float16)
        parts = [f"{timed([p]):.1f}" for p in prepared]
        partials = planner_ext.combine_partials(plan)
        partials = f" ({partials} partials)" if partials else ""
        planner = " (planner)" if splits == 0 else ""
        rows.append(f"ours splits {prepared[0].grid[0]}{partials}{planner}: whole "
                    f"{timed(prepared):.1f}, alone {' + '.join(parts)} ({prepared[0].pipeline.num_regs} regs)")
    return rows


def mlx(B, H, Hkv, S):
    import torch

    from . import bench

    sys.path.insert(0, str(ROOT / ".calib"))
    import peer_decode as peer

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, 1, D, device="cuda", generator=g).half()
    k = torch.randn(B, Hkv, S, D, device="cuda", generator=g).half()
    v = torch.randn(B, Hkv, S, D, device="cuda", generator=g).half()
    rows = []
    for blocks in (None, 32, 64, 128):
        if blocks is not None and blocks > S:
            continue
        try:
            p = peer.Prepared(q, k, v, blocks=blocks)
        except Exception as e:  # noqa: BLE001
            rows.append(f"MLX blocks {blocks}: {type(e).__name__} {e}")
            continue
        parts = [f"{bench.time_us(lc):.1f}" for lc in p.launches]
        rows.append(f"MLX {peer.describe(p.plan)}: whole {bench.time_us(p):.1f}, alone {' + '.join(parts)}")
    return rows


def sg_step_keys(R, D=D, elem=2):
    """Keys one simdgroup covers per step (paged_params.h's decode_step_keys / 8 simdgroups)."""
    chunk = 16 if R <= 4 else 8
    chunks = D * elem // chunk
    needed = -(-chunks // (2 if R <= 2 else 1))
    lanes = next(x for x in (2, 4, 8, 16, 32) if x >= needed or x == 32)
    per_lane = -(-chunks // lanes)
    u = max(1, min(8, 32 // (per_lane * chunk), (16 if R >= 8 else 32) // R))
    return 32 // lanes * u


def sweep():
    """Simdgroup partials (or the threadgroup's merge) against splits at the short shapes: each simdgroup one, two or
    four steps."""
    import torch

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(0), sms, "SMs")
    for B, H, Hkv, S in SHAPES:
        R = 1 << (H // Hkv - 1).bit_length()
        steps = -(-S // sg_step_keys(R))
        print(f"\nB={B} H={H}/{Hkv} S={S} D={D} fp16 (R = {R}: {steps} simdgroup steps)", flush=True)
        for line in ours(B, H, Hkv, S, sms, splits_list=(0,)):
            print("  " + line, flush=True)
        for sgp in (0, 1):
            splits = sorted({min(256 // (8 if sgp else 1), max(1, -(-steps // (8 * k)))) for k in (1, 2, 4)})
            for line in ours(B, H, Hkv, S, sms, splits_list=splits, simdgroup_partials=sgp):
                print("  " + line, flush=True)
        for line in mlx(B, H, Hkv, S):
            print("  " + line, flush=True)


def profile(B=1, H=32, Hkv=8, S=256, head_dim=D):
    """Three planner calls of one fp16 decode shape (default B=1 H=32/8 S=256 D=128; `profile B H Hkv S [D]`): run
    under Nsight Compute, e.g.
    ncu -k regex:mcu_paged --launch-skip 4 --launch-count 2 --cache-control none --section WarpStateStats ..."""
    import torch

    from msl.cuda import launch

    from . import gpu_common as gc

    case = gc.make_paged_case(B, S, H, Hkv, head_dim, torch.float16, 16, sk_new=0, full_length=True,
                              padded_rows=False, seed=1)
    plan = gc.plan_paged(case, torch.empty_like(case.q), None, scale=head_dim ** -0.5, with_new=False)
    prepared = launch.prepare_plan(gc.libraries(), plan)
    for _ in range(3):
        for p in prepared:
            p.launch()
    torch.cuda.synchronize()


def ab(reps=3, only_long=False):
    """The planner's call at every shape (only_long: the LONG ones), this tree against the baseline, in alternating
    order `reps` times (an A/B whose small differences are not the order of the runs): each shape's times and the
    median ratio."""
    import statistics

    import torch

    from msl.cuda import launch

    from . import gpu_common as gc

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(0), sms, "SMs")
    b = json.loads(BASELINE.read_text())
    base = gc.libraries()
    variants = {"tree": base,
                b["rev"]: dict(base, paged_decode_attention=launch.Library(compiler.cache_dir() / b["folder"]))}
    for B, H, Hkv, S in (LONG if only_long else SHAPES + LONG):
        times = {name: [] for name in variants}
        for rep in range(reps):
            for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):
                gc._LIBS = variants[name]
                line = ours(B, H, Hkv, S, sms, splits_list=(0,))[0]
                times[name].append(float(line.split("whole ")[1].split(",")[0]))
        gc._LIBS = base
        tree, other = (statistics.median(t) for t in times.values())
        runs = "; ".join(f"{n} {' '.join(f'{x:.1f}' for x in t)}" for n, t in times.items())
        print(f"B={B} H={H}/{Hkv} S={S}: {runs}; tree / {b['rev']} {tree / other:.3f}", flush=True)


def main():
    import torch

    from msl.cuda import launch

    from . import gpu_common as gc

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(0), sms, "SMs")
    base = gc.libraries()
    variants = {"tree": base}
    if BASELINE.exists():
        b = json.loads(BASELINE.read_text())
        variants[b["rev"]] = dict(base, paged_decode_attention=launch.Library(compiler.cache_dir() / b["folder"]))
    for B, H, Hkv, S in SHAPES:
        print(f"\nB={B} H={H}/{Hkv} S={S} D={D} fp16")
        for name, libs in variants.items():
            gc._LIBS = libs
            print(f"  [{name}] one-threadgroup append dispatch (floor): {floor_us(H, Hkv, sms):.1f} us")
            for line in ours(B, H, Hkv, S, sms):
                print(f"  [{name}] {line}", flush=True)
        gc._LIBS = base
        for line in mlx(B, H, Hkv, S):
            print("  " + line, flush=True)
    for B, H, Hkv, S in LONG:
        print(f"\nB={B} H={H}/{Hkv} S={S} D={D} fp16")
        for name, libs in variants.items():
            gc._LIBS = libs
            for line in ours(B, H, Hkv, S, sms, splits_list=(0,)):
                print(f"  [{name}] {line}", flush=True)
        gc._LIBS = base


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "build":
        build(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "sweep":
        sweep()
    elif len(sys.argv) > 1 and sys.argv[1] == "ab":
        ab(*map(int, sys.argv[2:]))
    elif len(sys.argv) > 1 and sys.argv[1] == "profile":
        profile(*map(int, sys.argv[2:]))
    else:
        main()
