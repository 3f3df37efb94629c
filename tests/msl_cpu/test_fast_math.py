"""Apple's fast math as the emulator models it: fast:: and precise:: differ, the plain names follow the compile's
fast-math setting, denormals are flushed and division is x * (1 / y) under fast math (README "Fast math")."""

from pathlib import Path

import numpy as np
import pytest
import torch

from msl import cpu as metal_cpu

KERNELS = Path(__file__).parent / "kernels"
F32 = np.float32
TINY = np.finfo(np.float32).tiny  # 2^-126, the smallest normal float
INF = float("inf")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's reference meets inf / NaN on purpose

# (x, y) rows: large and tiny arguments where fast math and exact math part, then ordinary values.
ROWS = [(50.0, 2.0), (-50.0, 2.0), (44.0, 1.0), (44.5, 1.0), (100.0, 2.0), (-100.0, 2.0), (-140.0, 2.0), (0.0, 2.0),
        (-1.0, 2.0), (1e-40, 1.0), (1e10, 1e38), (1e-20, 1e-20), (3e-39, -2e-39), (2.0, 10.0), (0.75, -3.5),
        (7.25, 0.5), (1e30, 1e-30)]
FUNCS = ["tanh", "exp", "exp2", "log", "log2", "rsqrt", "sqrt", "pow"]  # columns 3k..3k+2: plain, fast::, precise::


@pytest.fixture(scope="module", params=[True, False], ids=["fastmath", "precise"])
def lib(request):
    return metal_cpu.compile(KERNELS / "fast_math.metal", fast_math=request.param), request.param


def ftz(v):
    v = np.asarray(v, dtype=F32)
    return np.where(np.abs(v) < TINY, np.copysign(F32(0), v), v).astype(F32)


def exact(f, *args):
    """libm-like: computed in float64, rounded once to float32."""
    return np.asarray(f(*(np.asarray(a, dtype=np.float64) for a in args)), dtype=F32)


def fast_exp2(x):
    return ftz(np.exp2(ftz(x)))


def fast_log2(x):
    return np.log2(ftz(x)).astype(F32)


def fast_exp(x):
    return fast_exp2(ftz(x) * F32(np.log2(np.e)))


def fast_tanh(x):
    e = fast_exp(F32(2) * ftz(x))
    return ftz((e - F32(1)) / (e + F32(1)))


FAST = {
    "tanh": lambda x, y: fast_tanh(x),
    "exp": lambda x, y: fast_exp(x),
    "exp2": lambda x, y: fast_exp2(x),
    "log": lambda x, y: fast_log2(x) * F32(np.log(2)),
    "log2": lambda x, y: fast_log2(x),
    "rsqrt": lambda x, y: ftz(F32(1) / np.sqrt(ftz(x))),
    "sqrt": lambda x, y: ftz(np.sqrt(ftz(x))),
    "pow": lambda x, y: fast_exp2(ftz(y) * fast_log2(x)),
    "divide": lambda x, y: ftz(ftz(x) * ftz(F32(1) / ftz(y))),
    "exp10": lambda x, y: fast_exp2(ftz(x) * F32(np.log2(10))),
    "log10": lambda x, y: fast_log2(x) * F32(np.log10(2)),
}
PRECISE = {
    "tanh": lambda x, y: exact(np.tanh, x),
    "exp": lambda x, y: exact(np.exp, x),
    "exp2": lambda x, y: exact(np.exp2, x),
    "log": lambda x, y: exact(np.log, x),
    "log2": lambda x, y: exact(np.log2, x),
    "rsqrt": lambda x, y: exact(lambda v: 1 / np.sqrt(v), x),
    "sqrt": lambda x, y: exact(np.sqrt, x),
    "pow": lambda x, y: exact(np.power, x, y),
    "divide": lambda x, y: np.asarray(x / y, dtype=F32),
    "exp10": lambda x, y: exact(lambda v: 10.0 ** v, x),
    "log10": lambda x, y: exact(np.log10, x),
}


