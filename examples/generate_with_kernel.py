#!/usr/bin/env python3
"""transformers generation with metal-flash-sdpa: generate() and continuous batching (generate_batch).

    python examples/generate_with_kernel.py [--prompts 4] [--new-tokens 16] [--page-size 16]

Builds a tiny Llama-style model with random weights (GQA, head dim 64; nothing is downloaded), then
  1. model.generate() on left-padded prompts with attn_implementation="kernels-community/metal-flash-sdpa",
     checked against attn_implementation="sdpa";
  2. model.generate_batch() (continuous batching): prefill through flash_attn_varlen_func, decode steps through
     flash_attn_with_kvcache on the paged KV cache;
and prints the tokens and tokens/s of each.

On a Mac (MPS) the kernel comes from the Hugging Face Hub. Elsewhere it runs the emulated build of this checkout
(build/, made by `bash scripts/setup.sh`): the real .metal kernels executed on the CPU, correct but slow; its
tokens/s measure the emulator, not a GPU. LOCAL_KERNELS, if set, takes precedence in both cases.
"""

import argparse
import os
import sys
import time
from pathlib import Path

REPO = "kernels-community/metal-flash-sdpa"
VERSION = 2  # build.toml [general] version; transformers 5.22 would ask the Hub for v1 without "@v2"
ROOT = Path(__file__).resolve().parent.parent
ON_MAC = sys.platform == "darwin"

if not ON_MAC:
    # Before huggingface_hub is imported (it reads HF_HUB_OFFLINE once).
    os.environ.setdefault("LOCAL_KERNELS", f"{REPO}={ROOT}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: E402

KERNEL = f"{REPO}@v{VERSION}"


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
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--page-size", type=int, default=16)
    args = parser.parse_args()

    if ON_MAC and torch.backends.mps.is_available():
        device, backend = torch.device("mps"), "Metal on MPS"
    else:
        device, backend = torch.device("cpu"), "emulated build (Metal kernels on the CPU; timings are the emulator's)"
    print(f"kernel {KERNEL}: {backend}; LOCAL_KERNELS={os.environ.get('LOCAL_KERNELS', '(unset: Hugging Face Hub)')}")

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in range(7, 7 + 9 * args.prompts, 9)]
    gen = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, eos_token_id=2)
    model = tiny_model(device)
    counts = count_calls()

    # 1. generate(): one batch, left-padded.
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts])[:, None]).long().to(device)
    results = {}
    for impl in ("sdpa", KERNEL):
        model.set_attn_implementation(impl)
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        results[impl] = (out[:, width:].cpu(), time.perf_counter() - start)
    tokens, seconds = results[KERNEL]
    lengths = [len(p) for p in prompts]
    print(f"\ngenerate(): {len(prompts)} prompts (lengths {lengths}), {args.new_tokens} new tokens each")
    for row in tokens.tolist():
        print("  ", row)
    print(f"  {tokens.numel() / seconds:.1f} tokens/s; same tokens as sdpa: {torch.equal(tokens, results['sdpa'][0])}")

    # 2. Continuous batching.
    enable_decode_fast_path_off_cuda()
    counts.clear()
    cb = ContinuousBatchingConfig(page_size=args.page_size, num_blocks=256, max_batch_tokens=64, use_cuda_graph=False)
    start = time.perf_counter()
    outputs = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb, progress_bar=False)
    seconds = time.perf_counter() - start
    generated = [list(o.generated_tokens) for o in outputs.values()]
    print(f"\ngenerate_batch(): page size {args.page_size}; kernel calls {counts}")
    for row in generated:
        print("  ", row)
    n = sum(map(len, generated))
    print(f"  {n / seconds:.1f} tokens/s; same tokens as generate(): {generated == tokens.tolist()}")
    if counts.get("flash_attn_with_kvcache", 0) == 0:
        print("  (flash_attn_with_kvcache was not used: decode steps ran through the varlen path)")


if __name__ == "__main__":
    main()
