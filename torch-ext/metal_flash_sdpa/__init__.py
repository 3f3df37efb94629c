"""FlashAttention-style attention for Apple-Silicon GPUs (Metal), with FlashAttention-2's Python API.

Shapes use FlashAttention's names: B batch, S sequence length, H query heads, Hkv key/value heads (H % Hkv == 0:
MHA, GQA, MQA), D head dim. Causal masks are aligned to the bottom-right corner: query i of a sequence with
sq queries and sk keys sees keys j <= i + sk - sq. For sq = 2, sk = 5 (1 = visible):

    1 1 1 1 0
    1 1 1 1 1

A query row that sees no key (e.g. the first rows when sq > sk and causal) outputs 0 and has LSE = -inf.
"""

import operator
import os
import sys
from typing import Optional, Tuple, Union

import torch

from . import _tensor_ops
from ._ops import add_op_namespace_prefix, ops

__all__ = [
    "flash_attention_varlen",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "supported_head_dims",
]

# The device the ops are built for: MPS on a Mac, the CPU in the emulated Linux build.
_DEVICE_TYPE = "mps" if sys.platform == "darwin" else "cpu"


def supported_head_dims() -> Tuple[int, ...]:
    """Head dims the kernels are instantiated for (float32, float16 and bfloat16 alike)."""
    return tuple(ops.varlen_head_dims())


_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1


