"""FlashAttention-style attention for Apple-Silicon GPUs (Metal), with FlashAttention-2's Python API.

Shapes use FlashAttention's names: B batch, S sequence length, H query heads, Hkv key/value heads (H % Hkv == 0:
MHA, GQA, MQA), D head dim. Causal masks are aligned to the bottom-right corner: query i of a sequence with
sq queries and sk keys sees keys j <= i + sk - sq. For sq = 2, sk = 5 (1 = visible):

    1 1 1 1 0
    1 1 1 1 1

A query row that sees no key (e.g. the first rows when sq > sk and causal) outputs 0 and has LSE = -inf.
"""

import sys
from typing import Optional, Tuple

import torch

from ._ops import ops

__all__ = [
    "flash_attention_varlen",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "supported_head_dims",
]

# The device the ops are built for: MPS on a Mac, the CPU in the emulated Linux build.
_DEVICE_TYPE = "mps" if sys.platform == "darwin" else "cpu"


def supported_head_dims() -> Tuple[int, ...]:
    """Head dims the kernels are instantiated for (float32, float16 and bfloat16 alike)."""
    return tuple(ops.varlen_head_dims())


def _check_devices(q: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    if q.device.type != _DEVICE_TYPE:
        raise ValueError(f"q must be on {_DEVICE_TYPE}, got {q.device}")
    for name, t in tensors.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")


def _check_common(dropout_p: float, window_size) -> Tuple[int, int]:
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0 (these are inference kernels), got {dropout_p}")
    if len(window_size) != 2:
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}")
    return int(window_size[0]), int(window_size[1])


def _default_scale(q: torch.Tensor, softmax_scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)


def _as_float32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # A converted copy: the caller's tensor is never modified.
    return None if t is None else t.to(torch.float32).contiguous()


def flash_attention_varlen(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    do_causal: bool,
    scale: float,
    softcapping: float,
) -> None:
    """Varlen attention written into `out` (the package's original API).

    Args:
        out: [total_q, H, D], written in place (rows past cu_seqlens_q[-1] are left as they are).
        query: [total_q, H, D]; key, value: [total_k, Hkv, D]; last dims contiguous, other strides free.
        cu_seqlens_q, cu_seqlens_k: int32 [B + 1], prefix sums of the sequence lengths.
        max_seqlen_q, max_seqlen_k: the longest query / key sequence.
        do_causal: bottom-right causal mask.
        scale: multiplies q . k.
        softcapping: 1.0 means off (the historical convention); otherwise s = softcapping * tanh(s / softcapping).
    """
    _check_devices(query, key=key, value=value, out=out, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    ops.flash_attention_varlen(
        out,
        query,
        key,
        value,
        cu_seqlens_q,
        cu_seqlens_k,
        int(max_seqlen_q),
        int(max_seqlen_k),
        bool(do_causal),
        float(scale),
        float(softcapping),
    )


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Optional[torch.Tensor] = None,
    *,
    s_aux: Optional[torch.Tensor] = None,
):
    """FlashAttention-2 `flash_attn_varlen_func` (forward only).

    Args:
        q: [total_q, H, D]; q may have more rows than cu_seqlens_q[-1] (those output rows are unspecified).
        k, v: [total_k, Hkv, D]. Last dims contiguous; other strides free (no copy is made).
        cu_seqlens_q, cu_seqlens_k: int32 [B + 1] (may be the same tensor; never written).
        max_seqlen_q, max_seqlen_k: the longest query / key sequence (max_seqlen_q sizes the grid).
        dropout_p: must be 0.0.
        softmax_scale: defaults to D ** -0.5.
        causal: bottom-right aligned (see the module docstring).
        window_size: (left, right); query i sees keys in [i + sk - sq - left, i + sk - sq + right], -1 = unbounded.
        softcap: s = softcap * tanh(s / softcap) on the scaled scores; 0 = off.
        alibi_slopes: [H] or [B, H]; adds -slope * |i + sk - sq - j| to the scores.
        deterministic: accepted for compatibility (the forward pass is deterministic).
        return_attn_probs: also return the LSE.
        block_table: not supported here (use flash_attn_with_kvcache for paged caches).
        s_aux: [H] attention sinks, one logit per head that joins the softmax denominator only.

    Returns:
        out [total_q, H, D]; with return_attn_probs, (out, lse float32 [H, total_q], None). LSE is the natural log
        of the softmax denominator (sinks included); -inf for a row with no visible key.
    """
    window_left, window_right = _check_common(dropout_p, window_size)
    if block_table is not None:
        raise NotImplementedError("block_table is not supported by flash_attn_varlen_func; use flash_attn_with_kvcache")
    _check_devices(
        q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes, s_aux=s_aux
    )
    out, lse = ops.varlen_fwd(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        int(max_seqlen_q),
        int(max_seqlen_k),
        _default_scale(q, softmax_scale),
        bool(causal),
        window_left,
        window_right,
        float(softcap),
        _as_float32(alibi_slopes),
        _as_float32(s_aux),
    )
    return (out, lse, None) if return_attn_probs else out


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    s_aux: Optional[torch.Tensor] = None,
):
    """FlashAttention-2 `flash_attn_func` (forward only).

    Args:
        q: [B, Sq, H, D]; k, v: [B, Sk, Hkv, D]. Last dims contiguous; other strides free, so the transposed KV
            cache views transformers passes (strides [Sk*Hkv*D, D, Sk*D, 1]) are read in place.
        Other arguments as in flash_attn_varlen_func.

    Returns:
        out [B, Sq, H, D] (contiguous); with return_attn_probs, (out, lse float32 [B, H, Sq], None).
    """
    window_left, window_right = _check_common(dropout_p, window_size)
    _check_devices(q, k=k, v=v, alibi_slopes=alibi_slopes, s_aux=s_aux)
    out, lse = ops.fwd(
        q,
        k,
        v,
        _default_scale(q, softmax_scale),
        bool(causal),
        window_left,
        window_right,
        float(softcap),
        _as_float32(alibi_slopes),
        _as_float32(s_aux),
    )
    return (out, lse, None) if return_attn_probs else out
