"""The FlashAttention-2 backward of flash_attn_varlen_func and flash_attn_func against float64 autograd.

Tolerance: FlashAttention-2's rule per gradient, max|dx - dx_ref| <= 2 * max|dx_pt - dx_ref| + floor, where dx_ref is
torch autograd through tests/reference.py's math in float64 and dx_pt the same in the input dtype; floor =
1e-5 * max(1, max|dx_ref|) (fp32 inputs: both errors are ~1e-6). Gradients for q, k, v and s_aux (sinks); the
ALiBi slopes get none (as in FlashAttention-2).
"""

import itertools

import pytest
import reference as ref
import torch
from test_varlen import DTYPES, HEAD_DIMS, HEADS, LAYOUTS, WIDE_HEAD_DIMS, WINDOWS, extras, make_inputs, misalign

FEATURES = [
    dict(causal=True),
    dict(window=(6, 3)),
    dict(window=(0, 0)),
    dict(causal=True, window=(6, -1)),
    dict(softcap=2.0),
    dict(sinks=True),
    dict(alibi=True),
    dict(causal=True, window=(6, 3), softcap=2.0, sinks=True, alibi=True),
]


def feature_id(f):
    return "+".join(f"{k}={v}" for k, v in f.items())


def check_grad(g, g_ref, g_pt, what):
    """FlashAttention-2's rule with a floor relative to the gradient's size. Returns max|g - g_ref|."""
    assert g is not None, f"{what}: no gradient"
    assert g.shape == g_ref.shape, f"{what}: shape {tuple(g.shape)} != {tuple(g_ref.shape)}"
    if g.numel() == 0:
        return 0.0
    assert torch.isfinite(g).all(), f"{what}: non-finite gradient"
    err = (g.double().cpu() - g_ref).abs().max().item()
    base = (g_pt.double() - g_ref).abs().max().item()
    floor = 1e-5 * max(1.0, g_ref.abs().max().item())
    assert err <= 2 * base + floor, f"{what}: max error {err:.3g} > 2 * {base:.3g} + {floor:.3g} (torch in the dtype)"
    return err


def leaf(t, dtype=None):
    return t.detach().clone().to(dtype or t.dtype).requires_grad_()


def reference_grads(fn, tensors, dout, dtype):
    """Runs fn(*leaves) in `dtype` on the CPU (None entries stay None) and returns (out, [grads])."""
    leaves = [None if t is None else leaf(t.cpu(), dtype) for t in tensors]
    out = fn(*leaves)
    out.backward(dout.cpu().to(dtype))
    return out, [None if t is None else t.grad for t in leaves]


def run_varlen_backward(kernel, device, dtype, head_dim, heads, layout, causal=False, window=(-1, -1), softcap=0.0,
                        alibi=False, sinks=False, seed=0, max_seqlen_q=None, sink_dtype=torch.float32):
    """flash_attn_varlen_func forward + backward on one case; checks out, dq, dk, dv (and ds_aux). Returns grads."""
    h, hkv = HEADS[heads] if isinstance(heads, str) else heads
    lq, lk, pad = LAYOUTS[layout] if isinstance(layout, str) else layout
    q, k, v, cu_q, cu_k = make_inputs(lq, lk, h, hkv, head_dim, dtype, device, pad, seed)
    slopes, s_aux = extras(h, alibi, sinks, device)
    s_aux = None if s_aux is None else s_aux.to(sink_dtype)  # the values the kernel sees (float32 inside)
    g = torch.Generator().manual_seed(seed + 7)
    dout = torch.randn(q.shape, generator=g).to(dtype).to(device)
    scale = head_dim**-0.5
    ql, kl, vl = leaf(q), leaf(k), leaf(v)
    sl = None if s_aux is None else leaf(s_aux)
    out = kernel.flash_attn_varlen_func(ql, kl, vl, cu_q, cu_k, max(lq) if max_seqlen_q is None else max_seqlen_q,
                                        max(lk), softmax_scale=scale, causal=causal, window_size=window,
                                        softcap=softcap, alibi_slopes=slopes, s_aux=sl)
    out.backward(dout)

    cq, ck = cu_q.tolist(), cu_k.tolist()
    kw = dict(scale=scale, causal=causal, window=window, softcap=softcap,
              alibi_slopes=None if slopes is None else slopes.cpu())

    def fn(dt):
        return lambda q, k, v, s: ref.attention_varlen(q, k, v, cq, ck, sinks=s, dtype=dt, **kw)[0]

    out_ref, grads_ref = reference_grads(fn(torch.float64), (q, k, v, s_aux), dout, torch.float64)
    out_pt, grads_pt = reference_grads(fn(dtype), (q, k, v, s_aux), dout, dtype)
    check_grad(out.detach(), out_ref.detach(), out_pt.detach(), "out")
    mine = (ql.grad, kl.grad, vl.grad, None if sl is None else sl.grad)
    for name, gm, gr, gp in zip(("dq", "dk", "dv"), mine, grads_ref, grads_pt):
        check_grad(gm, gr, gp, name)
    if sl is not None:
        assert sl.grad.dtype == sink_dtype
        if sink_dtype == torch.float32:
            check_grad(sl.grad, grads_ref[3], grads_pt[3], "ds_aux")
        else:  # computed in float32, rounded once to the dtype of s_aux
            torch.testing.assert_close(sl.grad.cpu().double(), grads_ref[3], atol=1e-5, rtol=2 ** -7)
    return mine