def _require_tensor(name: str, t, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {expected}, got {type(t).__name__}")


def _as_int(name: str, x, minimum: Optional[int] = None, maximum: int = _INT64_MAX) -> int:
    """A Python int (or anything with __index__, not bool) in [minimum, maximum]."""
    if isinstance(x, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(x).__name__}") from None
    if (minimum is not None and value < minimum) or value > maximum:
        low = "" if minimum is None else f">= {minimum} and "
        raise ValueError(f"{name} must be {low}<= {maximum}, got {value}")
    return value


def _as_float(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) and not hasattr(x, "__float__"):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    return float(x)


def _as_bool(name: str, x) -> bool:
    """A bool, or what holds one (an int, a numpy bool, a one-element tensor); not a string, None or several values
    (whose truth Python would take silently or fail on without naming the argument)."""
    if x is None or isinstance(x, (str, bytes)) or (isinstance(x, torch.Tensor) and x.numel() != 1):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    try:
        return bool(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}") from None


def _require_tensors(**tensors) -> None:
    for name, t in tensors.items():
        _require_tensor(name, t)


def _check_q(q: torch.Tensor) -> None:
    _require_tensor("q", q)
    if q.dim() < 1 or q.shape[-1] <= 0:
        raise ValueError(f"q must end in a head dim >= 1 (q.shape[-1]), got shape {tuple(q.shape)}")


def _check_devices(q: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    for name, t in tensors.items():
        _require_tensor(name, t, optional=True)
    if q.device.type != _DEVICE_TYPE:
        raise ValueError(f"q must be on {_DEVICE_TYPE}, got {q.device}")
    for name, t in tensors.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")


_INT64_MIN = -(2**63)


def _op_options(q: torch.Tensor, softmax_scale: Optional[float], causal: bool, window_size, softcap: float,
                alibi_slopes: Optional[torch.Tensor] = None, s_aux: Optional[torch.Tensor] = None):
    """The option group every op takes last (torch_binding.cpp: FLASH_SDPA_OPTION_GROUP), read and converted once
    here: ([softmax_scale, softcap], [causal, window_left, window_right], [alibi_slopes, s_aux]). Ranges are checked
    once, in the op (checks.h: read_options); float32 copies of the option tensors leave the caller's unmodified."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right) of ints, got {window_size!r}")
    window_left = _as_int("window_size[0] (left)", window_size[0], minimum=_INT64_MIN)
    window_right = _as_int("window_size[1] (right)", window_size[1], minimum=_INT64_MIN)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else _as_float("softmax_scale", softmax_scale)
    return ([scale, _as_float("softcap", softcap)], [int(_as_bool("causal", causal)), window_left, window_right],
            [_as_float32(alibi_slopes), _as_float32(s_aux)])


def _check_dropout(dropout_p: float) -> None:
    if _as_float("dropout_p", dropout_p) != 0.0:
        raise ValueError(f"dropout_p must be 0.0 (the kernels have no dropout), got {dropout_p}")


class _ForwardOnly(torch.autograd.Function):
    """Runs an op with autograd off and connects its outputs to the inputs that require grad, so that a backward
    through them raises instead of silently leaving the inputs' .grad as None."""

    @staticmethod
    def forward(ctx, name, run, written, *inputs):
        ctx.name = name
        result = run()
        if written is not None:  # an op that writes `written` in place and returns nothing
            ctx.mark_dirty(written)
            return written
        return result

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"metal-flash-sdpa: {ctx.name} is forward-only (no backward pass); run it under torch.no_grad(), or train "
            f"through flash_attn_func / flash_attn_varlen_func (without block_table), which have a backward")


def _run(name: str, run, *inputs: Optional[torch.Tensor], written: Optional[torch.Tensor] = None):
    """run() -> the op's outputs; through _ForwardOnly when autograd would record them."""
    _tensor_ops.select(_DEVICE_TYPE)  # the first forward of the process picks its kernels
    grad = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if torch.is_grad_enabled() and grad:
        return _ForwardOnly.apply(name, run, written, *grad)
    return run()


class _FlashAttnFunction(torch.autograd.Function):
    """flash_attn_func / flash_attn_varlen_func with FlashAttention-2's backward. Saves FlashAttention-2's tensors
    (q, k, v, out, lse, and s_aux) and the call's other tensors (cu_seqlens, alibi_slopes) with save_for_backward,
    so that one modified in place before the backward raises (torch's version counter) instead of changing the
    gradients: the backward kernels recompute P from q, k and the LSE tile by tile (O(S) memory) and are
    deterministic by construction (no atomics). alibi_slopes get no gradient (as in FlashAttention-2). The backward
    is not differentiable: a double backward raises (once_differentiable), as in FlashAttention-2."""

    @staticmethod
    def forward(ctx, run, bwd, q, k, v, s_aux, *others):
        out, lse = run()  # run() reads these same q, k, v, s_aux and others
        ctx.bwd = bwd
        ctx.save_for_backward(q, k, v, out, lse, s_aux, *others)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, s_aux, *others = ctx.saved_tensors
        if dout.stride(-1) != 1:  # e.g. the expanded gradient of out.sum()
            dout = dout.contiguous()
        dq, dk, dv, ds_aux = ctx.bwd(dout, q, k, v, out, lse, s_aux, *others)
        return (None, None, dq, dk, dv, ds_aux if s_aux is not None else None) + (None,) * len(others)


def _attention(run, bwd, q, k, v, s_aux, *others: Optional[torch.Tensor]):
    """run() -> (out, lse); through _FlashAttnFunction when autograd would record it. bwd(dout, q, k, v, out, lse,
    s_aux, *others) gets `others` (cu_seqlens, alibi_slopes) back from the saved tensors."""
    _tensor_ops.select(_DEVICE_TYPE)  # the first forward of the process picks its kernels
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v, s_aux)):
        return _FlashAttnFunction.apply(run, bwd, q, k, v, s_aux, *others)
    return run()


def _strict_check_cu_seqlens(cu_seqlens: torch.Tensor, name: str, rows: Optional[int], max_seqlen: int,
                             max_name: str) -> torch.Tensor:
    """METAL_FLASH_SDPA_STRICT=1: cu_seqlens is a valid prefix sum over the rows of its tensor (host sync); returns
    the lengths."""
    cu = cu_seqlens.cpu().long()
    if int(cu[0]) < 0:
        raise ValueError(f"{name}[0] must be >= 0, got {int(cu[0])}")
    lengths = cu[1:] - cu[:-1]
    if (lengths < 0).any():
        b = int((lengths < 0).nonzero()[0])
        raise ValueError(f"{name} must be non-decreasing, got {name}[{b}] = {int(cu[b])} > {name}[{b + 1}] = "
                         f"{int(cu[b + 1])}")
    if rows is not None and int(cu[-1]) > rows:
        raise ValueError(f"{name}[-1] = {int(cu[-1])} exceeds the {rows} rows of its tensor")
    longest = int(lengths.max()) if lengths.numel() else 0
    if max_seqlen < longest:
        raise ValueError(f"{max_name} = {max_seqlen} is below the longest sequence in {name} ({longest})")
    return lengths


