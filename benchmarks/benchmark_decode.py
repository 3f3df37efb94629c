"""`kernels benchmark` workloads of metal-flash-sdpa: paged decode (flash_attn_with_kvcache) and varlen prefill.

    kernels benchmark kernels-community/metal-flash-sdpa@v2      (or a local checkout: kernels benchmark ./)

Each workload's verify_* is torch SDPA in float32 over the same K/V, so the runner's reference time is the torch
baseline. The runner warms up by iteration count; benchmarks/bench_decode.py does the time-based warm-up Apple GPUs
need and compares all decode paths. On a device other than mps (the emulated Linux build) the shapes are the
emulator's scaled-down ones (benchmarks/cases.py EMULATED).
"""

import sys
from pathlib import Path

import torch
from kernels.benchmark import Benchmark

# `kernels benchmark` loads this file by path, outside any package: its sibling cases.py is found on its folder's path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import cases  # noqa: E402


class MetalFlashSdpaBenchmark(Benchmark):
    seed = 0

    def _decode(self, name: str) -> None:
        c = cases.DECODE_CASES[name] if self.device == "mps" else cases.EMULATED[name]
        self.case = c
        self.t = cases.make_decode(c, self.device, torch.float16)
        self.out = torch.empty(c.B, 1, c.H, c.D, dtype=torch.float16, device=self.device)

    def _prefill(self, name: str) -> None:
        c = cases.PREFILL_CASES[name] if self.device == "mps" else cases.EMULATED[name]
        self.case = c
        self.t = cases.make_prefill(c, self.device, torch.float16)
        self.out = torch.empty(c.B * c.S, c.H, c.D, dtype=torch.float16, device=self.device)

    # decode, B=4 H=16 D=128 S=50 (the first port: ~134 us/call on an M3 Max)
    def setup_decode_b4_h16_s50(self):
        self._decode("b4_h16_s50")

    def benchmark_decode_b4_h16_s50(self):
        self.out = cases.paged_decode(self.kernel, self.case, self.t)

    def verify_decode_b4_h16_s50(self) -> torch.Tensor:
        return cases.reference_decode(self.case, self.t)

    # decode, B=1, 32 query / 8 KV heads, D=128, S=16384 (split-K)
    def setup_decode_b1_gqa8_s16k(self):
        self._decode("b1_gqa8_s16k")

    def benchmark_decode_b1_gqa8_s16k(self):
        self.out = cases.paged_decode(self.kernel, self.case, self.t)

    def verify_decode_b1_gqa8_s16k(self) -> torch.Tensor:
        return cases.reference_decode(self.case, self.t)

    # decode, B=32 H=16 D=128 S=2048
    def setup_decode_b32_h16_s2k(self):
        self._decode("b32_h16_s2k")

    def benchmark_decode_b32_h16_s2k(self):
        self.out = cases.paged_decode(self.kernel, self.case, self.t)

    def verify_decode_b32_h16_s2k(self) -> torch.Tensor:
        return cases.reference_decode(self.case, self.t)

    # prefill, varlen kernel, B=2 H=32/Hkv=8 D=128 S=2048 causal
    def setup_prefill_gqa8_s2k(self):
        self._prefill("prefill_gqa8_s2k")

    def benchmark_prefill_gqa8_s2k(self):
        self.out = cases.varlen_prefill(self.kernel, self.case, self.t)

    def verify_prefill_gqa8_s2k(self) -> torch.Tensor:
        t32 = {k: (v.float() if v.is_floating_point() else v) for k, v in self.t.items()}
        return cases.sdpa_prefill(None, self.case, t32).to(torch.float16)
