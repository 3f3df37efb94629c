"""Metal 4 tensors and MetalPerformancePrimitives' matmul2d on the NVIDIA proxy (msl/cuda/shim/metal_tensor_ops.h):
the emulator's kernels (tests/msl_cpu/kernels/tensor_ops.metal, unchanged) and cases (tests/msl_cpu/tensor_ops_cases.py)
against float64 torch matmuls under FlashAttention's tolerance rule, in every lowering (MCU_SIMDGROUP_MMA: 1 tensor
cores, float and mixed pairs by the three-bfloat split; 0 fp32 FMAs; 2 tensor cores for half / bfloat only).
Skipped without CUDA (CI has none).

    python3 -m pytest tests/metal_cuda/test_tensor_ops_gpu.py -q -rs      # on the GPU machine (carry .cache/metal_cuda)
"""

import zlib

import pytest
import torch

from msl.cuda import compiler
from tests.msl_cpu.tensor_ops_cases import DEVICE_CASES, DTYPES, THREADGROUP_CASES, check, round10

from . import targets

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (an NVIDIA GPU): CI has none")]

MMA_MODES = list(compiler.SIMDGROUP_MMA_MODES)


@pytest.fixture(scope="module", params=MMA_MODES, ids=lambda m: f"mma{m}")
def lib(request):
    from msl.cuda import launch

    return launch.Library(targets.load_all(request.param, names=["tensor_ops"])["tensor_ops"])


@pytest.mark.parametrize("case", DEVICE_CASES, ids=lambda c: c[0])
def test_matmul2d_device(lib, case):
    name, tin, tout, m, n, k, tl, tr, sg, acc = case
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000)
    a = torch.randn(m, k, generator=g).to(DTYPES[tin])
    b = torch.randn(k, n, generator=g).to(DTYPES[tin])
    c0 = torch.randn(m, n, generator=g).to(DTYPES[tout]) if acc else torch.zeros(m, n, dtype=DTYPES[tout])
    a_mem = (a.t().contiguous() if tl else a).cuda()
    b_mem = (b.t().contiguous() if tr else b).cuda()
    c, c_iter = c0.clone().cuda(), torch.full((m, n), -7.0, dtype=DTYPES[tout], device="cuda")
    lib.dispatch(name, (1, 1, 1), (32 * sg, 1, 1), buffers={0: a_mem, 1: b_mem, 2: c, 3: c_iter})
    torch.cuda.synchronize()
    ref = a.double() @ b.double() + (c0.double() if acc else 0)
    same = a.to(DTYPES[tout]) @ b.to(DTYPES[tout]) + (c0 if acc else 0)
    check(c, ref, DTYPES[tout], same)
    assert torch.equal(c_iter, c), "iteration and store() disagree"


@pytest.mark.parametrize("name,tin,tout,m,n,k,sg", THREADGROUP_CASES)
def test_matmul2d_threadgroup(lib, name, tin, tout, m, n, k, sg):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(m, k, generator=g).to(DTYPES[tin])
    b = torch.randn(k, 2 * n, generator=g).to(DTYPES[tin])
    c = torch.zeros(m, n, dtype=DTYPES[tout], device="cuda")
    lib.dispatch(name, (1, 1, 1), (32 * sg, 1, 1), buffers={0: a.cuda(), 1: b.cuda(), 2: c})
    torch.cuda.synchronize()
    check(c, a.double() @ b[:, n:].double(), DTYPES[tout], a.to(DTYPES[tout]) @ b[:, n:].to(DTYPES[tout]))


def test_matmul2d_ragged_rows(lib):
    m, n, k, rows = 32, 16, 48, 21
    g = torch.Generator().manual_seed(2)
    a = torch.randn(rows, k, generator=g).half()
    b = torch.randn(n, k, generator=g).half()  # transpose_right: B stored N x K
    c = torch.full((m, n), -7.0, device="cuda")
    lib.dispatch("ragged_half_32x16x48", (1, 1, 1), (32, 1, 1),
                 buffers={0: a.cuda(), 1: b.cuda(), 2: c}, bytes={3: torch.tensor([rows], dtype=torch.int32).numpy()})
    torch.cuda.synchronize()
    check(c[:rows], 2 * (a.double() @ b.double().t()), torch.float32, 2 * (a.float() @ b.float().t()))
    assert torch.all(c[rows:] == -7.0), "rows past the tensor's extent were written"