def ci_if(cond, *values):
    """pytest.param(*values), marked kernels_ci when cond holds (the quick kernels_ci subset: a grid diagonal)."""
    return pytest.param(*values, marks=[pytest.mark.kernels_ci] if cond else [])


# --- The default run: every dtype x head dim, every feature and layout (kernels_ci: a diagonal of each). -------


@pytest.mark.parametrize("dtype,head_dim", [ci_if(i % 3 == j, dtype, head_dim) for (i, head_dim), (j, dtype)
                                            in itertools.product(enumerate(HEAD_DIMS + WIDE_HEAD_DIMS),
                                                                 enumerate(DTYPES))],
                         ids=lambda x: str(x))
def test_dtype_head_dim(kernel, device, dtype, head_dim):
    run_varlen_backward(kernel, device, dtype, head_dim, "gqa", ([5, 37], [9, 37], 0), causal=True)


# Tile shapes (backward_params.h), fp16 / bf16: key / query tile rows 32 (D <= 128), 16 (192, 256), 8 (512); staged
# rows 32, 16, 8 (float: tiles of 32 up to D = 80). Lengths one past and one short of those multiples, several tiles per
# sequence, the diagonal crossing tiles.
@pytest.mark.parametrize("head_dim", [ci_if(d == 128, d) for d in (64, 128, 256, 512)])
def test_tile_boundaries(kernel, device, head_dim):
    layout = ([33, 15, 9], [31, 17, 40], 0)
    for feature in (dict(causal=True), dict(window=(9, 2), softcap=2.0, sinks=True, alibi=True)):
        run_varlen_backward(kernel, device, torch.float16, head_dim, "gqa", layout, **feature)


@pytest.mark.parametrize("feature", FEATURES, ids=feature_id)
@pytest.mark.parametrize("heads", [ci_if(h == "gqa", h) for h in HEADS])
def test_features(kernel, device, feature, heads):
    run_varlen_backward(kernel, device, torch.float16, 64, heads, "sq<sk", **feature)
    run_varlen_backward(kernel, device, torch.bfloat16, 128, heads, "sq>sk", **feature)


@pytest.mark.parametrize("feature", [ci_if(f == FEATURES[-1], f) for f in FEATURES], ids=feature_id)
def test_features_d512(kernel, device, feature):
    # Head dim 512 (Gemma's global layers): 8-row tiles, the two staged operands side by side in T (float: in turn).
    run_varlen_backward(kernel, device, torch.bfloat16, 512, "gqa", ([7, 12], [12, 10], 0), **feature)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts(kernel, device, layout):
    for causal in (False, True):
        run_varlen_backward(kernel, device, torch.float32, 32, "gqa", layout, causal=causal)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("how", ["offset", "row_stride"])
