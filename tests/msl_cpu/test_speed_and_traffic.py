"""The emulator runs decode-shaped kernels correctly, and its traffic counters see every byte. No time is asserted:
the emulator's speed belongs in benchmarks (a shared 2-core machine measured 241 ms for what took 25 ms alone)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from msl import cpu as metal_cpu

KERNELS = Path(__file__).parent / "kernels"


@pytest.fixture(scope="module")
def lib():
    return metal_cpu.compile(KERNELS / "decode_shape.metal", fast_math=True)


def run(lib, B=4, H=16, D=128, S=50, **kw):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g) for shape in [(B, H, D), (B, S, H, D), (B, S, H, D)])
    out = torch.zeros(B, H, D)
    params = np.array([(S, H, D ** -0.5)], dtype=[("seq_len", "<u4"), ("num_heads", "<u4"), ("scale", "<f4")])
    stats = lib.dispatch("decode_shape_d128", (H, B, 1), (32, 1, 1), buffers={0: q, 1: k, 2: v, 3: out},
                         bytes={4: params}, **kw)
    ref = torch.softmax(torch.einsum("bhd,bshd->bhs", q.double(), k.double()) * D ** -0.5, -1)
    ref = torch.einsum("bhs,bshd->bhd", ref, v.double())
    return out, ref, stats, (q, k, v)


@pytest.mark.parametrize("check_races", [True, False])
def test_decode_shape(lib, check_races):
    out, ref, *_ = run(lib, check_races=check_races)
    assert (out.double() - ref).abs().max() < 1e-5


def test_traffic_counts_every_byte_once(lib):
    out, ref, stats, (q, k, v) = run(lib, B=2, H=4, S=37)
    assert stats.loaded[1] == k.numel() * 4 and stats.loaded[2] == v.numel() * 4
    assert stats.loaded[0] == q.numel() * 4 and stats.stored[3] == out.numel() * 4
    assert stats.threadgroups == 2 * 4 and stats.threads == 2 * 4 * 32


def test_stats_log(lib):
    rt = metal_cpu.runtime()
    rt.reset_stats()
    run(lib, B=1, H=2, S=5)
    run(lib, B=1, H=3, S=5)
    log = rt.stats()
    assert [s.threadgroups for s in log] == [2, 3] and all(s.kernel == "decode_shape_d128" for s in log)