def proxy_layout(m, n, simdgroups):
    """The proxy's documented ownership (metal_tensor_ops.h): 16 x 8 tiles in row-major order, dealt to the warps in
    contiguous runs; slot 4 j + r of lane (g, t) holds row 16 tm + g + 8 (r / 2), column 8 tn + 2 t + r % 2."""
    tiles_n = -(-n // 8)
    tiles = -(-m // 16) * tiles_n
    per_warp = -(-tiles // simdgroups)
    out = []
    for w in range(simdgroups):
        for lane in range(32):
            for i in range(4 * per_warp):
                tile, r = w * per_warp + i // 4, i % 4
                row = tile // tiles_n * 16 + lane // 4 + 8 * (r // 2)
                col = tile % tiles_n * 8 + 2 * (lane % 4) + r % 2
                out.append(row * n + col if tile < tiles and row < m and col < n else -1)
    return 4 * per_warp, torch.tensor(out, dtype=torch.int32)


def test_ownership(lib):
    """Every element is owned once; the layout is the mma.sync D fragment the proxy documents. Kernels must still go
    through get_multidimensional_index (the emulator moves its layout with the seed)."""
    m, n, threads = 24, 40, 128
    cap, want = proxy_layout(m, n, threads // 32)
    out = torch.full((threads * cap,), -2, dtype=torch.int32, device="cuda")
    lib.dispatch("coop_layout", (1, 1, 1), (threads, 1, 1), buffers={0: out})
    torch.cuda.synchronize()
    out = out.cpu()
    valid = out[out >= 0]
    assert (out == -2).sum() == 0 and torch.equal(valid.sort().values, torch.arange(m * n, dtype=torch.int32))
    assert torch.equal(out, want)


def test_matmul2d_execution_thread(lib):
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(8, 8, 8, generator=g), torch.randn(8, 8, 8, generator=g)
    c = torch.zeros(8, 8, 8, device="cuda")
    lib.dispatch("matmul_per_thread", (1, 1, 1), (8, 1, 1), buffers={0: a.cuda(), 1: b.cuda(), 2: c})
    torch.cuda.synchronize()
    check(c, a.double() @ b.double(), torch.float32, a @ b)


def test_relaxed_precision(lib):
    """relaxed_precision: float operands rounded to 10 mantissa bits (nearest even) before the fp32 products."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(32, 64, generator=g), torch.randn(64, 32, generator=g)
    c = torch.zeros(32, 32, device="cuda")
    lib.dispatch("matmul_relaxed", (1, 1, 1), (32, 1, 1), buffers={0: a.cuda(), 1: b.cuda(), 2: c})
    torch.cuda.synchronize()

    relaxed = round10(a).double() @ round10(b).double()
    exact = a.double() @ b.double()
    assert (c.cpu().double() - relaxed).abs().max() < 1e-4
    assert (c.cpu().double() - exact).abs().max() > 1e-3


def test_row_reductions(lib):
    """reduce_rows on the proxy: max, min, a sum from a non-zero identity; lane (g, t) holds rows g and g + 8 (the rows
    of its destination slots), so every one-simdgroup destination of 16 rows maps onto it."""
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(16, 16, generator=g).half(), torch.randn(16, 32, generator=g).half()
    out, rows = torch.zeros(48, device="cuda"), torch.full((32 * 2,), -5, dtype=torch.int32, device="cuda")
    flags = torch.zeros(32, dtype=torch.int32, device="cuda")
    lib.dispatch("row_reductions", (1, 1, 1), (32, 1, 1), buffers={0: a.cuda(), 1: b.cuda(), 2: out, 3: rows, 4: flags})
    torch.cuda.synchronize()
    s = a.double() @ b.double()
    out = out.cpu().double()
    torch.testing.assert_close(out[:16], s.max(1).values, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[16:32], s.min(1).values, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[32:], 100 + s.sum(1), rtol=0, atol=1e-4)
    lane = torch.arange(32)
    assert torch.equal(rows.cpu().view(32, 2), torch.stack([lane // 4, lane // 4 + 8], 1).int())
    assert (flags.cpu() == 3).all()


@pytest.mark.parametrize("dtype", ["half", "bfloat"])
def test_softmax_pv(lib, dtype):
    """softmax(A B^T) V with S and P in registers: the mapped path and the converted left input (the proxy always
    answers yes), within FlashAttention's rule of the float64 reference."""
    g = torch.Generator().manual_seed(7)
    t = DTYPES[dtype]
    q, k, v = (torch.randn(*shape, generator=g).to(t) for shape in ((16, 64), (32, 64), (32, 24)))
    out, path = torch.zeros(16, 24, device="cuda"), torch.zeros(32, dtype=torch.int32, device="cuda")
    lib.dispatch(f"softmax_pv_{dtype}", (1, 1, 1), (32, 1, 1),
                 buffers={0: q.cuda(), 1: k.cuda(), 2: v.cuda(), 3: out, 4: path})
    torch.cuda.synchronize()
    assert (path.cpu() == 3).all()
    ref = torch.softmax(q.double() @ k.double().t(), 1) @ v.double()
    check(out, ref, t, (torch.softmax(q.float() @ k.float().t(), 1).to(t) @ v).float())
