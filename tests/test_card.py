"""CARD.md becomes the Hub page's README when kernel-builder uploads: front matter a Hub card has, and a usage example
that runs (here on the loaded build's device)."""

import re
from pathlib import Path

import torch

CARD = (Path(__file__).resolve().parent.parent / "CARD.md").read_text()


def test_front_matter():
    m = re.match(r"---\n(.*?)\n---\n", CARD, flags=re.S)
    assert m, "CARD.md must start with YAML front matter between --- lines"
    meta = m.group(1)
    assert re.search(r"^license: apache-2\.0$", meta, flags=re.M)
    assert re.search(r"^library_name: kernels$", meta, flags=re.M)
    tags = re.search(r"^tags:\n((?:  - .+\n?)+)", meta, flags=re.M)
    assert tags and "  - kernels" in tags.group(1).splitlines()


def test_usage_example_runs(kernel, device):
    blocks = re.findall(r"```python\n(.*?)```", CARD, flags=re.S)
    code = [b for b in blocks if "get_kernel(" in b]
    assert len(code) == 1, "one usage example with get_kernel"
    source = code[0].replace('device="mps"', f'device="{device.type}"')
    scope = {}
    exec(compile(source, "CARD.md", "exec"), scope)  # loads the kernel as conftest does (LOCAL_KERNELS here)
    assert scope["out"].shape == (1, 128, 32, 128) and scope["out1"].shape == (2, 1, 32, 128)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(x.float().transpose(1, 2) for x in (scope["q"], scope["k"], scope["v"])), is_causal=True, enable_gqa=True)
    assert (scope["out"].float() - ref.transpose(1, 2)).abs().max() < 2e-2
