"""The front end both targets share: a .metal file -> preprocessed text -> the pre-pass -> C++ (msl/cpu) or CUDA
(msl/cuda) source plus the kernels and function constants it declares.

clang-19 -E with the Metal headers replaced by empty stand-ins (shim/standins), then a pre-pass over the text:
kernel-scope threadgroup arrays, [[kernel]] signatures and template [[host_name]] instantiations are parsed and
rewritten, function constants become run-time values, half literals and vector constructors convert as MSL does,
C-style casts to vector types and pre-Metal-4.0 constructs are rejected (Metal 4.0 is the language version,
METAL_STD). Each target adds its entry points and compiles with its own shim.
"""

import hashlib
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # the checkout holding msl/: compile caches go to its .cache/
STANDINS = HERE / "shim" / "standins"
SHIM_CORE = HERE / "shim" / "msl_types.h"  # included by both targets' metal_stdlib.h
SHIM_TENSORS = HERE / "shim" / "msl_tensors.h"  # included by both targets' metal_tensor_ops.h


class MetalCompileError(Exception):
    """The .metal source uses something the toolchain rejects, or clang failed."""


def clang() -> str:
    exe = os.environ.get("METAL_CPU_CLANG") or shutil.which("clang-19") or shutil.which("clang")
    if not exe:
        raise MetalCompileError("clang-19 not found: run scripts/setup.sh "
                                "(apt-get install clang-19 libclang-rt-19-dev)")
    return exe


def cache_dir(name: str, env: str) -> Path:
    """<checkout>/.cache/<name>, or the folder the environment variable `env` names."""
    d = Path(os.environ.get(env, ROOT / ".cache" / name))
    d.mkdir(parents=True, exist_ok=True)
    return d


def run(cmd: Sequence[str], what: str) -> str:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if r.returncode != 0:
        raise MetalCompileError(f"{what} failed:\n{r.stderr.strip()[:6000]}\ncommand: {' '.join(cmd)}")
    return r.stdout


