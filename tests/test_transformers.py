"""End to end with real transformers code: a model whose attn_implementation is this kernel generates what it
generates with PyTorch attention.

transformers loads the kernel itself (attn_implementation="kernels-community/metal-flash-sdpa" -> kernels.get_kernel,
pointed at this checkout's build by LOCAL_KERNELS + HF_HUB_OFFLINE, see conftest.py). Nothing is mocked: the counters
in tiny_models.count_kernel_calls only wrap the functions transformers resolved from the kernel.

- generate(): 1 prompt (flash_attn_func: prefill, then decode with the transposed, non-contiguous KV cache) and
  3 left-padded prompts (flash_attn_varlen_func, cu_seqlens_q = arange(B + 1) when decoding).
- generate_batch (continuous batching): prefill and mixed steps go through flash_attn_varlen_func, pure decode
  steps through flash_attn_with_kvcache (block tables, in-place K/V append) once the decode fast path is on.

Reference: "sdpa", or "eager" for the models transformers gives no sdpa path (Gemma-2, gpt-oss).
Default run: float32 and one bfloat16 model, about 2 minutes on 2 CPU cores; `--full` adds the slow cases.
"""

import functools

import pytest

pytest.importorskip("transformers", reason="transformers is not installed: bash scripts/setup.sh (transformers 5.25.0)")

import tiny_models as tm  # noqa: E402
import torch  # noqa: E402

tm.kernel_environment()  # no-op under conftest.py, which already set LOCAL_KERNELS / HF_HUB_OFFLINE

REFERENCE_IMPL = {
    "llama-gqa": "sdpa",
    "gemma2": "eager",
    "gemma2-global": "eager",
    "gpt-oss": "eager",
    "gpt-oss-full": "eager",
}
GENERATE_PROMPT_LENGTHS = [6, 13, 9]
NEW_TOKENS = 12
# Continuous batching: prompt lengths that, with NEW_TOKENS, cross page boundaries at page sizes 16 and 32.
CB_PROMPT_LENGTHS = [5, 14, 27, 40]
# Max |logit difference| to the reference, as a fraction of max |logit| (about 8 for these models).
LOGIT_RTOL = {torch.float32: 1e-4, torch.bfloat16: 4e-2}


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def _generate(name, dtype, prompts, impl, calls_out=None):
    model = tm.build_model(name, dtype)
    model.set_attn_implementation(impl)
    input_ids, attention_mask = tm.left_padded(prompts)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=tm.greedy_config(NEW_TOKENS),
        output_logits=True,
        return_dict_in_generate=True,
    )
    new_tokens = out.sequences[:, input_ids.shape[1] :].cpu()
    logits = torch.stack(out.logits, dim=1).float().cpu()  # [B, NEW_TOKENS, vocab]
    return new_tokens, logits


@functools.lru_cache(maxsize=None)
def _reference(name, dtype, n_prompts):
    return _generate(name, dtype, tm.random_prompts(GENERATE_PROMPT_LENGTHS)[:n_prompts], REFERENCE_IMPL[name])


@functools.lru_cache(maxsize=None)
def _reference_per_prompt(name, lengths, seed):
    """generate() tokens of each prompt alone (no padding): what continuous batching must reproduce."""
    prompts = tm.random_prompts(list(lengths), seed=seed)
    return [_generate(name, torch.float32, [p], REFERENCE_IMPL[name])[0][0].tolist() for p in prompts]


def assert_same_generation(ref, got, dtype):
    """Identical greedy tokens and close logits (float32). In bfloat16 two correct attentions may round a near-tie
    differently (e.g. sdpa and eager disagree on a bf16 tie): there a row may diverge only at a step where the
    reference's logits of the two tokens are within the tolerance, and the row is compared up to that step."""
    ref_tokens, ref_logits = ref
    tokens, logits = got
    atol = LOGIT_RTOL[dtype] * ref_logits.abs().max().item()
    compared = 0
    for b in range(ref_tokens.shape[0]):
        differs = (ref_tokens[b] != tokens[b]).nonzero()
        stop = differs[0, 0].item() if len(differs) else ref_tokens.shape[1]
        if stop < ref_tokens.shape[1]:
            step_logits = ref_logits[b, stop]
            gap = (step_logits[ref_tokens[b, stop]] - step_logits[tokens[b, stop]]).item()
            assert dtype != torch.float32 and gap <= atol, (
                f"row {b}: tokens differ at step {stop} (reference margin {gap:.3g}, not a tie)\n"
                f"reference {ref_tokens[b].tolist()}\nkernel    {tokens[b].tolist()}"
            )
            stop += 1  # the tie step's logits are still comparable
        diff = (ref_logits[b, :stop] - logits[b, :stop]).abs().max().item()
        assert diff <= atol, f"row {b}: max |logit difference| {diff:.3g} > {atol:.3g} in the first {stop} steps"
        compared += stop
    assert compared >= 0.75 * ref_tokens.numel(), "too few comparable steps: pick another seed"