def assert_same(got, want, what, rtol=1e-6):
    got, want = np.asarray(got, dtype=F32), np.asarray(want, dtype=F32)
    bad = ~((np.isnan(got) & np.isnan(want))
            | (np.isinf(want) & (got == want))
            | ((want == 0) & (got == 0))
            | (np.isfinite(want) & (want != 0) & (np.abs(got.astype(np.float64) - want) <=
                                                   rtol * np.abs(want.astype(np.float64)) + 3e-45)))
    assert not bad.any(), f"{what}: got {got[bad]}, want {want[bad]} (rows {np.nonzero(bad)[0]})"


def run_variants(lib):
    x = torch.tensor([r[0] for r in ROWS], dtype=torch.float32)
    y = torch.tensor([r[1] for r in ROWS], dtype=torch.float32)
    out = torch.zeros(len(ROWS) * 32)
    lib.dispatch("math_variants", (1, 1, 1), (len(ROWS), 1, 1), buffers={0: x, 1: y, 2: out})
    return x.numpy(), y.numpy(), out.view(len(ROWS), 32).numpy()


def test_headline_facts(lib):
    lib, fast_math = lib
    _, _, o = run_variants(lib)
    col = {f: 3 * k for k, f in enumerate(FUNCS)}
    # Apple's fast tanh goes through exp: NaN (inf / inf) once e^2x overflows fp32; precise:: is exact.
    assert np.isnan(o[0, col["tanh"] + 1]) and o[0, col["tanh"] + 2] == 1.0
    assert o[1, col["tanh"] + 1] == -1.0 and o[2, col["tanh"] + 1] == 1.0 and np.isnan(o[3, col["tanh"] + 1])
    assert np.isnan(o[0, col["tanh"]]) == fast_math  # the plain name follows the compile's setting
    # exp overflows to inf in both; an underflowing result is flushed by fast:: only.
    assert o[4, col["exp"] + 1] == INF and o[4, col["exp"] + 2] == INF
    assert o[5, col["exp"] + 1] == 0.0 and 0 < o[5, col["exp"] + 2] < TINY
    assert o[6, col["exp2"] + 1] == 0.0 and o[6, col["exp2"] + 2] == F32(2.0 ** -140)
    # log of 0 is -inf, of a negative NaN; a denormal argument is 0 for fast::.
    assert o[7, col["log"] + 1] == -INF and np.isnan(o[8, col["log"] + 1])
    assert o[9, col["log"] + 1] == -INF and o[9, col["log"] + 2] == pytest.approx(-92.1034, abs=1e-3)
    assert o[9, col["rsqrt"] + 1] == INF and o[9, col["rsqrt"] + 2] == pytest.approx(1e20, rel=1e-5)
    # Division: x * (1 / y), so 1e10 / 1e38 is 0 under fast math (1 / 1e38 is denormal, flushed).
    assert o[10, 25] == 0.0 and o[10, 26] == pytest.approx(1e-28, rel=1e-6)
    assert (o[10, 24] == 0.0) == fast_math
    # Plain arithmetic flushes denormal inputs and results under fast math only.
    assert (o[11, 27] == 0.0) == fast_math and (o[9, 27] == 0.0) == fast_math
    assert (o[12, 28] == 0.0) == fast_math  # 3e-39 + -2e-39: both inputs denormal


def test_every_variant_matches_the_model(lib):
    lib, fast_math = lib
    x, y, o = run_variants(lib)
    for k, f in enumerate(FUNCS):
        fast, precise = FAST[f](x, y), PRECISE[f](x, y)
        assert_same(o[:, 3 * k + 1], fast, f"fast::{f}")
        assert_same(o[:, 3 * k + 2], precise, f"precise::{f}")
        assert_same(o[:, 3 * k], fast if fast_math else precise, f"{f} (fast_math={fast_math})")
    assert_same(o[:, 25], FAST["divide"](x, y), "fast::divide")
    assert_same(o[:, 26], PRECISE["divide"](x, y), "precise::divide")
    assert_same(o[:, 24], FAST["divide"](x, y) if fast_math else PRECISE["divide"](x, y), "x / y")
    arith = ftz if fast_math else (lambda v: np.asarray(v, dtype=F32))
    assert_same(o[:, 27], arith(arith(x) * arith(y)), "x * y", rtol=0)
    assert_same(o[:, 28], arith(arith(x) + arith(y)), "x + y", rtol=0)
    half_x = np.clip(x, -60000, 60000).astype(np.float16)
    assert_same(o[:, 29], np.tanh(half_x.astype(np.float64)).astype(np.float16), "tanh(half)", rtol=0)
    for col, f in [(30, "exp10"), (31, "log10")]:
        assert_same(o[:, col], (FAST if fast_math else PRECISE)[f](x, y), f)