@pytest.mark.parametrize("which", ["q", "k", "v", "dout"])
def test_rows_not_4_aligned(kernel, device, which, how):
    # The staging loops read rows 4 elements at a time only where every row starts at a multiple of 4 (the planner's
    # aligned_rows bits); the emulator reports any misaligned vector access, so a wrong bit fails here.
    lq, lk, d = [7, 33], [19, 45], 64
    q, k, v, cu_q, cu_k = make_inputs(lq, lk, 4, 2, d, torch.float16, device)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).half().to(device)
    tensors = dict(q=q, k=k, v=v, dout=dout)
    tensors[which] = misalign(tensors[which], how)
    ql, kl, vl = (tensors[n].detach().requires_grad_() for n in "qkv")  # views of the same storage
    out = kernel.flash_attn_varlen_func(ql, kl, vl, cu_q, cu_k, max(lq), max(lk), causal=True)
    out.backward(tensors["dout"])
    cq, ck = cu_q.tolist(), cu_k.tolist()

    def fn(dt):
        return lambda q_, k_, v_: ref.attention_varlen(q_, k_, v_, cq, ck, scale=d**-0.5, causal=True, dtype=dt)[0]

    _, grads_ref = reference_grads(fn(torch.float64), (q, k, v), dout, torch.float64)
    _, grads_pt = reference_grads(fn(torch.float16), (q, k, v), dout, torch.float16)
    for name, gm, gr, gp in zip(("dq", "dk", "dv"), (ql.grad, kl.grad, vl.grad), grads_ref, grads_pt):
        check_grad(gm, gr, gp, name)


@pytest.mark.kernels_ci
def test_sink_gradient_dtype_and_value(kernel, device):
    # s_aux in bf16 (as gpt-oss holds it): the gradient comes back in bf16, through the float32 copy the API makes.
    run_varlen_backward(kernel, device, torch.float32, 64, "gqa", "sq<sk", causal=True, sinks=True,
                        sink_dtype=torch.bfloat16)


@pytest.mark.kernels_ci
def test_rows_without_keys(kernel, device):
    # sq > sk causal: the first sq - sk rows see nothing (out 0, LSE -inf): their dq is 0, and they add nothing to dk,
    # dv or ds_aux; sk = 0: no row sees anything.
    dq, dk, dv, ds = run_varlen_backward(kernel, device, torch.float32, 32, (2, 2), ([6, 4], [2, 0], 0), causal=True,
                                         sinks=True)
    assert torch.equal(dq[:4].cpu(), torch.zeros(4, 2, 32)) and torch.equal(dq[6:].cpu(), torch.zeros(4, 2, 32))


@pytest.mark.kernels_ci
def test_max_seqlen_only_sizes_the_grid(kernel, device):
    # max_seqlen_q below the longest sequence: the kernels loop over the query tiles past the grid; max_seqlen_k = 1
    # likewise for the key tiles of the dK/dV pass. Same gradients as the exact values.
    lq, lk = [70, 3], [90, 9]
    q, k, v, cu_q, cu_k = make_inputs(lq, lk, 4, 2, 64, torch.float16, device)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).half().to(device)
    grads = []
    for mq, mk in ((70, 90), (2, 1), (5000, 5000)):
        ql, kl, vl = leaf(q), leaf(k), leaf(v)
        kernel.flash_attn_varlen_func(ql, kl, vl, cu_q, cu_k, mq, mk, causal=True).backward(dout)
        grads.append((ql.grad, kl.grad, vl.grad))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)


@pytest.mark.kernels_ci
def test_varlen_decode_route(kernel, device):
    # max_seqlen_q == 1 runs the forward's decode kernel; the backward only needs its out and LSE.
    run_varlen_backward(kernel, device, torch.float16, 128, "gqa", ([1, 1, 0, 1], [9, 30, 4, 1], 0), causal=True,
                        max_seqlen_q=1, sinks=True, softcap=3.0)


