"""Another git revision of the whole tree, packed with its own proxy PTX, to time beside this one in one device
command: A/B of a change that moves the planner as well as the kernels (a tile shape, a grid order), which a PTX-only
variant (decode_variants, bench_prefill --variant) cannot, since the planner builds on the GPU machine from the
tree it runs in.

    python3 -m tests.metal_cuda.alt_tree build REV     # here: .cache/alt-<rev>.tgz (the tree at REV + its PTX)
    # GPU machine, carry [".cache/alt-<rev>.tgz", ...]:
    mkdir -p .cache/alt && tar xzf .cache/alt-<rev>.tgz -C .cache/alt && (cd .cache/alt/<rev> && python3 -m ...)

The packed tree holds the revision's tracked files and its .cache/metal_cuda (index.json and the folders it names:
the tensor-core lowering); its planner extension builds there on first use, as in this tree.
"""

import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build(rev: str) -> Path:
    rev = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    tree = ROOT / ".cache" / "alt" / rev
    if not tree.exists():
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "xf", "-", "-C", str(tree)], input=archive, check=True)
    # Its own toolchain and targets: the revision's kernels, planner and lowering, into its own cache.
    subprocess.run([sys.executable, "-m", "tests.metal_cuda.targets", "--mma", "1", "--prune"], cwd=tree, check=True)
    out = ROOT / ".cache" / f"alt-{rev}.tgz"
    with tarfile.open(out, "w:gz") as t:
        t.add(tree, arcname=rev, filter=lambda m: None if "/.cache/metal_cuda_ext" in m.name else m)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB; there: mkdir -p .cache/alt && tar xzf .cache/alt-{rev}.tgz "
          f"-C .cache/alt && (cd .cache/alt/{rev} && python3 -m tests.metal_cuda.<benchmark> ...)")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "build":
        sys.exit(__doc__)
    build(sys.argv[2])
