"""The GPU correctness suite: the project's .metal kernels run on an NVIDIA GPU (the CUDA target of the pre-pass)
against float64 references, at shapes the CPU emulator cannot reach. Skipped without CUDA (CI has none).

    python3 -m pytest tests/metal_cuda/test_gpu.py -q -rs        # on a machine with an NVIDIA GPU (RESULTS.md)

Paged decode runs exactly the dispatches of the project's C++ planner (flash_sdpa/paged_planner.cpp, built as a
torch extension by planner_ext.py): kv_paged_write, paged_decode_attention with the planner's split count, and
paged_decode_combine. Tolerance: FlashAttention's rule max|out - ref| <= 3 max|torch_same_dtype - ref| + 1e-5, and
a relative L2 bound per dtype; the cache must hold exactly the expected bits afterwards (nothing else written).
"""

import math
import struct

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (an NVIDIA GPU): CI has none")]

if torch.cuda.is_available():
    from msl.cuda import launch

    from . import gpu_common as gc

REL_L2 = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
RESULTS = []  # (name, shape, max err, FA baseline, rel L2, splits) printed at the end


@pytest.fixture(scope="module")
def libs():
    return gc.libraries()


def rel_l2(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


# ---- the simdgroup_matrix lowering (msl/README.md, "simdgroup_matrix on tensor cores") -----------------------------
SGM_TYPES = {"half": torch.float16, "bfloat": torch.bfloat16, "float": torch.float32}
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}