# ---------------------------------------------------------------------------------------------------------------------
# generate()


def _case(name, dtype, *marks):
    return pytest.param(name, dtype, marks=marks, id=f"{name}-{str(dtype).removeprefix('torch.')}")


GENERATE_CASES = [
    _case("llama-gqa", torch.float32, pytest.mark.kernels_ci),
    _case("llama-gqa", torch.bfloat16),
    _case("gemma2", torch.float32),
    _case("gemma2", torch.bfloat16, pytest.mark.full),
    _case("gpt-oss", torch.float32),
]


@pytest.mark.parametrize("n_prompts", [1, 3], ids=["1prompt", "3prompts"])
@pytest.mark.parametrize("name,dtype", GENERATE_CASES)
def test_generate_matches_reference(name, dtype, n_prompts):
    with tm.count_kernel_calls() as calls:
        got = _generate(name, dtype, tm.random_prompts(GENERATE_PROMPT_LENGTHS)[:n_prompts], tm.KERNEL_REPO)
    assert_same_generation(_reference(name, dtype, n_prompts), got, dtype)

    n_layers = 2
    if n_prompts == 1:
        # No padding: flash_attn_func for the prefill and every decode step (the call that used to crash).
        assert calls.count("flash_attn_func") == n_layers * NEW_TOKENS, calls
    else:
        # Left padding: varlen for the prefill and for decode steps (max_seqlen_q = 1). Sliding layers may drop the
        # mask once the window is past the padding, and then call flash_attn_func.
        assert calls.count("flash_attn_varlen_func", min_seqlen_q=2) >= 1, calls
        assert calls.count("flash_attn_varlen_func") >= NEW_TOKENS, calls
    assert len(calls.calls) == n_layers * NEW_TOKENS, calls


# ---------------------------------------------------------------------------------------------------------------------
# continuous batching


def _generate_batch(name, page_size, fast_path, dtype=torch.float32, seed=2):
    model = tm.build_model(name, dtype)
    model.set_attn_implementation(tm.KERNEL_REPO)
    prompts = tm.random_prompts(CB_PROMPT_LENGTHS, seed=seed)
    with tm.decode_fast_path_on_any_device(), tm.count_kernel_calls() as calls:
        results = model.generate_batch(
            prompts,
            generation_config=tm.greedy_config(NEW_TOKENS),
            continuous_batching_config=tm.continuous_batching_config(page_size, fast_path=fast_path),
            progress_bar=False,
        )
    # generate_batch logs and swallows exceptions of its worker thread: check every request came back whole.
    outputs = list(results.values())
    assert len(outputs) == len(prompts), f"{len(outputs)} of {len(prompts)} requests finished: {results}"
    assert all(o.error is None for o in outputs), [o.error for o in outputs]
    return [list(o.generated_tokens) for o in outputs], calls


def _require_kvcache():
    from transformers.modeling_flash_attention_utils import lazy_import_flash_attention

    if lazy_import_flash_attention(tm.KERNEL_REPO)[0][2] is None:
        pytest.fail(f"{tm.KERNEL_REPO} has no flash_attn_with_kvcache: the decode fast path cannot run")


@pytest.mark.parametrize(
    "name,page_size",
    [
        pytest.param("llama-gqa", 16, marks=pytest.mark.kernels_ci),
        pytest.param("llama-gqa", 32),
        pytest.param("gpt-oss-full", 16),  # sinks (s_aux) through flash_attn_with_kvcache
        pytest.param("gpt-oss-full", 32, marks=pytest.mark.full),
        pytest.param("gemma2-global", 16),  # softcap through flash_attn_with_kvcache
    ],
)
def test_generate_batch_decode_fast_path(name, page_size):
    _require_kvcache()
    tokens, calls = _generate_batch(name, page_size, fast_path=True)
    assert tokens == _reference_per_prompt(name, tuple(CB_PROMPT_LENGTHS), 2)
    assert calls.count("flash_attn_with_kvcache") > 0, f"the block-table decode path was not taken: {calls}"
    assert calls.count("flash_attn_varlen_func", min_seqlen_q=2) > 0, f"no varlen prefill: {calls}"
    assert calls.count("flash_attn_func") == 0, calls


@pytest.mark.parametrize(
    "name,page_size",
    [
        pytest.param("llama-gqa", 16),
        # Sliding-window layers get no block table in transformers: every step is varlen.
        pytest.param("gemma2", 16),
        pytest.param("gpt-oss", 32, marks=pytest.mark.full),
    ],
)
def test_generate_batch_varlen_only(name, page_size):
    tokens, calls = _generate_batch(name, page_size, fast_path=False)
    assert tokens == _reference_per_prompt(name, tuple(CB_PROMPT_LENGTHS), 2)
    assert calls.count("flash_attn_varlen_func", min_seqlen_q=2) > 0, calls
    assert calls.count("flash_attn_with_kvcache") == 0, calls
