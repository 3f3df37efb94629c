"""Backward benchmark on an NVIDIA GPU (a proxy, not Apple timings): issue 22's table. Per row: our forward (the
varlen kernel in dense mode), our backward (the planner's three dispatches), their ratio; torch's own flash forward and
backward (SDPA, flash backend; memory-efficient where flash does not take the head dim) and their ratio; our ratio /
theirs (the figure that carries to Apple: the issue asks for <= 1.25); peak scratch bytes of each backward.

    python3 -m tests.metal_cuda.bench_backward [--quick] [--S 1024,4096] [--D 64,128] [--heads 16/4] [--dtype bf16]
                                               [--causal false] [--tops] [--json PATH]

--tops also times our backward on the tensor-ops plan (attention_backward_tensor_ops.h, targets.py's
attention_tensor_ops: the planner's plan with tensor_ops on) beside the simdgroup one: columns "ours bwd tops us" and
"tops / simdgroup", its gradients checked first against the simdgroup backward's (relative L2 < 2e-2, else the run
stops) and reported against torch's; head dims the tensor-ops library does not serve (512) print n/a.

Grid: causal and not, S = 1024, 4096, 16384, H/Hkv = 16/4 and 32/32, D = 64, 128, 256 (512 at S <= 4096), fp16 and
bf16, B = 1. Timing: CUDA graphs of several calls, the median of a few replays (median_us); torch's backward is its
forward + backward less its forward (autograd's streams: see theirs); a row whose torch figures were timed eagerly
(capture failed) says so. A correctness check per row: ours against torch's backward in the same dtype (relative L2
of dq, dk, dv; the float64 check is test_gpu.py's). Our scratch is the delta buffer (B x H x S floats; the planner
allocates nothing else); torch's is its peak allocation during the backward beyond the gradients it returns.
"""

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from msl.cuda import launch

from . import gpu_common as gc

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # older torch: no backend selection, SDPA picks
    SDPBackend = sdpa_kernel = None


def grid(quick: bool):
    for causal in (True, False):
        for S in (1024, 4096, 16384):
            for H, Hkv in ((16, 4), (32, 32)):
                for D in (64, 128, 256, 512):
                    if D == 512 and S > 4096:
                        continue
                    for dtype in (torch.float16, torch.bfloat16):
                        if quick and (S > 4096 or dtype == torch.bfloat16 or (H, Hkv) == (32, 32)):
                            continue
                        yield causal, S, H, Hkv, D, dtype


EAGER_TIMED = []  # the functions median_us timed eagerly (capture failed): bench_row flags their rows


