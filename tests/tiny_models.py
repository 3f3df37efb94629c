"""Tiny random-weight transformers models and the instruments the end-to-end tests (and the example) use.

Nothing is downloaded: every model is built from a config with a fixed seed. Sizes are chosen for the Metal-on-CPU
emulator (2 layers, hidden 128, head dim 32, vocab 128). `initializer_range=0.2` (not the usual 0.02) makes the
random models attend sharply and emit varied tokens, so an attention bug changes the generated ids.
"""

import contextlib
import functools
import os
import sys
from typing import Callable, Dict, List, Optional

import torch

KERNEL_REPO = "kernels-community/metal-flash-sdpa"
VOCAB = 128
PAD_ID = 0
EOS_ID = 2
SPECIAL_IDS = (PAD_ID, 1, EOS_ID)  # their lm_head rows are zero: see build_model


def model_device() -> torch.device:
    """MPS on a Mac (the kernel-builder build), the CPU elsewhere (the emulated build runs its kernels on the CPU)."""
    return torch.device("mps" if sys.platform == "darwin" and torch.backends.mps.is_available() else "cpu")


def _common(**overrides) -> dict:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: 2 query heads per KV head
        head_dim=32,
        max_position_embeddings=256,
        initializer_range=0.2,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    base.update(overrides)
    return base


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_common()))


def _gemma2(layer_types=("sliding_attention", "full_attention")):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # Sliding layers see 8 keys; a small attention softcap so tanh actually bends the scores.
    config = Gemma2Config(
        **_common(),
        layer_types=list(layer_types),
        sliding_window=8,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=None,
        query_pre_attn_scalar=32,
    )
    return Gemma2ForCausalLM(config)


def _gpt_oss(layer_types=("sliding_attention", "full_attention")):
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        **_common(intermediate_size=128),
        layer_types=list(layer_types),
        sliding_window=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = GptOssForCausalLM(config)
    with torch.no_grad():
        # Random sinks (one logit per head) of the same size as the scores, so dropping them changes the output.
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)
    return model


BUILDERS: Dict[str, Callable] = {
    "llama-gqa": _llama,
    "gemma2": _gemma2,
    # Gemma-2 attention (softcap) on full-attention layers only, for the block-table path (see gpt-oss-full).
    "gemma2-global": functools.partial(_gemma2, layer_types=("full_attention", "full_attention")),
    "gpt-oss": _gpt_oss,
    # gpt-oss attention (sinks) on full-attention layers only: the only kind continuous batching gives a block table.
    "gpt-oss-full": functools.partial(_gpt_oss, layer_types=("full_attention", "full_attention")),
}


def build_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A fresh tiny model, random weights from `seed`, in eval mode on model_device().

    The lm_head rows of pad/bos/eos are zero: their logit is exactly 0 while the max over 125 random logits is
    positive, so greedy decoding never stops early and every run generates exactly max_new_tokens tokens."""
    torch.manual_seed(seed)
    model = BUILDERS[name]()
    with torch.no_grad():
        model.lm_head.weight[list(SPECIAL_IDS)] = 0.0
    return model.to(device=model_device(), dtype=dtype).eval()


def random_prompts(lengths: List[int], seed: int = 1) -> List[List[int]]:
    """Prompts of the given lengths, token ids in [3, VOCAB) (no pad / bos / eos)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def left_padded(prompts: List[List[int]]):
    """(input_ids, attention_mask) [B, max_len] on model_device(), left-padded as decoder-only generate() wants."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(model_device()), mask.to(model_device())


def greedy_config(max_new_tokens: int):
    """Greedy decoding of max_new_tokens tokens."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Instruments


