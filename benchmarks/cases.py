"""Benchmark workloads shared by the Mac timing script, the Linux traffic report and the `kernels benchmark` class.

A decode case builds one transformers-style paged cache (k_cache/v_cache: two views of one buffer, shuffled block
ids, page size 16) and the same K/V in the other layouts the compared paths need. Shapes use FlashAttention's names:
B batch, H query heads, Hkv KV heads, D head dim, S tokens already cached (the step appends token S).
"""

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
REPO_ID = "kernels-community/metal-flash-sdpa"
KERNEL_VERSION = 2  # build.toml [general] version
PAGE_SIZE = 16


# ---- the model zoo: real models' attention shapes (the Mac report's grid, the NVIDIA proxy's zoo table) ----


@dataclass(frozen=True)
class Model:
    """A model's attention: H query heads, Hkv KV heads, head dim D, and the options its layers use."""

    name: str
    H: int
    Hkv: int
    D: int
    softcap: float = 0.0  # attn_logit_softcapping (0 = off)
    sinks: bool = False  # one learned sink logit per head (s_aux)

    @property
    def key(self) -> str:
        return self.name.lower()

    def heads(self) -> str:
        return f"{self.H}/{self.Hkv}/{self.D}"

    def features(self) -> str:
        f = ([f"softcap {self.softcap:g}"] if self.softcap else []) + (["sinks"] if self.sinks else [])
        return ", ".join(f) or "-"


MODELS = (
    Model("Llama-3-8B", 32, 8, 128),
    Model("Llama-3-70B", 64, 8, 128),
    Model("Qwen2.5-7B", 28, 4, 128),
    Model("Qwen2.5-14B", 40, 8, 128),
    Model("Mistral-7B", 32, 8, 128),
    Model("Gemma-2-9B", 16, 8, 256, softcap=50.0),
    Model("Gemma-3-27B", 32, 16, 128),
    Model("gpt-oss-20b", 64, 8, 64, sinks=True),
    Model("Phi-3-mini", 32, 32, 96),
    Model("SmolLM2-1.7B", 32, 32, 64),
)


@dataclass(frozen=True)
class DecodeCase:
    name: str
    B: int
    H: int
    Hkv: int
    D: int
    S: int  # cached tokens before the step

    def label(self) -> str:
        gqa = f"H={self.H}" if self.H == self.Hkv else f"H={self.H}/Hkv={self.Hkv}"
        return f"B={self.B} {gqa} D={self.D} S={self.S}"


@dataclass(frozen=True)
class PrefillCase:
    name: str
    B: int
    H: int
    Hkv: int
    D: int
    S: int  # tokens per sequence (causal self-attention)

    def label(self) -> str:
        return f"B={self.B} H={self.H}/Hkv={self.Hkv} D={self.D} S={self.S} causal"


# The shapes (what a Mac measures). B=32, S=2048 keeps the first case's heads (H=16, D=128).
DECODE_CASES = {
    "b4_h16_s50": DecodeCase("b4_h16_s50", 4, 16, 16, 128, 50),
    "b1_gqa8_s16k": DecodeCase("b1_gqa8_s16k", 1, 32, 8, 128, 16384),
    "b32_h16_s2k": DecodeCase("b32_h16_s2k", 32, 16, 16, 128, 2048),
}
PREFILL_CASES = {"prefill_gqa8_s2k": PrefillCase("prefill_gqa8_s2k", 2, 32, 8, 128, 2048)}

# The same cases scaled for the Metal-on-CPU emulator (Linux report), which runs every GPU thread as a fiber: the
# paged kernel takes ~0.15 s per MB of K/V, the varlen kernel (simdgroup-matrix tiles) ~10x that. Decode traffic per
# valid K/V byte hardly depends on S or B; the split-K choice (and so the dispatch count) can.
EMULATED = {
    "b4_h16_s50": DECODE_CASES["b4_h16_s50"],
    "b1_gqa8_s16k": replace(DECODE_CASES["b1_gqa8_s16k"], S=256),
    "b32_h16_s2k": replace(DECODE_CASES["b32_h16_s2k"], B=2, S=64),
    "prefill_gqa8_s2k": replace(PREFILL_CASES["prefill_gqa8_s2k"], B=1, S=64),
}

# Context lengths of the time-vs-context plot (B=1, GQA 8).
PLOT_CONTEXTS = (256, 1024, 2048, 4096, 8192, 16384)


