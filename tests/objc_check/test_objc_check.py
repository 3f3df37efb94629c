"""The Mac-only glue compiles against PyTorch's MPS headers and the Metal/Foundation stubs, and the check can fail.

Each planted error is one edit of a copy of flash_sdpa/metal_launch.mm that a Mac build rejects, or (a misspelled
selector) only warns about and then fails at run time with "unrecognized selector sent to instance".
"""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

pytestmark = [
    pytest.mark.kernels_ci,
    pytest.mark.skipif(sys.platform == "darwin", reason="on a Mac the real build compiles the glue"),
]


def _load_check():
    spec = importlib.util.spec_from_file_location("objc_check_script", HERE / "check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load_check()
GLUE = ROOT / "flash_sdpa" / "metal_launch.mm"

# name -> (pattern in the glue, replacement, a fragment of the expected diagnostic)
PLANTED = {
    # a selector misspelled: Objective-C only warns "instance method not found"; -Werror makes it fail
    "misspelled_selector": (r"setComputePipelineState:\(\*pipelines\)", "setComputePipelineStat:(*pipelines)",
                            "setComputePipelineStat:"),
    # wrong argument type: the plan's own enum where MTLDataType is expected
    "wrong_enum_argument": (r"type:MTLDataTypeInt atIndex:c\.index", "type:c.type atIndex:c.index", "MTLDataType"),
    # wrong argument type: a tensor where the NSUInteger byte offset is expected
    "tensor_as_offset": (r"offset:b\.tensor\.storage_offset\(\) \* b\.tensor\.element_size\(\)", "offset:b.tensor",
                         "NSUInteger"),
    # wrong object type: function-constant values where an id<MTLFunction> is expected
    "wrong_protocol_argument": (r"newComputePipelineStateWithFunction:fn ",
                                "newComputePipelineStateWithFunction:values ", "MTLFunction"),
}


def test_glue_compiles():
    ok, report = check.run_check()
    print(report)
    print(f"glue: {check.glue_line_count()} lines")
    assert ok, report


def test_planted_errors_fail(tmp_path):
    if not GLUE.exists():
        pytest.skip("no flash_sdpa/metal_launch.mm yet")
    source = GLUE.read_text()
    mutants = {}
    for name, (pattern, replacement, _) in PLANTED.items():
        mutated, n = re.subn(pattern, replacement, source, count=1)
        assert n == 1, f"{name}: pattern {pattern!r} no longer in {GLUE.name}; update the planted error"
        if name == "wrong_protocol_argument":
            # `values` is released before the pipeline is built: keep it alive in the copy so only the type is wrong
            mutated = mutated.replace("[values release];", "", 1)
        path = tmp_path / f"{name}.mm"
        path.write_text(mutated)
        mutants[path] = name
    # launch_plan.h is found through -I flash_sdpa, as the copy is not next to it.
    results = check.compile_all(list(mutants), binding=None, jobs=2)
    for src, ok, err, _ in results:
        name = mutants[src]
        assert not ok, f"{name}: the planted error compiled:\n{src.read_text()}"
        assert PLANTED[name][2] in err, f"{name}: unexpected diagnostic:\n{err}"
        print(f"{name}: {next(line for line in err.splitlines() if 'error' in line)}")


def test_arc_would_fail():
    """The check compiles as kernel-builder does, without ARC: under ARC the glue's retain/release are errors."""
    if not GLUE.exists():
        pytest.skip("no flash_sdpa/metal_launch.mm yet")
    (src, ok, err, _), = check.compile_all([GLUE], binding=None, extra_flags=["-fobjc-arc"])
    assert not ok and "ARC forbids" in err


def test_stubs_declare_only_documented_selectors():
    """Every selector the glue sends is declared in the stubs (so a typo cannot match a catch-all declaration)."""
    stubs = "\n".join(p.read_text() for p in (HERE / "stubs").rglob("*.h"))
    assert "id)forwardingTargetForSelector" not in stubs and "NS_REQUIRES_NIL" not in stubs
    for selector in ("setComputePipelineState:", "setBuffer:", "setBytes:", "setThreadgroupMemoryLength:",
                     "dispatchThreadgroups:", "newFunctionWithName:", "newComputePipelineStateWithFunction:",
                     "setConstantValue:", "newLibraryWithData:", "maxTotalThreadsPerThreadgroup"):
        assert selector.rstrip(":") in stubs, selector


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-s"]))


def test_autoreleasepools():
    """Metal's autoreleased objects (PyTorch's commandEncoder(), NSError descriptions) are drained by the glue itself:
    a long generate() on a thread without a pool would otherwise accumulate them. The pipeline build and the body of
    the dispatch_sync block each run inside an @autoreleasepool, and no TORCH_CHECK throws from inside a pool."""
    text = GLUE.read_text()
    block = text[text.index("dispatch_sync(stream->queue()"):]
    assert re.match(r"dispatch_sync\(stream->queue\(\), \^\(\) \{\s*@autoreleasepool \{", block)
    build = text[text.index("id<MTLComputePipelineState> pipeline("):text.index("void run_launch_plan")]
    pool = build[build.index("@autoreleasepool {"):]
    depth, end = 0, 0
    for end, ch in enumerate(pool):
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0 and ch == "}":
            break
    inside = pool[:end]
    assert "newFunctionWithName" in inside and "newComputePipelineStateWithFunction" in inside
    assert "TORCH_CHECK" not in inside, "an exception thrown inside @autoreleasepool skips the pool's drain"