def median_us(fn, target_ms: float = 50.0) -> float:
    """Median microseconds per call: a CUDA graph of N calls (N so that a replay takes about target_ms, at most 50),
    replayed 5 times (3 when a call takes over 100 ms). Graphs, not events around single calls: at 1024 tokens a torch
    SDPA call is tens of microseconds of GPU work behind more of Python and autograd, which events around one call
    would time instead. Warm-up on a side stream, as torch asks before capturing autograd. Eager events if capture
    fails (printed)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    one_ms = a.elapsed_time(b)
    n = max(1, min(50, int(target_ms / max(one_ms, 1e-3))))
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(n):
                fn()
        run = graph.replay
    except Exception as e:  # noqa: BLE001
        print(f"  (graph capture failed: {type(e).__name__}: {e}; timing eagerly)", flush=True)
        EAGER_TIMED.append(fn)
        torch.cuda.synchronize()

        def run():
            for _ in range(n):
                fn()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(5 if one_ms < 100.0 else 3):
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / n)
    del graph
    return statistics.median(times)


def ours(q, k, v, dout, scale, causal, tops=False):
    """Prepared forward and backward plans; returns (forward fn, backward fn, (dq, dk, dv), scratch bytes). tops: the
    forward's and the backward's tensor-ops plans (None when the library does not serve the dtype and head dim)."""
    B, S, H, D = q.shape
    right = 0 if causal else -1
    out = torch.empty_like(q)
    lse = torch.empty(B, H, S, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count  # the command-buffer budget's device
    fwd_plan = gc.planner().plan_varlen(q, k, v, out, lse, None, None, None, None, S, scale, 0.0, -1, right,
                                        gpu_cores=sms, tensor_ops=tops)
    if tops and not all("_tops_" in d["kernel"] for d in fwd_plan):
        return None
    fwd = launch.prepare_plan(gc.libraries(), fwd_plan)
    for p in fwd:
        p.launch()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta, dsinks = torch.empty_like(lse), torch.empty(0, device="cuda")
    bwd_plan = gc.planner().plan_backward(dout, q, k, v, out, lse, delta, dq, dk, dv, dsinks, None, None, None, None,
                                          S, S, scale, 0.0, -1, right, gpu_cores=sms, tensor_ops=tops)
    if tops and not all("_tops_" in d["kernel"] for d in bwd_plan[1:]):
        return None
    bwd = launch.prepare_plan(gc.libraries(), bwd_plan)

    def run(plan):
        def fn():
            for p in plan:
                p.launch()
        fn.prepared = plan  # --dispatches
        return fn
    return run(fwd), run(bwd), (dq, dk, dv), delta.numel() * delta.element_size()


def theirs(q, k, v, dout, scale, causal):
    """torch SDPA forward and backward on [B, H, S, D] (K/V expanded to H heads when flash lacks GQA); returns
    (forward fn, backward fn, forward + backward fn, grads fn, backend name) or None when no fused backend takes the
    shape."""
    group = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2).detach().requires_grad_()
    kt = k.transpose(1, 2).repeat_interleave(group, 1).detach().requires_grad_()
    vt = v.transpose(1, 2).repeat_interleave(group, 1).detach().requires_grad_()
    dot = dout.transpose(1, 2)
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        backend = getattr(SDPBackend, name) if SDPBackend is not None else None

        def attend(a, b, c, backend=backend):
            if backend is None:
                return F.scaled_dot_product_attention(a, b, c, is_causal=causal, scale=scale)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(a, b, c, is_causal=causal, scale=scale)

        def fwd(attend=attend):
            return attend(qt, kt, vt)
        try:
            out = fwd()
            grads = torch.autograd.grad(out, (qt, kt, vt), dot, retain_graph=True)
        except RuntimeError:
            continue
        del grads

        def bwd(out=out):
            return torch.autograd.grad(out, (qt, kt, vt), dot, retain_graph=True)

        # Timed as forward + backward less the forward: autograd runs a backward on its forward's stream, so the
        # backward alone of an output made outside a graph cannot be captured in one. Fresh leaves per call: with
        # the leaves above, whose gradient nodes the eager calls made on another stream, autograd warned of the
        # stream mismatch and the capture was invalidated (the first row of each run, 2026-12-06).
        def fwd_bwd(attend=attend):
            leaves = [x.detach().requires_grad_() for x in (qt, kt, vt)]
            return torch.autograd.grad(attend(*leaves), leaves, dot)

        def grads_gqa(bwd=bwd):  # dk, dv summed over each KV head's group, as ours
            gq, gk, gv = bwd()
            B, H, S, D = gk.shape
            sum_group = lambda g: g.view(B, H // group, group, S, D).sum(2).transpose(1, 2)  # noqa: E731
            return gq.transpose(1, 2), sum_group(gk), sum_group(gv)
        return fwd, bwd, fwd_bwd, grads_gqa, name.lower()
    return None


def rel_l2(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def bench_row(causal, S, H, Hkv, D, dtype):
    g = torch.Generator(device="cuda").manual_seed(S + D)
    q, dout = (torch.randn(1, S, H, D, generator=g, device="cuda").to(dtype) for _ in range(2))
    k, v = (torch.randn(1, S, Hkv, D, generator=g, device="cuda").to(dtype) for _ in range(2))
    scale = D ** -0.5
    row = dict(causal=causal, S=S, H=H, Hkv=Hkv, D=D, dtype=str(dtype)[6:])
    fwd, bwd, grads, scratch = ours(q, k, v, dout, scale, causal)
    bwd()
    torch.cuda.synchronize()
    row["fwd_us"], row["bwd_us"] = median_us(fwd), median_us(bwd)
    row["ratio"] = row["bwd_us"] / row["fwd_us"]
    if DISPATCHES:  # each backward dispatch alone (its inputs are the call's; it rewrites the same outputs)
        row["dispatches"] = [(p.pipeline.kernel, list(p.grid), round(median_us(p.launch), 1), p.pipeline.num_regs)
                             for p in bwd.prepared]
    row["scratch_bytes"] = scratch
    if TOPS:
        row.update(bench_tops(q, k, v, dout, scale, causal, grads))
    t = theirs(q, k, v, dout, scale, causal)
    if t is not None:
        t_fwd, t_bwd, t_fwd_bwd, t_grads, backend = t
        for name, mine, ref in zip(("dq", "dk", "dv"), grads, t_grads()):
            row[f"relL2_{name}"] = rel_l2(mine, ref)
        if "tops_grads" in row:
            for name, mine, ref in zip(("dq", "dk", "dv"), row["tops_grads"], t_grads()):
                row[f"tops_relL2_{name}"] = rel_l2(mine, ref)
        row["torch_backend"] = backend
        EAGER_TIMED.clear()
        row["torch_fwd_us"] = median_us(t_fwd)
        row["torch_bwd_us"] = median_us(t_fwd_bwd) - row["torch_fwd_us"]
        if EAGER_TIMED:  # host time in torch's figures: its ratio is not comparable
            row["torch_timed_eagerly"] = True
        row["torch_ratio"] = row["torch_bwd_us"] / row["torch_fwd_us"]
        row["ratio_of_ratios"] = row["ratio"] / row["torch_ratio"]
        if "tops_ratio" in row:
            row["tops_ratio_of_ratios"] = row["tops_ratio"] / row["torch_ratio"]
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out_grads = t_bwd()
        torch.cuda.synchronize()
        returned = sum(x.numel() * x.element_size() for x in out_grads)
        row["torch_scratch_bytes"] = torch.cuda.max_memory_allocated() - before - returned
        del out_grads
    row.pop("tops_grads", None)
    if "tops_bwd_us" in row:
        row["tops_over_simd"] = row["tops_bwd_us"] / row["bwd_us"]
    return row


TOPS = False  # --tops
DISPATCHES = False  # --dispatches


def bench_tops(q, k, v, dout, scale, causal, simd_grads):
    """Our backward on the tensor-ops plan: its gradients checked first (relative L2 against the simdgroup backward's;
    against torch's in bench_row), then timed. {} where the library does not serve the shape."""
    made = ours(q, k, v, dout, scale, causal, tops=True)
    if made is None:
        return {}
    fwd, bwd, grads, _ = made
    bwd()
    torch.cuda.synchronize()
    row = {}
    for name, mine, simd in zip(("dq", "dk", "dv"), grads, simd_grads):
        err = rel_l2(mine, simd)
        assert err < 2e-2, f"tensor-ops backward: {name} relative L2 {err:.3g} against the simdgroup backward's"
        row[f"tops_relL2_simd_{name}"] = err
    row["tops_grads"] = grads
    row["tops_fwd_us"], row["tops_bwd_us"] = median_us(fwd), median_us(bwd)
    row["tops_ratio"] = row["tops_bwd_us"] / row["tops_fwd_us"]
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fp16, 16/4 heads, S <= 4096 only")
    ap.add_argument("--S", default="", help="comma-separated sequence lengths to keep")
    ap.add_argument("--D", default="", help="comma-separated head dims to keep")
    ap.add_argument("--heads", default="", help="comma-separated H/Hkv to keep, e.g. 16/4,32/32")
    ap.add_argument("--dtype", default="", help="comma-separated dtypes to keep: fp16, bf16")
    ap.add_argument("--causal", choices=("true", "false"), help="only the causal rows, or only the others")
    ap.add_argument("--tops", action="store_true", help="also time our backward on Metal 4 tensor ops (the "
                    "planner's tensor-ops plan: attention_backward_tensor_ops.h) beside the simdgroup one")
    ap.add_argument("--dispatches", action="store_true", help="also time each dispatch of our backward alone "
                    "(printed under its row)")
    ap.add_argument("--json", default="", help="also write the rows to this file (rewritten after every row, so a "
                    "command cut by its time limit keeps what it measured)")
    a = ap.parse_args()
    keep_s = {int(x) for x in a.S.split(",") if x}
    keep_d = {int(x) for x in a.D.split(",") if x}
    keep_heads = {tuple(int(n) for n in x.split("/")) for x in a.heads.split(",") if x}
    keep_dtype = {{"fp16": torch.float16, "bf16": torch.bfloat16}[x] for x in a.dtype.split(",") if x}
    global TOPS, DISPATCHES
    TOPS = a.tops
    DISPATCHES = a.dispatches
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.cuda.get_device_properties(0)
    print(f"device: {dev.name}, {dev.multi_processor_count} SMs, torch {torch.__version__}")
    tops_head = (" ours fwd tops us | ours bwd tops us | tops bwd/fwd | tops / torch ratio | tops bwd / simdgroup bwd "
                 "| tops relL2 dq/dk/dv |" if a.tops else "")
    print("| causal | S | H/Hkv | D | dtype | ours fwd us | ours bwd us | bwd/fwd | torch fwd us | torch bwd us | "
          "bwd/fwd | ours / torch ratio | scratch B (ours) | scratch B (torch) | relL2 dq/dk/dv |" + tops_head)
    print("|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|" +
          ("---:|---:|---:|---:|---:|---|" if a.tops else ""))
    rows = []
    for causal, S, H, Hkv, D, dtype in grid(a.quick):
        if ((keep_s and S not in keep_s) or (keep_d and D not in keep_d) or (keep_heads and (H, Hkv) not in keep_heads)
                or (keep_dtype and dtype not in keep_dtype) or (a.causal and causal != (a.causal == "true"))):
            continue
        r = bench_row(causal, S, H, Hkv, D, dtype)
        rows.append(r)
        t = lambda key, f="{:.0f}": f.format(r[key]) if key in r else "n/a"  # noqa: E731
        errs = "/".join(t(f"relL2_{n}", "{:.1e}") for n in ("dq", "dk", "dv"))
        eager = " (torch eager)" if r.get("torch_timed_eagerly") else ""
        print(f"| {causal} | {S} | {H}/{Hkv} | {D} | {r['dtype']} | {t('fwd_us')} | {t('bwd_us')} | "
              f"{t('ratio', '{:.2f}')} | {t('torch_fwd_us')} | {t('torch_bwd_us')} | {t('torch_ratio', '{:.2f}')} | "
              f"{t('ratio_of_ratios', '{:.2f}')}{eager} | {r['scratch_bytes']} | {t('torch_scratch_bytes')} | "
              f"{errs} |" +
              (f" {t('tops_fwd_us')} | {t('tops_bwd_us')} | {t('tops_ratio', '{:.2f}')} | "
               f"{t('tops_ratio_of_ratios', '{:.2f}')} | {t('tops_over_simd', '{:.2f}')} | "
               + "/".join(t(f"tops_relL2_{n}", "{:.1e}") for n in ("dq", "dk", "dv")) + " |" if a.tops else ""),
              flush=True)
        for kernel, grid_, us, regs in r.get("dispatches", []):
            print(f"  {kernel} grid {tuple(grid_)} ({regs} registers): {us} us alone", flush=True)
        torch.cuda.empty_cache()
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
