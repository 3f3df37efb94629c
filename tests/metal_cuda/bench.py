"""Decode benchmark on an NVIDIA GPU (a proxy, not Apple timings): the project's paged decode, run as the C++
planner plans it (split count included), against torch SDPA on a contiguous cache and gather-then-SDPA.

    python3 -m tests.metal_cuda.bench [--quick]          # RESULTS.md has the command and the figures

Every variant is captured in a CUDA graph (CALLS calls per graph) and timed with CUDA events over REPEATS replays;
the figure is the median per call. GB/s counts the valid K/V bytes only (2 x sum(sk) x Hkv x D x element size): the
floor every method must read. Also prints a split-count sweep, the kernels' registers / local memory, and a
device-to-device copy as the bandwidth ceiling.
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

from msl.cuda import launch

from . import gpu_common as gc

CALLS, REPEATS = 20, 15


def time_us(fn) -> float:
    """Median us per call of fn over REPEATS graph replays of CALLS calls (eager if capture fails)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(CALLS):
                fn()
        run = graph.replay
    except Exception as e:  # noqa: BLE001
        print(f"  (graph capture failed: {e}; timing eagerly)")
        torch.cuda.synchronize()

        def run():
            for _ in range(CALLS):
                fn()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPEATS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / CALLS)
    return statistics.median(times)


def copy_ceiling() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    us = time_us(lambda: y.copy_(x))
    return 2 * x.numel() / us / 1e3  # GB/s, read + write


def paged_callable(case, out, splits=0, with_new=False, target=0):
    plan = gc.plan_paged(case, out, None, scale=case.q.shape[-1] ** -0.5, window=(-1, 0), num_splits=splits,
                         with_new=with_new, target_threadgroups=target)
    prepared = launch.prepare_plan(gc.libraries(), plan)

    def fn():
        for p in prepared:
            p.launch()
    attn = next(p for p in prepared if p.pipeline.kernel.startswith("paged_decode_") and
                "combine" not in p.pipeline.kernel)
    return fn, attn


def check(out, ref, what):
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    if err > 5e-3:
        raise AssertionError(f"{what}: relative error {err:.3g} against SDPA")