def run_dense_backward(kernel, device, dtype, head_dim, batch, sq, sk, heads, causal=False, window=(-1, -1),
                       softcap=0.0, alibi=False, sinks=False, alibi_per_batch=False, transposed_kv=True, seed=0):
    """flash_attn_func on strided views: q a head slice of a packed qkv, k/v transposes of [B, Hkv, Sk, D] caches
    (the layout transformers passes); gradients land in the underlying leaves."""
    h, hkv = HEADS[heads] if isinstance(heads, str) else heads
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, sq, 2 * h, head_dim, generator=g).to(dtype).to(device)
    kc = torch.randn(batch, hkv, sk, head_dim, generator=g).to(dtype).to(device)
    vc = torch.randn(batch, hkv, sk, head_dim, generator=g).to(dtype).to(device)
    dout = torch.randn(batch, sq, h, head_dim, generator=g).to(dtype).to(device)
    slopes, s_aux = extras(h, alibi, sinks, device, batch=batch if alibi_per_batch else None)
    scale = 0.7 * head_dim**-0.5
    qkv_l, kc_l, vc_l = leaf(qkv), leaf(kc), leaf(vc)
    sl = None if s_aux is None else leaf(s_aux)

    def views(qkv, kc, vc):
        k, v = (kc.transpose(1, 2), vc.transpose(1, 2)) if transposed_kv else (kc.permute(0, 2, 1, 3).contiguous(),
                                                                               vc.permute(0, 2, 1, 3).contiguous())
        return qkv[:, :, h:], k, v

    q, k, v = views(qkv_l, kc_l, vc_l)
    out, lse, _ = kernel.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, window_size=window,
                                         softcap=softcap, alibi_slopes=slopes, return_attn_probs=True, s_aux=sl)
    assert not lse.requires_grad
    out.backward(dout)

    kw = dict(scale=scale, causal=causal, window=window, softcap=softcap,
              alibi_slopes=None if slopes is None else slopes.cpu())

    def fn(dt):
        return lambda qkv, kc, vc, s: ref.attention_dense(*views(qkv, kc, vc), sinks=s, dtype=dt, **kw)[0]

    out_ref, grads_ref = reference_grads(fn(torch.float64), (qkv, kc, vc, s_aux), dout, torch.float64)
    out_pt, grads_pt = reference_grads(fn(dtype), (qkv, kc, vc, s_aux), dout, dtype)
    check_grad(out.detach(), out_ref.detach(), out_pt.detach(), "out")
    mine = (qkv_l.grad, kc_l.grad, vc_l.grad, None if sl is None else sl.grad)
    for name, gm, gr, gp in zip(("dqkv", "dk_cache", "dv_cache", "ds_aux"), mine, grads_ref, grads_pt):
        if gr is not None:
            check_grad(gm, gr, gp, name)
    assert torch.equal(qkv_l.grad[:, :, :h].cpu(), torch.zeros_like(qkv_l.grad[:, :, :h].cpu()))


@pytest.mark.parametrize("sq,sk", [(40, 40), (23, 50), (50, 23), (5, 40), (1, 33)], ids=str)
@pytest.mark.parametrize("dtype", [ci_if(d == torch.float16, d) for d in DTYPES], ids=str)
def test_dense(kernel, device, dtype, sq, sk):
    # sq <= 16 takes the forward's decode kernel; the others the varlen kernel in dense mode.
    run_dense_backward(kernel, device, dtype, 64, 2, sq, sk, "gqa", causal=True)


@pytest.mark.parametrize("feature", FEATURES + [dict(alibi=True, alibi_per_batch=True), dict(transposed_kv=False)],
                         ids=feature_id)
def test_dense_features(kernel, device, feature):
    run_dense_backward(kernel, device, torch.float16, 96, 2, 30, 37, "gqa", **feature)


# --- Determinism, schedules and races, memory. -----------------------------------------------------------------


def _all_grads(kernel, device, dtype=torch.float16, head_dim=64):
    lq, lk = [37, 5, 60], [41, 9, 60]
    q, k, v, cu_q, cu_k = make_inputs(lq, lk, 6, 2, head_dim, dtype, device)
    _, s_aux = extras(6, False, True, device)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(dtype).to(device)
    ql, kl, vl, sl = leaf(q), leaf(k), leaf(v), leaf(s_aux)
    out = kernel.flash_attn_varlen_func(ql, kl, vl, cu_q, cu_k, 60, 60, causal=True, window_size=(20, 3),
                                        softcap=2.0, s_aux=sl)
    out.backward(dout)
    return ql.grad, kl.grad, vl.grad, sl.grad


