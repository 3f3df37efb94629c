"""Each MSL feature the emulator supports, run on the CPU and checked against numpy / torch."""

import ctypes
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from msl import cpu as metal_cpu

KERNELS = Path(__file__).parent / "kernels"
SCHEDULES = [dict(schedule="forward"), dict(schedule="reverse"), dict(schedule="random", seed=7)]


@pytest.fixture(scope="module", params=[False, True], ids=["precise", "fastmath"])
def lib(request):
    return metal_cpu.compile(KERNELS / "features.metal", fast_math=request.param)


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: s["schedule"])
def test_builtins(lib, sched):
    grid, tpt = (3, 2, 2), (8, 4, 2)
    threads = int(np.prod(tpt))
    out = torch.zeros(int(np.prod(grid)) * threads * 16, dtype=torch.int32)
    lib.dispatch("builtins", grid, tpt, buffers={0: out}, **sched)
    got = out.view(-1, 16).numpy()
    rows = []
    for gz in range(grid[2]):
        for gy in range(grid[1]):
            for gx in range(grid[0]):
                for t in range(threads):
                    lx, ly, lz = t % tpt[0], t // tpt[0] % tpt[1], t // tpt[0] // tpt[1]
                    rows.append([gx * tpt[0] + lx, gy * tpt[1] + ly, gz * tpt[2] + lz, lx, ly, lz, gx, gy, gz,
                                 grid[0] * tpt[0], grid[1] * tpt[1], t, t // 32, t % 32, 32, (threads + 31) // 32])
    np.testing.assert_array_equal(got, np.array(rows))


def test_vectors(lib):
    x = torch.randn(8, 4)
    out, out_half, bits = torch.zeros(32, 4), torch.zeros(8, 4, dtype=torch.float16), torch.zeros(8, dtype=torch.int32)
    lib.dispatch("vectors", (1, 1, 1), (8, 1, 1), buffers={0: x, 1: out, 2: out_half, 3: bits})
    o = out.view(8, 4, 4)
    torch.testing.assert_close(o[:, 0], x.flip(1), rtol=0, atol=0)
    expected = torch.stack([x[:, 0], x[:, 1], torch.full((8,), 7.0), x[:, 2]], 1)
    torch.testing.assert_close(o[:, 1], expected, rtol=0, atol=0)
    assert torch.all(o[:, 2] == 2.5)
    w = torch.stack([x[:, 0], x[:, 0], -x[:, 3], x[:, 3]], 1) + torch.tensor([1.0, 2, 3, 4])
    torch.testing.assert_close(o[:, 3], w, rtol=0, atol=0)
    torch.testing.assert_close(out_half, x.half(), rtol=0, atol=0)
    assert torch.equal(bits, x[:, 0].contiguous().view(torch.int32))


@pytest.mark.parametrize("dtype,kernel", [(torch.float16, "half_ops"), (torch.bfloat16, "bfloat_ops")])
def test_per_operation_rounding(lib, dtype, kernel):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, generator=g).to(dtype), torch.randn(256, generator=g).to(dtype)
    out = torch.zeros(256, dtype=dtype)
    lib.dispatch(kernel, (1, 1, 1), (256, 1, 1), buffers={0: a, 1: b, 2: out})
    # torch rounds every op to the dtype on CPU too: the result must match bit for bit.
    x = a * b
    x = x + a
    x = x * torch.tensor(0.5, dtype=dtype) + torch.tensor(1.0, dtype=dtype)
    assert torch.equal(out, x)
    # and differ from doing it all in float then rounding once, for some element (rounding is really per op)
    once = ((a.float() * b.float() + a.float()) * 0.5 + 1.0).to(dtype)
    assert not torch.equal(out, once)


def test_math(lib):
    x = torch.linspace(-3, 3, 64)
    out = torch.zeros(64 * 12)
    lib.dispatch("math", (2, 1, 1), (32, 1, 1), buffers={0: x, 1: out})
    o = out.view(64, 12)
    expect = [torch.exp(x), torch.exp2(x), torch.log(x.abs() + 1), torch.tanh(x), x * 2 + 1, x.clamp(min=0.25),
              x.clamp(max=0.25), x.clamp(-0.5, 0.5), x.abs(), torch.exp(x), torch.exp(x)]
    for k, e in enumerate(expect):
        torch.testing.assert_close(o[:, k], e, rtol=2e-6, atol=1e-6, msg=f"column {k}")
    torch.testing.assert_close(o[:, 11], torch.exp(x.half()).float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: s["schedule"])
def test_simd(lib, sched):
    x = torch.randn(64)
    out = torch.zeros(64 * 11)
    lib.dispatch("simd_ops", (1, 1, 1), (64, 1, 1), buffers={0: x, 1: out}, **sched)
    o, xs = out.view(2, 32, 11), x.view(2, 32)
    lanes = torch.arange(32)
    for s in range(2):
        v = xs[s]
        torch.testing.assert_close(o[s, :, 0], v.sum().expand(32), rtol=1e-6, atol=1e-6)
        assert torch.all(o[s, :, 1] == v.max()) and torch.all(o[s, :, 2] == v.min())
        assert torch.equal(o[s, :, 3], v[(lanes + 3) % 32])
        assert torch.equal(o[s, :, 4], v[lanes ^ 5])
        assert torch.equal(o[s, :, 5], torch.where(lanes + 4 < 32, v[(lanes + 4).clamp(max=31)], v))
        assert torch.equal(o[s, :, 6], torch.where(lanes >= 4, v[(lanes - 4).clamp(min=0)], v))
        assert torch.all(o[s, :, 7] == v[7])
        torch.testing.assert_close(o[s, :, 8], v.cumsum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o[s, :, 9], v.cumsum(0) - v, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o[s, :8, 10], v[:8].sum().expand(8), rtol=1e-6, atol=1e-6)
        assert torch.all(o[s, 8:, 10] == 0)


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: s["schedule"])
@pytest.mark.parametrize("threads", [32, 96, 256, 1024])
def test_threadgroup_reduce(lib, sched, threads):
    x = torch.randn(3 * threads, generator=torch.Generator().manual_seed(threads))
    out = torch.zeros(3)
    lib.dispatch("reduce", (3, 1, 1), (threads, 1, 1), buffers={0: x, 1: out}, threadgroup_memory={0: 32 * 4}, **sched)
    # fp32 sums in the kernel's order: within log2(n) roundings of sum |x| of the float64 sum (a fixed atol failed
    # when the values cancel)
    rows = x.view(3, threads).double()
    bound = (threads.bit_length() + 1) * 2 ** -24 * rows.abs().sum(1)
    assert ((out.double() - rows.sum(1)).abs() <= bound).all()