def bench_shape(name, B, H, Hkv, D, S, bs, dtype=torch.float16, sweep=False):
    rows = []
    # Attention only: every request has S cached keys (cache_seqlens = S), no new token.
    case = gc.make_paged_case(B, S, H, Hkv, D, dtype, bs, sk_new=0, full_length=True, padded_rows=False, seed=1)
    elsize = torch.finfo(dtype).bits // 8
    kv_bytes = 2 * B * S * Hkv * D * elsize
    out = torch.empty_like(case.q)
    nb = -(-S // bs)  # blocks holding the S keys
    # Contiguous copies of the same keys, [B, Hkv, S, D] (the layout SDPA reads).
    t = torch.arange(S, device="cuda")
    blk = case.block_table[:, t // bs].long()
    k_c = case.k_cache[blk, t % bs].transpose(1, 2).contiguous()
    v_c = case.v_cache[blk, t % bs].transpose(1, 2).contiguous()
    q_sdpa = case.q.transpose(1, 2)  # [B, H, 1, D]
    k_exp, v_exp = k_c.repeat_interleave(H // Hkv, 1), v_c.repeat_interleave(H // Hkv, 1)

    def sdpa_gqa():
        return F.scaled_dot_product_attention(q_sdpa, k_c, v_c, enable_gqa=Hkv != H)

    def sdpa_expanded():
        return F.scaled_dot_product_attention(q_sdpa, k_exp, v_exp)

    def gather_sdpa():
        bt = case.block_table[:, :nb].long()
        kg = case.k_cache[bt].reshape(B, nb * bs, Hkv, D)[:, :S].transpose(1, 2)
        vg = case.v_cache[bt].reshape(B, nb * bs, Hkv, D)[:, :S].transpose(1, 2)
        return F.scaled_dot_product_attention(q_sdpa, kg, vg, enable_gqa=Hkv != H)

    ours, attn = paged_callable(case, out)
    ours()
    torch.cuda.synchronize()
    ref = sdpa_expanded().transpose(1, 2)
    check(out, ref, f"{name}: paged decode")
    check(gather_sdpa().transpose(1, 2), ref, f"{name}: gather-then-SDPA")
    # With the append of one new token (kv_paged_write + attention, as flash_attn_with_kvcache does).
    case_new = gc.make_paged_case(B, S, H, Hkv, D, dtype, bs, sk_new=1, full_length=True, padded_rows=False, seed=2)
    out_new = torch.empty_like(case_new.q)
    ours_new, _ = paged_callable(case_new, out_new, with_new=True)

    # The planner's split target for this GPU instead of the Apple default (160 threadgroups): 4 per SM.
    target = 4 * torch.cuda.get_device_properties(0).multi_processor_count
    ours_dev, attn_dev = paged_callable(case, torch.empty_like(case.q), target=target)

    # flash_attn_func's decode today: the package's varlen kernel on dense q [B, 1, H, D] and k/v [B, S, Hkv, D]
    # views with transformers' transposed strides [S*Hkv*D, D, S*D, 1], read in place (no copy).
    k_t = k_c.transpose(1, 2)  # [B, S, Hkv, D] over the [B, Hkv, S, D] storage
    v_t = v_c.transpose(1, 2)
    out_vl = torch.empty_like(case.q)
    lse_vl = torch.empty(B, H, 1, device="cuda", dtype=torch.float32)
    plan_vl = gc.planner().plan_varlen(case.q, k_t, v_t, out_vl, lse_vl, None, None, None, None, 1,
                                       D ** -0.5, 0.0, -1, 0)
    prepared_vl = launch.prepare_plan(gc.libraries(), plan_vl)

    def varlen_decode():
        for p in prepared_vl:
            p.launch()
    varlen_decode()
    torch.cuda.synchronize()
    check(out_vl, ref, f"{name}: varlen kernel (flash_attn_func decode)")

    t_ours = time_us(ours)
    t_varlen = time_us(varlen_decode)
    t_ours_dev = time_us(ours_dev)
    t_ours_new = time_us(ours_new)
    t_sdpa_gqa = time_us(sdpa_gqa)
    t_sdpa_exp = time_us(sdpa_expanded)
    t_gather = time_us(gather_sdpa)
    t_sdpa = min(t_sdpa_gqa, t_sdpa_exp)
    gbs = lambda us: kv_bytes / us / 1e3  # noqa: E731
    shape = f"B={B} H={H}/{Hkv} D={D} S={S} bs={bs}"
    splits, tgs = attn.grid[0], attn.grid[0] * attn.grid[1] * attn.grid[2]
    dev_label = f"paged decode (target {target} TGs: {attn_dev.grid[0]} splits)"
    for label, us in (("paged decode (planner)", t_ours), (dev_label, t_ours_dev), ("paged append+decode", t_ours_new),
                      ("torch SDPA contiguous (gqa)", t_sdpa_gqa), ("torch SDPA contiguous (expanded)", t_sdpa_exp),
                      ("gather-then-SDPA", t_gather), ("varlen kernel as flash_attn_func decode", t_varlen)):
        rows.append((shape, label, us, gbs(us), t_sdpa / us))
    print(f"{shape}: {attn.pipeline.kernel}, splits {splits}, threadgroups {tgs}, "
          f"decode kernel regs {attn.pipeline.num_regs}, local {attn.pipeline.local_bytes} B, "
          f"shared {attn.pipeline.shared_bytes} B; valid K/V {kv_bytes / 1e6:.1f} MB")
    if sweep:
        for s in (1, 4, 8, 16, 32, 48, 64):
            fn, a = paged_callable(case, torch.empty_like(case.q), splits=s)
            us = time_us(fn)
            rows.append((shape, f"  splits={a.grid[0]} ({a.grid[0] * a.grid[1] * a.grid[2]} TGs)", us, gbs(us),
                         t_sdpa / us))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.cuda.get_device_properties(0)
    print(f"device: {dev.name}, {dev.multi_processor_count} SMs, torch {torch.__version__}")
    print(f"device-to-device copy: {copy_ceiling():.0f} GB/s (read + write)")
    rows = []
    rows += bench_shape("small", 4, 16, 16, 128, 50, 16)
    rows += bench_shape("long", 1, 32, 8, 128, 16384, 16, sweep=not a.quick)
    if not a.quick:
        rows += bench_shape("long-bs256", 1, 32, 8, 128, 16384, 256)
    rows += bench_shape("batch", 32, 32, 8, 128, 2048, 16, sweep=not a.quick)
    print("\n| shape | method | us/call | GB/s (valid K/V) | x torch SDPA |")
    print("|---|---|---:|---:|---:|")
    for shape, label, us, gbs, ratio in rows:
        print(f"| {shape} | {label} | {us:.1f} | {gbs:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