@pytest.mark.parametrize("head_dim", [ci_if(d == 64, d) for d in (64, 512)])
def test_deterministic(kernel, device, head_dim):
    # No atomics: the gradients are bit-identical on repeat (deterministic=True costs nothing: it is the only mode).
    first = _all_grads(kernel, device, head_dim=head_dim)
    for _ in range(2):
        for a, b in zip(first, _all_grads(kernel, device, head_dim=head_dim)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("splits", [ci_if(s == 2, s) for s in (1, 2, 4)])
def test_split_gqa_group(kernel, device, monkeypatch, splits):
    # dK/dV of a KV head's 4 query heads over `splits` threadgroups (fp32 parts, then the sum pass in part order;
    # forced here, chosen by the grid's size otherwise): FlashAttention's rule at every count, varlen and dense, with
    # every feature, and the same bits on a second call.
    monkeypatch.setenv("METAL_FLASH_SDPA_BWD_GROUP_SPLITS", str(splits))
    feature = FEATURES[-1]
    first = run_varlen_backward(kernel, device, torch.float16, 64, (8, 2), "ragged", **feature)
    again = run_varlen_backward(kernel, device, torch.float16, 64, (8, 2), "ragged", **feature)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    run_dense_backward(kernel, device, torch.bfloat16, 128, 2, 37, 45, "mqa", causal=True)


@pytest.mark.parametrize("schedule,seed", [ci_if(s == "random", s, n) for s, n in (("reverse", 0), ("random", 1))])
def test_schedules_and_races(kernel, device, emulator, schedule, seed):
    # Race detector on, threadgroups / threads / barrier resumes in reverse or random order: no race, no overrun,
    # and the same bits as the forward schedule (every result has one writer and a fixed summation order).
    emulator(schedule="forward", check_races=True)
    want = _all_grads(kernel, device)
    emulator(schedule=schedule, seed=seed, check_races=True)
    for a, b in zip(want, _all_grads(kernel, device)):
        assert torch.equal(a, b)
    run_varlen_backward(kernel, device, torch.bfloat16, 256, "mqa", "ragged", causal=True, alibi=True)
    run_dense_backward(kernel, device, torch.float32, 32, 2, 70, 66, "mha", window=(9, 4), sinks=True)


@pytest.mark.kernels_ci
def test_memory_is_linear_in_seqlen(kernel, device):
    # The backward allocates its outputs and an fp32 delta shaped like the LSE, nothing S x S: every allocation an
    # op makes during backward() is at most a few [S, H, D] tensors, while S x S floats would be 8x larger. The
    # reference backward (which materialises P) shows the profiler sees such allocations.
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cpu":
        pytest.skip("CPU allocator profiling (the emulated build)")
    s, d = 512, 32
    q, k, v = (torch.randn(1, s, 1, d).requires_grad_() for _ in range(3))
    dout = torch.randn(1, s, 1, d)

    def largest_allocation(out):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out.backward(dout.to(out.dtype))
        return max(e.self_cpu_memory_usage for e in prof.events())

    mine = largest_allocation(kernel.flash_attn_func(q, k, v, causal=True))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    theirs = largest_allocation(ref.attention_dense(qd, kd, vd, scale=d**-0.5, causal=True)[0])
    assert theirs >= s * s * 8, f"the profiler did not see the reference's S x S allocation ({theirs} bytes)"
    assert mine <= s * d * 4, f"largest allocation {mine} bytes > one [S, D] float tensor ({s * d * 4})"


# --- Errors, schemas. ---------------------------------------------------------------------------------------------


@pytest.mark.kernels_ci
def test_errors_name_the_argument(kernel, device):
    ops = kernel._ops.ops
    q, k, v, cu_q, cu_k = make_inputs([5, 9], [5, 9], 4, 2, 64, torch.float32, device)
    out, lse, _ = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 9, return_attn_probs=True)
    args = dict(dout=out, q=q, k=k, v=v, out=out, lse=lse)

    def call(**over):
        a = {**args, **over}
        return ops.varlen_bwd(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"], a.get("cu_q", cu_q), cu_k, 9, 9,
                              [0.125, a.get("softcap", 0.0)], [1, -1, -1], [None, a.get("s_aux")])

    with pytest.raises(ValueError, match="dout must have the shape of q"):
        call(dout=out[:3])
    with pytest.raises(TypeError, match="dout must have the dtype of q"):
        call(dout=out.half())
    with pytest.raises(ValueError, match="dout must have a contiguous last dimension"):
        call(dout=torch.ones(1).expand(out.shape))
    with pytest.raises(TypeError, match="lse must be float32"):
        call(lse=lse.double())
    with pytest.raises(ValueError, match="lse must have shape"):
        call(lse=lse[:, :3])
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        call(cu_q=cu_q.long())
    with pytest.raises(ValueError, match="softcap must be >= 0"):
        call(softcap=-1.0)
    with pytest.raises(ValueError, match="s_aux must have shape"):
        call(s_aux=torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="head dim 48 has no backward"):
        x = torch.zeros(14, 4, 48, device=device)
        call(dout=x, q=x, k=x[:, :2], v=x[:, :2], out=x)