def test_simdgroup_barrier_orders_lanes(lib):
    x, out = torch.randn(32), torch.zeros(32)
    lib.dispatch("simd_exchange_tg", (1, 1, 1), (32, 1, 1), buffers={0: x, 1: out})
    assert torch.equal(out, x[torch.arange(32) ^ 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transpose", [0, 1])
def test_simdgroup_matrix(lib, dtype, transpose):
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(8, 8, generator=g).to(dtype) for _ in range(3))
    out = c.clone()
    name = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat"}[dtype]
    stats = lib.dispatch(f"matmul8_{name}", (1, 1, 1), (32, 1, 1),
                         buffers={0: a, 1: b, 2: out}, bytes={3: np.uint32(transpose)})
    aa = a.double().T if transpose else a.double()
    ref = (aa @ b.double() + c.double()).to(dtype)
    tol = 0 if dtype == torch.float32 else 1
    assert (out.double() - ref.double()).abs().max() <= tol * ref.double().abs().max() * 2 ** -7 + 1e-5
    # Each element of A and C is read once by one lane (not 32 times), as on the GPU.
    assert stats.loaded[0] == 64 * a.element_size()
    assert stats.stored[2] == 64 * a.element_size()


def test_simdgroup_matrix_origin(lib):
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    c = torch.zeros(16, 16)
    lib.dispatch("matmul_origin", (1, 1, 1), (32, 1, 1), buffers={0: a, 1: b, 2: c})
    torch.testing.assert_close(c[8:, 8:], a[8:, :] @ b[:, 8:], rtol=1e-5, atol=1e-5)
    assert torch.all(c[:8] == 0) and torch.all(c[:, :8] == 0)


def test_function_constants(lib):
    out = torch.zeros(8)
    lib.dispatch("function_constants", (1, 1, 1), (8, 1, 1), buffers={0: out},
                 constants={0: True, 1: 2.5, 2: ("int", -3)})
    torch.testing.assert_close(out, torch.arange(8.0) * 2.5 - 3)
    lib.dispatch("function_constants", (1, 1, 1), (8, 1, 1), buffers={0: out}, constants={0: False})
    torch.testing.assert_close(out, torch.arange(8.0))


def test_atomics(lib):
    counter, fsum, per_tg = torch.zeros(1, dtype=torch.int32), torch.zeros(1), torch.zeros(4, dtype=torch.int32)
    lib.dispatch("atomics", (4, 1, 1), (64, 1, 1), buffers={0: counter, 1: fsum, 2: per_tg})
    assert counter.item() == 256 and fsum.item() == 128.0
    assert torch.all(per_tg == 63)


def test_limits(lib):
    out = torch.zeros(4)
    lib.dispatch("limits", (1, 1, 1), (1, 1, 1), buffers={0: out})
    assert out[0] == torch.finfo(torch.float32).max and out[1] == -torch.finfo(torch.float32).max
    assert out[2] == 65504.0
    if "fastmath" not in str(lib.path):  # under fast math infinity is not a value to rely on (as in Metal)
        assert torch.isinf(out[3])


def test_templates_and_threadgroup_memory():
    lib = metal_cpu.compile(KERNELS / "smoke.metal")
    for name, dtype in [("tg_reverse_float", torch.float32), ("tg_reverse_half", torch.float16)]:
        x = torch.randn(256).to(dtype)
        y = torch.zeros_like(x)
        lib.dispatch(name, (2, 1, 1), (128, 1, 1), buffers={0: x, 1: y}, schedule="reverse")
        assert torch.equal(y.view(2, 128), x.view(2, 128).flip(1))


class AddParams(ctypes.Structure):
    _fields_ = [("n", ctypes.c_uint32), ("scale", ctypes.c_float)]


def test_set_bytes_and_offsets():
    lib = metal_cpu.compile(KERNELS / "smoke.metal")
    a, out = torch.arange(12, dtype=torch.float32), torch.zeros(12)
    stats = lib.dispatch("add_scaled", (1, 1, 1), (32, 1, 1), buffers={0: (a, 8), 1: out},
                         bytes={2: AddParams(10, 2.0)})
    torch.testing.assert_close(out[:10], a[2:12] * 2 + 1)
    assert torch.all(out[10:] == 0)
    assert stats.loaded[0] == 40 and stats.stored[1] == 40 and stats.threadgroups == 1


def test_overlapping_views_keep_every_write(lib):
    buf = torch.zeros(8)
    lib.dispatch("overlapping_views", (1, 1, 1), (2, 1, 1), buffers={0: buf[2:6], 1: buf[0:6]})
    assert buf.tolist() == [0, 0, 1, 2, 0, 0, 0, 0]


def test_sparse_buffers(lib):
    """A bound buffer of 6 GB that is mostly never touched costs the emulator (and the caller) almost no memory: only
    non-zero 4 KB chunks are copied and saved. Writes anywhere still come back, a zero over a non-zero value too."""
    script = """
import resource, sys, torch
from msl import cpu as metal_cpu
lib = metal_cpu.compile(sys.argv[1], fast_math=sys.argv[2] == "1")
buf = torch.empty(3 << 29, dtype=torch.float32)  # 6 GB of address space, untouched
far = buf.numel() - 3
buf[5] = 7.0
buf[far + 1] = 9.0
where = torch.tensor([5, far, 1 << 30], dtype=torch.int64)  # thread 0 writes 0 over 7; 1 and 2 write zero chunks
lib.dispatch("write_far", (1, 1, 1), (3, 1, 1), buffers={0: buf, 1: where})
assert buf[5] == 0 and buf[far] == 1 and buf[1 << 30] == 2 and buf[far + 1] == 9, "writes lost"
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # kB
"""
    fast = "fastmath" in str(lib.path)
    r = subprocess.run([sys.executable, "-c", script, str(KERNELS / "features.metal"), str(int(fast))],
                       capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=600)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) < 2 << 20, "peak memory above 2 GB: the 6 GB buffer was copied"