def _strict_check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table=None) -> None:
    if not (_strict() and isinstance(cu_seqlens_q, torch.Tensor) and isinstance(cu_seqlens_k, torch.Tensor)):
        return
    _strict_check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q")
    paged = isinstance(block_table, torch.Tensor) and block_table.dim() == 2 and k.dim() == 4
    lengths = _strict_check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", None if paged else k.shape[0], max_seqlen_k,
                                       "max_seqlen_k")
    if paged:  # every block a sequence uses is a block of k
        table, num_blocks, block_size = block_table.cpu().long(), k.shape[0], k.shape[1]
        for b, n in enumerate(lengths.tolist()):
            used = table[b, : (n + block_size - 1) // block_size]
            if used.numel() * block_size < n:
                raise ValueError(f"sequence {b} has {n} keys, more than block_table's {table.shape[1]} blocks of "
                                 f"{block_size} hold")
            bad = (used < 0) | (used >= num_blocks)
            if bad.any():
                j = int(bad.nonzero()[0])
                raise ValueError(f"block_table[{b}, {j}] = {int(used[j])} is not a block of k (0..{num_blocks - 1}) "
                                 f"but sequence {b} needs it for {n} keys")


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
    do_causal: bool = False,
    scale: Optional[float] = None,
    softcapping: float = 1.0,
    s_aux: Optional[torch.Tensor] = None,
    window_size: Tuple[int, int] = (-1, -1),
) -> None:
    """Varlen attention written into `out` (the package's original API, same signature and defaults).

    Args:
        out: [total_q, H, D], written in place (rows past cu_seqlens_q[-1] are left as they are).
        query: [total_q, H, D]; key, value: [total_k, Hkv, D]; last dims contiguous, other strides free.
        cu_seqlens_q, cu_seqlens_k: int32 [B + 1], prefix sums of the sequence lengths.
        max_seqlen_q, max_seqlen_k: the longest query / key sequence (they size the launch only: every row of every
            sequence is computed whatever they say; METAL_FLASH_SDPA_STRICT=1 checks them).
        do_causal: bottom-right causal mask.
        scale: multiplies q . k; defaults to D ** -0.5.
        softcapping: 1.0 means off (the historical convention); otherwise s = softcapping * tanh(s / softcapping).
        s_aux: [H] attention sinks (one logit per head in the softmax denominator).
        window_size: (left, right) sliding window, -1 = unbounded (as in flash_attn_varlen_func).
    """
    _check_q(query)
    _require_tensors(out=out, key=key, value=value, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    _check_devices(query, key=key, value=value, out=out, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                   s_aux=s_aux)
    max_seqlen_q = _as_int("max_seqlen_q", max_seqlen_q, minimum=0)
    max_seqlen_k = _as_int("max_seqlen_k", max_seqlen_k, minimum=0)
    _strict_check_varlen(query, key, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    softcapping = _as_float("softcapping", softcapping)
    options = _op_options(query, scale, _as_bool("do_causal", do_causal), window_size,
                          0.0 if softcapping == 1.0 else softcapping, s_aux=s_aux)

    def run():
        ops.flash_attention_varlen(out, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   *options)

    _run("flash_attention_varlen", run, query, key, value, s_aux, written=out)


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
    """FlashAttention-2 `flash_attn_varlen_func`, differentiable (FlashAttention-2 backward; paged K/V through
    block_table is forward-only).

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
        deterministic: accepted for compatibility: forward and backward are always deterministic (the backward
            uses no atomics; gradients are bit-identical on repeat).
        return_attn_probs: also return the LSE.
        block_table: int32 [B, max_blocks_per_seq]: paged K/V. k and v are then caches [num_blocks, block_size, Hkv, D]
            (any block size, pages anywhere, shared between sequences); sequence b's keys are positions
            0 .. cu_seqlens_k[b + 1] - cu_seqlens_k[b] - 1 through block_table[b]. Block ids outside k are masked
            (METAL_FLASH_SDPA_STRICT=1 raises instead).
        s_aux: [H] attention sinks, one logit per head that joins the softmax denominator only.

    Returns:
        out [total_q, H, D]; with return_attn_probs, (out, lse float32 [H, total_q], None). LSE is the natural log
        of the softmax denominator (sinks included); -inf for a row with no visible key.
    """
    _check_q(q)
    _require_tensors(k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    _check_devices(
        q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes, s_aux=s_aux,
        block_table=block_table,
    )
    _check_dropout(dropout_p)
    _as_bool("deterministic", deterministic)
    return_attn_probs = _as_bool("return_attn_probs", return_attn_probs)
    max_seqlen_q = _as_int("max_seqlen_q", max_seqlen_q, minimum=0)
    max_seqlen_k = _as_int("max_seqlen_k", max_seqlen_k, minimum=0)
    _strict_check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table)
    option_floats, option_ints, (alibi_slopes, s_aux) = options = _op_options(
        q, softmax_scale, causal, window_size, softcap, alibi_slopes, s_aux)

    def run():
        return ops.varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table, *options)

    def bwd(dout, q, k, v, out, lse, s_aux, cu_seqlens_q, cu_seqlens_k, alibi_slopes):
        return ops.varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              option_floats, option_ints, [alibi_slopes, s_aux])

    if block_table is not None:  # paged K/V: forward-only
        out, lse = _run("flash_attn_varlen_func with block_table", run, q, k, v, alibi_slopes, s_aux)
    else:
        out, lse = _attention(run, bwd, q, k, v, s_aux, cu_seqlens_q, cu_seqlens_k, alibi_slopes)
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
    """FlashAttention-2 `flash_attn_func`, differentiable (FlashAttention-2 backward).

    Args:
        q: [B, Sq, H, D]; k, v: [B, Sk, Hkv, D]. Last dims contiguous; other strides free, so the transposed KV
            cache views transformers passes (strides [Sk*Hkv*D, D, Sk*D, 1]) are read in place.
        Other arguments as in flash_attn_varlen_func.

    Returns:
        out [B, Sq, H, D] (contiguous); with return_attn_probs, (out, lse float32 [B, H, Sq], None).
    """
    _check_q(q)
    _require_tensors(k=k, v=v)
    _check_devices(q, k=k, v=v, alibi_slopes=alibi_slopes, s_aux=s_aux)
    _check_dropout(dropout_p)
    _as_bool("deterministic", deterministic)
    return_attn_probs = _as_bool("return_attn_probs", return_attn_probs)
    option_floats, option_ints, (alibi_slopes, s_aux) = options = _op_options(
        q, softmax_scale, causal, window_size, softcap, alibi_slopes, s_aux)

    def run():
        return ops.fwd(q, k, v, *options)

    def bwd(dout, q, k, v, out, lse, s_aux, alibi_slopes):
        return ops.bwd(dout, q, k, v, out, lse, option_floats, option_ints, [alibi_slopes, s_aux])

    out, lse = _attention(run, bwd, q, k, v, s_aux, alibi_slopes)
    return (out, lse, None) if return_attn_probs else out


