"""Prefill against the peers on the NVIDIA proxy (issue 21): the project's varlen forward, MLX 0.32.4's steel attention
and llama.cpp's tiled flash attention (PTX from `peers_prefill.py build`, in the ignored .peers/ptx), each launched as
its own host code would, and torch's flash SDPA (the GPU's ceiling), under each simdgroup_matrix lowering.

    python3 -m tests.metal_cuda.bench_prefill --json $OUT/prefill.json [--mma 1 0] [--rows 0,5] [--seqlens 512 2048]
    # GPU machine; carry .cache/metal_cuda and .peers/ptx (built here: targets --mma 1 / --mma 0, peers_prefill build)
    python3 -m tests.metal_cuda.bench_prefill --nax --mma 1 ...   # also MLX's NAX (M5) kernel: column mlx_nax
    python3 -m tests.metal_cuda.bench_prefill --tops --nax --mma 1 --sides ours,tops,mlx_nax,torch  # issue 23's table

Rows (issue 21's grid): causal prefill, B = 1 at S 512, 2048, 8192, 32768, and a varlen batch of four sequences of
mixed lengths (320 + 1216 + 2944 + 4992 tokens: ours in one varlen call, each peer and torch once per sequence, as
their host code has no varlen prefill); H / Hkv 32/8 and 32/32; D 64, 128, 256; fp16 and bf16. Every output is
checked against SDPA in fp32 before it is timed. Timing: a CUDA graph of N calls (N chosen so a replay takes
~50 ms), median of 7 replays. "x MLX" = t_MLX / t_ours (above 1: ours is faster).

The pure parts (launch geometry, parameter structs, FLOP counts, the table) need no GPU: test_bench_prefill.py.
"""

import argparse
import ctypes
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
PEER_PTX = ROOT / ".peers" / "ptx"

HEADS = ((32, 8), (32, 32))
HEAD_DIMS = (64, 128, 256)
SEQLENS = (512, 2048, 8192, 32768)
MIXED = (320, 1216, 2944, 4992)  # multiples of 64: the llama.cpp launcher has no K/V padding pass
DTYPES = ("fp16", "bf16")
MLX_TYPE = {"fp16": "float16", "bf16": "bfloat16"}
GGML_TYPE = {"fp16": "f16", "bf16": "bf16"}


@dataclass(frozen=True)
class Row:
    B: int
    H: int
    Hkv: int
    S: int
    D: int
    dtype: str
    causal: bool
    lengths: Tuple[int, ...] = ()  # a varlen batch (B = 1, S = their sum): the sequences' lengths

    def label(self) -> str:
        shape = f"varlen {'+'.join(map(str, self.lengths))}" if self.lengths else f"S={self.S}"
        return f"H={self.H}/{self.Hkv} D={self.D} {shape} {self.dtype}{' causal' if self.causal else ''}"

    def sequences(self) -> List["Row"]:
        """The row as B = 1 sequences: itself, or one per length of a varlen batch."""
        if not self.lengths:
            return [self]
        return [Row(1, self.H, self.Hkv, n, self.D, self.dtype, self.causal) for n in self.lengths]


def rows() -> List[Row]:
    dense = [Row(1, h, hkv, s, d, dt, True) for (h, hkv) in HEADS for d in HEAD_DIMS for s in SEQLENS for dt in DTYPES]
    mixed = [Row(1, h, hkv, sum(MIXED), d, dt, True, MIXED) for (h, hkv) in HEADS for d in HEAD_DIMS for dt in DTYPES]
    return dense + mixed


def flops(r: Row) -> float:
    """Two matmuls of 2 S_q S_k D each per head; causal counts the visible (lower-triangle) pairs only."""
    if r.lengths:
        return sum(flops(x) for x in r.sequences())
    pairs = r.S * (r.S + 1) / 2 if r.causal else r.S * r.S
    return 4.0 * r.B * r.H * pairs * r.D