def test_ordinary_arguments_stay_accurate(lib):
    # Away from the edges the fast model is a few ulp from exact math (Metal's fast functions are not exact either).
    lib, fast_math = lib
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, generator=g) * 20 - 10
    y = torch.rand(256, generator=g) * 4 + 0.25
    out = torch.zeros(256 * 32)
    lib.dispatch("math_variants", (8, 1, 1), (32, 1, 1), buffers={0: x, 1: y, 2: out})
    o = out.view(256, 32)
    ax = x.abs() + 0.5
    torch.testing.assert_close(o[:, 1], torch.tanh(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o[:, 4], torch.exp(x), rtol=1e-5, atol=0)
    torch.testing.assert_close(o[:, 7], torch.exp2(x), rtol=1e-6, atol=0)
    torch.testing.assert_close(o[:, 24], x / y, rtol=1e-6, atol=0)
    out2 = torch.zeros(256 * 32)
    lib.dispatch("math_variants", (8, 1, 1), (32, 1, 1), buffers={0: ax, 1: y, 2: out2})
    o2 = out2.view(256, 32)
    torch.testing.assert_close(o2[:, 10], torch.log(ax), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(o2[:, 16], torch.rsqrt(ax), rtol=1e-6, atol=0)
    torch.testing.assert_close(o2[:, 22], torch.pow(ax, y), rtol=2e-5, atol=0)


def test_vectors_follow_the_model(lib):
    lib, fast_math = lib
    x = torch.tensor([[50.0, -50.0, 1.0, 1e38], [100.0, -100.0, 0.5, 3e-39]])
    out = torch.zeros(2, 4, 4)
    lib.dispatch("math_variants4", (1, 1, 1), (2, 1, 1), buffers={0: x, 1: out})
    xn = x.numpy()
    assert_same(out[:, 0].numpy(), fast_tanh(xn) if fast_math else PRECISE["tanh"](xn, None), "tanh(float4)")
    assert_same(out[:, 1].numpy(), PRECISE["tanh"](xn, None), "precise::tanh(float4)")
    assert_same(out[:, 2].numpy(), fast_exp(xn) if fast_math else PRECISE["exp"](xn, None), "exp(float4)")
    assert_same(out[:, 3].numpy(), FAST["divide"](F32(1), xn) if fast_math else F32(1) / xn, "1 / float4")


def test_softcap_needs_a_clamped_argument(lib):
    # softcap * tanh(s / softcap) with s / softcap = 60: NaN under fast math (e^120 overflows). Clamping the argument
    # to [-15, 15] (tanh(15) == 1 in fp32) keeps every result finite and equal to the exact softcap.
    lib, fast_math = lib
    cap = 30.0
    s = torch.tensor([1800.0, -1800.0, 1e6, 12.5, -3.0, 0.0, 449.0, 1330.0])
    out = torch.zeros(len(s), 2)
    lib.dispatch("softcap", (1, 1, 1), (len(s), 1, 1), buffers={0: s, 2: out}, bytes={1: np.float32(cap)})
    ref = cap * torch.tanh(s.double() / cap)
    raw, clamped = out[:, 0], out[:, 1]
    assert torch.isnan(raw[0]).item() == fast_math and torch.isnan(raw[2]).item() == fast_math
    assert raw[1] == -cap  # e^-120 flushes to 0: (0 - 1) / (0 + 1)
    assert torch.isfinite(clamped).all()
    torch.testing.assert_close(clamped.double(), ref, rtol=2e-6, atol=2e-6)