_STRICT_ENV = "METAL_FLASH_SDPA_STRICT"


def _strict() -> bool:
    return os.environ.get(_STRICT_ENV, "0") not in ("", "0")


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotates the first rotary_dim = 2 * cos.shape[-1] channels of x [B, s, h, D] by per-position cos/sin
    [B, s, rotary_dim / 2] (FlashAttention's apply_rotary_emb, computed in float32)."""
    rd = 2 * cos.shape[-1]
    xf = x[..., :rd].float()
    c, s = cos[:, :, None, :].float(), sin[:, :, None, :].float()
    if interleaved:  # pairs (0, 1), (2, 3), ...
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:  # GPT-NeoX: halves
        x1, x2 = xf[..., : rd // 2], xf[..., rd // 2 :]
        rot = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., rd:]), dim=-1)


def _index_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    """An index tensor of int32 or int64 (checked, not yet narrowed), contiguous."""
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 (or int64) tensor, got {t.dtype}")
    return t.contiguous()


def _to_int32(t: torch.Tensor) -> torch.Tensor:
    # Saturating, not wrapping: an int64 value past int32 stays out of range (the kernels skip it) instead of
    # becoming a plausible small index. No host sync.
    return t if t.dtype == torch.int32 else t.clamp(-(2**31), _INT32_MAX).to(torch.int32)


