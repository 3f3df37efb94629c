"""Metal 4 tensors and MetalPerformancePrimitives' matmul2d on the emulator (kernels/tensor_ops.metal), against
float64 torch matmuls under FlashAttention's tolerance rule, in every schedule (the seed also moves the shim's
cooperative-tensor element ownership)."""

import zlib
from pathlib import Path

import pytest
import torch

from msl import cpu as metal_cpu
from tests.msl_cpu.tensor_ops_cases import DEVICE_CASES, DTYPES, THREADGROUP_CASES, check, round10

KERNELS = Path(__file__).parent / "kernels"
SCHEDULES = [dict(schedule="forward"), dict(schedule="reverse"), dict(schedule="random", seed=7)]


@pytest.fixture(scope="module")
def lib():
    return metal_cpu.compile(KERNELS / "tensor_ops.metal")


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: s["schedule"])
@pytest.mark.parametrize("case", DEVICE_CASES, ids=lambda c: c[0])
def test_matmul2d_device(lib, case, sched):
    name, tin, tout, m, n, k, tl, tr, sg, acc = case
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000)  # str hash() changes from run to run
    a = torch.randn(m, k, generator=g).to(DTYPES[tin])
    b = torch.randn(k, n, generator=g).to(DTYPES[tin])
    c0 = torch.randn(m, n, generator=g).to(DTYPES[tout]) if acc else torch.zeros(m, n, dtype=DTYPES[tout])
    a_mem = a.t().contiguous() if tl else a
    b_mem = b.t().contiguous() if tr else b
    c, c_iter = c0.clone(), torch.full((m, n), -7.0, dtype=DTYPES[tout])
    stats = lib.dispatch(name, (1, 1, 1), (32 * sg, 1, 1), buffers={0: a_mem, 1: b_mem, 2: c, 3: c_iter}, **sched)
    # Every operand element run() uses is an instrumented load (K per destination element), so none escapes the checks.
    assert stats.loaded[0] == m * n * k * a.element_size() and stats.loaded[1] == m * n * k * b.element_size()
    ref = a.double() @ b.double() + (c0.double() if acc else 0)
    same = a.to(DTYPES[tout]) @ b.to(DTYPES[tout]) + (c0 if acc else 0)
    check(c, ref, DTYPES[tout], same)
    assert torch.equal(c_iter, c), "iteration and store() disagree"


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: s["schedule"])
@pytest.mark.parametrize("name,tin,tout,m,n,k,sg", THREADGROUP_CASES)
def test_matmul2d_threadgroup(lib, name, tin, tout, m, n, k, sg, sched):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(m, k, generator=g).to(DTYPES[tin])
    b = torch.randn(k, 2 * n, generator=g).to(DTYPES[tin])
    c = torch.zeros(m, n, dtype=DTYPES[tout])
    lib.dispatch(name, (1, 1, 1), (32 * sg, 1, 1), buffers={0: a, 1: b, 2: c}, **sched)
    check(c, a.double() @ b[:, n:].double(), DTYPES[tout], a.to(DTYPES[tout]) @ b[:, n:].to(DTYPES[tout]))


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: s["schedule"])
def test_matmul2d_ragged_rows(lib, sched):
    m, n, k, rows = 32, 16, 48, 21
    g = torch.Generator().manual_seed(2)
    a = torch.randn(rows, k, generator=g).half()
    b = torch.randn(n, k, generator=g).half()  # transpose_right: B stored N x K
    c = torch.full((m, n), -7.0)
    lib.dispatch("ragged_half_32x16x48", (1, 1, 1), (32, 1, 1),
                 buffers={0: a, 1: b, 2: c}, bytes={3: torch.tensor([rows], dtype=torch.int32).numpy()}, **sched)
    check(c[:rows], 2 * (a.double() @ b.double().t()), torch.float32, 2 * (a.float() @ b.float().t()))
    assert torch.all(c[rows:] == -7.0), "rows past the tensor's extent were written"


def test_ownership_moves_with_the_seed(lib):
    """The shim's element ownership is not a natural layout and changes with the seed; results do not."""
    m, n, k = 64, 32, 16
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(m, k, generator=g).half(), torch.randn(k, n, generator=g).half()
    results = []
    for seed in (1, 2):
        c, c_iter = torch.zeros(m, n), torch.zeros(m, n)
        lib.dispatch("device_half_float_64x32x16", (1, 1, 1), (128, 1, 1), buffers={0: a, 1: b, 2: c, 3: c_iter},
                     schedule="random", seed=seed)
        results.append(c)
    assert torch.equal(results[0], results[1])