# ---- MLX 0.32.4 steel attention: MLX's host code (scaled_dot_product_attention.cpp, no NAX) ------------------------
class MLXAttnParams(ctypes.Structure):
    """mlx::steel::AttnParams (steel/attn/params.h); strides in elements, axes (B, H, L), D stride 1."""
    _fields_ = [("B", ctypes.c_int32), ("H", ctypes.c_int32), ("D", ctypes.c_int32), ("qL", ctypes.c_int32),
                ("kL", ctypes.c_int32), ("gqa_factor", ctypes.c_int32), ("scale", ctypes.c_float),
                ("NQ", ctypes.c_int32), ("NK", ctypes.c_int32), ("NQ_aligned", ctypes.c_int32),
                ("NK_aligned", ctypes.c_int32), ("qL_rem", ctypes.c_int32), ("kL_rem", ctypes.c_int32),
                ("qL_off", ctypes.c_int32), ("Q_strides", ctypes.c_int64 * 3), ("K_strides", ctypes.c_int64 * 3),
                ("V_strides", ctypes.c_int64 * 3), ("O_strides", ctypes.c_int64 * 3)]


assert ctypes.sizeof(MLXAttnParams) == 152 and MLXAttnParams.Q_strides.offset == 56

# Function-constant indices of steel_attention.h.
MLX_FC = {"align_Q": 200, "align_K": 201, "has_mask": 300, "do_causal": 301, "has_sinks": 302, "save_lse": 303}
# D = 256 in 0.32.4 runs wm4_wn2 with BK 16 or 32 (the metallib holds both; the host code that picks between them
# was not available here). BK = 32 keeps Q in registers for 16-bit types (q_in_registers in the kernel), which
# suggests it is the 16-bit choice: the launcher uses it and the table also times BK = 16 at D = 256.
MLX_D256_BK = 32


@dataclass
class MLXPlan:
    kernel: str
    grid: Tuple[int, int, int]
    threads: Tuple[int, int, int]
    constants: Dict[int, bool]
    params: MLXAttnParams


def mlx_strides(*tensors):
    """MLX's (B, H, L) element strides of [B, S, H, D] tensors."""
    return [(x.stride(0), x.stride(2), x.stride(1)) for x in tensors]


def mlx_plan(r: Row, q_strides, k_strides, v_strides, o_strides, scale: float, bk: Optional[int] = None) -> MLXPlan:
    """Kernel, grid, function constants and AttnParams as MLX's sdpa_full_self_attention_metal builds them on a GPU
    without NAX (pre-M5). Strides in elements, (B, H, L)."""
    bq, wm = 32, 4
    if r.D == 256:
        wn, bk = 2, bk or MLX_D256_BK
    else:
        wn, bk = 1, bk or (32 if r.D < 128 else 16)
    t = MLX_TYPE[r.dtype]
    kernel = f"steel_attention_{t}_bq{bq}_bk{bk}_bd{r.D}_bv{r.D}_wm{wm}_wn{wn}_mask{t}"
    return _mlx_launch(r, kernel, bq, bk, wm, wn, (q_strides, k_strides, v_strides, o_strides), scale)


def _mlx_launch(r: Row, kernel: str, bq: int, bk: int, wm: int, wn: int, strides, scale: float) -> MLXPlan:
    """The AttnParams, function constants and grid both MLX launchers build for a self-attention row (qL = kL);
    strides: Q, K, V, O in elements, (B, H, L)."""
    qL = kL = r.S
    NQ, NK = (qL + bq - 1) // bq, (kL + bk - 1) // bk
    NQa, NKa = qL // bq, kL // bk
    p = MLXAttnParams(B=r.B, H=r.H, D=r.D, qL=qL, kL=kL, gqa_factor=r.H // r.Hkv, scale=scale, NQ=NQ, NK=NK,
                      NQ_aligned=NQa, NK_aligned=NKa, qL_rem=qL - NQa * bq, kL_rem=kL - NKa * bk, qL_off=kL - qL)
    for name, st in zip(("Q_strides", "K_strides", "V_strides", "O_strides"), strides):
        getattr(p, name)[:] = [int(x) for x in st]
    constants = {MLX_FC["align_Q"]: qL % bq == 0, MLX_FC["align_K"]: kL % bk == 0, MLX_FC["has_mask"]: False,
                 MLX_FC["do_causal"]: r.causal, MLX_FC["has_sinks"]: False, MLX_FC["save_lse"]: False}
    return MLXPlan(kernel, (NQ, r.H, r.B), (32, wm, wn), constants, p)