class KernelCalls:
    """Records every call transformers makes into the kernel's flash functions: one (name, max_seqlen_q) per call,
    max_seqlen_q is None for flash_attn_func / flash_attn_with_kvcache (q of one row per sequence there)."""

    def __init__(self):
        self.calls: List[tuple] = []

    def count(self, name: str, min_seqlen_q: int = 0) -> int:
        return sum(1 for n, sq in self.calls if n == name and (sq or 0) >= min_seqlen_q)

    def __repr__(self) -> str:
        names = sorted({n for n, _ in self.calls})
        return "KernelCalls(" + ", ".join(f"{n}={self.count(n)}" for n in names) + ")"


@contextlib.contextmanager
def count_kernel_calls():
    """Wraps the functions transformers resolved from the kernel (modeling_flash_attention_utils' module-level
    handles, filled by lazy_import_flash_attention) with counters. functools.wraps keeps inspect.signature intact,
    which transformers reads to decide which keywords to pass. Yields a KernelCalls."""
    import transformers.modeling_flash_attention_utils as mfau

    mfau.lazy_import_flash_attention(KERNEL_REPO)
    calls = KernelCalls()
    names = {"_flash_fn": "flash_attn_func", "_flash_varlen_fn": "flash_attn_varlen_func",
             "_flash_with_kvcache_fn": "flash_attn_with_kvcache"}  # fmt: skip
    saved = {attr: getattr(mfau, attr) for attr in names}

    def counting(fn, name):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            calls.calls.append((name, kwargs.get("max_seqlen_q")))
            return fn(*args, **kwargs)

        return wrapper

    for attr, name in names.items():
        if saved[attr] is not None:
            setattr(mfau, attr, counting(saved[attr], name))
    try:
        yield calls
    finally:
        for attr, fn in saved.items():
            setattr(mfau, attr, fn)


@contextlib.contextmanager
def decode_fast_path_on_any_device():
    """Lets continuous batching use flash_attn_with_kvcache (the block-table decode fast path) off CUDA.

    transformers 5.22 to 5.25 enable that path only for flash attention on CUDA (or flash-attn2 on XPU), in
    generation/continuous_batching/initialization.py::ensure_decode_fast_path_is_available; a pending transformers
    change enables it for MPS Hub kernels. This keeps every other check of that function (all attention types support
    block tables, the kernel has flash_attn_with_kvcache) and drops only the device check."""
    from transformers.generation.continuous_batching import initialization as init

    original = init.ensure_decode_fast_path_is_available

    def without_device_check(config, cb_config, user_requested):
        if cb_config.max_blocks_per_request == 0:
            return
        layer_types = init.group_layers_by_attn_type(config)
        if not all(init.ATTN_TYPE_TO_ALLOCATOR[t].supports_block_table for t in layer_types):
            cb_config.max_blocks_per_request = 0  # e.g. sliding-window layers: varlen only, as on CUDA
            return
        if init.lazy_import_flash_attention(config._attn_implementation)[0][2] is None:
            raise AssertionError(f"{config._attn_implementation} has no flash_attn_with_kvcache")

    init.ensure_decode_fast_path_is_available = without_device_check
    try:
        yield
    finally:
        init.ensure_decode_fast_path_is_available = original


def continuous_batching_config(page_size: int, fast_path: bool, max_batch_tokens: int = 48, num_blocks: int = 96):
    """A small, explicit cache (no memory probing). max_batch_tokens below the total prompt length makes the
    scheduler split prefills, so some steps mix a prefill chunk (after cached tokens) with decodes."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    return ContinuousBatchingConfig(
        page_size=page_size,
        num_blocks=num_blocks,
        max_batch_tokens=max_batch_tokens,
        max_blocks_per_request=None if fast_path else 0,
        use_cuda_graph=False,
        allow_block_sharing=False,
    )


def kernel_environment() -> Optional[str]:
    """Points kernels.get_kernel at this checkout's build (LOCAL_KERNELS, offline) unless the caller already did.
    Must run before huggingface_hub is imported. Returns the local path in use, or None on a Mac without a build."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LOCAL_KERNELS", f"{KERNEL_REPO}={root}")
    return os.environ["LOCAL_KERNELS"]