def load_kernel(local: Optional[Path] = ROOT):
    """The package through kernels.get_kernel, as transformers loads it. `local`: a folder holding build/<variant>/
    (by default this checkout: its emulated build on Linux, a kernel-builder build on a Mac), loaded through
    LOCAL_KERNELS in offline mode; None: version 2 of the Hub repository kernels-community/metal-flash-sdpa."""
    if local is not None:
        os.environ["LOCAL_KERNELS"] = f"{REPO_ID}={Path(local).resolve()}"
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is first imported
    import kernels

    return kernels.get_kernel(REPO_ID, version=KERNEL_VERSION)


def load_hint(local: Optional[Path], error: BaseException) -> str:
    """What to do when load_kernel(local) raised `error`."""
    if local is None:
        return (f"could not load {REPO_ID} version {KERNEL_VERSION} from the Hugging Face Hub ({error}). It needs an "
                "Apple-Silicon Mac with macOS 26 or later (kernels >= 0.19 loads Metal builds only there), network "
                "access (or the kernel in the local Hugging Face cache) and `pip install kernels`.")
    return (f"no usable build of {REPO_ID} in {Path(local).resolve() / 'build'} ({error}). On Linux run "
            "`bash scripts/setup.sh` (it builds the emulated variant); on a Mac build with kernel-builder "
            "(`nix run .#build-and-copy`, README 'Building on a Mac'), or drop the local flag to use the Hub kernel.")


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_bytes(c: DecodeCase, dtype: torch.dtype) -> int:
    """Valid K and V bytes of one step (S cached + 1 new token per request): what the ideal kernel reads once."""
    return 2 * c.B * (c.S + 1) * c.Hkv * c.D * element_size(dtype)


def make_decode(c: DecodeCase, device, dtype=torch.float16, seed: int = 0,
                packed: bool = True) -> Dict[str, torch.Tensor]:
    """Inputs of one decode step: q [B,1,H,D], new k/v [B,1,Hkv,D], a paged cache holding S tokens per request
    (block ids shuffled, v_cache one buffer after k_cache), block_table int32 [B, blocks], cache_seqlens int32 [B],
    plus the same S tokens packed for varlen ([B*S, Hkv, D]; not with packed=False) and in a contiguous cache
    [B, Hkv, S_max, D]."""
    g = torch.Generator().manual_seed(seed)
    blocks = (c.S + 1 + PAGE_SIZE - 1) // PAGE_SIZE
    num_pages = c.B * blocks + 1
    cache = torch.randn(2 * num_pages, PAGE_SIZE, c.Hkv, c.D, generator=g).to(dtype)
    block_table = torch.randperm(num_pages, generator=g)[: c.B * blocks].view(c.B, blocks).to(torch.int32)
    q = torch.randn(c.B, 1, c.H, c.D, generator=g).to(dtype)
    k_new = torch.randn(c.B, 1, c.Hkv, c.D, generator=g).to(dtype)
    v_new = torch.randn(c.B, 1, c.Hkv, c.D, generator=g).to(dtype)
    k_cache, v_cache = cache[:num_pages], cache[num_pages:]
    # The S + 1 tokens of each request in order (the new one written where the kernel writes it).
    k_seq = k_cache[block_table.long()].reshape(c.B, blocks * PAGE_SIZE, c.Hkv, c.D)[:, : c.S + 1].clone()
    v_seq = v_cache[block_table.long()].reshape(c.B, blocks * PAGE_SIZE, c.Hkv, c.D)[:, : c.S + 1].clone()
    k_seq[:, c.S], v_seq[:, c.S] = k_new[:, 0], v_new[:, 0]
    t = dict(
        q=q, k_new=k_new, v_new=v_new, cache=cache, k_cache=k_cache, v_cache=v_cache, block_table=block_table,
        cache_seqlens=torch.full((c.B,), c.S, dtype=torch.int32),
        cu_seqlens_q=torch.arange(c.B + 1, dtype=torch.int32),
        cu_seqlens_k=torch.arange(c.B + 1, dtype=torch.int32) * (c.S + 1),
        k_contig=k_seq.transpose(1, 2).contiguous(), v_contig=v_seq.transpose(1, 2).contiguous(),
    )
    if packed:
        t.update(k_packed=k_seq.reshape(-1, c.Hkv, c.D).contiguous(),
                 v_packed=v_seq.reshape(-1, c.Hkv, c.D).contiguous())
    return {name: x.to(device) for name, x in t.items()}