# ---- MLX 0.32.4 NAX attention: MLX's host code on a GPU with NAX (M5), sdpa_full_self_attention_nax ----------------
MLX_NAX_BQ, MLX_NAX_BK, MLX_NAX_WM = 64, 32, 4


def mlx_nax_plan(r: Row, q_strides, k_strides, v_strides, o_strides, scale: float) -> MLXPlan:
    """Kernel, grid, function constants and AttnParams as MLX's host code builds them where NAX is available
    (peers_prefill.mlx_nax_instances says what was read): bq 64, bk 32, wm 4; D = 256 on the head-dim split kernel
    with wn = 2. The kL widening of D = 256 causal launches with kL % 32 != 0 is not modelled (S % 32 == 0 here)."""
    bq, bk, wm = MLX_NAX_BQ, MLX_NAX_BK, MLX_NAX_WM
    if r.S % bk and r.D == 256 and r.causal:
        raise ValueError(f"mlx-nax launcher: D = 256 causal with S = {r.S} % {bk} != 0 (host-side kL widening)")
    wn = 2 if r.D == 256 else 1
    t = MLX_TYPE[r.dtype]
    kernel = f"steel_attention_{'dsplit_' if wn == 2 else ''}{t}_bq{bq}_bk{bk}_bd{r.D}_wm{wm}_wn{wn}_mask{t}"
    return _mlx_launch(r, kernel, bq, bk, wm, wn, (q_strides, k_strides, v_strides, o_strides), scale)


# ---- llama.cpp tiled flash attention: ggml-metal-ops.cpp (flash_attn_ext, non-vec path) ---------------------------
class GGMLFlashAttnArgs(ctypes.Structure):
    """ggml_metal_kargs_flash_attn_ext (ggml-metal-impl.h): ne* counts (int32), nb* byte strides (uint64)."""
    _fields_ = [("ne01", ctypes.c_int32), ("ne02", ctypes.c_int32), ("ne03", ctypes.c_int32),
                ("nb01", ctypes.c_uint64), ("nb02", ctypes.c_uint64), ("nb03", ctypes.c_uint64),
                ("ne11", ctypes.c_int32), ("ne_12_2", ctypes.c_int32), ("ne_12_3", ctypes.c_int32),
                ("ns10", ctypes.c_int32), ("nb11", ctypes.c_uint64), ("nb12", ctypes.c_uint64),
                ("nb13", ctypes.c_uint64), ("ns20", ctypes.c_int32), ("nb21", ctypes.c_uint64),
                ("nb22", ctypes.c_uint64), ("nb23", ctypes.c_uint64), ("ne31", ctypes.c_int32),
                ("ne32", ctypes.c_int32), ("ne33", ctypes.c_int32), ("nb31", ctypes.c_uint64),
                ("nb32", ctypes.c_uint64), ("nb33", ctypes.c_uint64), ("ne1", ctypes.c_int32), ("ne2", ctypes.c_int32),
                ("ne3", ctypes.c_int32), ("scale", ctypes.c_float), ("max_bias", ctypes.c_float),
                ("m0", ctypes.c_float), ("m1", ctypes.c_float), ("n_head_log2", ctypes.c_int32),
                ("logit_softcap", ctypes.c_float)]


class GGMLBlkArgs(ctypes.Structure):
    """ggml_metal_kargs_flash_attn_ext_blk."""
    _fields_ = [("ne01", ctypes.c_int32), ("ne30", ctypes.c_int32), ("ne31", ctypes.c_int32), ("ne32", ctypes.c_int32),
                ("ne33", ctypes.c_int32), ("nb31", ctypes.c_uint64), ("nb32", ctypes.c_uint64),
                ("nb33", ctypes.c_uint64)]


assert ctypes.sizeof(GGMLFlashAttnArgs) == 192 and GGMLFlashAttnArgs.nb31.offset == 128
assert ctypes.sizeof(GGMLBlkArgs) == 48

GGML_NQPTG, GGML_NCPSG, GGML_NSG = 8, 64, 4  # queries, keys per threadgroup; simdgroups (D < 512)