@pytest.mark.kernels_ci
def test_op_schemas(kernel, device):
    ops = kernel._ops.ops
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(7, 4, 64, generator=g).to(device) for _ in range(3))
    k, v = k[:, :2].contiguous(), v[:, :2].contiguous()
    cu_s = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    out, lse = ops.varlen_fwd(q, k, v, cu_s, cu_s, 4, 4, None, [0.125, 0.0], [1, -1, -1], [None, None])
    sinks = torch.zeros(4, device=device)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.varlen_bwd.default, (out, q, k, v, out, lse, cu_s, cu_s, 4, 4, [0.125, 0.0], [1, -1, -1],
                                                   [None, sinks]), test_utils=utils)
    qd, kd, vd, od = q.view(1, 7, 4, 64), k.view(1, 7, 2, 64), v.view(1, 7, 2, 64), out.view(1, 7, 4, 64)
    torch.library.opcheck(ops.bwd.default, (od, qd, kd, vd, od, lse.view(4, 7)[None], [0.125, 0.0], [0, -1, -1],
                                            [None, None]), test_utils=utils)


# --- The full matrix (--full). -----------------------------------------------------------------------------


@pytest.mark.full
@pytest.mark.parametrize("layout", ["sq<sk", "sq>sk", "empty", "padded_tail"])
@pytest.mark.parametrize("causal,window,softcap,sinks,alibi",
                         list(itertools.product([False, True], WINDOWS, [0.0, 2.0], [False, True], [False, True])))
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_full_matrix(kernel, device, dtype, head_dim, heads, causal, window, softcap, sinks, alibi, layout):
    run_varlen_backward(kernel, device, dtype, head_dim, heads, layout, causal=causal, window=window, softcap=softcap,
                        sinks=sinks, alibi=alibi)


@pytest.mark.full
@pytest.mark.parametrize("sq,sk", [(1, 70), (16, 70), (17, 70), (70, 70), (70, 17)], ids=str)
@pytest.mark.parametrize("feature", FEATURES, ids=feature_id)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_full_dense(kernel, device, dtype, head_dim, feature, sq, sk):
    run_dense_backward(kernel, device, dtype, head_dim, 2, sq, sk, "gqa", **feature)


# --- transformers: a training step of the tiny models with this kernel vs PyTorch attention. ------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("name", ["llama-gqa", "gemma2"])
def test_transformers_training_step(kernel, name, padded):
    """Loss and every parameter gradient of one training step of a tiny Llama (GQA) / Gemma-2 (softcap, sliding
    window 8) with attn_implementation = this kernel match sdpa / eager (float32). Unpadded batches go through
    flash_attn_func, padded ones through flash_attn_varlen_func."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    import tiny_models as tm

    prompts = tm.random_prompts([24, 17 if padded else 24, 24 if padded else 24], seed=3)
    input_ids, attention_mask = tm.left_padded(prompts)
    # No loss term reads a padding position's logits (the first real token's label is predicted from one): padding
    # rows see no key, so their outputs are implementation-defined (0 here, a uniform average in eager).
    first_real = attention_mask.argmax(dim=1, keepdim=True)
    labels = input_ids.masked_fill(attention_mask == 0, -100).scatter(1, first_real, -100)

    def step(impl):
        model = tm.build_model(name, torch.float32).train()
        model.set_attn_implementation(impl)
        with tm.count_kernel_calls() as calls:
            loss = model(input_ids=input_ids, attention_mask=attention_mask if padded else None, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.detach().cpu() for n, p in model.named_parameters()}, calls

    loss, grads, calls = step(tm.KERNEL_REPO)
    assert calls.count("flash_attn_varlen_func" if padded else "flash_attn_func") == 2, calls  # one per layer
    loss_ref, grads_ref, _ = step("sdpa" if name == "llama-gqa" else "eager")
    torch.testing.assert_close(loss.cpu(), loss_ref.cpu(), atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for n, g in grads.items():
        scale = max(grads_ref[n].abs().max().item(), 1e-6)
        err = (g - grads_ref[n]).abs().max().item()
        assert err <= 1e-4 * scale, f"{n}: max |grad - ref| = {err:.3g} (max |ref| = {scale:.3g})"