def file_hash(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# The language version: Metal 4.0, what kernel-builder compiles with (`-std=metal4.0 -O2` in its
# kernel-builder/src/pyproject/templates/torch/metal/compile-metal.cmake) and why kernels (0.17.2 on) loads Metal
# variants only on macOS 26+. `-std=metal4.0` predefines __METAL_VERSION__ as 400 (major * 100 + minor * 10, as
# 3.1's 310), so `#if __METAL_VERSION__ >= 400` branches are the ones taken here too; MSL 4.0 is based on C++17 (3.x:
# C++14), hence the C++17 front end.
#
# Pre-4.0-only constructs the pre-pass rejects, with where the rule comes from. Apple's MSL 4.0 specification (its
# "New in Metal 4" and removed-features notes) was not among the sources reachable from this workplace (its search
# corpus holds the 3.2 PDF); the list holds only what the reachable sources establish:
# - the SIMD-group asynchronous copy family (simdgroup_async_copy, simdgroup_event and their __metal_* builtins, the
#   private air.simdgroup_async_copy_1d/2d intrinsics): never part of the documented MSL (the 3.2 specification has
#   no such function), reachable only through headers Xcode 15 already dropped (philipturner/metal-flash-attention#14,
#   dougallj/applegpu#28), and gone under -std=metal4.0 (metal-flash-sdpa issue 18, from kernels 0.19's and
#   kernel-builder's change to Metal 4.0). A kernel that uses them fails to compile on the Mac build.
METAL_STD = "metal4.0"
METAL_VERSION = 400
REMOVED_IN_METAL4 = {
    "simdgroup_async_copy": "the SIMD-group asynchronous copy (private air.simdgroup_async_copy intrinsics)",
    "simdgroup_event": "the SIMD-group asynchronous copy's event type",
    "_simdgroup_event_t": "the SIMD-group asynchronous copy's event type",
    "__metal_simdgroup_async_copy_1d": "the private air.simdgroup_async_copy_1d intrinsic",
    "__metal_simdgroup_async_copy_2d": "the private air.simdgroup_async_copy_2d intrinsic",
    "__metal_wait_simdgroup_events": "the SIMD-group asynchronous copy's wait",
}


def check_metal4(text: str, where=lambda pos: "?") -> None:
    """Rejects the pre-Metal-4.0-only constructs of REMOVED_IN_METAL4 in preprocessed MSL, naming the place."""
    m = re.search(r"(?<![\w.])(" + "|".join(sorted(REMOVED_IN_METAL4, key=len, reverse=True)) + r")\b", text)
    if m:
        raise MetalCompileError(
            f"{where(m.start())}: {m.group(1)} ({REMOVED_IN_METAL4[m.group(1)]}) is a pre-Metal-4.0 construct: "
            f"kernel-builder compiles with -std={METAL_STD}, where it does not exist. Stage tiles into threadgroup "
            f"memory with ordinary loads and threadgroup_barrier instead.")


def preprocess(metal_path: Path, include_dirs: Sequence[str], defines: Dict[str, str]) -> str:
    metal_path = Path(metal_path)
    cmd = [clang(), "-E", "-x", "c++", "-std=c++17", f"-D__METAL_VERSION__={METAL_VERSION}", "-D__HAVE_MCPU__=1",
           "-isystem", str(STANDINS)]
    for d in include_dirs:
        cmd += ["-I", str(Path(d).resolve())]
    for k, v in (defines or {}).items():
        cmd.append(f"-D{k}={v}")
    cmd.append(str(metal_path.resolve()))
    return run(cmd, f"preprocessing {metal_path}")


def constant_bits(ty: str, value) -> int:
    """The 32 bits a launcher stores for a function constant of type `ty` (FC_TYPES)."""
    if ty == "float":
        return struct.unpack("<I", struct.pack("<f", float(value)))[0]
    return int(value) & 0xFFFFFFFF


def param_type(i: int, callee: str) -> str:
    """The C++ type of parameter i of a kernel, for the generated entry points (mcpu_param_t in msl_types.h)."""
    return f"mcpu_param_t<{i}, decltype({callee})>"


# ---------------------------------------------------------------------------------------------------------------
# The pre-pass.

VECTOR_TYPES = r"(?:float|half|bfloat|int|uint|short|ushort|char|uchar|long|ulong|bool)[234]"
BUILTINS = {
    "thread_position_in_grid": "thread_position_in_grid",
    "thread_position_in_threadgroup": "thread_position_in_threadgroup",
    "threadgroup_position_in_grid": "threadgroup_position_in_grid",
    "threadgroups_per_grid": "threadgroups_per_grid",
    "threads_per_threadgroup": "threads_per_threadgroup",
    "dispatch_threads_per_threadgroup": "threads_per_threadgroup",
    "threads_per_grid": "threads_per_grid",
    "thread_index_in_threadgroup": "thread_index_in_threadgroup",
    "simdgroup_index_in_threadgroup": "simdgroup_index_in_threadgroup",
    "thread_index_in_simdgroup": "thread_index_in_simdgroup",
    "simdgroups_per_threadgroup": "simdgroups_per_threadgroup",
    "dispatch_simdgroups_per_threadgroup": "simdgroups_per_threadgroup",
    "threads_per_simdgroup": None,  # constant 32
    "thread_execution_width": None,
}
FC_TYPES = {"bool": 0, "int": 1, "uint": 2, "float": 3}  # function-constant type codes of both launchers
MAX_BUFFERS = 31  # [[buffer(i)]] and [[threadgroup(i)]] indices are below this, as in Metal
KEEP_ATTRIBUTES = {"maybe_unused", "likely", "unlikely", "fallthrough", "nodiscard"}


@dataclass
class Param:
    name: str
    kind: str  # "buffer" | "threadgroup" | builtin name
    index: str = "0"  # a C++ constant expression: a literal or a named constant from a params header


@dataclass
class KernelDef:
    name: str
    params: List[Param]
    is_template: bool
    max_threads: Union[int, str] = 0  # max_total_threads_per_threadgroup: a number, or a C++ constant expression


@dataclass
class Instance:
    host_name: str
    callee: str  # e.g. attention<float, 64>
    template_name: str


@dataclass
class Prepassed:
    source: str  # the rewritten source, without entry points
    kernels: List[Tuple[str, str, KernelDef]] = field(default_factory=list)  # (host name, callee, def)
    function_constants: List[Tuple[str, str, str]] = field(default_factory=list)  # (type, name, index expression)


class _Src:
    """Location helper over the preprocessed text: maps offsets to the .metal file and line via line markers."""

    def __init__(self, text: str):
        self.text = text
        self.markers = [(m.start(), int(m.group(1)), m.group(2)) for m in
                        re.finditer(r'^# (\d+) "([^"]*)"[^\n]*$', text, re.M)]

    def where(self, pos: int) -> str:
        line, fname, start = 1, "?", 0
        for off, ln, fn in self.markers:
            if off > pos:
                break
            line, fname, start = ln, fn, off
        nl = self.text.count("\n", start, pos) - 1
        return f"{fname}:{line + max(nl, 0)}"


def _match_close(text: str, i: int, open_ch: str, close_ch: str) -> int:
    """Index just past the bracket matching text[i] == open_ch."""
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == open_ch:
            depth += 1
        elif c == close_ch:
            depth -= 1
            if depth == 0:
                return j + 1
    raise MetalCompileError(f"unbalanced {open_ch}{close_ch}")


def _blank(s: str) -> str:
    """Same number of lines, no code."""
    return "\n" * s.count("\n") + " "


def split_top(s: str, sep: str = ",") -> List[str]:
    """s split at `sep` outside brackets, each piece stripped (an empty last piece dropped): kernel parameter lists,
    LLVM IR operand lists."""
    out, depth, cur = [], 0, []
    for c in s:
        if c in "([{<":
            depth += 1
        elif c in ")]}>":
            depth -= 1
        if c == sep and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _parse_params(plist: str, where: str, implicit_buffers: bool = False) -> List[Param]:
    """implicit_buffers (the cuda target, for peers): device / constant parameters without an attribute are numbered
    as Metal numbers them; the emulator keeps rejecting them, so the project's kernels bind every buffer by name."""
    params = []
    for raw in split_top(plist):
        attrs = re.findall(r"\[\[(.*?)\]\]", raw, re.S)
        decl = re.sub(r"\[\[.*?\]\]", " ", raw, flags=re.S).split("=")[0].strip()
        m = re.search(r"(\w+)\s*$", decl)
        if not m:
            raise MetalCompileError(f"{where}: cannot parse kernel parameter '{raw.strip()}'")
        name = m.group(1)
        kind = None
        # One [[...]] may hold several attributes: [[buffer(5), function_constant(has_mask)]].
        for a in (part for group in attrs for part in split_top(group)):
            a = a.strip()
            mb = re.fullmatch(r"(buffer|threadgroup)\s*\((.+)\)", a, re.S)
            if mb:
                kind, index = mb.group(1), " ".join(mb.group(2).split())
            elif a in BUILTINS:
                kind, index = a, "0"
        if kind is None and implicit_buffers and not attrs and re.search(r"\b(device|constant)\b.*[*&]", decl):
            kind, index = "buffer", None  # Metal numbers unattributed buffers in order (below)
        if kind is None:
            raise MetalCompileError(f"{where}: kernel parameter '{name}' has no supported attribute "
                                    f"([[buffer(i)]], [[threadgroup(i)]] or a position builtin)")
        params.append(Param(name, kind, index))
    # Unattributed device / constant buffers take the lowest indices the others leave free, in order.
    used = {p.index for p in params if p.kind == "buffer" and p.index is not None}
    free = (str(i) for i in range(64) if str(i) not in used)
    return [Param(p.name, p.kind, next(free)) if p.kind == "buffer" and p.index is None else p for p in params]


def _qualify_vec(t: str) -> str:
    """`vec<T, N>` / `metal::vec<T, N>` -> `metal::vec<T, N>` (a vector type name such as float4 unchanged)."""
    return re.sub(r"^(?:metal\s*::\s*)?vec\b", "metal::vec", t.strip())


def _cast_operand_end(text: str, i: int) -> int:
    """End of the unary-expression operand of a C-style cast that starts at i: unary operators, then an identifier,
    number or parenthesised group, then postfix [..], (..), .member, ->member (a cast binds tighter than * and +)."""
    n = len(text)
    while i < n and text[i] in " \t-+!~":
        i += 1

    def close(j, o, c):
        depth = 0
        while j < n:
            depth += text[j] == o
            depth -= text[j] == c
            j += 1
            if depth == 0:
                return j
        return j
    if i < n and text[i] == "(":
        i = close(i, "(", ")")
    else:
        m = re.match(r"[\w.]+", text[i:])
        i += m.end() if m else 0
    while i < n:
        if text[i] == "[":
            i = close(i, "[", "]")
        elif text[i] == "(":
            i = close(i, "(", ")")
        elif text.startswith("->", i) or (text[i] == "." and re.match(r"\.[A-Za-z_]", text[i:])):
            i += 2 if text[i] == "-" else 1
            i += re.match(r"\w*", text[i:]).end()
        else:
            break
    return i


def _convert_vector_casts(text: str, cast_types: Optional[str] = None) -> str:
    """The proxy's reading of peers' C-style vector casts, `(float4) x[i]` -> `metal::mcu_cast<float4>(x[i])`: MSL's
    element-wise conversion (clang's cast would reinterpret the bits). cast_types: a regex of more type names to
    treat so (a peer's template parameters that name vector types, e.g. llama.cpp's `q4_t`). The emulator keeps
    rejecting them: the project's kernels spell conversions."""
    names = VECTOR_TYPES + r"(?:x[234])?" + (f"|{cast_types}" if cast_types else "")
    pat = re.compile(r"(\w*)(\s*)\(\s*(?:const\s+)?(" + names + r")\s*\)\s*(?=[\w(\-+!~.])")
    out, pos = [], 0
    for m in pat.finditer(text):
        if m.start() < pos or m.group(1) not in ("", "return", "case"):
            continue
        end = _cast_operand_end(text, m.end())
        out.append(text[pos:m.start()] + m.group(1) + m.group(2) + f"metal::mcu_cast<{m.group(3)}>(" +
                   text[m.end():end] + ")")
        pos = end
    text = "".join(out) + text[pos:]
    if cast_types:  # functional casts too: s2_t(x)
        text = re.sub(r"(?<![\w.:<])(" + cast_types + r")\s*\(", r"metal::mcu_cast<\1>(", text)
    return text


def prepass(text: str, target: str, baked: Optional[Dict[str, object]] = None,
            cast_types: Optional[str] = None) -> Prepassed:
    """The preprocessed MSL rewritten as C++ (target "cpu", the emulator) or CUDA (target "cuda"), and the kernels and
    function constants it declares. The targets differ in storage only: function constants are `static` globals the
    runtime sets or `__constant__` ones the launcher writes; a kernel-scope `threadgroup T x[N]` is one allocation per
    threadgroup from the emulator's runtime or a `__shared__` array. Entry points are the targets' own
    (msl/cpu/compiler.py, msl/cuda/compiler.py). `baked`: function constants by name -> value, compiled in.
    cast_types (cuda): more type names whose C-style casts convert (_convert_vector_casts)."""
    if target not in ("cpu", "cuda"):
        raise ValueError(f"prepass target must be 'cpu' or 'cuda', got {target!r}")
    if target == "cuda":
        text = _convert_vector_casts(text, cast_types)
    src = _Src(text)

    # C-style casts to vector types: clang reinterprets bits where MSL converts values. Reject them.
    for m in re.finditer(r"(\w*)\s*\(\s*(?:const\s+)?(" + VECTOR_TYPES + r")\s*\)\s*(?=[\w(\-+!~.])", text):
        if m.group(1) in ("", "return", "case"):
            raise MetalCompileError(f"{src.where(m.start())}: C-style cast to {m.group(2)}: clang would reinterpret "
                                    f"the bits where MSL converts; write {m.group(2)}(x)")
    check_metal4(text, src.where)
    # The emulator refuses thread_elements() (the project's kernels must not depend on a lane layout Apple does not
    # document); the proxy keeps Apple's layout (msl/cuda/shim/simdgroup_layout.h) so that peers which index it run.
    m = re.search(r"\.thread_elements\s*\(", text)
    if m and target == "cpu":
        raise MetalCompileError(f"{src.where(m.start())}: thread_elements() is not supported: Apple does not "
                                f"document which lane holds which element; stage through threadgroup memory")

    edits: List[Tuple[int, int, str]] = []  # (start, end, replacement) on `text`

    # Function constants (those named in `baked` become compile-time values, as a Metal pipeline specialises them).
    fcs = []
    for m in re.finditer(r"\bconstant\s+(\w+)\s+(\w+)\s*\[\[\s*function_constant\s*\((.+?)\)\s*\]\]\s*;", text):
        ty, name, idx = m.group(1), m.group(2), " ".join(m.group(3).split())
        if baked and name in baked:
            v = baked[name]
            value = ("true" if v else "false") if isinstance(v, bool) else repr(v)
            edits.append((m.start(), m.end(), f"static constexpr {ty} {name} = {ty}({value}); "
                          f"static constexpr bool mcpu_fc_defined_{name} = true;" + _blank(m.group(0))[:-1]))
            continue
        ty = {"int32_t": "int", "uint32_t": "uint"}.get(ty, ty)  # same types, fixed-width names (llama.cpp)
        if ty not in FC_TYPES:
            raise MetalCompileError(f"{src.where(m.start())}: function constant type {ty} not supported")
        fcs.append((ty, name, idx))
        storage = "__constant__" if target == "cuda" else "static"
        edits.append((m.start(), m.end(), f"{storage} {ty} {name} = {ty}(); "
                      f"{storage} bool mcpu_fc_defined_{name} = false;" + _blank(m.group(0))[:-1]))

    # Explicit instantiations: template [[host_name("x")]] [[kernel]] <decl>;
    instances: List[Instance] = []
    for m in re.finditer(r"\btemplate\s*((?:\[\[.*?\]\]\s*)+)", text, re.S):
        attrs = m.group(1)
        hn = re.search(r'host_name\s*\(\s*"([^"]+)"\s*\)', attrs)
        if not hn:
            continue
        end = text.index(";", m.end()) + 1
        decl = re.sub(r"^\s*kernel\b", "", text[m.end():end])  # `template [[host_name(..)]] kernel T f<..>;`
        d = re.match(r"\s*decltype\s*\(\s*([\w:]+)\s*(<.*?>)?\s*\)\s*([\w:]+)\s*(<.*?>)?\s*;", decl, re.S)
        # Or through a typedef of the function type: `kernel_t f<...>;` (llama.cpp's instantiation tables).
        d = d or re.match(r"\s*()()(?!void\b)[\w:]+\s+([\w:]+)\s*(<.*?>)\s*;", decl, re.S)
        if d:
            callee = d.group(3) + (d.group(4) or "")
            tname = d.group(3)
        else:
            f = re.match(r"\s*(?:\[\[.*?\]\]\s*)*void\s+([\w:]+)\s*(<.*?>)\s*\(", decl, re.S)
            if not f:
                raise MetalCompileError(f"{src.where(m.start())}: cannot parse kernel instantiation")
            callee, tname = f.group(1) + f.group(2), f.group(1)
        instances.append(Instance(hn.group(1), " ".join(callee.split()), tname))
        edits.append((m.start(), end, _blank(text[m.start():end])))

    # Kernel definitions: [[kernel]] / kernel before `void name(`.
    defs: Dict[str, KernelDef] = {}
    kernel_attr = r"\[\[(?:[^\[\]]*?,\s*)?kernel\s*(?:,[^\[\]]*?)?\]\]"  # [[kernel]], [[kernel, max_total...(N)]]
    for m in re.finditer(r"(" + kernel_attr + r"|\bkernel\b)((?:\s*\[\[.*?\]\])*)\s*void\s+(\w+)\s*\(", text, re.S):
        if any(s <= m.start() < e for s, e, _ in edits):
            continue  # inside an instantiation
        name = m.group(3)
        open_paren = m.end() - 1
        close = _match_close(text, open_paren, "(", ")")
        plist = text[open_paren + 1:close - 1]
        before = text[max(0, m.start() - 400):m.start()]
        is_template = re.search(r"template\s*<[^;{}]*>\s*(\[\[[^;{}]*\]\]\s*)*$", before) is not None
        mt = re.search(r"max_total_threads_per_threadgroup\s*\((.+?)\)\s*(?:\]\]|,)", before[-200:] + m.group(0), re.S)
        limit = " ".join(mt.group(1).split()) if mt else "0"
        kd = KernelDef(name, _parse_params(plist, src.where(m.start()), target == "cuda"), is_template,
                       int(limit) if limit.isdigit() else limit)
        defs[name] = kd
        edits.append((m.start(), m.start() + len(m.group(1)), " " * len(m.group(1))))

    # Kernel-scope threadgroup declarations: one allocation per threadgroup.
    decl_id = 0
    for m in re.finditer(r"(?<=[;{}])(\s*)threadgroup\s+([^;(){}=]*?)\s*(\b\w+)\s*((?:\[[^\]]+\]\s*)*);", text):
        ty, name, dims = m.group(2).strip(), m.group(3), m.group(4).strip()
        if not ty or "*" in ty or "&" in ty or "," in name:
            continue
        # Only inside function bodies: count braces before.
        if text.count("{", 0, m.start()) == text.count("}", 0, m.start()):
            continue
        decl_id += 1
        rep = (f"{m.group(1)}threadgroup {ty} (&{name}){dims} = *(threadgroup {ty} (*){dims})"
               f"mcpu_threadgroup_alloc(sizeof({ty}{dims}), alignof({ty}), {decl_id});")
        if target == "cuda":
            rep = f"{m.group(1)}__shared__ {ty} {name}{dims};"
        edits.append((m.start(), m.end(), rep))

    # Attributes clang does not know: drop them (their meaning was recorded above).
    for m in re.finditer(r"\[\[(.*?)\]\]", text, re.S):
        if any(s <= m.start() < e for s, e, _ in edits):
            continue
        if m.group(1).strip() not in KEEP_ATTRIBUTES:
            edits.append((m.start(), m.end(), _blank(m.group(0))))

    edits.sort()
    pieces, last = [], 0
    for s, e, r in edits:
        if s < last:
            continue  # nested in an earlier edit
        pieces.append(text[last:s])
        pieces.append(r)
        last = e
    pieces.append(text[last:])
    out = "".join(pieces)

    # is_function_constant_defined(x), half literals, vector constructors.
    out = re.sub(r"\bis_function_constant_defined\s*\(\s*(\w+)\s*\)", r"(mcpu_fc_defined_\1)", out)
    out = re.sub(r"(?<![\w.])((?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)[hH]\b", r"((half)\1f)", out)
    out = re.sub(r"(?<![\w.])(\d+)[hH]\b", r"((half)\1)", out)
    # Every spelling of a vector conversion converts values as MSL does (clang would reject static_cast between
    # vectors and reinterpret bits in vec<float, 4>(int4)): float4(...), metal::float4(...), static_cast<float4>(...),
    # vec<T, N>(...), static_cast<vec<T, N>>(...). Not a declarator such as `float4 (&x)[N]` (threadgroup arrays of
    # vectors) or `float4 (*)[N]`.
    vec_type = r"(?:metal\s*::\s*)?vec\s*<[^<>;(){}]*>"
    not_declarator = r"(?!&\s*\w+\s*\)|\*\s*\))"
    out = re.sub(r"(?<![\w.:])static_cast\s*<\s*(?:metal\s*::\s*)?(" + VECTOR_TYPES + "|" + vec_type + r")\s*>\s*\(",
                 lambda m: f"metal::mcpu_make<{_qualify_vec(m.group(1))}>(", out)
    out = re.sub(r"(?<![\w.:])(" + vec_type + r")\s*\(" + not_declarator,
                 lambda m: f"metal::mcpu_make<{_qualify_vec(m.group(1))}>(", out)
    out = re.sub(r"(?<![\w.:])(?:metal\s*::\s*)?(" + VECTOR_TYPES + r")\s*\(" + not_declarator,
                 r"metal::mcpu_make<\1>(", out)

    # Kernels to export: instantiated templates, and non-template kernels under their own name.
    kernels = []
    for inst in instances:
        kd = defs.get(inst.template_name.split("::")[-1])
        if kd is None:
            raise MetalCompileError(f"host_name(\"{inst.host_name}\"): no [[kernel]] template named "
                                    f"{inst.template_name}")
        kernels.append((inst.host_name, inst.callee, kd))
    for kd in defs.values():
        if not kd.is_template:
            kernels.append((kd.name, kd.name, kd))
    return Prepassed(source=out, kernels=kernels, function_constants=fcs)
