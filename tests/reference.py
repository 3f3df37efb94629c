"""Reference attention with FlashAttention-2 semantics, for the tests of every kernel of the package.

`attention_one` is the primitive: one sequence, any number of queries and keys. The other functions lay sequences
out the way the ops do (varlen, dense, paged caches build on `attention_one`). Computed in `dtype`: float64 for
the reference, the input dtype for the "torch in the same dtype" baseline of FlashAttention's tolerance rule.

Semantics (DESIGN.md section 2):
- scores s = scale * q . k; softcap > 0: s = softcap * tanh(s / softcap); ALiBi: s -= slope * |i + sk - sq - j|;
- bottom-right alignment: query i of sq sits at key position i + sk - sq; causal sees j <= i + sk - sq; a window
  (left, right) sees [i + sk - sq - left, i + sk - sq + right], -1 = unbounded;
- sinks (one logit per head) join the softmax denominator only;
- LSE = natural log of the softmax denominator (sinks included); a row with no visible key: output 0, LSE = -inf;
- GQA: query head h reads kv head h // (H // Hkv).
"""

from typing import Optional, Sequence, Tuple

import torch


def visible_mask(sq: int, sk: int, causal: bool = False, window: Tuple[int, int] = (-1, -1), device=None):
    """Bool [sq, sk]: key j visible to query i."""
    left, right = window
    if causal:
        right = 0
    i = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    mask = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= j >= i - left
    if right >= 0:
        mask &= j <= i + right
    return mask


def attention_one(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool = False,
    window: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One sequence: q [sq, H, D], k/v [sk, Hkv, D], alibi_slopes/sinks [H]. Returns (out [sq, H, D], lse [H, sq])
    in `dtype`."""
    sq, heads, _ = q.shape
    sk, kv_heads, _ = k.shape
    group = heads // kv_heads
    qd = q.to(dtype).transpose(0, 1)  # [H, sq, D]
    kd = k.to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)  # [H, sk, D]
    vd = v.to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)
    s = torch.matmul(qd, kd.transpose(1, 2)) * scale  # [H, sq, sk]
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        i = torch.arange(sq)[:, None] + (sk - sq)
        j = torch.arange(sk)[None, :]
        s = s - alibi_slopes.to(dtype)[:, None, None] * (i - j).abs().to(dtype)[None]
    mask = visible_mask(sq, sk, causal, window)
    s = s.masked_fill(~mask[None], float("-inf"))
    if sinks is not None:
        sink_col = sinks.to(dtype)[:, None, None].expand(heads, sq, 1)
        lse = torch.logsumexp(torch.cat([s, sink_col], dim=-1), dim=-1)  # [H, sq]
    else:
        lse = torch.logsumexp(s, dim=-1)
    empty = ~mask.any(dim=-1)  # [sq]
    lse = lse.masked_fill(empty[None], float("-inf"))
    p = torch.exp(s - lse.masked_fill(empty[None], 0.0)[..., None])
    p = p.masked_fill(~mask[None], 0.0)
    out = torch.matmul(p, vd).transpose(0, 1)  # [sq, H, D]
    return out.contiguous(), lse


def _slopes_for(alibi_slopes: Optional[torch.Tensor], b: int) -> Optional[torch.Tensor]:
    if alibi_slopes is None:
        return None
    return alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: Sequence[int],
    cu_seqlens_k: Sequence[int],
    *,
    scale: float,
    causal: bool = False,
    window: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """q [total_q, H, D], k/v [total_k, Hkv, D]. Returns (out [total_q, H, D], lse [H, total_q]); rows past
    cu_seqlens_q[-1] are 0 / -inf."""
    cq = [int(x) for x in cu_seqlens_q]
    ck = [int(x) for x in cu_seqlens_k]
    out = torch.zeros(q.shape, dtype=dtype)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=dtype)
    for b in range(len(cq) - 1):
        o, l = attention_one(
            q[cq[b] : cq[b + 1]],
            k[ck[b] : ck[b + 1]],
            v[ck[b] : ck[b + 1]],
            scale=scale,
            causal=causal,
            window=window,
            softcap=softcap,
            alibi_slopes=_slopes_for(alibi_slopes, b),
            sinks=sinks,
            dtype=dtype,
        )
        out[cq[b] : cq[b + 1]] = o
        lse[:, cq[b] : cq[b + 1]] = l
    return out, lse


def attention_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, alibi_slopes=None, dtype=torch.float64, **kw
) -> Tuple[torch.Tensor, torch.Tensor]:
    """q [B, Sq, H, D], k/v [B, Sk, Hkv, D]. Returns (out [B, Sq, H, D], lse [B, H, Sq])."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        slopes = _slopes_for(alibi_slopes, b)
        o, l = attention_one(q[b], k[b], v[b], scale=scale, alibi_slopes=slopes, dtype=dtype, **kw)
        outs.append(o)
        lses.append(l)
    return torch.stack(outs), torch.stack(lses)


def check_close(out: torch.Tensor, out_ref: torch.Tensor, out_same_dtype: torch.Tensor, what: str = "out") -> float:
    """FlashAttention's rule: max|out - ref| <= 2 * max|out_same_dtype - ref| + 1e-5. Returns max|out - ref|."""
    err = (out.to(torch.float64) - out_ref).abs().max().item() if out.numel() else 0.0
    base = (out_same_dtype.to(torch.float64) - out_ref).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * base + 1e-5, f"{what}: max error {err:.3g} > 2 * {base:.3g} + 1e-5 (torch in the same dtype)"
    return err


def check_lse(lse: torch.Tensor, lse_ref: torch.Tensor, atol: float = 1e-3) -> float:
    """LSE is fp32 whatever the input dtype: -inf exactly where the reference is -inf, else close."""
    lse = lse.to(torch.float64)
    inf_ref = torch.isinf(lse_ref)
    assert torch.equal(torch.isinf(lse) & (lse < 0), inf_ref), "lse: -inf rows differ from the reference"
    if (~inf_ref).any():
        err = (lse[~inf_ref] - lse_ref[~inf_ref]).abs().max().item()
        scale = lse_ref[~inf_ref].abs().max().item()
        assert err <= atol * max(1.0, scale), f"lse: max error {err:.3g}"
        return err
    return 0.0
