"""Which forward and backward the process runs: the simdgroup_matrix kernels (every Apple GPU), or the same forward
and the backward's dK/dV and dQ passes on Metal 4 tensor ops (the M5 family's neural accelerators: Apple GPU family 10,
macOS 26+).

Decided once, at the first forward call. METAL_FLASH_SDPA_TENSOR_OPS (read then):
  unset, "auto"   tensor ops where the GPU runs them and a self-test agrees with the simdgroup_matrix forward
  "1"             tensor ops wherever the GPU runs them, without the self-test (a warning where it cannot)
  "0"             the simdgroup_matrix kernels only

The self-test runs a few small forwards and backwards on both paths and compares them: a tensor-ops library that runs
but computes something else (e.g. a cooperative-tensor layout that differs on a new GPU generation) or that fails to run
costs one warning and the tensor-ops path, never a wrong result. The decode kernels and the backward's delta pre-pass
are the same on both paths.
"""

import os
import threading
import warnings

import torch

from ._ops import ops

ENV = "METAL_FLASH_SDPA_TENSOR_OPS"

_lock = threading.Lock()
_decided = False

# (dtype, head dim, tolerance on max|tensor ops - simdgroup| relative to max|simdgroup|): each tile layout of the
# routed kernels (attention_tensor_ops.h: flash_attn_varlen_tops, Q staged with 16- and 32-key tiles; at D = 256 the
# D-split kernel, Q held in left inputs); the backward's (attention_backward_tensor_ops.h) at (32, 32, 2),
# (32, 16, 2) and (16, 16, 1) tiles (backward_params.h, bwd_tops_*).
_SELF_TEST = ((torch.float16, 128, 2e-2), (torch.bfloat16, 64, 3e-2), (torch.float16, 256, 2e-2),
              (torch.float32, 64, 1e-2))


def select(device_type: str) -> None:
    """Decides the forward path for the process (once; later calls return at once)."""
    global _decided
    if _decided or _compiling():
        return
    with _lock:
        if not _decided:
            ops.set_tensor_ops(_choose(device_type))
            _decided = True


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _choose(device_type: str) -> bool:
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode not in ("", "auto", "0", "1"):
        raise ValueError(f"{ENV} must be 0, 1 or auto, got {os.environ[ENV]!r}")
    if mode == "0":
        return False
    if not ops.tensor_ops_supported():
        if mode == "1":
            warnings.warn(f"metal-flash-sdpa: {ENV}=1, but this GPU or build has no tensor-ops path (Apple GPU family "
                          f"10 and macOS 26 needed); using the simdgroup_matrix forward", stacklevel=3)
        return False
    return mode == "1" or _self_test(device_type)


def _self_test(device_type: str) -> bool:
    """A causal GQA varlen forward per dtype / head dim on both paths (a partial and a whole 64-row query tile, more
    keys than queries, key norms growing along each sequence so that the running max moves and O is rescaled through
    the row reductions), then its backward on both paths (from the simdgroup forward's out and LSE); True if every pair
    agrees."""
    gen = torch.Generator().manual_seed(0)
    lens_q, lens_k = [37, 100], [53, 100]
    cu_q = torch.tensor([0, lens_q[0], sum(lens_q)], dtype=torch.int32, device=device_type)
    cu_k = torch.tensor([0, lens_k[0], sum(lens_k)], dtype=torch.int32, device=device_type)
    growth = torch.cat([torch.linspace(0.2, 6.0, n) for n in lens_k])[:, None, None]
    try:
        for dtype, head_dim, tolerance in _SELF_TEST:
            q = torch.randn(sum(lens_q), 4, head_dim, generator=gen).to(device_type, dtype)
            k = (torch.randn(sum(lens_k), 2, head_dim, generator=gen) * growth).to(device_type, dtype)
            v = torch.randn(sum(lens_k), 2, head_dim, generator=gen).to(device_type, dtype)
            options = ([head_dim ** -0.5, 0.0], [1, -1, -1], [None, None])
            forwards = []
            for on in (True, False):
                ops.set_tensor_ops(on)
                forwards.append(ops.varlen_fwd(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), None, *options))
            outs = [out.float().cpu() for out, _ in forwards]
            error = (outs[0] - outs[1]).abs().max().item()
            if not error <= tolerance * outs[1].abs().max().item():  # NaN fails too
                return _fall_back(f"its {dtype} D = {head_dim} output differs from the simdgroup_matrix forward's "
                                  f"by up to {error:.3g}")
            out, lse = forwards[1]
            dout = torch.randn(out.shape, generator=gen).to(device_type, dtype)
            grads = []
            for on in (True, False):
                ops.set_tensor_ops(on)
                grads.append(ops.varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max(lens_q), max(lens_k), *options))
            for name, mine, theirs in zip(("dq", "dk", "dv"), grads[0], grads[1]):
                mine, theirs = mine.float().cpu(), theirs.float().cpu()
                error = (mine - theirs).abs().max().item()
                if not error <= tolerance * theirs.abs().max().item():
                    return _fall_back(f"its {dtype} D = {head_dim} {name} differs from the simdgroup_matrix "
                                      f"backward's by up to {error:.3g}")
    except RuntimeError as e:
        return _fall_back(f"it failed to run ({e})")
    finally:
        ops.set_tensor_ops(False)
    return True


def _fall_back(why: str) -> bool:
    warnings.warn(f"metal-flash-sdpa: the tensor-ops path failed its self-test on this GPU: {why}; using the "
                  f"simdgroup_matrix kernels ({ENV}=0 skips the test, =1 forces tensor ops)", stacklevel=4)
    return False
