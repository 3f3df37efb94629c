"""A hostile caller, systematically: every argument of every entry point, one hostile value at a time.

For each entry point a small valid call is the baseline; each case replaces one argument. A call must either
- raise TypeError / ValueError / RuntimeError whose message names the argument it replaced (the legacy
  flash_attention_varlen's query / key / value are named q / k / v, as in flash_attn_varlen_func), leaving every
  tensor it was given unchanged (the documented in-place ones, `out` and the KV cache, included: checks run before
  any dispatch), or, only for the values a case marks acceptable (strided rows, int64 indices, float64 slopes: the
  same values in another layout or type), return exactly the baseline's result, with no input modified except the
  documented in-place ones.
Never a crash, a hang, an out-of-bounds access (the emulator reports one as an error without the argument's name,
which fails here) or a silent result. About 350 calls; test_hostile_inputs.py and test_promises.py hold the targeted
cases (NaN isolation, huge windows, threads, understated max_seqlen ...).
"""

from typing import Callable, Dict, List, Tuple

import pytest
import torch

H, HKV, D = 4, 2, 64
ERRORS = (TypeError, ValueError, RuntimeError, NotImplementedError)


def _rand(*shape, dtype=torch.float16, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


def baselines() -> Dict[str, Tuple[str, Callable[[], dict]]]:
    """entry point -> (function name, fresh keyword arguments of a valid call)."""
    return {
        "varlen": ("flash_attn_varlen_func", lambda: dict(
            q=_rand(14, H, D, seed=1), k=_rand(20, HKV, D, seed=2), v=_rand(20, HKV, D, seed=3),
            cu_seqlens_q=_i32([0, 5, 14]), cu_seqlens_k=_i32([0, 8, 20]), max_seqlen_q=9, max_seqlen_k=12,
            causal=True, alibi_slopes=torch.full((H,), 0.1), s_aux=torch.zeros(H), deterministic=True,
            return_attn_probs=True)),
        "paged_varlen": ("flash_attn_varlen_func", lambda: dict(
            q=_rand(14, H, D, seed=1), k=_rand(6, 16, HKV, D, seed=2), v=_rand(6, 16, HKV, D, seed=3),
            cu_seqlens_q=_i32([0, 5, 14]), cu_seqlens_k=_i32([0, 20, 40]), max_seqlen_q=9, max_seqlen_k=20,
            causal=True, block_table=_i32([[4, 1], [0, 5]]))),
        "dense": ("flash_attn_func", lambda: dict(
            q=_rand(2, 5, H, D, seed=1), k=_rand(2, 7, HKV, D, seed=2), v=_rand(2, 7, HKV, D, seed=3), causal=True,
            window_size=(4, 0), softcap=20.0, return_attn_probs=False)),
        "legacy": ("flash_attention_varlen", lambda: dict(
            out=torch.zeros(14, H, D, dtype=torch.float16), query=_rand(14, H, D, seed=1),
            key=_rand(20, HKV, D, seed=2), value=_rand(20, HKV, D, seed=3), cu_seqlens_q=_i32([0, 5, 14]),
            cu_seqlens_k=_i32([0, 8, 20]), max_seqlen_q=9, max_seqlen_k=12, do_causal=True)),
        "kvcache_paged": ("flash_attn_with_kvcache", lambda: dict(
            q=_rand(2, 1, H, D, seed=1), k_cache=_rand(6, 16, HKV, D, seed=2), v_cache=_rand(6, 16, HKV, D, seed=3),
            k=_rand(2, 1, HKV, D, seed=4), v=_rand(2, 1, HKV, D, seed=5), cache_seqlens=_i32([10, 20]),
            block_table=_i32([[0, 2], [5, 1]]), num_splits=2, return_softmax_lse=True)),
        "kvcache_contiguous": ("flash_attn_with_kvcache", lambda: dict(
            q=_rand(2, 2, H, D, seed=1), k_cache=_rand(3, 40, HKV, D, seed=2), v_cache=_rand(3, 40, HKV, D, seed=3),
            k=_rand(2, 2, HKV, D, seed=4), v=_rand(2, 2, HKV, D, seed=5), cache_seqlens=_i32([10, 30]),
            cache_batch_idx=_i32([2, 0]), cache_leftpad=_i32([0, 3]), causal=True)),
    }


def _last_dim_strided(t):
    """The same values with a last-dim stride of 2."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def _rows_strided(t):
    """The same values, every dim but the last strided (a legal layout: other strides are free)."""
    wide = torch.zeros(*(2 * s for s in t.shape[:-1]), t.shape[-1], dtype=t.dtype)
    view = wide[tuple(slice(None, None, 2) for _ in t.shape[:-1])]
    view.copy_(t)
    return view


# Hostile values for a tensor argument: (label, transform, legal?). A legal one must give the baseline's result.
FLOAT_TENSOR_CASES = [
    ("list", lambda t: t.tolist(), False),
    ("float64", lambda t: t.double(), False),
    ("int32", lambda t: t.int(), False),
    ("rank_plus_1", lambda t: t[None], False),
    ("rank_1", lambda t: t.flatten(), False),
    ("last_dim_half", lambda t: t[..., : t.shape[-1] // 2], False),
    ("last_dim_strided", _last_dim_strided, False),
    ("meta", lambda t: t.to("meta"), False),
    ("rows_strided", _rows_strided, True),
]
INDEX_TENSOR_CASES = [
    ("list", lambda t: t.tolist(), False),
    ("float32", lambda t: t.float(), False),
    ("int16", lambda t: t.short(), False),
    ("rank_plus_1", lambda t: t[None], False),
    ("meta", lambda t: t.to("meta"), False),
    ("int64", lambda t: t.long(), True),  # cu_seqlens: int32 only, as in FlashAttention-2 (a named refusal)
    ("strided", lambda t: _rows_strided(t[..., None])[..., 0] if t.dim() == 1 else _rows_strided(t), True),
]
SMALL_FLOAT_CASES = [  # alibi_slopes, s_aux: float32 [H]
    ("list", lambda t: t.tolist(), False),
    ("float64", lambda t: t.double(), True),  # converted to float32 (a copy)
    ("wrong_length", lambda t: t[:-1], False),
    ("rank_3", lambda t: t[None, None], False),
    ("meta", lambda t: t.to("meta"), False),
]
# Hostile scalars: argument -> [(label, value, legal?)]
SCALAR_CASES = {
    "max_seqlen_q": [("negative", -1, False), ("huge", 2**70, False), ("float", 9.5, False), ("str", "9", False),
                     ("none", None, False)],
    "max_seqlen_k": [("negative", -1, False), ("huge", 2**70, False), ("float", 12.5, False)],
    "softmax_scale": [("nan", float("nan"), False), ("inf", float("inf"), False), ("str", "0.1", False),
                      ("tensor", torch.tensor([0.1, 0.2]), False)],
    "scale": [("nan", float("nan"), False), ("inf", float("-inf"), False), ("str", "0.1", False)],
    "causal": [("str", "yes", False), ("tensor", torch.tensor([True, False]), False)],
    "do_causal": [("str", "yes", False)],
    "window_size": [("short", (3,), False), ("none", None, False), ("float", (1.5, 0), False),
                    ("below_minus_1", (-2, 0), False), ("str", "4,0", False)],
    "softcap": [("negative", -1.0, False), ("nan", float("nan"), False), ("inf", float("inf"), False),
                ("str", "20", False)],
    "softcapping": [("nan", float("nan"), False), ("negative", -2.0, False)],
    "dropout_p": [("positive", 0.1, False), ("nan", float("nan"), False)],
    "num_splits": [("negative", -1, False), ("huge", 2**40, False), ("float", 1.5, False)],
    "return_softmax_lse": [("str", "yes", False), ("none", None, False)],
    "return_attn_probs": [("str", "yes", False)],
    "deterministic": [("str", "yes", False)],
}


def cases() -> List[Tuple[str, str, str, object, bool]]:
    """(entry, argument, label, hostile value or tensor transform, legal)."""
    out = []
    for entry, (_, make) in baselines().items():
        args = make()
        for name, value in args.items():
            if isinstance(value, torch.Tensor):
                if value.dtype.is_floating_point and value.dim() >= 2:
                    table = FLOAT_TENSOR_CASES
                elif value.dtype.is_floating_point:
                    table = SMALL_FLOAT_CASES
                else:
                    table = INDEX_TENSOR_CASES
                out += [(entry, name, label, fn, legal) for label, fn, legal in table]
                if name in ("q", "query", "k_cache", "cu_seqlens_q"):  # None elsewhere is a legal other call
                    out.append((entry, name, "none", None, False))
            else:
                out += [(entry, name, label, v, legal) for label, v, legal in SCALAR_CASES.get(name, [])]
    return out


CASES = cases()


NAMED_AS = {"query": "q", "key": "k", "value": "v"}  # the legacy API's errors use flash_attn_varlen_func's names


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()


def _equal(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))
    return a == b


def _in_place(entry: str, args: dict) -> set:
    """The arguments the call may write: `out`, and the KV cache when new k/v are appended."""
    if entry == "legacy":
        return {"out"}
    if entry.startswith("kvcache") and args.get("k") is not None:
        return {"k_cache", "v_cache"}
    return set()


@pytest.fixture(scope="module")
def baseline_results(kernel):
    results = {}
    for entry, (fn, make) in baselines().items():
        args = make()
        result = getattr(kernel, fn)(**args)
        results[entry] = (result, {n: t.clone() for n, t in args.items() if isinstance(t, torch.Tensor)})
    return results


@pytest.mark.parametrize("entry,name,label,hostile,legal", CASES,
                         ids=[f"{e}-{n}-{label}" for e, n, label, _, _ in CASES])
def test_hostile_argument(kernel, device, baseline_results, entry, name, label, hostile, legal):
    if device.type != "cpu" and label == "meta":
        pytest.skip("the meta case is written for the emulated build's CPU tensors")
    fn, make = baselines()[entry]
    args = make()
    args[name] = hostile(args[name]) if callable(hostile) else hostile
    given = {n: _bits(t) for n, t in args.items() if isinstance(t, torch.Tensor) and t.device.type != "meta"}
    writable = _in_place(entry, args)
    try:
        result = getattr(kernel, fn)(**args)
    except ERRORS as e:  # acceptable values may be refused too, if the error names them (e.g. int64 cu_seqlens)
        assert NAMED_AS.get(name, name) in str(e), f"{entry}: the error for {name} ({label}) does not name it: {e}"
        for n, before in given.items():  # nothing written, in-place arguments included
            assert torch.equal(_bits(args[n]), before), f"{entry}: {n} modified by a call that raised"
        return
    assert legal, f"{entry}: a hostile {name} ({label}) was accepted"
    expected, after = baseline_results[entry]
    assert _equal(result, expected), f"{entry}: {name} ({label}) changed the result"
    for n, before in given.items():
        if n in writable:  # the appended slots: as the baseline left them
            assert _equal(args[n].contiguous(), after[n]), f"{entry}: {n} holds other values than the baseline's"
        else:
            assert torch.equal(_bits(args[n]), before), f"{entry}: {n} modified"


def test_the_matrix_is_large(kernel):
    # Every entry point, every argument of its baseline: the count only grows as arguments do.
    assert len(CASES) >= 300 and {c[0] for c in CASES} == set(baselines())
