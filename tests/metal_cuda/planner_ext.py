"""Builds the project's C++ planners into a small torch extension (plan_paged / plan_varlen -> dispatch dicts).

Needs a host C++ compiler and torch's headers; no CUDA (the planners only allocate through ATen, on the inputs'
device). Cached by torch.utils.cpp_extension under METAL_CUDA_EXT_DIR (default .cache/metal_cuda_ext).
"""

import os
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
FS = ROOT / "flash_sdpa"
_EXT = None


def load(verbose: bool = False):
    global _EXT
    if _EXT is None:
        from torch.utils import cpp_extension

        build_dir = Path(os.environ.get("METAL_CUDA_EXT_DIR", ROOT / ".cache" / "metal_cuda_ext"))
        build_dir.mkdir(parents=True, exist_ok=True)
        _EXT = cpp_extension.load(
            name="metal_cuda_planner",
            sources=[str(HERE / "planner_binding.cpp"), str(FS / "paged_planner.cpp"), str(FS / "varlen_planner.cpp"),
                     str(FS / "backward_planner.cpp"), str(FS / "routing.cpp")],
            extra_include_paths=[str(FS)], extra_cflags=["-O1", "-std=c++20"], build_directory=str(build_dir),
            verbose=verbose)
    return _EXT


def combine_partials(plan) -> int:
    """The partials a paged plan's combine dispatch reads (PagedCombineParams::num_splits, offset 16: the split count,
    8x it where each decode simdgroup writes its own); 0 when the plan has no combine."""
    combine = [d for d in plan if "combine" in d["kernel"]]
    return struct.unpack_from("<i", combine[0]["bytes"][0][1], 16)[0] if combine else 0