def make_prefill(c: PrefillCase, device, dtype=torch.float16, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(c.B * c.S, c.H, c.D, generator=g).to(dtype)
    k = torch.randn(c.B * c.S, c.Hkv, c.D, generator=g).to(dtype)
    v = torch.randn(c.B * c.S, c.Hkv, c.D, generator=g).to(dtype)
    cu = torch.arange(c.B + 1, dtype=torch.int32) * c.S
    return {name: x.to(device) for name, x in dict(q=q, k=k, v=v, cu_seqlens=cu).items()}


# ---- the compared decode paths: each is one decode step, returning out [B, 1, H, D] ----

def paged_decode(kernel, c: DecodeCase, t, **options) -> torch.Tensor:
    """flash_attn_with_kvcache as transformers' continuous batching calls it: appends k/v, attends in place.
    `options`: more keywords (softcap=..., s_aux=...)."""
    return kernel.flash_attn_with_kvcache(t["q"], t["k_cache"], t["v_cache"], t["k_new"], t["v_new"],
                                         cache_seqlens=t["cache_seqlens"], block_table=t["block_table"], causal=True,
                                         **options)


def varlen_decode(kernel, c: DecodeCase, t) -> torch.Tensor:
    """The package's varlen kernel on K/V already packed [B*(S+1), Hkv, D] (the gather is not counted)."""
    out = kernel.flash_attn_varlen_func(t["q"].view(c.B, c.H, c.D), t["k_packed"], t["v_packed"], t["cu_seqlens_q"],
                                        t["cu_seqlens_k"], 1, c.S + 1, causal=True)
    return out.view(c.B, 1, c.H, c.D)


def gather_sdpa_decode(kernel, c: DecodeCase, t) -> torch.Tensor:
    """The pre-kernel path: write the new token into its page, gather the valid pages, torch SDPA."""
    blocks = t["block_table"].shape[1]
    slot_block = t["block_table"][:, c.S // PAGE_SIZE].long()
    t["k_cache"][slot_block, c.S % PAGE_SIZE] = t["k_new"][:, 0]
    t["v_cache"][slot_block, c.S % PAGE_SIZE] = t["v_new"][:, 0]
    idx = t["block_table"].long()
    k = t["k_cache"][idx].reshape(c.B, blocks * PAGE_SIZE, c.Hkv, c.D)[:, : c.S + 1]
    v = t["v_cache"][idx].reshape(c.B, blocks * PAGE_SIZE, c.Hkv, c.D)[:, : c.S + 1]
    out = F.scaled_dot_product_attention(t["q"].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         enable_gqa=c.H != c.Hkv)
    return out.transpose(1, 2)


def contiguous_sdpa_decode(kernel, c: DecodeCase, t) -> torch.Tensor:
    """torch SDPA on a contiguous cache [B, Hkv, S_max, D] (a static cache): write the token, attend to S + 1."""
    t["k_contig"][:, :, c.S] = t["k_new"][:, 0]
    t["v_contig"][:, :, c.S] = t["v_new"][:, 0]
    out = F.scaled_dot_product_attention(t["q"].transpose(1, 2), t["k_contig"], t["v_contig"],
                                         enable_gqa=c.H != c.Hkv)
    return out.transpose(1, 2)


DECODE_PATHS = {
    "paged flash_attn_with_kvcache": paged_decode,
    "flash_attn_varlen_func (K/V pre-packed)": varlen_decode,
    "gather + torch SDPA": gather_sdpa_decode,
    "contiguous cache + torch SDPA": contiguous_sdpa_decode,
}


def reference_decode(c: DecodeCase, t) -> torch.Tensor:
    """float32 SDPA over the S + 1 tokens, in the input dtype."""
    q = t["q"].float().transpose(1, 2)
    k = t["k_contig"].float()
    v = t["v_contig"].float()
    k = torch.cat([k[:, :, : c.S], t["k_new"].float().transpose(1, 2)], dim=2)
    v = torch.cat([v[:, :, : c.S], t["v_new"].float().transpose(1, 2)], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, enable_gqa=c.H != c.Hkv)
    return out.transpose(1, 2).to(t["q"].dtype)


def varlen_prefill(kernel, c: PrefillCase, t) -> torch.Tensor:
    return kernel.flash_attn_varlen_func(t["q"], t["k"], t["v"], t["cu_seqlens"], t["cu_seqlens"], c.S, c.S,
                                         causal=True)


def sdpa_prefill(kernel, c: PrefillCase, t) -> torch.Tensor:
    q = t["q"].view(c.B, c.S, c.H, c.D).transpose(1, 2)
    k = t["k"].view(c.B, c.S, c.Hkv, c.D).transpose(1, 2)
    v = t["v"].view(c.B, c.S, c.Hkv, c.D).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.H != c.Hkv)
    return out.transpose(1, 2).reshape(c.B * c.S, c.H, c.D)


PREFILL_PATHS = {"varlen kernel": varlen_prefill, "torch SDPA": sdpa_prefill}
