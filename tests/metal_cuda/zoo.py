"""The model zoo of the decode benchmark (issue 19): real models' heads, KV heads and head dims, the contexts and
batches they run at. Used by bench_peers.py (timing, GPU machine) and apple_plans.py (the planner on Apple devices)."""

import torch

from benchmarks.cases import MODELS, Model

# The GQA factors (query heads per KV head) the Mac report's models leave out, which issue 19 names: 3, 6, 12, 16
# (MODELS has 1, 2, 4, 5, 7, 8). Proxy table only: the Mac report's grid is its own issue's.
GQA_MODELS = (
    Model("Llama-3.2-3B", 24, 8, 128),  # GQA 3
    Model("Qwen2.5-1.5B", 12, 2, 128),  # GQA 6
    Model("Mistral-Large-2", 96, 8, 128),  # GQA 12
    Model("Llama-3.1-405B", 128, 8, 128),  # GQA 16
)

# name -> (H, Hkv, D, options), from benchmarks/cases.py's MODELS (one list for the Mac report and this table) and
# GQA_MODELS. Gemma-2 runs with its softcap and gpt-oss with its sinks on our side; MLX has no softcap, llama.cpp's
# kernels here neither softcap nor sinks, so those peers run without them.
ZOO = {m.name: (m.H, m.Hkv, m.D, {"softcap": m.softcap} if m.softcap else ({"sinks": True} if m.sinks else {}))
       for m in MODELS + GQA_MODELS}
ZOO_CONTEXTS = (256, 1000, 4096, 32768, 131072)
ZOO_BATCHES = (1, 8, 32)
ZOO_MAX_KV_BYTES = 2 << 30  # skip what does not fit the time of one run (K + V of the whole batch)
ZOO_EXTRA_DTYPES = {"Llama-3-8B": (torch.bfloat16, torch.float32), "Qwen2.5-7B": (torch.bfloat16,)}
ZOO_EXTRA_SHAPES = ((1, 1000), (1, 32768), (8, 4096))


def zoo_rows():
    rows = []
    for name, (H, Hkv, D, opts) in ZOO.items():
        for B in ZOO_BATCHES:
            for S in ZOO_CONTEXTS:
                if B * S * Hkv * D * 2 * 2 <= ZOO_MAX_KV_BYTES:
                    rows.append((name, B, S, torch.float16))
        for dtype in ZOO_EXTRA_DTYPES.get(name, ()):
            rows.extend((name, B, S, dtype) for B, S in ZOO_EXTRA_SHAPES)
    return rows
