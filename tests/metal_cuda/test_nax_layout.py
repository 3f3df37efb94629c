"""CI (no GPU): the index algebra of the proxy's opt-in cooperative-tensor layout (MSL_NAX_FRAGMENT_LAYOUT,
msl/cuda/shim/metal_tensor_ops.h), replayed on 32 simulated lanes with PTX's mma.sync m16n8k16 fragment layout: the
warp shuffles of matmul2d::run on input cooperative tensors must compute D = A B + C with every operand and result
slot where the layout puts it. A mirror of the shim's formulas (the emulator's check, `peers_prefill check-nax`,
tests the layout itself against MLX's NAX kernel; this tests the proxy's lowering of it)."""

import numpy as np
import pytest

from . import peers_prefill as pp

LANES = np.arange(32)


def row0(l):
    return (l >> 4 & 1) << 2 | (l >> 1 & 3)


def quad(l):
    return (l >> 3 & 1) << 1 | (l & 1)


def lane(r0, q):
    return (r0 >> 2) << 4 | (q >> 1) << 3 | (r0 & 3) << 1 | (q & 1)


def block_slots(m):
    """A 16 x 16k matrix in the layout: [lane, slot], slot 8 f + 4 h + j = (row0 + 8 h, 16 f + 4 quad + j)."""
    blocks = m.shape[1] // 16
    out = np.zeros((32, 8 * blocks))
    for x in LANES:
        for i in range(8 * blocks):
            out[x, i] = m[row0(x) + 8 * (i >> 2 & 1), 16 * (i >> 3) + 4 * quad(x) + (i & 3)]
    return out


def shfl(values, src):
    """values[lane], src[lane] -> values[src[lane]] (shfl.sync.idx, whole warp)."""
    return values[src]


def mma_m16n8k16(a, b, c):
    """a [lane, 4 regs, 2], b [lane, 2 regs, 2], c [lane, 4]: PTX's fragment layouts, D = A B + C."""
    A, B, C = np.zeros((16, 16)), np.zeros((16, 8)), np.zeros((16, 8))
    for x in LANES:
        g, t = x >> 2, x & 3
        for e in range(2):
            A[g, 2 * t + e], A[g + 8, 2 * t + e] = a[x, 0, e], a[x, 1, e]
            A[g, 2 * t + 8 + e], A[g + 8, 2 * t + 8 + e] = a[x, 2, e], a[x, 3, e]
            B[2 * t + e, g], B[2 * t + 8 + e, g] = b[x, 0, e], b[x, 1, e]
            C[g, 2 * t + e], C[g + 8, 2 * t + e] = c[x, e], c[x, 2 + e]
    D = A @ B + C
    d = np.zeros((32, 4))
    for x in LANES:
        g, t = x >> 2, x & 3
        for e in range(2):
            d[x, e], d[x, 2 + e] = D[g, 2 * t + e], D[g + 8, 2 * t + e]
    return d


def proxy_run(a, b, c, n, transpose_right):
    """matmul2d<(16, n, 16)>::run(ct_a, ct_b, ct_c), as the shim lowers it (its variable names)."""
    g, t = LANES >> 2, LANES & 3
    owner = lane(g, t)
    ar = np.zeros((32, 4, 2))
    for q in range(2):
        for h in range(2):
            s0 = 4 * h + 2 * q
            ar[:, 2 * q + h] = shfl(a[:, s0:s0 + 2], owner)
    c = c.copy()
    for f in range(n // 16):
        acc = np.zeros((2, 32, 4))
        for s in range(2):
            for r in range(4):
                acc[s, :, r] = shfl(c[:, 8 * f + 4 * (r >> 1) + 2 * s + (r & 1)], owner)
        for s in range(2):
            br = np.zeros((32, 2, 2))
            for q in range(2):
                if transpose_right:
                    src = lane(4 * ((g >> 1) & 1) + 2 * s + (g & 1), t)
                    s0 = 8 * f + 2 * q
                    w0, w1 = shfl(b[:, s0:s0 + 2], src), shfl(b[:, s0 + 4:s0 + 6], src)
                    br[:, q] = np.where(((g >> 2) != 0)[:, None], w1, w0)
                else:
                    s0 = 8 * f + 2 * s
                    for e in range(2):
                        src = lane((4 * t + 2 * q + e) & 7, g >> 1)
                        w0, w1 = shfl(b[:, s0:s0 + 2], src), shfl(b[:, s0 + 4:s0 + 6], src)
                        w = np.where(((t >> 1) != 0)[:, None], w1, w0)
                        br[:, q, e] = np.where((g & 1) != 0, w[:, 1], w[:, 0])
            acc[s] = mma_m16n8k16(ar, br, acc[s])
        frm = 4 * row0(LANES) + quad(LANES)
        for s in range(2):
            for r in range(4):
                c[:, 8 * f + 4 * (r >> 1) + 2 * s + (r & 1)] = shfl(acc[s, :, r], frm)
    return c


@pytest.mark.parametrize("n", [16, 32, 64])
@pytest.mark.parametrize("transpose_right", [False, True])
def test_proxy_lowering_of_the_opt_in_layout(n, transpose_right):
    rng = np.random.default_rng(n + transpose_right)
    A, B, C = rng.integers(-8, 8, (16, 16)), rng.integers(-8, 8, (16, n)), rng.integers(-8, 8, (16, n))
    b_slots = block_slots(B.T.reshape(n // 16, 16, 16).transpose(1, 0, 2).reshape(16, n) if transpose_right else B)
    got = proxy_run(block_slots(A), b_slots, block_slots(C), n, transpose_right)
    assert np.array_equal(got, block_slots(A @ B + C))


def test_layout_is_a_bijection():
    cells = {(row0(x) + 8 * h, 4 * quad(x) + j) for x in LANES for h in range(2) for j in range(4)}
    assert len(cells) == 256 and all(lane(row0(x), quad(x)) == x for x in LANES)


@pytest.mark.skipif(not (pp.PEERS / "mlx" / "include").exists(),
                    reason="MLX's headers not fetched (peers_prefill fetch)")
@pytest.mark.parametrize("dtype,d,S", [("float16", 128, 128), ("bfloat16", 256, 96), ("float16", 64, 77)])
def test_mlx_nax_on_the_emulator(dtype, d, S):
    """MLX's NAX kernel with the opt-in layout on the emulator, causal, GQA, against SDPA (check_nax_cpu raises)."""
    pytest.importorskip("torch")
    assert pp.check_nax_cpu(dtype, d, S, 4, 2) < 2e-2