def test_int_overflow_wraps(lib):
    # 4 * 2^30 wraps to 0 as the GPU's 32-bit multiply does (-fwrapv): an int offset that should have been 64-bit
    # reads the wrong element here too, where an optimiser exploiting undefined overflow could widen it and hide it.
    x, out = torch.arange(8, dtype=torch.float32) + 1, torch.zeros(1)
    lib.dispatch("int_product_index", (1, 1, 1), (1, 1, 1), buffers={0: x, 1: out}, bytes={2: Int2(4, 1 << 30)})
    assert out.item() == 1.0


class Int2(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int32), ("y", ctypes.c_int32)]


def test_combined_kernel_attribute(lib):
    out = torch.zeros(64)
    lib.dispatch("combined_attribute", (1, 1, 1), (64, 1, 1), buffers={0: out})
    assert torch.all(out == 3)
    with pytest.raises(metal_cpu.MetalCPUError, match=r"max_total_threads_per_threadgroup\(64\)"):
        lib.dispatch("combined_attribute", (1, 1, 1), (128, 1, 1), buffers={0: torch.zeros(128)})


class ConvParams(ctypes.Structure):
    _fields_ = [("i", ctypes.c_int32 * 4), ("f", ctypes.c_float * 4)]


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: s["schedule"])
def test_vector_conversions_every_address_space(lib, sched):
    # Constructors and conversions whose arguments are read from device, constant, threadgroup and thread memory
    # (directly, through pointers and through references) convert values as MSL does.
    n = 64
    g = torch.Generator().manual_seed(3)
    di = torch.randint(-1000, 1000, (n, 4), generator=g, dtype=torch.int32)
    di[::3, 1] = 0
    df = torch.randn(n, 4, generator=g) * 300
    df[::4, 2] = 0
    df[1::5, 0] = -0.0
    cf = torch.randn(n, 4, generator=g) * 10
    cf[::2, 3] = 0
    cp = ConvParams((7, 0, -3, 2 ** 20 + 1), (1.0009765625, -2.5, 3.25, -1e-3))
    of, oh = torch.zeros(n, 16, 4), torch.zeros(n, 2, 4, dtype=torch.float16)
    ob, oi = torch.zeros(n, 2, 4, dtype=torch.bfloat16), torch.zeros(n, 2, 4, dtype=torch.int32)
    ou32 = torch.zeros(n, 2, 4, dtype=torch.int32)  # uint4 bits
    lib.dispatch("conversions", (2, 1, 1), (32, 1, 1),
                 buffers={0: di, 1: df, 2: cf, 4: of, 5: oh, 6: ob, 7: ou32, 8: oi}, bytes={3: cp}, **sched)
    ou = ou32.numpy().view(np.uint32)
    cpi, cpf = torch.tensor(list(cp.i), dtype=torch.int32), torch.tensor(list(cp.f))
    fi, nz = di.float(), lambda t: (t != 0).float()
    half, bf = lambda t: t.half().float(), lambda t: t.bfloat16().float()
    expect = [
        fi * 0.5,
        torch.cat([cf[:, :2], df[:, 2:]], 1),
        df[:, :1].expand(n, 4),
        fi,
        fi,
        cpi.float().expand(n, 4),
        torch.stack([cf[:, 0], cf[:, 1], fi[:, 1], fi[:, 0]], 1),
        half(df),
        bf(df),
        nz(di),
        torch.cat([cpf[3].expand(n, 1), cf[:, [2, 1, 0]]], 1),
        fi,
        fi,
        nz(df),
        torch.cat([half(cpf[:2]).expand(n, 2), bf(df[:, 2:])], 1),
        df.trunc(),
    ]
    for k, e in enumerate(expect):
        assert torch.equal(of[:, k], e), f"row {k}: {of[:, k][:3]} != {e[:3]}"
    assert torch.equal(oh[:, 0], df.half())
    assert torch.equal(oh[:, 1], df.bfloat16().float().half())
    assert torch.equal(ob[:, 0], cf.bfloat16())
    assert torch.equal(ob[:, 1], di.float().bfloat16())
    np.testing.assert_array_equal(ou[:, 0], di.numpy().astype(np.uint32))
    np.testing.assert_array_equal(ou[:, 1], np.concatenate(
        [np.broadcast_to((cpi[:2] != 0).numpy(), (n, 2)), (df[:, :2] != 0).numpy()], 1).astype(np.uint32))
    assert torch.equal(oi[:, 0], df.trunc().int())
    assert torch.equal(oi[:, 1], (cf != 0).int())