@dataclass
class GGMLPlan:
    variant: str            # the PTX folder (peers_prefill.ggml_variants)
    kernel: str
    grid: Tuple[int, int, int]
    threads: Tuple[int, int, int]
    smem: int               # [[threadgroup(0)]] bytes
    args: GGMLFlashAttnArgs
    blk: Optional[dict] = field(default=None)  # the block-map pass (causal: ggml's mask path)


def ggml_plan(r: Row, scale: float) -> GGMLPlan:
    """ggml's launch for q f32 [B, S, H, D] (ggml [D, n_q, H, B] permuted as llama.cpp does: nb01 = row of one query),
    K / V [B, Hkv, S, D] in f16 / bf16 (contiguous rows: ns10 = D, the value baked into the PTX), dst f32
    [B, S, H, D] (ggml's [D, H, n_q, B]) and, when causal, an f16 mask [S_q, S_k] of 0 / -inf with its block map."""
    if r.S % GGML_NCPSG or r.S % GGML_NQPTG:
        raise ValueError(f"ggml launcher: S = {r.S} must be a multiple of {GGML_NCPSG} (no K/V padding pass built)")
    D, S, H, Hkv, B = r.D, r.S, r.H, r.Hkv, r.B
    n_head_log2 = 1 << int(math.floor(math.log2(H)))
    a = GGMLFlashAttnArgs(
        ne01=S, ne02=H, ne03=B, nb01=4 * H * D, nb02=4 * D, nb03=4 * S * H * D,
        ne11=S, ne_12_2=Hkv, ne_12_3=B, ns10=D, nb11=2 * D, nb12=2 * D * S, nb13=2 * D * S * Hkv,
        ns20=D, nb21=2 * D, nb22=2 * D * S, nb23=2 * D * S * Hkv,
        ne31=S, ne32=1, ne33=1, nb31=2 * S, nb32=2 * S * S, nb33=2 * S * S,
        ne1=H, ne2=S, ne3=B, scale=scale, max_bias=0.0, m0=1.0, m1=1.0, n_head_log2=n_head_log2, logit_softcap=0.0)
    dv_pad = (D + 63) // 64 * 64
    smem = (GGML_NQPTG * (D + 2 * dv_pad + 4 * GGML_NCPSG) * 2 + 15) // 16 * 16
    blk = None
    if r.causal:
        nblk1, nblk0 = (S + GGML_NQPTG - 1) // GGML_NQPTG, (S + GGML_NCPSG - 1) // GGML_NCPSG
        blk = dict(kernel="kernel_flash_attn_ext_blk", grid=(nblk0, nblk1, 1), threads=(32, 1, 1), bytes=nblk0 * nblk1,
                   args=GGMLBlkArgs(ne01=S, ne30=S, ne31=S, ne32=1, ne33=1, nb31=2 * S, nb32=2 * S * S,
                                    nb33=2 * S * S))
    return GGMLPlan(f"fa_d{D}_mask{int(r.causal)}", f"kernel_flash_attn_ext_{GGML_TYPE[r.dtype]}_dk{D}_dv{D}",
                    ((S + GGML_NQPTG - 1) // GGML_NQPTG, H, B), (32, GGML_NSG, 1), smem, a, blk)


# ---- the table ----------------------------------------------------------------------------------------------------
COLUMNS = ("ours", "mlx", "ggml", "torch")


def table(results: List[dict]) -> str:
    """Markdown: per row and lowering, us and TFLOPS of each side, ours / best peer, then the experiments' us. MLX's
    column is the faster of its instances where two were timed (D = 256: BK 32 and BK 16)."""
    # MLX NAX and the experiments timed beside ours (--nax, --variant, --tops: the 64-row tensor-ops kernel and the
    # 32-row one): a column each, in us, where any row has them.
    extra = [c for c in ("mlx_nax", "variant", "tops", "tops32") if any(res.get(f"{c}_us") for res in results)]
    lines = ["| shape | mma | ours us (TF) | MLX us (TF) | llama.cpp us (TF) | torch flash us (TF) | x MLX "
             "| x llama.cpp | x best peer |" + "".join(f" {c} us |" for c in extra),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra)]
    ratios = {}
    for res in results:
        mlx = [res[k] for k in ("mlx_us", "mlx_bk16_us") if res.get(k)]
        res = dict(res, mlx_us=min(mlx)) if mlx else res
        cells = []
        for c in COLUMNS:
            us = res.get(f"{c}_us")
            cells.append(f"{us:.1f} ({res['flops'] / us / 1e6:.1f})" if us else res.get(f"{c}_error", "-")[:40])
        x = {}
        for c in ("mlx", "ggml"):
            if res.get(f"{c}_us") and res.get("ours_us"):
                x[c] = res[f"{c}_us"] / res["ours_us"]
        if x:
            x["best"] = min(x.values())
        for k, v in x.items():
            ratios.setdefault((res["mma"], k), []).append(v)
        if res.get("tops_us") and res.get("mlx_nax_us"):  # issue 23's bound: ours on tensor ops against NAX
            ratios.setdefault((res["mma"], "NAX, tops"), []).append(res["mlx_nax_us"] / res["tops_us"])
        xs = [f"{x[k]:.2f}" if k in x else "-" for k in ("mlx", "ggml", "best")]
        xs += [f"{res[f'{c}_us']:.1f}" if res.get(f"{c}_us") else res.get(f"{c}_error", "-")[:40] for c in extra]
        lines.append(f"| {res['label']} | {res['mma']} | " + " | ".join(cells) + " | " + " | ".join(xs) + " |")
    if ratios:
        lines.append("")
    for (mma, k), v in sorted(ratios.items()):
        gm = math.exp(sum(math.log(x) for x in v) / len(v))
        lines.append(f"mma={mma} x {k}: geometric mean {gm:.2f}, minimum {min(v):.2f} over {len(v)} rows")
    return "\n".join(lines)


# ---- the GPU part -------------------------------------------------------------------------------------------------
def _gpu():
    import torch
    import torch.nn.functional as F

    from msl.cuda import launch

    from . import gpu_common as gc
    from . import targets
    return torch, F, launch, gc, targets


def time_us(fn, target_ms: float = 50.0, replays: int = 7) -> float:
    """Median us per call: a CUDA graph of N calls (N so that a replay takes ~target_ms), `replays` replays (3 when
    one call takes over 100 ms: the shuffle lowering at S = 8192 and above)."""
    import torch

    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    one_ms = a.elapsed_time(b)
    n = max(1, min(200, int(target_ms / max(one_ms, 1e-3))))
    replays = replays if one_ms < 100.0 else 3
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / n)
    return sorted(times)[len(times) // 2]


def check(out, ref, what: str, dtype: str) -> float:
    err = ((out.float() - ref).norm() / ref.norm()).item()
    bound = 2e-2 if dtype == "bf16" else 5e-3
    if not err <= bound:
        raise AssertionError(f"{what}: relative error {err:.3g} against SDPA in fp32 (bound {bound})")
    return err


class Runner:
    """Libraries per lowering (ours from the targets' index, the peers from .peers/ptx) and one row's tensors."""

    def __init__(self, variant: Optional[str] = None, tops: bool = False, nax: bool = False,
                 sides: Optional[List[str]] = None):
        self.torch, self.F, self.launch, self.gc, self.targets = _gpu()
        # Only these sides (--sides; None: every side the flags ask for), to fit a long table in one command.
        self.sides = sides
        self._ours: Dict[int, dict] = {}
        self._peer: Dict[Tuple[str, int], object] = {}
        # An experiment: another build of our forward (a PTX folder of the proxy cache, e.g. from a branch's headers,
        # same planner), timed as the side "variant" beside the tree's.
        self.variant = variant
        # Our forward on Metal 4 tensor ops (attention_tensor_ops.h), timed as two sides: "tops", the kernel the package
        # routes to (the planner's tensor-ops plan: 64-row query tiles, S and P in cooperative tensors), and "tops32",
        # the 32-row kernel kept to compare (the simdgroup forward's plan under its own kernel names).
        self.tops = tops
        # MLX's NAX attention (the M5 tensor-ops kernel; peers_prefill build --peer mlx-nax), timed as the side
        # "mlx_nax" under the lowerings 1 and 2 (the proxy lowers its tensor ops on tensor cores only).
        self.nax = nax

    def wants(self, side: str) -> bool:
        return self.sides is None or side in self.sides

    def ours_libs(self, mma: int):
        if mma not in self._ours:
            names = ["attention_varlen"] + (["attention_tensor_ops"] if self.tops else [])
            libs = self.targets.load_all(mma, names=names)
            self._ours[mma] = {n: self.launch.Library(p) for n, p in libs.items()}
        return self._ours[mma]

    def peer_lib(self, path: Path):
        if path not in self._peer:
            if not (path / "manifest.json").exists():
                raise FileNotFoundError(f"{path}: run `python3 -m tests.metal_cuda.peers_prefill build` where clang-19 "
                                        f"is, and carry .peers/ptx")
            self._peer[path] = self.launch.Library(path)
        return self._peer[path]

    def run_row(self, r: Row, modes, with_torch: bool) -> List[dict]:
        """One row: B = 1 packed tensors [1, S, H, D]; a varlen row's sequences are consecutive slices of them."""
        torch, F = self.torch, self.F
        torch.cuda.empty_cache()  # the previous row's tensors are gone
        dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[r.dtype]
        g = torch.Generator(device="cuda").manual_seed(r.S + r.D)
        q = torch.randn(r.B, r.S, r.H, r.D, generator=g, device="cuda").to(dt)     # [B, S, H, D]
        k = torch.randn(r.B, r.S, r.Hkv, r.D, generator=g, device="cuda").to(dt)   # [B, S, Hkv, D]
        v = torch.randn(r.B, r.S, r.Hkv, r.D, generator=g, device="cuda").to(dt)
        scale = r.D ** -0.5
        seqs, bounds = r.sequences(), [0]
        for x in seqs:
            bounds.append(bounds[-1] + x.S)
        parts = [(x, q[:, a:b], k[:, a:b], v[:, a:b]) for x, a, b in zip(seqs, bounds, bounds[1:])]
        # fp32 reference with K / V expanded to H heads: the memory-efficient kernel, never an S x S matrix.
        refs = []
        for x, qs, ks, vs in parts:
            kr, vr = (t.transpose(1, 2).float().repeat_interleave(r.H // r.Hkv, dim=1) for t in (ks, vs))
            refs.append(F.scaled_dot_product_attention(qs.transpose(1, 2).float(), kr, vr, is_causal=r.causal,
                                                       scale=scale).transpose(1, 2))
            del kr, vr
        base = dict(label=r.label(), flops=flops(r), **r.__dict__)
        out_rows = []

        def timed(side, *args):
            """A side's per-sequence launches (each output checked first), timed together."""
            fns = [side(qs, ks, vs, x, scale, ref, *args) for (x, qs, ks, vs), ref in zip(parts, refs)]
            return time_us(lambda: [fn() for fn in fns])

        torch_us = None
        if with_torch and self.wants("torch"):
            try:
                torch_us = timed(self.torch_flash)
            except Exception as e:  # noqa: BLE001 (a side that cannot run a row says so in the table)
                base["torch_error"] = f"{type(e).__name__}: {e}"[:120]
        for mma in modes:
            res = dict(base, mma=mma)
            if torch_us:
                res["torch_us"] = torch_us
            sides = (("ours", lambda: time_us(self.ours(q, k, v, r, scale, torch.cat(refs, 1), mma))),
                     ("mlx", lambda: timed(self.mlx, mma)), ("ggml", lambda: timed(self.ggml, mma)))
            if r.D == 256:
                sides += (("mlx_bk16", lambda: timed(self.mlx, mma, 16)),)
            if self.variant:
                sides += (("variant", lambda: time_us(self.ours(q, k, v, r, scale, torch.cat(refs, 1), mma,
                                                                variant=True))),)
            if self.nax and mma != 0:
                sides += (("mlx_nax", lambda: timed(self.mlx_nax, mma)),)
            if self.tops:
                sides += tuple((kind, lambda kind=kind: time_us(self.ours(q, k, v, r, scale, torch.cat(refs, 1), mma,
                                                                          tops=kind))) for kind in ("tops", "tops32"))
            for side, run in sides:
                if not self.wants(side):
                    continue
                try:
                    res[f"{side}_us"] = run()
                except Exception as e:  # noqa: BLE001
                    res[f"{side}_error"] = f"{type(e).__name__}: {e}"[:200]
            out_rows.append(res)
        return out_rows

    def torch_flash(self, q, k, v, r, scale, ref):
        F = self.F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, S, D] views
        if r.H != r.Hkv:  # flash's GQA support varies by torch version: expand once, outside the timing
            kh, vh = (x.repeat_interleave(r.H // r.Hkv, dim=1) for x in (kh, vh))

        def fn():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qh, kh, vh, is_causal=r.causal, scale=scale)
        check(fn().transpose(1, 2), ref, "torch flash", r.dtype)
        return fn

    def ours(self, q, k, v, r, scale, ref, mma, variant=False, tops=""):
        """The whole row in one varlen call (a varlen row's sequences by cu_seqlens); returns the launch. tops: "tops"
        (the tensor-ops plan and kernel) or "tops32" (the 32-row tensor-ops kernel on the simdgroup forward's plan)."""
        torch = self.torch
        T = r.B * r.S
        qv, kv, vv = q.reshape(T, r.H, r.D), k.reshape(T, r.Hkv, r.D), v.reshape(T, r.Hkv, r.D)
        out = torch.full_like(qv, float("nan"))
        lse = torch.empty(r.H, T, device="cuda", dtype=torch.float32)
        lengths = [x.S for x in r.sequences()] * r.B if r.lengths else [r.S] * r.B
        cu = torch.tensor([0] + [sum(lengths[: i + 1]) for i in range(len(lengths))], dtype=torch.int32,
                          device="cuda")
        # The planner's command-buffer budget for a GPU of this one's SMs (planner_common.h: it grows with the cores).
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        plan = self.gc.planner().plan_varlen(qv, kv, vv, out, lse, cu, cu, None, None, max(lengths), scale, 0.0, -1,
                                             0 if r.causal else -1, None, sms, tensor_ops=tops == "tops")
        if tops == "tops":
            assert all(d["kernel"].startswith("flash_attn_varlen_tops_") for d in plan), [d["kernel"] for d in plan]
        libs = self.ours_libs(mma)
        if variant:
            from msl.cuda import compiler

            libs = dict(libs, attention_varlen=self.launch.Library(compiler.cache_dir() / self.variant))
        if tops == "tops32":  # the same plan, each dispatch on the 32-row tensor-ops kernel of its dtype and head dim
            plan = [dict(d, kernel=d["kernel"].replace("flash_attn_varlen_", "flash_attn_varlen_tops32_", 1))
                    for d in plan]
        prepared = self.launch.prepare_plan(libs, plan)

        def fn():
            for p in prepared:
                p.launch()
        fn()
        torch.cuda.synchronize()
        side = " variant" if variant else f" tensor ops ({tops})" if tops else ""
        check(out.view(r.B, r.S, r.H, r.D), ref, f"ours{side} mma={mma}", r.dtype)
        return fn

    def mlx(self, q, k, v, r, scale, ref, mma, bk=None):
        out = self.torch.full_like(q, float("nan"))  # [B, S, H, D]; MLX's (B, H, L) strides over it
        plan = mlx_plan(r, *mlx_strides(q, k, v, out), scale, bk=bk)
        return self.mlx_launch(plan, f"mlx-mma{mma}", q, k, v, out, ref, r, f"MLX {plan.kernel} mma={mma}")

    def mlx_nax(self, q, k, v, r, scale, ref, mma):
        """MLX's NAX kernel as its host code launches it (mlx_nax_plan); output checked against SDPA first."""
        out = self.torch.full_like(q, float("nan"))
        plan = mlx_nax_plan(r, *mlx_strides(q, k, v, out), scale)
        return self.mlx_launch(plan, f"mlx-nax-mma{mma}", q, k, v, out, ref, r, f"MLX NAX {plan.kernel} mma={mma}")

    def mlx_launch(self, plan, folder, q, k, v, out, ref, r, label):
        """One of MLX's launches (its buffer indices; the function constants its kernel declares), run once and
        checked against SDPA; returns the launch."""
        # Buffers 5-8 are read only under a constant that is false here.
        scratch = self.torch.zeros(64, device="cuda", dtype=self.torch.float32)
        lib = self.peer_lib(PEER_PTX / folder)
        declared = {fc["index"] for fc in lib.manifest["kernels"][plan.kernel]["function_constants"]}
        p = lib.prepare(plan.kernel, plan.grid, plan.threads,
                        buffers={0: q, 1: k, 2: v, 3: out, 5: scratch, 6: scratch, 7: scratch, 8: scratch},
                        bytes={4: plan.params}, constants={i: c for i, c in plan.constants.items() if i in declared})
        p.launch()
        self.torch.cuda.synchronize()
        check(out, ref, label, r.dtype)
        return p.launch

    def ggml(self, q, k, v, r, scale, ref, mma):
        torch = self.torch
        plan = ggml_plan(r, scale)
        root = PEER_PTX / f"ggml-mma{mma}"
        qf = q.float().contiguous()                             # ggml-attn's glue hands the kernel f32 q
        kc, vc = (x.transpose(1, 2).contiguous() for x in (k, v))  # [B, Hkv, S, D]
        dst = torch.full((r.B, r.S, r.H, r.D), float("nan"), device="cuda", dtype=torch.float32)
        launches = []
        mask = blk = torch.zeros(16, device="cuda", dtype=torch.uint8)
        if plan.blk:
            i = torch.arange(r.S, device="cuda")
            mask = torch.where(i[None, :] <= i[:, None], 0.0, float("-inf")).to(torch.float16).contiguous()
            blk = torch.zeros(plan.blk["bytes"], device="cuda", dtype=torch.uint8)
            lib_blk = self.peer_lib(root / "blk")
            launches.append(lib_blk.prepare(plan.blk["kernel"], plan.blk["grid"], plan.blk["threads"],
                                            buffers={1: mask, 2: blk}, bytes={0: plan.blk["args"]}))
        lib = self.peer_lib(root / plan.variant)
        launches.append(lib.prepare(plan.kernel, plan.grid, plan.threads,
                                    buffers={1: qf, 2: kc, 3: vc, 4: mask, 5: qf, 6: dst, 7: blk, 8: dst},
                                    bytes={0: plan.args}, threadgroup_memory={0: plan.smem}))

        def fn():
            for p in launches:
                p.launch()
        fn()
        torch.cuda.synchronize()
        check(dst, ref, f"llama.cpp {plan.kernel} mma={mma}", r.dtype)
        return fn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results here (rewritten after every row)")
    ap.add_argument("--mma", type=int, nargs="+", default=[1, 0], help="simdgroup_matrix lowerings to time")
    ap.add_argument("--rows", help="comma-separated row indices (default: all; --list shows them)")
    ap.add_argument("--seqlens", type=int, nargs="+", help="only rows of these S (the varlen batch: 9472; e.g. 512 "
                    "for the shuffle lowering, which takes seconds per call from S = 8192)")
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    ap.add_argument("--variant", help="also time our forward from this PTX folder of the proxy cache (an experiment)")
    ap.add_argument("--tops", action="store_true", help="also time our forward on Metal 4 tensor ops "
                    "(attention_tensor_ops.h; targets.py's attention_tensor_ops): columns tops (the routed 64-row "
                    "kernel, the planner's tensor-ops plan) and tops32 (the 32-row kernel on the simdgroup plan)")
    ap.add_argument("--nax", action="store_true", help="also time MLX's NAX attention (the M5 tensor-ops kernel, "
                    "PTX from `peers_prefill build --peer mlx-nax --mma 1`; lowerings 1 and 2 only), column mlx_nax")
    ap.add_argument("--sides", help="comma-separated sides to time (default: all the flags ask for): ours, mlx, "
                    "mlx_bk16, ggml, torch, and with their flags mlx_nax, tops, tops32, variant")
    a = ap.parse_args(argv)
    all_rows = rows()
    if a.list:
        for i, r in enumerate(all_rows):
            print(i, r.label())
        return
    sel = [all_rows[int(i)] for i in a.rows.split(",")] if a.rows else all_rows
    if a.seqlens:
        sel = [r for r in sel if r.S in a.seqlens]
    runner = Runner(a.variant, a.tops, a.nax, a.sides.split(",") if a.sides else None)
    torch = runner.torch
    dev = torch.cuda.get_device_properties(0)
    print(f"device: {dev.name}, {dev.multi_processor_count} SMs, torch {torch.__version__}", flush=True)
    results = []
    for r in sel:
        for res in runner.run_row(r, a.mma, with_torch=True):
            results.append(res)
            print(json.dumps(res), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    sys.exit(main())