def _check_rotary(cos: torch.Tensor, sin: torch.Tensor, head_dim: int, capacity: int) -> None:
    if cos.dim() != 2 or cos.shape[1] < 1:
        raise ValueError(f"rotary_cos must have shape [seqlen_ro, rotary_dim / 2], got {tuple(cos.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"rotary_sin must have the shape of rotary_cos {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if not cos.is_floating_point() or not sin.is_floating_point():
        raise TypeError(f"rotary_cos and rotary_sin must be floating point, got {cos.dtype} and {sin.dtype}")
    if 2 * cos.shape[1] > head_dim:
        raise ValueError(f"rotary_dim = 2 x rotary_cos.shape[1] = {2 * cos.shape[1]} exceeds the head dim {head_dim}")
    if cos.shape[0] < capacity:  # FlashAttention-2's rule: the table covers every position of the cache
        raise ValueError(f"rotary_cos has {cos.shape[0]} positions, fewer than the cache's {capacity} "
                         f"(seqlen_ro must be >= the cache capacity)")


def _kvcache_capacity(q: torch.Tensor, k_cache: torch.Tensor, block_table: Optional[torch.Tensor]) -> int:
    """Keys per request the cache holds (strict mode and rotary read it on the host; the op checks the same shapes
    for every call)."""
    if q.dim() != 4:
        raise ValueError(f"q must have shape [batch, seqlen_q, num_heads, head_dim], got {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must have 4 dims [num_blocks or batch, block_size or seqlen, num_kv_heads, "
                         f"head_dim], got {tuple(k_cache.shape)}")
    if block_table is None:
        return k_cache.shape[1]
    if block_table.dim() != 2:
        raise ValueError(f"block_table must have shape [batch, max_blocks_per_seq], got {tuple(block_table.shape)}")
    return block_table.shape[1] * k_cache.shape[1]


def _strict_check_kvcache(k_cache, cache_seqlens, block_table, cache_batch_idx, seqlen_new) -> None:
    """METAL_FLASH_SDPA_STRICT=1: host-side validation of the indices (synchronises with the device)."""
    lens = cache_seqlens.cpu().long()
    if (lens < -1).any():
        raise ValueError(f"cache_seqlens must be >= -1 (-1 = padding row), got {lens.tolist()}")
    valid = lens >= 0
    if block_table is not None:
        table = block_table.cpu().long()
        num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
        capacity = table.shape[1] * block_size
        need = lens + seqlen_new
        over = valid & (need > capacity)
        if over.any():
            b = int(over.nonzero()[0])
            raise ValueError(
                f"cache_seqlens[{b}] + seqlen_new = {int(need[b])} exceeds the block table capacity "
                f"{table.shape[1]} x block_size {block_size} = {capacity}"
            )
        for b in valid.nonzero().flatten().tolist():
            used = table[b, : (int(need[b]) + block_size - 1) // block_size]
            bad = (used < 0) | (used >= num_blocks)
            if bad.any():
                j = int(bad.nonzero()[0])
                raise ValueError(
                    f"block_table[{b}, {j}] = {int(used[j])} is not a block of k_cache (0..{num_blocks - 1}) "
                    f"but request {b} needs it for {int(need[b])} keys"
                )
    else:
        over = valid & (lens + seqlen_new > k_cache.shape[1])
        if over.any():
            b = int(over.nonzero()[0])
            raise ValueError(
                f"cache_seqlens[{b}] + seqlen_new = {int(lens[b]) + seqlen_new} exceeds the cache length "
                f"{k_cache.shape[1]}"
            )
        if cache_batch_idx is not None:
            idx = cache_batch_idx.cpu().long()
            if ((idx < 0) | (idx >= k_cache.shape[0])).any():
                raise ValueError(
                    f"cache_batch_idx must index k_cache rows 0..{k_cache.shape[0] - 1}, got {idx.tolist()}")


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    rotary_cos: Optional[torch.Tensor] = None,
    rotary_sin: Optional[torch.Tensor] = None,
    cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[torch.Tensor] = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    s_aux: Optional[torch.Tensor] = None,
):
    """FlashAttention-2 `flash_attn_with_kvcache` (forward): decode straight from a KV cache.

    If k and v are given, they are first written into the cache in place at positions cache_seqlens[b] + i, then
    attention runs over cache_seqlens[b] + seqlen_new keys. K/V are read through block_table (no gather, no copy).

    Args:
        q: [B, sq, H, D] (any sq; one pass over K/V serves up to 16 rows per KV head, see README).
        k_cache, v_cache: paged [num_blocks, block_size, Hkv, D] with block_table (any block_size >= 1), or
            contiguous [B_cache, S, Hkv, D] without. They may be views of one buffer (each is bound at its own
            storage offset; nothing outside the views is touched). Last dim contiguous.
        k, v: [B, seqlen_new, Hkv, D] new tokens, or None.
        rotary_cos, rotary_sin: [seqlen_ro, rotary_dim / 2]: rotate k at positions cache_seqlens + i, and q at
            cache_seqlens + i if causal or local (else at cache_seqlens), as FlashAttention does.
        cache_seqlens: int or int32 [B]: cache lengths before the new tokens; -1 marks a padding row (nothing
            written, output 0). None: the whole cache (paged: the block table's capacity).
        cache_batch_idx: int32 [B], rows of a contiguous cache (default 0..B-1).
        cache_leftpad: int32 [B], contiguous caches only: row b's keys start at slot cache_leftpad[b] (left-padded
            prompts); cache_seqlens stays the slot where new tokens land, so row b has cache_seqlens[b] -
            cache_leftpad[b] + seqlen_new keys (FlashAttention-2's semantics; rotary positions are slots).
        block_table: int32 [B, max_blocks_per_seq], block ids into k_cache (unused entries may hold anything).
        softmax_scale: defaults to D ** -0.5.
        causal: bottom-right aligned: query i sees keys j <= i + sk - sq (sk = cache_seqlens + seqlen_new).
        window_size: (left, right), -1 = unbounded.
        softcap: s = softcap * tanh(s / softcap); 0 = off.
        rotary_interleaved: rotary on pairs (0, 1), (2, 3)... (True) or on halves (False, GPT-NeoX).
        alibi_slopes: [H] or [B, H]; adds -slope * |i + sk - sq - j|.
        num_splits: split-K count; 0 = automatic, 1 = no split, at most 256.
        return_softmax_lse: also return the LSE.
        s_aux: [H] attention sinks (one logit per head in the softmax denominator).

    Returns:
        out [B, sq, H, D] (contiguous); with return_softmax_lse, (out, lse float32 [B, H, sq]); LSE is -inf for rows
        with no visible key. Invalid indices (block ids outside k_cache, lengths beyond the table) never cause an
        out-of-bounds access: such keys are skipped. Set METAL_FLASH_SDPA_STRICT=1 to raise instead.
    """
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    _check_q(q)
    _require_tensors(k_cache=k_cache, v_cache=v_cache)
    _check_devices(
        q, cache_leftpad=cache_leftpad, k_cache=k_cache, v_cache=v_cache, k=k, v=v, block_table=block_table,
        cache_batch_idx=cache_batch_idx,
        alibi_slopes=alibi_slopes, s_aux=s_aux, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
    )
    options = _op_options(q, softmax_scale, causal, window_size, softcap, alibi_slopes, s_aux)
    num_splits = _as_int("num_splits", num_splits, minimum=_INT64_MIN)
    return_softmax_lse = _as_bool("return_softmax_lse", return_softmax_lse)
    rotary_interleaved = _as_bool("rotary_interleaved", rotary_interleaved)
    batch = q.shape[0]
    for name, t in (("k", k), ("v", v)):
        if t is not None and t.dim() != 4:
            raise ValueError(f"{name} must have shape [batch, seqlen_new, num_kv_heads, head_dim], got {list(t.shape)}")
    seqlen_new = 0 if k is None else k.shape[1]

    # cache_seqlens: int32 [B] (None: the whole cache, filled by the op); an int also gives the split heuristic its
    # exact key count.
    max_seqlen_k = 0
    if isinstance(cache_seqlens, torch.Tensor):
        _check_devices(q, cache_seqlens=cache_seqlens)
        cache_seqlens = _index_tensor("cache_seqlens", cache_seqlens)
    elif cache_seqlens is not None:
        seqlen = _as_int("cache_seqlens", cache_seqlens, minimum=-1, maximum=_INT32_MAX)
        max_seqlen_k = max(seqlen, 0) + seqlen_new
        cache_seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=q.device)
    if cache_batch_idx is not None:
        cache_batch_idx = _index_tensor("cache_batch_idx", cache_batch_idx)
    if cache_leftpad is not None:
        cache_leftpad = _index_tensor("cache_leftpad", cache_leftpad)

    # Strict mode and rotary read the cache's shape and lengths on the host (k and v without cache_seqlens: the op
    # raises).
    host_reads = (_strict() or rotary_cos is not None) and (cache_seqlens is not None or k is None)
    if host_reads:
        capacity = _kvcache_capacity(q, k_cache, block_table)
        if cache_seqlens is None:
            cache_seqlens = torch.full((batch,), capacity, dtype=torch.int32, device=q.device)
    if host_reads and _strict():  # on the caller's values, before any narrowing
        _strict_check_kvcache(k_cache, cache_seqlens, block_table, cache_batch_idx, seqlen_new)
        if cache_leftpad is not None:
            pad, lens = cache_leftpad.cpu().long(), cache_seqlens.cpu().long()
            bad = (lens >= 0) & ((pad < 0) | (pad > lens))
            if bad.any():
                b = int(bad.nonzero()[0])
                raise ValueError(
                    f"cache_leftpad[{b}] = {int(pad[b])} must be in [0, cache_seqlens[{b}] = {int(lens[b])}]")
    cache_seqlens = None if cache_seqlens is None else _to_int32(cache_seqlens)
    cache_batch_idx = None if cache_batch_idx is None else _to_int32(cache_batch_idx)
    cache_leftpad = None if cache_leftpad is None else _to_int32(cache_leftpad)

    if host_reads and rotary_cos is not None:
        _check_rotary(rotary_cos, rotary_sin, q.shape[-1], capacity)
        pos0 = cache_seqlens.clamp(min=0).long()[:, None]  # padding rows: any valid position
        limit = rotary_cos.shape[0] - 1  # positions past the table only come from garbage cache_seqlens
        if k is not None:
            pos = (pos0 + torch.arange(seqlen_new, device=q.device)).clamp(max=limit)
            k = _apply_rotary(k, rotary_cos[pos], rotary_sin[pos], rotary_interleaved)
        _, (_, window_left, window_right), _ = options
        local = causal or window_left >= 0 or window_right >= 0
        if local:
            steps = torch.arange(q.shape[1], device=q.device)
        else:
            steps = torch.zeros(q.shape[1], dtype=torch.long, device=q.device)
        pos = (pos0 + steps).clamp(max=limit)
        q = _apply_rotary(q, rotary_cos[pos], rotary_sin[pos], rotary_interleaved)

    if k is not None and torch.is_grad_enabled() and (k_cache.requires_grad or v_cache.requires_grad):
        raise ValueError("k_cache and v_cache are written in place when k and v are appended: they cannot require "
                         "grad (flash_attn_with_kvcache is forward-only)")

    def run():
        return ops.kvcache_fwd(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, cache_leftpad,
                               num_splits, bool(return_softmax_lse), max_seqlen_k, *options)

    out, lse = _run("flash_attn_with_kvcache", run, q, k, v, *options[2])
    return (out, lse) if return_softmax_lse else out



# ---- fake (meta) implementations: shapes only, so torch.compile(fullgraph=True) can trace the ops ----


# Every op ends with the option group (_op_options): option_floats, option_ints, option_tensors.


@torch.library.register_fake(add_op_namespace_prefix("flash_attention_varlen"))
def _flash_attention_varlen_fake(out, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 option_floats, option_ints, option_tensors):
    return None


@torch.library.register_fake(add_op_namespace_prefix("varlen_fwd"))
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table, option_floats,
                     option_ints, option_tensors):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.register_fake(add_op_namespace_prefix("fwd"))
def _fwd_fake(q, k, v, option_floats, option_ints, option_tensors):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.register_fake(add_op_namespace_prefix("kvcache_fwd"))
def _kvcache_fwd_fake(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, cache_leftpad,
                      num_splits, return_lse, max_seqlen_k, option_floats, option_ints, option_tensors):
    lse_shape = (q.shape[0], q.shape[2], q.shape[1]) if return_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


def _bwd_fake_outputs(q, k, v, option_tensors):
    sinks = option_tensors[1]
    ds_aux = q.new_empty((0 if sinks is None else q.shape[-2],), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds_aux


@torch.library.register_fake(add_op_namespace_prefix("varlen_bwd"))
def _varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, option_floats,
                     option_ints, option_tensors):
    return _bwd_fake_outputs(q, k, v, option_tensors)


@torch.library.register_fake(add_op_namespace_prefix("bwd"))
def _bwd_fake(dout, q, k, v, out, lse, option_floats, option_ints, option_tensors):
    return _bwd_fake_outputs(q, k, v, option_tensors)
