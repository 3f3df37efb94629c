"""What the tensor-ops tests of both targets share (tests/msl_cpu/test_tensor_ops.py on the emulator,
tests/metal_cuda/test_tensor_ops_gpu.py on the proxy): the cases of kernels/tensor_ops.metal, FlashAttention's
tolerance rule for a product, and relaxed_precision's rounding."""

import torch

DTYPES = {"half": torch.float16, "bfloat": torch.bfloat16, "float": torch.float32}

# (name, input type, output type, M, N, K, transpose_left, transpose_right, simdgroups, accumulate): tensor_ops.metal's
# DEVICE_CASE lines.
DEVICE_CASES = [
    ("device_half_float_64x32x16", "half", "float", 64, 32, 16, False, False, 4, False),
    ("device_half_half_64x32x16", "half", "half", 64, 32, 16, False, False, 4, False),
    ("device_bfloat_float_64x32x16", "bfloat", "float", 64, 32, 16, False, False, 4, False),
    ("device_float_float_64x32x16", "float", "float", 64, 32, 16, False, False, 4, False),
    ("device_half_float_16x32x64_tl", "half", "float", 16, 32, 64, True, False, 1, False),
    ("device_bfloat_float_32x16x64_tr", "bfloat", "float", 32, 16, 64, False, True, 2, False),
    ("device_float_float_32x32x8_tltr", "float", "float", 32, 32, 8, True, True, 2, False),
    ("device_half_float_64x32x16_acc", "half", "float", 64, 32, 16, False, False, 4, True),
    ("device_bfloat_half_24x40x8_acc", "bfloat", "half", 24, 40, 8, False, True, 1, True),
]

# (name, input type, output type, M, N, K, simdgroups): operands in threadgroup memory.
THREADGROUP_CASES = [
    ("threadgroup_half_float_32x16x32", "half", "float", 32, 16, 32, 2),
    ("threadgroup_bfloat_half_16x64x16", "bfloat", "half", 16, 64, 16, 4),
]


def check(out, ref64, out_dtype, same):
    """FlashAttention's rule: the error is at most 2x that of the same product computed by torch in the output's type
    (`same`; at least the rounding of the exact product to that type) plus a small absolute term."""
    out, ref64, same = out.cpu().double(), ref64.cpu(), same.cpu().double()
    base = max((ref64.to(out_dtype).double() - ref64).abs().max().item(), (same - ref64).abs().max().item())
    err = (out - ref64).abs().max().item()
    eps = torch.finfo(out_dtype).eps * ref64.abs().max().item()
    assert err <= 2 * base + 2 * eps + 1e-6, (err, base, eps)


def round10(x):
    """float32 -> 10 explicit mantissa bits, round to nearest even (the shims' relaxed_precision)."""
    u = x.view(torch.int32).to(torch.int64)
    u = (u + 0xFFF + ((u >> 13) & 1)) & ~0x1FFF
    return u.to(torch.int32).view(torch.float32)
