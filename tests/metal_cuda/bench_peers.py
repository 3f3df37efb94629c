"""Decode against the peers on the NVIDIA proxy, in one run: the project's paged decode (planner with this GPU's SM
count, planner with the Apple default, a forced-split sweep, the varlen and flash_attn_func routes), MLX's decode
kernels (M2 Max launch and best block count) and llama.cpp's (ggml-attn launch), all compiled by the same MSL-to-PTX
route (the peers from .calib/, an optional local copy of their kernels and launcher: never part of the project).

    python3 -m tests.metal_cuda.bench_peers [--json PATH]      # GPU machine; carry .cache/metal_cuda and .calib
    python3 -m tests.metal_cuda.bench_peers --zoo [--json PATH]  # the model zoo: real models' H / Hkv / D
                                                                 # (--contexts 256,1000 --batches 1: a subset)

Timing as bench.py and peer_decode.py: a CUDA graph of 20 calls, median of 15 replays. Every output is checked
against SDPA in fp32 first. "x MLX" = t_MLX / t_ours (above 1: ours is faster).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from msl.cuda import launch

from . import bench
from . import gpu_common as gc
from .zoo import ZOO, zoo_rows, zoo_table

ROOT = Path(__file__).resolve().parents[2]
# The peers' launcher lives in .calib/, an optional local copy outside the project: found on its own folder's path.
sys.path.insert(0, str(ROOT / ".calib"))
try:
    import peer_decode as peer  # noqa: E402
except ModuleNotFoundError as e:
    raise SystemExit(f"bench_peers needs {ROOT / '.calib'}: a local copy of the peers' decode kernels and their "
                     f"launcher (peer_decode.py), which the project does not ship ({e})") from e

# Issue 11's rows (and one more): (B, H, Hkv, S, D, dtype).
ROWS = [(4, 16, 16, 50, 128, torch.float16), (1, 32, 8, 16384, 128, torch.float16),
        (32, 32, 8, 2048, 128, torch.float16), (8, 32, 8, 4096, 128, torch.float16),
        (1, 32, 32, 8192, 128, torch.float16), (8, 32, 8, 4096, 64, torch.float16),
        (8, 32, 8, 4096, 256, torch.float16), (1, 32, 8, 16384, 128, torch.bfloat16),
        (1, 32, 16, 8192, 128, torch.float16),  # beyond issue 11's rows: GQA 2 (row tile R = 2)
        # issue 19's rows: GQA 8 and 7 (R = 8), a short single-sequence context, fp32, a large batch
        (4, 64, 8, 8192, 128, torch.float16), (1, 28, 4, 32768, 128, torch.float16),
        (1, 32, 8, 1000, 128, torch.float16), (8, 32, 8, 4096, 128, torch.float32),
        (64, 32, 8, 512, 128, torch.float16)]
SPLITS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def prepared_fn(plan):
    prepared = launch.prepare_plan(gc.libraries(), plan)

    def fn():
        for p in prepared:
            p.launch()
    attn = next(p for p in prepared if p.pipeline.kernel.startswith("paged_decode_") and
                "combine" not in p.pipeline.kernel)
    return fn, attn


def check(out, ref, what, dtype):
    err = ((out.float() - ref).norm() / ref.norm()).item()
    bound = 2e-2 if dtype == torch.bfloat16 else 5e-3
    if not err <= bound:
        raise AssertionError(f"{what}: relative error {err:.3g} against SDPA (bound {bound})")
    return err


def run_row(B, H, Hkv, S, D, dtype, sms):
    r = dict(B=B, H=H, Hkv=Hkv, S=S, D=D, dtype=SHORT[dtype])
    bs = 16
    case = gc.make_paged_case(B, S, H, Hkv, D, dtype, bs, sk_new=0, full_length=True, padded_rows=False, seed=1)
    scale = D ** -0.5
    t = torch.arange(S, device="cuda")
    blk = case.block_table[:, t // bs].long()
    k_c = case.k_cache[blk, t % bs].transpose(1, 2).contiguous()  # [B, Hkv, S, D]
    v_c = case.v_cache[blk, t % bs].transpose(1, 2).contiguous()
    ref = F.scaled_dot_product_attention(case.q.transpose(1, 2).float(), k_c.float(), v_c.float(),
                                         enable_gqa=Hkv != H).transpose(1, 2)  # [B, 1, H, D]

    def paged(num_splits=0, gpu_cores=None):
        out = torch.full_like(case.q, float("nan"))
        plan = gc.plan_paged(case, out, None, scale=scale, window=(-1, 0), num_splits=num_splits, with_new=False,
                             gpu_cores=gpu_cores)
        fn, attn = prepared_fn(plan)
        fn()
        torch.cuda.synchronize()
        check(out, ref, f"paged splits={num_splits}", dtype)
        return bench.time_us(fn), attn

    r["planner_us"], attn = paged(gpu_cores=sms)
    r["planner_splits"], r["kernel"], r["regs"] = attn.grid[0], attn.pipeline.kernel, attn.pipeline.num_regs
    r["apple_us"], attn_apple = paged(gpu_cores=0)
    r["apple_splits"] = attn_apple.grid[0]
    sweep = {}
    for s in SPLITS:
        if s == 1 or s * 16 <= S:
            sweep[s] = paged(num_splits=s)[0]
    r["sweep"] = sweep
    r["best_split"] = min(sweep, key=sweep.get)
    r["best_us"] = sweep[r["best_split"]]

    # flash_attn_varlen_func decode route: packed K/V [B * S, Hkv, D], one query per sequence.
    kp, vp = k_c.transpose(1, 2).reshape(B * S, Hkv, D), v_c.transpose(1, 2).reshape(B * S, Hkv, D)
    qv = case.q.reshape(B, H, D)
    cu_q = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    cu_k = torch.arange(B + 1, dtype=torch.int32, device="cuda") * S
    out_v = torch.full_like(qv, float("nan"))
    plan = gc.planner().plan_varlen_decode(qv, kp, vp, cu_q, cu_k, out_v, None, None, None, scale, 0.0, -1, 0, 0, S,
                                           sms)
    fn, _ = prepared_fn(plan)
    fn()
    torch.cuda.synchronize()
    check(out_v.view(B, 1, H, D), ref, "varlen route", dtype)
    r["varlen_us"] = bench.time_us(fn)
    # flash_attn_func decode route: K/V [B, S, Hkv, D] with transformers' transposed strides, one block per request.
    fa = gc.PagedCase(case.q, k_c.transpose(1, 2), v_c.transpose(1, 2), None,
                      torch.arange(B, dtype=torch.int32, device="cuda").view(B, 1),
                      torch.full((B,), S, dtype=torch.int32, device="cuda"), None, None, [S] * B, S)
    out_f = torch.full_like(case.q, float("nan"))
    fn, _ = prepared_fn(gc.plan_paged(fa, out_f, None, scale=scale, window=(-1, 0), with_new=False, gpu_cores=sms))
    fn()
    torch.cuda.synchronize()
    check(out_f, ref, "flash_attn_func route", dtype)
    r["func_us"] = bench.time_us(fn)

    # Peers.
    dt = SHORT[dtype]
    r["mlx_launch_us"] = peer.time_mlx_decode(B, H, Hkv, S, D, dt)
    r["mlx_blocks"] = peer.describe(peer.mlx_plan(B, H, Hkv, S, D, dt))
    msweep = peer.sweep(B, H, Hkv, S, D, dt)
    r["mlx_best_blocks"] = min(msweep, key=msweep.get)
    r["mlx_best_us"] = min(r["mlx_launch_us"], msweep[r["mlx_best_blocks"]])
    if D == 128 and dtype == torch.float16:
        r["ggml_us"] = peer.time_ggml_decode(B, H, Hkv, S, D, dt)
        r["ggml_kernels_us"] = peer.time_ggml_decode(B, H, Hkv, S, D, dt, kernels_only=True)
    torch.cuda.synchronize()
    return r


MLX_ZOO_BLOCKS = (32, 128, 512)  # with MLX's own launch: its best of these is "MLX best"


def run_zoo_row(name, B, S, dtype, sms):
    H, Hkv, D, opts = ZOO[name]
    softcap = opts.get("softcap", 0.0)
    r = dict(model=name, B=B, H=H, Hkv=Hkv, S=S, D=D, dtype=SHORT[dtype], options=sorted(opts))
    case = gc.make_paged_case(B, S, H, Hkv, D, dtype, 16, sk_new=0, full_length=True, padded_rows=False, seed=1)
    scale = D ** -0.5
    sinks = torch.randn(H, device="cuda") if opts.get("sinks") else None
    ref = gc.reference_attention(case, case.k_cache, case.v_cache, scale=scale, window=(-1, 0), softcap=softcap,
                                 sinks=sinks, dtype=torch.float32)[0]
    out = torch.full_like(case.q, float("nan"))
    plan = gc.plan_paged(case, out, None, scale=scale, window=(-1, 0), softcap=softcap, sinks=sinks, with_new=False,
                         gpu_cores=sms)
    fn, attn = prepared_fn(plan)
    fn()
    torch.cuda.synchronize()
    check(out, ref, f"{name} B={B} S={S}", dtype)
    r["ours_us"], r["splits"], r["kernel"], r["regs"] = bench.time_us(fn), attn.grid[0], attn.pipeline.kernel, \
        attn.pipeline.num_regs
    if r["kernel"].startswith("paged_decode_wide_"):
        # The same call on the other paths (PagedKVCacheAttention::decode_wide = 0), timed alternately with it.
        gc.DECODE_WIDE = 0
        out_other = torch.full_like(case.q, float("nan"))
        fn_other, attn_other = prepared_fn(gc.plan_paged(case, out_other, None, scale=scale, window=(-1, 0),
                                                         softcap=softcap, sinks=sinks, with_new=False, gpu_cores=sms))
        gc.DECODE_WIDE = -1
        fn_other()
        torch.cuda.synchronize()
        check(out_other, ref, f"{name} B={B} S={S} without the wide path", dtype)
        times, times_other = [r["ours_us"]], []
        for _ in range(2):
            times_other.append(bench.time_us(fn_other))
            times.append(bench.time_us(fn))
        r["ours_us"], r["ours_other_us"] = min(times), min(times_other)
        r["other_kernel"], r["other_regs"] = attn_other.pipeline.kernel, attn_other.pipeline.num_regs
    del case, ref, out
    # The same call on a dense cache [B, S, Hkv, D] as flash_attn_func's decode route plans it (transformers'
    # generate(); no block table or lengths): the peers' layout.
    case = gc.make_paged_case(B, S, H, Hkv, D, dtype, S, sk_new=0, full_length=True, padded_rows=False, seed=1)
    ref = gc.reference_attention(case, case.k_cache, case.v_cache, scale=scale, window=(-1, 0), softcap=softcap,
                                 sinks=sinks, dtype=torch.float32)[0]
    rows = case.block_table[:, 0].long()
    k, v = case.k_cache[rows].contiguous(), case.v_cache[rows].contiguous()
    out = torch.full_like(case.q, float("nan"))
    fn, _ = prepared_fn(gc.plan_dense_decode(case.q, k, v, out, scale=scale, softcap=softcap, sinks=sinks,
                                             gpu_cores=sms))
    fn()
    torch.cuda.synchronize()
    check(out, ref, f"{name} B={B} S={S} dense", dtype)
    r["ours_dense_us"] = bench.time_us(fn)
    del case, ref, out, k, v
    dt = SHORT[dtype]
    if D in peer.HEAD_DIMS:
        try:
            r["mlx_launch_us"] = peer.time_mlx_decode(B, H, Hkv, S, D, dt, sinks=sinks is not None)
            blocks = [b for b in MLX_ZOO_BLOCKS if b <= S]
            msweep = peer.sweep(B, H, Hkv, S, D, dt, block_counts=blocks, sinks=sinks is not None) if blocks else {}
            r["mlx_best_us"] = min([r["mlx_launch_us"], *msweep.values()])
        except Exception as e:  # noqa: BLE001 (a peer that cannot run this shape: said in the row)
            r["mlx_error"] = f"{type(e).__name__}: {str(e)[:80]}"
    if D == 128 and dtype == torch.float16:
        r["ggml_us"] = peer.time_ggml_decode(B, H, Hkv, S, D, dt, kernels_only=True)
    peers = [r[k] for k in ("mlx_best_us", "ggml_us") if k in r]
    if peers:
        r["x_best_peer"] = min(peers) / r["ours_us"]
        r["x_best_peer_dense"] = min(peers) / r["ours_dense_us"]
    torch.cuda.empty_cache()
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--rows", default="all", help="comma-separated row indices")
    ap.add_argument("--zoo", action="store_true", help="the model-zoo table instead of the fixed rows")
    ap.add_argument("--contexts", help="zoo: only these comma-separated contexts S")
    ap.add_argument("--batches", help="zoo: only these comma-separated batches B")
    ap.add_argument("--models", help="zoo: only these comma-separated model names (zoo.py's ZOO)")
    a = ap.parse_args()
    dev = torch.cuda.get_device_properties(0)
    sms = dev.multi_processor_count
    print(f"device: {dev.name}, {sms} SMs, torch {torch.__version__}")
    if a.zoo:
        results = []
        contexts = [int(x) for x in a.contexts.split(",")] if a.contexts else None
        batches = [int(x) for x in a.batches.split(",")] if a.batches else None
        models = a.models.split(",") if a.models else None
        for row in zoo_rows():
            if (contexts and row[2] not in contexts) or (batches and row[1] not in batches) or \
                    (models and row[0] not in models):
                continue
            r = run_zoo_row(*row, sms)
            results.append(r)
            print(json.dumps(r), flush=True)
            if a.json:
                Path(a.json).write_text(json.dumps(results, indent=1))
        print("\n" + zoo_table(results))
        return
    rows = ROWS if a.rows == "all" else [ROWS[int(i)] for i in a.rows.split(",")]
    results = []
    for row in rows:
        r = run_row(*row, sms)
        results.append(r)
        print(json.dumps(r), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print("\n| shape | ours, planner (SMs) | ours, best split | ours, Apple default | MLX, M2-Max launch | "
          "MLX, best blocks | llama.cpp kernels (launch) | x MLX planner/launch | x MLX planner/best | "
          "x MLX best/best | x MLX Apple-default/launch | x llama.cpp | planner/best | varlen, func routes | regs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        shape = f"B={r['B']} H={r['H']}/{r['Hkv']} S={r['S']} D={r['D']} {r['dtype']}"
        gg = (f"{r['ggml_kernels_us']:.1f} ({r['ggml_us']:.1f})" if "ggml_us" in r else "-")
        xg = f"{r['ggml_kernels_us'] / r['planner_us']:.2f}" if "ggml_us" in r else "-"
        print(f"| {shape} | {r['planner_us']:.1f} ({r['planner_splits']}) | {r['best_us']:.1f} ({r['best_split']}) | "
              f"{r['apple_us']:.1f} ({r['apple_splits']}) | {r['mlx_launch_us']:.1f} ({r['mlx_blocks']}) | "
              f"{r['mlx_best_us']:.1f} ({r['mlx_best_blocks']}) | {gg} | "
              f"{r['mlx_launch_us'] / r['planner_us']:.2f} | {r['mlx_best_us'] / r['planner_us']:.2f} | "
              f"{r['mlx_best_us'] / r['best_us']:.2f} | {r['mlx_launch_us'] / r['apple_us']:.2f} | {xg} | "
              f"{r['planner_us'] / r['best_us']:.2f} | {r['varlen_us']:.1f}, {r['func_us']:.1f} | {r['regs']} |")
    print("\nsplit sweeps (us):")
    for r in results:
        print(f"  B={r['B']} H={r['H']}/{r['Hkv']} S={r['S']} D={r['D']} {r['dtype']}: " +
              ", ".join(f"{s}: {us:.1f}" for s, us in r["sweep"].items()))


if __name__ == "__main__":
    main()