@pytest.mark.parametrize("mma", [1, 0, 2])
def test_simdgroup_matrix_lowering(mma):
    """Every lowering: Apple's lane layout through thread_elements(), D = A x B + C for each type combination (one
    fp32 sum per element, rounded once to D's type) and a four-step accumulation, against float64."""
    from . import targets

    lib = launch.Library(targets.load_all(mma, names=["simdgroup_mma"])["simdgroup_mma"])
    m = torch.arange(64, dtype=torch.float32, device="cuda")
    out = torch.full((64,), -1.0, device="cuda")
    lib.dispatch("sgm_layout", (1, 1, 1), (32, 1, 1), buffers={0: m, 1: out})
    want = []
    for lane in range(32):
        qid = lane // 4
        r, c = (qid & 4) + (lane // 2) % 4, (qid & 2) * 2 + (lane % 2) * 2
        want += [r * 8 + c, r * 8 + c + 1]
    assert out.tolist() == want, f"mma={mma}: thread_elements() layout"
    g = torch.Generator(device="cuda").manual_seed(mma)
    for name in [k for k in lib.kernels() if k.startswith("sgm_mac_")]:
        ta, tb, tcd = (SGM_TYPES[t] for t in name.split("_")[2:])
        a = torch.randn(8, 8, generator=g, device="cuda").to(ta)
        bt = torch.randn(8, 8, generator=g, device="cuda").to(tb)  # B transposed in memory
        c = torch.randn(8, 8, generator=g, device="cuda").to(tcd)
        d = torch.full((8, 8), float("nan"), device="cuda", dtype=tcd)
        lib.dispatch(name, (1, 1, 1), (32, 1, 1), buffers={0: a, 1: bt, 2: c, 3: d})
        torch.cuda.synchronize()
        ref = a.double() @ bt.double().T + c.double()
        mag = a.double().abs() @ bt.double().abs().T + c.double().abs()
        err = ((d.double() - ref).abs() / mag).max().item()
        assert err <= 2 * UNIT_ROUNDOFF[tcd] + 1e-6, f"mma={mma} {name}: relative error {err:.3g}"
    for t in ("half", "bfloat", "float"):
        a = torch.randn(8, 32, generator=g, device="cuda").to(SGM_TYPES[t])
        b = torch.randn(32, 8, generator=g, device="cuda").to(SGM_TYPES[t])
        d = torch.full((8, 8), float("nan"), device="cuda")
        lib.dispatch(f"sgm_chain_{t}", (1, 1, 1), (32, 1, 1), buffers={0: a, 1: b, 2: d})
        torch.cuda.synchronize()
        ref = a.double() @ b.double()
        err = ((d.double() - ref).abs() / (a.double().abs() @ b.double().abs())).max().item()
        assert err <= 1e-6, f"mma={mma} sgm_chain_{t}: relative error {err:.3g}"


# ---- the emulator's feature kernels -------------------------------------------------------------------------------


def test_features(libs):
    lib = libs["features"]
    dev = "cuda"
    # builtins
    grid, tpt = (3, 2, 2), (8, 4, 2)
    threads = 64
    out = torch.zeros(12 * threads * 16, dtype=torch.int32, device=dev)
    lib.dispatch("builtins", grid, tpt, buffers={0: out})
    rows = []
    for gz in range(2):
        for gy in range(2):
            for gx in range(3):
                for t in range(threads):
                    lx, ly, lz = t % 8, t // 8 % 4, t // 32
                    rows.append([gx * 8 + lx, gy * 4 + ly, gz * 2 + lz, lx, ly, lz, gx, gy, gz, 24, 8, t, t // 32,
                                 t % 32, 32, 2])
    assert torch.equal(out.view(-1, 16).cpu(), torch.tensor(rows, dtype=torch.int32))
    # vectors
    x = torch.randn(8, 4, device=dev)
    o, oh, bits = torch.zeros(32, 4, device=dev), torch.zeros(8, 4, dtype=torch.half, device=dev), \
        torch.zeros(8, dtype=torch.int32, device=dev)
    lib.dispatch("vectors", (1, 1, 1), (8, 1, 1), buffers={0: x, 1: o, 2: oh, 3: bits})
    o = o.view(8, 4, 4)
    assert torch.equal(o[:, 0], x.flip(1)) and torch.all(o[:, 2] == 2.5)
    assert torch.equal(o[:, 1], torch.stack([x[:, 0], x[:, 1], torch.full_like(x[:, 0], 7.0), x[:, 2]], 1))
    assert torch.equal(oh, x.half()) and torch.equal(bits, x[:, 0].contiguous().view(torch.int32))
    # half / bfloat arithmetic: per-operation rounding, or one fused multiply-add (the GPU may contract a * b + c)
    for dtype, name in ((torch.float16, "half_ops"), (torch.bfloat16, "bfloat_ops")):
        a, b = torch.randn(256, device=dev).to(dtype), torch.randn(256, device=dev).to(dtype)
        r = torch.zeros(256, dtype=dtype, device=dev)
        lib.dispatch(name, (1, 1, 1), (256, 1, 1), buffers={0: a, 1: b, 2: r})
        y = a * b + a
        per_op = y * 0.5 + 1.0
        ulp = torch.finfo(dtype).eps * per_op.float().abs().clamp(min=1)
        assert ((r.float() - per_op.float()).abs() <= 2 * ulp).all(), name
    # math (fast math build): exp exp2 log tanh fma max min clamp select fast::exp precise::exp exp(half)
    x = torch.linspace(-3, 3, 64, device=dev)
    o = torch.zeros(64 * 12, device=dev)
    lib.dispatch("math", (2, 1, 1), (32, 1, 1), buffers={0: x, 1: o})
    o = o.view(64, 12)
    expect = [torch.exp(x), torch.exp2(x), torch.log(x.abs() + 1), torch.tanh(x), x * 2 + 1, x.clamp(min=0.25),
              x.clamp(max=0.25), x.clamp(-0.5, 0.5), x.abs(), torch.exp(x), torch.exp(x)]
    for k, e in enumerate(expect):
        torch.testing.assert_close(o[:, k], e, rtol=2e-6 if k == 10 else 1e-5, atol=1e-6, msg=f"math column {k}")
    torch.testing.assert_close(o[:, 11], torch.exp(x.half()).float(), rtol=1e-3, atol=1e-3)
    # simd collectives, including a reduction among 8 active lanes of a divergent branch
    x = torch.randn(64, device=dev)
    o = torch.zeros(64 * 11, device=dev)
    lib.dispatch("simd_ops", (1, 1, 1), (64, 1, 1), buffers={0: x, 1: o})
    o, xs, lanes = o.view(2, 32, 11), x.view(2, 32), torch.arange(32, device=dev)
    for s in range(2):
        v = xs[s]
        torch.testing.assert_close(o[s, :, 0], v.sum().expand(32), rtol=1e-5, atol=1e-5)
        assert torch.all(o[s, :, 0] == o[s, 0, 0]), "lanes disagree on simd_sum"
        assert torch.all(o[s, :, 1] == v.max()) and torch.all(o[s, :, 2] == v.min())
        assert torch.equal(o[s, :, 3], v[(lanes + 3) % 32]) and torch.equal(o[s, :, 4], v[lanes ^ 5])
        assert torch.equal(o[s, :, 5], torch.where(lanes + 4 < 32, v[(lanes + 4).clamp(max=31)], v))
        assert torch.equal(o[s, :, 6], torch.where(lanes >= 4, v[(lanes - 4).clamp(min=0)], v))
        assert torch.all(o[s, :, 7] == v[7])
        torch.testing.assert_close(o[s, :, 8], v.cumsum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o[s, :, 9], v.cumsum(0) - v, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o[s, :8, 10], v[:8].sum().expand(8), rtol=1e-5, atol=1e-5)
        assert torch.all(o[s, 8:, 10] == 0)
    # threadgroup reduction through [[threadgroup(0)]] memory
    for threads in (32, 96, 256, 1024):
        x = torch.randn(3 * threads, device=dev)
        r = torch.zeros(3, device=dev)
        lib.dispatch("reduce", (3, 1, 1), (threads, 1, 1), buffers={0: x, 1: r}, threadgroup_memory={0: 128})
        torch.testing.assert_close(r, x.view(3, threads).sum(1), rtol=1e-5, atol=1e-4)
    x, r = torch.randn(32, device=dev), torch.zeros(32, device=dev)
    lib.dispatch("simd_exchange_tg", (1, 1, 1), (32, 1, 1), buffers={0: x, 1: r})
    assert torch.equal(r, x[torch.arange(32, device=dev) ^ 1])
    # simdgroup_matrix
    for dtype, name in ((torch.float32, "float"), (torch.float16, "half"), (torch.bfloat16, "bfloat")):
        for transpose in (0, 1):
            a, b, c = (torch.randn(8, 8, device=dev).to(dtype) for _ in range(3))
            r = c.clone()
            lib.dispatch(f"matmul8_{name}", (1, 1, 1), (32, 1, 1), buffers={0: a, 1: b, 2: r},
                         bytes={3: struct.pack("<I", transpose)})
            aa = a.double().T if transpose else a.double()
            ref = aa @ b.double() + c.double()
            tol = 1e-5 if dtype == torch.float32 else ref.abs().max().item() * torch.finfo(dtype).eps
            assert (r.double() - ref).abs().max().item() <= tol, (name, transpose)
    a, b, c = torch.randn(16, 16, device=dev), torch.randn(16, 16, device=dev), torch.zeros(16, 16, device=dev)
    lib.dispatch("matmul_origin", (1, 1, 1), (32, 1, 1), buffers={0: a, 1: b, 2: c})
    torch.testing.assert_close(c[8:, 8:], a[8:, :] @ b[:, 8:], rtol=1e-4, atol=1e-4)
    assert torch.all(c[:8] == 0) and torch.all(c[:, :8] == 0)
    # function constants (two pipelines of one kernel), atomics, limits
    r = torch.zeros(8, device=dev)
    lib.dispatch("function_constants", (1, 1, 1), (8, 1, 1), buffers={0: r},
                 constants={0: True, 1: 2.5, 2: ("int", -3)})
    torch.testing.assert_close(r, torch.arange(8.0, device=dev) * 2.5 - 3)
    lib.dispatch("function_constants", (1, 1, 1), (8, 1, 1), buffers={0: r}, constants={0: False})
    torch.testing.assert_close(r, torch.arange(8.0, device=dev))
    counter, fsum = torch.zeros(1, dtype=torch.int32, device=dev), torch.zeros(1, device=dev)
    per_tg = torch.zeros(4, dtype=torch.int32, device=dev)
    lib.dispatch("atomics", (4, 1, 1), (64, 1, 1), buffers={0: counter, 1: fsum, 2: per_tg})
    assert counter.item() == 256 and fsum.item() == 128.0 and torch.all(per_tg == 63)
    r = torch.zeros(4, device=dev)
    lib.dispatch("limits", (1, 1, 1), (1, 1, 1), buffers={0: r})
    assert r[0] == torch.finfo(torch.float32).max and r[1] == -torch.finfo(torch.float32).max and r[2] == 65504.0
    # a launch above max_total_threads_per_threadgroup is refused (Metal would silently run nothing)
    with pytest.raises(launch.CudaError):
        libs["paged_decode_attention"].prepare("paged_decode_combine_float32", (1, 1, 1), (256, 1, 1))


# ---- paged decode: flash_attn_with_kvcache ------------------------------------------------------------------------

def run_paged(name, B, S, H, Hkv, D, dtype, bs, *, sq=1, sk_new=1, layout="interleaved", window=(-1, 0),
              softcap=0.0, use_alibi=False, use_sinks=False, num_splits=0, seed=0, full_length=False):
    libs = gc.libraries()
    torch.manual_seed(seed)
    case = gc.make_paged_case(B, S, H, Hkv, D, dtype, bs, sq=sq, sk_new=sk_new, layout=layout, seed=seed,
                              full_length=full_length)
    scale = 1.0 if softcap else D ** -0.5
    alibi = (torch.rand(H, device="cuda") * 0.05) if use_alibi else None
    sinks = torch.randn(H, device="cuda") if use_sinks else None
    expect_storage = gc.reference_write(case)
    out = torch.full_like(case.q, float("nan"))
    lse = torch.full((B, H, sq), float("nan"), device="cuda")
    plan = gc.plan_paged(case, out, lse, scale=scale, window=window, softcap=softcap, alibi=alibi, sinks=sinks,
                         num_splits=num_splits)
    launch.run_plan(libs, plan)
    torch.cuda.synchronize()
    attn = next(d for d in plan if d["kernel"].startswith("paged_decode_") and "combine" not in d["kernel"])
    splits = attn["threadgroups"][0]
    # The cache: exactly the expected bits, NaN slots included; nothing outside the written slots changed.
    assert torch.equal(gc.bits(case.storage), gc.bits(expect_storage)), "cache contents differ after the write"
    kw = dict(scale=scale, window=window, softcap=softcap, alibi=alibi, sinks=sinks)
    ref, ref_lse = gc.reference_attention(case, case.k_cache, case.v_cache, **kw)
    same, _ = gc.reference_attention(case, case.k_cache, case.v_cache, dtype=dtype, **kw)
    assert not torch.isnan(out).any(), "unwritten or NaN output"
    err = (out.double() - ref).abs().max().item()
    base = (same.double() - ref).abs().max().item()
    rel = rel_l2(out, ref)
    assert err <= 3 * base + 1e-5, f"{name}: max err {err:.3g} > 3 x {base:.3g} + 1e-5"
    assert rel <= REL_L2[dtype], f"{name}: relative L2 error {rel:.3g} > {REL_L2[dtype]}"
    inf = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), inf), f"{name}: -inf LSE rows differ"
    if (~inf).any():
        lse_err = (lse[~inf].double() - ref_lse[~inf]).abs().max().item()
        assert lse_err <= (2e-4 if dtype == torch.float32 else 2e-2), f"{name}: LSE err {lse_err:.3g}"
    RESULTS.append((name, f"B={B} S={S} H={H}/{Hkv} D={D} {str(dtype)[6:]} bs={bs} sq={sq}", err, base, rel, splits))
    return err, base, rel, splits, attn["kernel"]


DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("bs", [16, 256])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_paged_grid(dtype, group, bs):
    """Every dtype x GQA group x block size at B=8, S=4096 (planner's split count)."""
    run_paged(f"grid-g{group}", 8, 4096, 4 * group, 4, 128, dtype, bs, seed=group * 10 + bs)


@pytest.mark.parametrize("bs", [16, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_paged_long_context(dtype, bs):
    """S = 32768, one request, 32 query / 4 KV heads (GQA 8): the planner splits the keys."""
    run_paged("long-S32k", 1, 32768, 32, 4, 128, dtype, bs, seed=bs, full_length=True)


@pytest.mark.parametrize("dtype,bs,group", [(torch.float16, 256, 4), (torch.bfloat16, 16, 8), (torch.float32, 16, 1)],
                         ids=["fp16-bs256-g4", "bf16-bs16-g8", "fp32-bs16-g1"])
def test_paged_wide_batch(dtype, bs, group):
    """B = 64 requests up to S = 32768 (padding rows included), 8 KV heads."""
    H = 8 * group
    run_paged(f"wide-B64-g{group}", 64, 32768 if group > 1 else 8192, H, 8, 128, dtype, bs, seed=7)


@pytest.mark.parametrize("D", [64, 256, 512])
@pytest.mark.parametrize("splits", [0, 64])
def test_paged_head_dims_and_splits(D, splits):
    run_paged(f"D{D}-splits{splits}", 4, 8192, 16, 2, D, torch.float16, 16, num_splits=splits, seed=D + splits)


@pytest.mark.parametrize("group", [1, 2, 3, 4, 6, 8, 12, 16])
@pytest.mark.parametrize("D,dtype", [(64, torch.float16), (128, torch.float16), (128, torch.bfloat16)],
                         ids=["d64-fp16", "d128-fp16", "d128-bf16"])
def test_paged_wide_path(group, D, dtype):
    """Short one-token splits (the wide path, paged_decode_wide) at every row tile: single sequences of 256 and 1000
    keys (the planner's one- and two-step splits) and a batch of 3 with padding rows, with every option."""
    Hkv = 2
    for S, B, kw in ((256, 1, {}), (1000, 1, dict(use_sinks=True, use_alibi=True)),
                     (300, 3, dict(window=(100, 0), softcap=30.0))):
        kernel = run_paged(f"wide-g{group}-S{S}", B, S, group * Hkv, Hkv, D, dtype, 16, seed=group + S,
                           full_length=B == 1, **kw)[-1]
        assert kernel.startswith("paged_decode_wide_") or B > 1, kernel  # B = 3: splits of up to 3 steps at R = 16


@pytest.mark.parametrize("feature", ["window", "softcap", "sinks", "alibi", "all"])
def test_paged_features_multi_token(feature):
    """sq = 4 new tokens (speculative decode), features on, split and unsplit."""
    kw = dict(window=dict(window=(300, 0)), softcap=dict(softcap=30.0), sinks=dict(use_sinks=True),
              alibi=dict(use_alibi=True), all=dict(window=(1000, 0), softcap=30.0, use_sinks=True,
                                                   use_alibi=True))[feature]
    for splits in (0, 1):
        run_paged(f"feat-{feature}-s{splits}", 3, 4096, 16, 4, 128, torch.bfloat16, 16, sq=4, sk_new=4,
                  num_splits=splits, seed=len(feature), layout="halves", **kw)


# ---- varlen prefill ------------------------------------------------------------------------------------------------

def reference_varlen(q, k, v, cu, scale, causal, dtype):
    H, Hkv = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    lse = torch.full((H, q.shape[0]), -math.inf, dtype=torch.float64, device=q.device)
    for b in range(len(cu) - 1):
        s0, s1 = cu[b], cu[b + 1]
        n = s1 - s0
        qb = q[s0:s1].to(dtype).transpose(0, 1)  # [H, n, D]
        kb = k[s0:s1].to(dtype).repeat_interleave(H // Hkv, 1).transpose(0, 1)
        vb = v[s0:s1].to(dtype).repeat_interleave(H // Hkv, 1).transpose(0, 1)
        s = qb @ kb.transpose(1, 2) * scale
        if causal:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), -math.inf)
        lse[:, s0:s1] = torch.logsumexp(s.double(), -1)
        out[s0:s1] = (torch.softmax(s, -1) @ vb).transpose(0, 1)
    return out, lse


def check_varlen(name, shape, out, lse, q, k, v, cu, scale, causal):
    """A varlen output [T, H, D] and its LSE against float64 (FlashAttention's rule, 3 x torch in the same dtype)."""
    dtype = q.dtype
    ref, ref_lse = reference_varlen(q, k, v, cu, scale, causal, torch.float64)
    same, _ = reference_varlen(q, k, v, cu, scale, causal, dtype)
    assert not torch.isnan(out).any()
    err = (out.double() - ref).abs().max().item()
    base = (same.double() - ref).abs().max().item()
    rel = rel_l2(out, ref)
    assert err <= 3 * base + 1e-5, f"{name}: max err {err:.3g} > 3 x {base:.3g} + 1e-5"
    assert rel <= REL_L2[dtype], f"{name}: relative L2 error {rel:.3g}"
    assert (lse.double() - ref_lse).abs().max().item() <= (1e-4 if dtype == torch.float32 else 2e-2)
    RESULTS.append((name, shape, err, base, rel, 0))


@pytest.mark.parametrize("D", [128, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_varlen_prefill_4096(dtype, D):
    """4096 query tokens in three sequences (1000 + 2000 + 1096), 16 query / 4 KV heads, causal."""
    libs = gc.libraries()
    lens = [1000, 2000, 1096]
    cu = [0, 1000, 3000, 4096]
    H, Hkv = 16, 4
    g = torch.Generator(device="cuda").manual_seed(D)
    q = torch.randn(4096, H, D, generator=g, device="cuda").to(dtype)
    k = torch.randn(4096, Hkv, D, generator=g, device="cuda").to(dtype)
    v = torch.randn(4096, Hkv, D, generator=g, device="cuda").to(dtype)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((H, 4096), float("nan"), device="cuda")
    cu_t = torch.tensor(cu, dtype=torch.int32, device="cuda")
    scale = D ** -0.5
    causal = D == 128
    plan = gc.planner().plan_varlen(q, k, v, out, lse, cu_t, cu_t, None, None, max(lens), scale, 0.0, -1,
                                    0 if causal else -1)
    launch.run_plan(libs, plan)
    torch.cuda.synchronize()
    check_varlen("varlen-4096", f"T=4096 (1000+2000+1096) H={H}/{Hkv} D={D} {str(dtype)[6:]} causal={causal}",
                 out, lse, q, k, v, cu, scale, causal)


@pytest.mark.parametrize("kernel", ["tops", "tops32"])
@pytest.mark.parametrize("dtype,D", [(torch.float16, 64), (torch.bfloat16, 128), (torch.float16, 256),
                                     (torch.bfloat16, 96), (torch.float32, 128)],
                         ids=lambda x: str(x).replace("torch.", ""))
def test_tensor_ops_prefill_4096(kernel, dtype, D):
    """The forward on Metal 4 tensor ops (attention_tensor_ops.h) through the proxy's tensor-op lowering: the routed
    64-row kernel on the planner's tensor-ops plan (D = 256: the D-split kernel) and the 32-row one on the simdgroup
    plan renamed; 4096 tokens in three sequences, 16 query / 4 KV heads, causal."""
    libs = gc.libraries()
    lens = [1000, 2000, 1096]
    cu = [0, 1000, 3000, 4096]
    H, Hkv = 16, 4
    g = torch.Generator(device="cuda").manual_seed(D)
    q, k, v = (torch.randn(4096, h, D, generator=g, device="cuda").to(dtype) for h in (H, Hkv, Hkv))
    out = torch.full_like(q, float("nan"))
    lse = torch.full((H, 4096), float("nan"), device="cuda")
    cu_t = torch.tensor(cu, dtype=torch.int32, device="cuda")
    scale = D ** -0.5
    plan = gc.planner().plan_varlen(q, k, v, out, lse, cu_t, cu_t, None, None, max(lens), scale, 0.0, -1, 0,
                                    tensor_ops=kernel == "tops")
    if kernel == "tops32":
        plan = [dict(d, kernel=d["kernel"].replace("flash_attn_varlen_", "flash_attn_varlen_tops32_", 1)) for d in plan]
    assert all(d["kernel"].startswith(f"flash_attn_varlen_{kernel}_") for d in plan), [d["kernel"] for d in plan]
    launch.run_plan(libs, plan)
    torch.cuda.synchronize()
    check_varlen(f"{kernel}-4096", f"T=4096 (1000+2000+1096) H={H}/{Hkv} D={D} {str(dtype)[6:]} causal", out, lse, q,
                 k, v, cu, scale, True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("D", [128, 512])
def test_paged_varlen_prefill_4096(dtype, D):
    """Paged varlen (flash_attn_varlen_func with block_table): 4096 query tokens in three sequences over their keys in
    a paged cache (block size 16, pages permuted, the first 8 pages shared by every sequence as a cached prefix),
    16 query / 4 KV heads, causal; D = 512 runs the wide kernel."""
    libs = gc.libraries()
    lens = [1000, 2000, 1096]
    H, Hkv, bs = 16, 4, 16
    g = torch.Generator(device="cuda").manual_seed(D + 7)
    blocks = [(n + bs - 1) // bs for n in lens]
    num_blocks = sum(blocks) + 5
    perm = torch.randperm(num_blocks, generator=g, device="cuda").to(torch.int32)
    table = torch.full((3, max(blocks)), -1, dtype=torch.int32, device="cuda")
    used = 0
    for b, nb in enumerate(blocks):
        for j in range(nb):
            if b > 0 and j < 8:
                table[b, j] = table[0, j]
            else:
                table[b, j] = perm[used]
                used += 1
    k_cache = torch.randn(num_blocks, bs, Hkv, D, generator=g, device="cuda").to(dtype)
    v_cache = torch.randn(num_blocks, bs, Hkv, D, generator=g, device="cuda").to(dtype)
    q = torch.randn(sum(lens), H, D, generator=g, device="cuda").to(dtype)
    cu = [0, 1000, 3000, 4096]
    ks, vs = [], []
    for b, n in enumerate(lens):
        t = torch.arange(n, device="cuda")
        ids = table[b, t // bs].long()
        ks.append(k_cache[ids, t % bs])
        vs.append(v_cache[ids, t % bs])
    k, v = torch.cat(ks), torch.cat(vs)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((H, 4096), float("nan"), device="cuda")
    cu_t = torch.tensor(cu, dtype=torch.int32, device="cuda")
    scale = D ** -0.5
    plan = gc.planner().plan_varlen(q, k_cache, v_cache, out, lse, cu_t, cu_t, None, None, max(lens), scale, 0.0, -1,
                                    0, table)
    launch.run_plan(libs, plan)
    torch.cuda.synchronize()
    check_varlen("paged-varlen-4096", f"T=4096 (1000+2000+1096) H={H}/{Hkv} D={D} {str(dtype)[6:]} bs={bs}", out, lse,
                 q, k, v, cu, scale, True)


def _backward_reference(q, k, v, dout, scale, causal, dtype):
    """dq, dk, dv of dense causal attention [B, S, H, D] (GQA by repeat) through torch autograd in `dtype`."""
    group = q.shape[2] // k.shape[2]
    qd, kd, vd = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    qt, kt, vt = qd.transpose(1, 2), kd.transpose(1, 2), vd.transpose(1, 2)
    kt, vt = kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1)
    s = (qt @ kt.transpose(-1, -2)) * scale
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    o = (torch.softmax(s, -1) @ vt).transpose(1, 2)
    o.backward(dout.to(dtype))
    return qd.grad, kd.grad, vd.grad


@pytest.mark.parametrize("S,D", [(4096, 128), (8192, 128), (4096, 512)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_backward_at_scale(dtype, S, D):
    """The FlashAttention-2 backward (attention_backward.metal, the C++ planner's three dispatches) at S = 4096 and
    8192 (D = 128) and S = 4096 (D = 512), B=1, 16 query / 4 KV heads, causal, after the forward kernel: dq, dk, dv
    against float64 autograd (FlashAttention's rule, 2x the error of torch autograd in the same dtype), then timed
    against torch's SDPA backward in the same dtype (CUDA events, median of 10)."""
    libs = gc.libraries()
    B, H, Hkv = 1, 16, 4
    g = torch.Generator(device="cuda").manual_seed(S)
    q, dout = (torch.randn(B, S, H, D, generator=g, device="cuda").to(dtype) for _ in range(2))
    k, v = (torch.randn(B, S, Hkv, D, generator=g, device="cuda").to(dtype) for _ in range(2))
    scale = D ** -0.5
    out = torch.empty_like(q)
    lse = torch.empty(B, H, S, device="cuda")
    launch.run_plan(libs, gc.planner().plan_varlen(q, k, v, out, lse, None, None, None, None, S, scale, 0.0, -1, 0))
    dq, dk, dv = torch.full_like(q, float("nan")), torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    delta, dsinks = torch.empty_like(lse), torch.empty(0, device="cuda")
    plan = gc.planner().plan_backward(dout, q, k, v, out, lse, delta, dq, dk, dv, dsinks, None, None, None, None, S,
                                      S, scale, 0.0, -1, 0)
    prepared = launch.run_plan(libs, plan)
    torch.cuda.synchronize()
    ref = _backward_reference(q, k, v, dout, scale, True, torch.float64)
    same = _backward_reference(q, k, v, dout, scale, True, dtype)
    errs = []
    for name, got, r, pt in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, same):
        assert not torch.isnan(got).any(), name
        err = (got.double() - r).abs().max().item()
        base = (pt.double() - r).abs().max().item()
        assert err <= 2 * base + 1e-5 * max(1.0, r.abs().max().item()), f"{name}: max err {err:.3g} > 2 x {base:.3g}"
        errs.append((err, base))
    del ref, same

    def median_us(fn):
        fn()
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1000)
        return sorted(times)[len(times) // 2]

    ours = median_us(lambda: [p.launch() for p in prepared])
    qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    ot = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True, scale=scale)
    sdpa = median_us(lambda: torch.autograd.grad(ot, (qt, kt, vt), dout.transpose(1, 2), retain_graph=True))
    RESULTS.append(("backward", f"B=1 S={S} H={H}/{Hkv} D={D} {str(dtype)[6:]} causal: ours {ours:.0f} us, "
                    f"SDPA bwd {sdpa:.0f} us", errs[0][0], errs[0][1], 0.0, 0))


def _chunked_backward_reference(q, k, v, dout, scale, block=1024):
    """dq, dk, dv of dense causal attention [1, S, H, D] (GQA) in float32, one block of query rows at a time: the S x S
    matrices never exist whole (S = 32768 would need 64 GB per head in float64)."""
    group = q.shape[2] // k.shape[2]
    S = q.shape[1]
    qf, kf, vf, dof = (t[0].float().transpose(0, 1) for t in (q, k, v, dout))  # [H or Hkv, S, D]
    kf, vf = kf.repeat_interleave(group, 0), vf.repeat_interleave(group, 0)
    dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
    cols = torch.arange(S, device=q.device)
    for i0 in range(0, S, block):
        i1 = min(i0 + block, S)
        keys = i1  # causal: rows < i1 see keys < i1
        s = (qf[:, i0:i1] @ kf[:, :keys].transpose(1, 2)) * scale
        s = s.masked_fill(cols[None, :keys] > torch.arange(i0, i1, device=q.device)[:, None], -math.inf)
        p = torch.softmax(s, -1)
        o = p @ vf[:, :keys]
        dp = dof[:, i0:i1] @ vf[:, :keys].transpose(1, 2)
        ds = p * (dp - (dof[:, i0:i1] * o).sum(-1, keepdim=True))
        dq[:, i0:i1] = (ds @ kf[:, :keys]) * scale
        dk[:, :keys] += (ds.transpose(1, 2) @ qf[:, i0:i1]) * scale
        dv[:, :keys] += p.transpose(1, 2) @ dof[:, i0:i1]
    H, D = dq.shape[0], dq.shape[2]
    dk = dk.view(H // group, group, S, D).sum(1)
    dv = dv.view(H // group, group, S, D).sum(1)
    return [t.transpose(0, 1)[None] for t in (dq, dk, dv)]


def test_backward_32k(libs):
    """The backward at S = 32768 (B=1, 16 / 4 heads, D=128, fp16, causal): ours and torch's SDPA backward in fp16
    against a float32 reference computed in query blocks; ours within 3x torch's error (FlashAttention's rule with a
    float32 reference, whose own error is ~1e-6 of the gradients)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    B, S, H, Hkv, D, dtype = 1, 32768, 16, 4, 128, torch.float16
    g = torch.Generator(device="cuda").manual_seed(32)
    q, dout = (torch.randn(B, S, H, D, generator=g, device="cuda").to(dtype) for _ in range(2))
    k, v = (torch.randn(B, S, Hkv, D, generator=g, device="cuda").to(dtype) for _ in range(2))
    scale = D ** -0.5
    out = torch.empty_like(q)
    lse = torch.empty(B, H, S, device="cuda")
    launch.run_plan(libs, gc.planner().plan_varlen(q, k, v, out, lse, None, None, None, None, S, scale, 0.0, -1, 0))
    dq, dk, dv = torch.full_like(q, float("nan")), torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    delta, dsinks = torch.empty_like(lse), torch.empty(0, device="cuda")
    launch.run_plan(libs, gc.planner().plan_backward(dout, q, k, v, out, lse, delta, dq, dk, dv, dsinks, None, None,
                                                     None, None, S, S, scale, 0.0, -1, 0))
    torch.cuda.synchronize()
    ref = _chunked_backward_reference(q, k, v, dout, scale)
    qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    ot = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True, scale=scale)
    theirs = [t.transpose(1, 2) for t in torch.autograd.grad(ot, (qt, kt, vt), dout.transpose(1, 2))]
    for name, got, r, pt in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, theirs):
        assert not torch.isnan(got).any(), name
        err = (got.float() - r).abs().max().item()
        base = (pt.float() - r).abs().max().item()
        assert err <= 3 * base + 1e-5 * max(1.0, r.abs().max().item()), f"{name}: max err {err:.3g} > 3 x {base:.3g}"
        RESULTS.append(("backward-32k", f"B=1 S={S} H={H}/{Hkv} D={D} fp16 causal {name}", err, base,
                        rel_l2(got, r.double()), 0))


# ---- past 2^31 and 2^32 elements ------------------------------------------------------------------------------------
# Real data at sizes where a 32-bit offset wraps (the addressing is also covered in CI by tests/test_large_tensors.py,
# on the emulator with sparse tensors). At most about 27 GB of GPU memory per test.

TWO_31, TWO_32 = 1 << 31, 1 << 32


def test_large_paged_cache():
    """Decode + append over a paged fp16 cache of more than 2^31 elements per K and per V (their one interleaved
    buffer past 2^32), 17 requests of 128K keys, 32 query / 8 KV heads, the planner's splits."""
    B, S, H, Hkv, D, bs = 17, 131072, 32, 8, 128, 256
    assert B * (S // bs) * bs * Hkv * D > TWO_31
    run_paged("large-paged-cache", B, S, H, Hkv, D, torch.float16, bs, full_length=True)


def _dense_reference(q, k, v, scale, dtype):
    """One non-causal sequence, q [n, H, D], k/v [m, Hkv, D]: (out [n, H, D], lse [H, n] float64) in `dtype`."""
    group = q.shape[1] // k.shape[1]
    qt = q.to(dtype).transpose(0, 1)
    kt, vt = (t.to(dtype).repeat_interleave(group, 1).transpose(0, 1) for t in (k, v))
    s = qt @ kt.transpose(1, 2) * scale
    return (torch.softmax(s, -1) @ vt).transpose(0, 1), torch.logsumexp(s.double(), -1)


def _check_rule(name, got, ref, same, k=3):
    err = (got.double() - ref.double()).abs().max().item()
    base = (same.double() - ref.double()).abs().max().item()
    assert err <= k * base + 1e-5, f"{name}: max err {err:.3g} > {k} x {base:.3g} + 1e-5"
    return err, base


@pytest.mark.parametrize("long_side", ["queries", "keys"])
def test_large_varlen_forward_and_backward(long_side):
    """Varlen forward + backward, 16 heads, D=128, fp16, non-causal, where the query side (q, out, dout, dq) or the
    key side (k, v, dk, dv) has more than 2^31 elements: 1040 sequences of 1024 queries and 64 keys, or 256 sequences
    of 16 queries and 4160 keys. The first, a middle and the last two sequences are checked (forward, LSE, dq, dk,
    dv), the last ones past 2^31."""
    libs = gc.libraries()
    H, D, dtype = 16, 128, torch.float16
    seqs, n_q, n_k = (1040, 1024, 64) if long_side == "queries" else (256, 16, 4160)
    tq, tk = seqs * n_q, seqs * n_k
    assert max(tq, tk) * H * D > TWO_31
    g = torch.Generator(device="cuda").manual_seed(31)
    q, dout = (torch.randn(tq, H, D, generator=g, device="cuda").to(dtype) for _ in range(2))
    k, v = (torch.randn(tk, H, D, generator=g, device="cuda").to(dtype) for _ in range(2))
    cu_q = torch.arange(0, tq + 1, n_q, dtype=torch.int32, device="cuda")
    cu_k = torch.arange(0, tk + 1, n_k, dtype=torch.int32, device="cuda")
    scale = D ** -0.5
    out = torch.full_like(q, float("nan"))
    lse = torch.full((H, tq), float("nan"), device="cuda")
    launch.run_plan(libs, gc.planner().plan_varlen(q, k, v, out, lse, cu_q, cu_k, None, None, n_q, scale, 0.0, -1,
                                                   -1))
    dq, dk, dv = torch.full_like(q, float("nan")), torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    delta, dsinks = torch.empty_like(lse), torch.empty(0, device="cuda")
    launch.run_plan(libs, gc.planner().plan_backward(dout, q, k, v, out, lse, delta, dq, dk, dv, dsinks, cu_q, cu_k,
                                                     None, None, n_q, n_k, scale, 0.0, -1, -1))
    torch.cuda.synchronize()
    for b in (0, seqs // 2, seqs - 2, seqs - 1):
        rq, rk = slice(b * n_q, (b + 1) * n_q), slice(b * n_k, (b + 1) * n_k)
        ref, ref_lse = _dense_reference(q[rq], k[rk], v[rk], scale, torch.float64)
        same, _ = _dense_reference(q[rq], k[rk], v[rk], scale, dtype)
        err, base = _check_rule(f"out of sequence {b}", out[rq], ref, same)
        assert (lse[:, rq].double() - ref_lse).abs().max().item() <= 2e-2, f"lse of sequence {b}"
        grads = [_backward_reference(q[None, rq], k[None, rk], v[None, rk], dout[None, rq], scale, False, t)
                 for t in (torch.float64, dtype)]
        for name, got, r, pt in zip(("dq", "dk", "dv"), (dq[rq], dk[rk], dv[rk]), grads[0], grads[1]):
            _check_rule(f"{name} of sequence {b}", got, r[0], pt[0])
    RESULTS.append((f"large-varlen-{long_side}", f"{seqs} x ({n_q} q, {n_k} k) H={H} D={D} fp16, fwd + bwd", err,
                    base, 0.0, 0))


def test_large_score_count():
    """Dense forward with B x H x Sq x Sk past 2^32 (1 x 80 x 8192 x 8192, 8 KV heads, D=64, fp16, non-causal): the
    first and last heads checked against float64 with their LSE."""
    libs = gc.libraries()
    B, S, H, Hkv, D, dtype = 1, 8192, 80, 8, 64, torch.float16
    assert B * H * S * S > TWO_32
    g = torch.Generator(device="cuda").manual_seed(32)
    q = torch.randn(B, S, H, D, generator=g, device="cuda").to(dtype)
    k, v = (torch.randn(B, S, Hkv, D, generator=g, device="cuda").to(dtype) for _ in range(2))
    out = torch.full_like(q, float("nan"))
    lse = torch.full((B, H, S), float("nan"), device="cuda")
    scale = D ** -0.5
    launch.run_plan(libs, gc.planner().plan_varlen(q, k, v, out, lse, None, None, None, None, S, scale, 0.0, -1, -1))
    torch.cuda.synchronize()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    for h in (0, H - 1):
        kv = h // (H // Hkv)
        heads = slice(h, h + 1)
        ref, ref_lse = _dense_reference(q[0, :, heads], k[0, :, kv:kv + 1], v[0, :, kv:kv + 1], scale, torch.float64)
        same, _ = _dense_reference(q[0, :, heads], k[0, :, kv:kv + 1], v[0, :, kv:kv + 1], scale, dtype)
        err, base = _check_rule(f"head {h}", out[0, :, heads], ref, same, k=2)
        assert (lse[0, h].double() - ref_lse[0]).abs().max().item() <= 2e-2, f"lse of head {h}"
    RESULTS.append(("large-score-count", f"B={B} S={S} H={H}/{Hkv} D={D} fp16 (5.4e9 scores)", err, base, 0.0, 0))


def test_prefill_128k():
    """A 128K-token causal prefill (B=1, 4 query / 1 KV heads, D=128, fp16) as the planner splits it into command
    buffers (varlen_planner.h: macOS terminates a command buffer that runs too long): several dispatches, each marked
    for a commit, the output and LSE of 64 rows spread over the prompt checked against float64 (FlashAttention's
    rule), and the longest dispatch's proxy time reported (NVIDIA time, not Apple's)."""
    libs = gc.libraries()
    S, H, Hkv, D, dtype = 131072, 4, 1, 128, torch.float16
    g = torch.Generator(device="cuda").manual_seed(128)
    q = torch.randn(S, H, D, generator=g, device="cuda").to(dtype)
    k, v = (torch.randn(S, Hkv, D, generator=g, device="cuda").to(dtype) for _ in range(2))
    cu = torch.tensor([0, S], dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))
    lse = torch.full((H, S), float("nan"), device="cuda")
    scale = D**-0.5
    plan = gc.planner().plan_varlen(q, k, v, out, lse, cu, cu, None, None, S, scale, 0.0, -1, 0)
    assert len(plan) > 1 and all(d["commit_after"] for d in plan), "a 128K prefill must be split"
    prepared = launch.prepare_plan(libs, plan)
    times = []
    for p in prepared:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        p.launch()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    longest_ms = max(a.elapsed_time(b) for a, b in times)
    rows = torch.linspace(0, S - 1, 64, device="cuda").long()
    errs = []
    for dt in (torch.float64, dtype):
        got = []
        for r in rows.tolist():
            s = (q[r].to(dt) @ k[: r + 1, 0].to(dt).T) * scale  # [H, r + 1]
            got.append((torch.softmax(s, -1) @ v[: r + 1, 0].to(dt), torch.logsumexp(s.double(), -1)))
        errs.append(got)
    err, base = _check_rule("128K rows", out[rows], torch.stack([o for o, _ in errs[0]]),
                            torch.stack([o for o, _ in errs[1]]), k=2)
    lse_ref = torch.stack([lr for _, lr in errs[0]], 1)
    assert (lse[:, rows].double() - lse_ref).abs().max().item() <= 2e-2
    RESULTS.append(("prefill-128k", f"S={S} H={H}/{Hkv} D={D} fp16 causal: {len(plan)} dispatches, longest "
                    f"{longest_ms:.0f} ms (proxy)", err, base, 0.0, len(plan)))


def test_zz_summary():
    print("\nGPU suite results (max|err|, FA baseline = max|torch same dtype - ref|, rel L2, splits):")
    for name, shape, err, base, rel, splits in RESULTS:
        print(f"  {name:22s} {shape:58s} err {err:.2e} base {base:.2e} relL2 {rel:.2e} splits {splits}")