def test_ownership_is_the_shims_own(lib):
    """Every element is owned once, capacity = ceil(M * N / threads), the order is not row-major, and it changes with
    the seed: kernels must go through get_multidimensional_index."""
    m, n, threads = 24, 40, 128
    cap = -(-m * n // threads)
    layouts = []
    for seed in (1, 2):
        out = torch.full((threads * cap,), -2, dtype=torch.int32)
        lib.dispatch("coop_layout", (1, 1, 1), (threads, 1, 1), buffers={0: out}, schedule="random", seed=seed)
        valid = out[out >= 0]
        assert (out == -2).sum() == 0 and torch.equal(valid.sort().values, torch.arange(m * n, dtype=torch.int32))
        assert not torch.equal(valid, torch.arange(m * n, dtype=torch.int32))
        layouts.append(out)
    assert not torch.equal(layouts[0], layouts[1])


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: s["schedule"])
def test_matmul2d_execution_thread(lib, sched):
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(8, 8, 8, generator=g), torch.randn(8, 8, 8, generator=g)
    c = torch.zeros(8, 8, 8)
    lib.dispatch("matmul_per_thread", (1, 1, 1), (8, 1, 1), buffers={0: a, 1: b, 2: c}, **sched)
    check(c, a.double() @ b.double(), torch.float32, a @ b)


def test_relaxed_precision(lib):
    """relaxed_precision: float operands rounded to 10 mantissa bits (nearest even) before the fp32 products."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(32, 64, generator=g), torch.randn(64, 32, generator=g)
    c = torch.zeros(32, 32)
    lib.dispatch("matmul_relaxed", (1, 1, 1), (32, 1, 1), buffers={0: a, 1: b, 2: c})

    relaxed = round10(a).double() @ round10(b).double()
    exact = a.double() @ b.double()
    assert (c.double() - relaxed).abs().max() < 1e-4
    assert (c.double() - exact).abs().max() > 1e-3


# ---- row reductions and input cooperative tensors ------------------------------------------------------------------
# Seeds 0-11 give each of the emulator's row-reduction models (every thread holds every row; a thread holds its own
# destination slots' rows; one thread holds each row) and both answers of is_compatible_as_left_input.
SEEDS = range(12)


def test_row_reductions():
    """reduce_rows: max, min and a sum from a non-zero identity, every row held by some lane, and the three layouts
    is_iterator_compatible tells apart (with the operation's own destination; with another operation's)."""
    lib = metal_cpu.compile(KERNELS / "tensor_ops.metal")
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(16, 16, generator=g).half(), torch.randn(16, 32, generator=g).half()
    s = a.double() @ b.double()
    models = set()
    for seed in SEEDS:
        out, rows = torch.zeros(48), torch.full((32 * 16,), -5, dtype=torch.int32)
        flags = torch.zeros(32, dtype=torch.int32)
        lib.dispatch("row_reductions", (1, 1, 1), (32, 1, 1), buffers={0: a, 1: b, 2: out, 3: rows, 4: flags},
                     schedule="random", seed=seed)
        torch.testing.assert_close(out[:16].double(), s.max(1).values, rtol=0, atol=1e-5)
        torch.testing.assert_close(out[16:32].double(), s.min(1).values, rtol=0, atol=1e-5)
        torch.testing.assert_close(out[32:].double(), 100 + s.sum(1), rtol=0, atol=1e-4)
        held = rows.view(32, 16)
        assert set(held[held >= 0].tolist()) == set(range(16)), "a row no lane holds"
        for lane in held:
            valid = lane[lane >= 0]
            assert len(set(valid.tolist())) == len(valid) and (lane[len(valid):] == -1).all()
        own, other = bool((flags & 1).all()), bool((flags & 2).all())
        if other:
            assert own and (held >= 0).all(), "compatible with every destination: every lane holds every row"
            models.add("replicated")
        elif own:
            models.add("own rows")
        else:
            models.add("dealt")
    assert models == {"replicated", "own rows", "dealt"}, models


@pytest.mark.parametrize("dtype", ["half", "bfloat"])
def test_softmax_pv(dtype):
    """softmax(A B^T) V with S and P in cooperative tensors: row max through map_iterator or threadgroup memory, P as
    the next operation's left input or through threadgroup memory, as the API's answers say; every path taken over the
    seeds, every result within FlashAttention's rule of the float64 reference."""
    lib = metal_cpu.compile(KERNELS / "tensor_ops.metal")
    g = torch.Generator().manual_seed(7)
    t = DTYPES[dtype]
    q, k, v = torch.randn(16, 64, generator=g).to(t), torch.randn(32, 64, generator=g).to(t), \
        torch.randn(32, 24, generator=g).to(t)
    ref = torch.softmax(q.double() @ k.double().t(), 1) @ v.double()
    same = (torch.softmax(q.float() @ k.float().t(), 1).to(t) @ v).float()
    paths = set()
    for seed in SEEDS:
        out, path = torch.zeros(16, 24), torch.zeros(32, dtype=torch.int32)
        lib.dispatch(f"softmax_pv_{dtype}", (1, 1, 1), (32, 1, 1), buffers={0: q, 1: k, 2: v, 3: out, 4: path},
                     schedule="random", seed=seed)
        assert (path == path[0]).all(), "a path decision that is not uniform over the simdgroup"
        paths.add(int(path[0]))
        check(out, ref, t, same)
    assert paths == {0, 1, 2, 3}, paths
