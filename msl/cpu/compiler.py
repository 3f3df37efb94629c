"""Turns a .metal file into a shared object the metal_cpu runtime can run.

clang-19 -E (Metal headers replaced by empty stand-ins) -> pre-pass (this file) -> clang-19 as C++ with
shim/metal_stdlib.h, SanitizerCoverage load/store hooks and line tables pointing at the .metal source.
"""

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

HERE = Path(__file__).resolve().parent
SHIM = HERE / "shim" / "metal_stdlib.h"
STANDINS = HERE.parent / "shim" / "standins"  # shared with the CUDA target
SHIM_CORE = HERE.parent / "shim" / "msl_types.h"
RUNTIME_SOURCES = [HERE / "runtime" / "runtime.cpp", HERE / "runtime" / "fiber.h", HERE / "runtime" / "mcpu_abi.h",
                   HERE / "runtime" / "metal_cpu.h"]


class MetalCompileError(Exception):
    """The .metal source uses something the emulator rejects, or clang failed."""


def clang() -> str:
    exe = os.environ.get("METAL_CPU_CLANG") or shutil.which("clang-19") or shutil.which("clang")
    if not exe:
        raise MetalCompileError("clang-19 not found: run scripts/setup.sh "
                                "(apt-get install clang-19 libclang-rt-19-dev)")
    return exe


def cache_dir() -> Path:
    d = Path(os.environ.get("METAL_CPU_CACHE", HERE.parent.parent / ".cache" / "metal_cpu"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _run(cmd: Sequence[str], what: str) -> str:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if r.returncode != 0:
        raise MetalCompileError(f"{what} failed:\n{r.stderr.strip()[:6000]}\ncommand: {' '.join(cmd)}")
    return r.stdout


def _file_hash(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


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
FC_TYPES = {"bool": 0, "int": 1, "uint": 2, "float": 3}
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
    source: str  # for the run compile (with entry points)
    check_source: str  # for the address-space syntax check (no entry points)
    kernels: List[Tuple[str, str, KernelDef]] = field(default_factory=list)  # (host name, callee, def)


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


def _split_top(s: str, sep: str = ",") -> List[str]:
    out, depth, cur = [], 0, []
    for c in s:
        if c in "([{<":
            depth += 1
        elif c in ")]}>":
            depth -= 1
        if c == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        out.append("".join(cur))
    return out


def _parse_params(plist: str, where: str) -> List[Param]:
    params = []
    for raw in _split_top(plist):
        attrs = re.findall(r"\[\[(.*?)\]\]", raw, re.S)
        decl = re.sub(r"\[\[.*?\]\]", " ", raw, flags=re.S).split("=")[0].strip()
        m = re.search(r"(\w+)\s*$", decl)
        if not m:
            raise MetalCompileError(f"{where}: cannot parse kernel parameter '{raw.strip()}'")
        name = m.group(1)
        kind = None
        for a in attrs:
            a = a.strip()
            mb = re.fullmatch(r"(buffer|threadgroup)\s*\((.+)\)", a, re.S)
            if mb:
                kind, index = mb.group(1), " ".join(mb.group(2).split())
            elif a in BUILTINS:
                kind, index = a, "0"
        if kind is None:
            raise MetalCompileError(f"{where}: kernel parameter '{name}' has no supported attribute "
                                    f"([[buffer(i)]], [[threadgroup(i)]] or a position builtin)")
        params.append(Param(name, kind, index))
    return params


def _qualify_vec(t: str) -> str:
    """`vec<T, N>` / `metal::vec<T, N>` -> `metal::vec<T, N>` (a vector type name such as float4 unchanged)."""
    return re.sub(r"^(?:metal\s*::\s*)?vec\b", "metal::vec", t.strip())


def prepass(text: str, target: str = "cpu") -> Prepassed:
    """target "cpu": the emulator's source (entry points included). target "cuda" (msl/cuda): function
    constants become __constant__ globals and kernel-scope threadgroup arrays __shared__ ones; no entry points."""
    if target not in ("cpu", "cuda"):
        raise ValueError(f"prepass target must be 'cpu' or 'cuda', got {target!r}")
    src = _Src(text)

    # C-style casts to vector types: clang reinterprets bits where MSL converts values. Reject them.
    for m in re.finditer(r"(\w*)\s*\(\s*(?:const\s+)?(" + VECTOR_TYPES + r")\s*\)\s*(?=[\w(\-+!~.])", text):
        if m.group(1) in ("", "return", "case"):
            raise MetalCompileError(f"{src.where(m.start())}: C-style cast to {m.group(2)}: clang would reinterpret "
                                    f"the bits where MSL converts; write {m.group(2)}(x)")
    m = re.search(r"\.thread_elements\s*\(", text)
    if m:
        raise MetalCompileError(f"{src.where(m.start())}: thread_elements() is not supported: Apple does not "
                                f"document which lane holds which element; stage through threadgroup memory")

    edits: List[Tuple[int, int, str]] = []  # (start, end, replacement) on `text`

    # Function constants.
    fcs = []
    for m in re.finditer(r"\bconstant\s+(\w+)\s+(\w+)\s*\[\[\s*function_constant\s*\((.+?)\)\s*\]\]\s*;", text):
        ty, name, idx = m.group(1), m.group(2), " ".join(m.group(3).split())
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
        decl = text[m.end():end]
        d = re.match(r"\s*decltype\s*\(\s*([\w:]+)\s*(<.*?>)?\s*\)\s*([\w:]+)\s*(<.*?>)?\s*;", decl, re.S)
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
        kd = KernelDef(name, _parse_params(plist, src.where(m.start())), is_template,
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
    if target == "cuda":
        return Prepassed(source=out, check_source=out, kernels=kernels)

    gen = ['\n#line 1 "<mcpu-generated>"']
    for i, (host, callee, kd) in enumerate(kernels):
        args = []
        for p_i, p in enumerate(kd.params):
            ptype = f"mcpu_param_t<{p_i}, decltype({callee})>"
            if p.kind == "buffer":
                args.append(f"mcpu_bind<{ptype}>(a->buffers[{p.index}])")
            elif p.kind == "threadgroup":
                args.append(f"mcpu_bind<{ptype}>(a->threadgroup_args[{p.index}])")
            elif BUILTINS[p.kind] is None:
                args.append(f"({ptype})32")
            else:
                args.append(f"mcpu_builtin<{ptype}>(a->{BUILTINS[p.kind]})")
        gen.append(f"static void mcpu_entry_{i}(const mcpu_thread_args* a) {{ metal::mcpu_thread_fp_mode(); "
                   f"{callee}({', '.join(args)}); }}")
        pinfo = ", ".join(
            f'{{{0 if p.kind == "buffer" else 1 if p.kind == "threadgroup" else 2}, (uint32_t)({p.index}), "{p.name}", '
            f'{f"mcpu_bind_align<mcpu_param_t<{p_i}, decltype({callee})>>()" if p.kind == "buffer" else "0"}}}'
            for p_i, p in enumerate(kd.params))
        pinfo = pinfo or '{2, 0, "", 0}'
        gen.append(f"static const mcpu_param_info mcpu_params_{i}[] = {{ {pinfo} }};")
    table = ", ".join(f'{{"{host}", mcpu_entry_{i}, (uint32_t)({kd.max_threads}), {len(kd.params)}, mcpu_params_{i}}}'
                      for i, (host, _, kd) in enumerate(kernels))
    table = table or "{nullptr, nullptr, 0, 0, nullptr}"
    gen.append(f"static const mcpu_kernel_info mcpu_kernel_table[] = {{ {table} }};")
    cases = []
    for ty, name, idx in fcs:
        cast = {"bool": "bits != 0", "int": "(int)bits", "uint": "bits", "float": "__builtin_bit_cast(float, bits)"}[ty]
        cases.append(f"if (index == (uint32_t)({idx})) {{ if (type != {FC_TYPES[ty]}) return -2; {name} = {cast}; "
                     f"mcpu_fc_defined_{name} = true; return 0; }}")
    resets = " ".join(f"{name} = {ty}(); mcpu_fc_defined_{name} = false;" for ty, name, _ in fcs)
    gen.append("static MCPU_TRAMPOLINE int mcpu_set_fc(uint32_t index, uint32_t type, uint32_t bits) {"
               f" (void)type; (void)bits; if (index == UINT32_MAX) {{ {resets} return 0; }} {' '.join(cases)}"
               " return -1; }")
    gen.append('extern "C" __attribute__((visibility("default"))) const mcpu_library_info mcpu_library = '
               f'{{ MCPU_ABI_VERSION, {len(kernels)}, mcpu_kernel_table, mcpu_set_fc, mcpu_bind_runtime, '
               'MCPU_SOURCE_PATH };')
    return Prepassed(source=out + "\n".join(gen) + "\n", check_source=out, kernels=kernels)


# ---------------------------------------------------------------------------------------------------------------
# Compilation.

def _builtins_lib() -> Optional[str]:
    r = subprocess.run([clang(), "-rtlib=compiler-rt", "-print-libgcc-file-name"], capture_output=True, text=True)
    p = r.stdout.strip()
    return p if r.returncode == 0 and p and os.path.exists(p) else None


COMMON_FLAGS = ["-x", "c++", "-std=c++17", "-fno-exceptions", "-fno-rtti", "-Wall", "-Wextra", "-Werror",
                "-Wno-unused-parameter", "-Wno-unused-variable", "-Wno-unused-function", "-Wno-unknown-attributes",
                "-Wno-unused-but-set-variable", "-Xclang", "-ffloat16-excess-precision=none",
                "-Xclang", "-fbfloat16-excess-precision=none"]


def _preprocess(metal_path: Path, include_dirs: Sequence[str], defines: Dict[str, str]) -> str:
    cmd = [clang(), "-E", "-x", "c++", "-std=c++17", "-D__METAL_VERSION__=310", "-D__HAVE_MCPU__=1",
           "-isystem", str(STANDINS)]
    for d in include_dirs:
        cmd += ["-I", str(Path(d).resolve())]
    for k, v in (defines or {}).items():
        cmd.append(f"-D{k}={v}")
    cmd.append(str(metal_path.resolve()))
    return _run(cmd, f"preprocessing {metal_path}")


def compile_to(metal_path, out_path, include_dirs: Sequence[str] = (), defines: Optional[Dict[str, str]] = None,
               fast_math: bool = True, opt: str = "-O2") -> Path:
    """Compiles one .metal file to a kernel library at `out_path` (uncached). fast_math (Metal's default) selects the
    fast:: math functions for the plain names, runs the threads with denormals flushed and computes divisions as
    x * (1 / y) (see shim/metal_stdlib.h, README "Fast math")."""
    metal_path, out_path = Path(metal_path), Path(out_path)
    pre = prepass(_preprocess(metal_path, include_dirs, defines or {}))
    math = ["-ffast-math", "-DMCPU_FAST_MATH"] if fast_math else []
    with tempfile.TemporaryDirectory() as tmp:
        check = Path(tmp) / "check.cpp"
        check.write_text(pre.check_source)
        _run([clang(), "-fsyntax-only", *COMMON_FLAGS, *math, "-DMCPU_ADDRESS_SPACES", "-include", str(SHIM),
              str(check)], f"address-space check of {metal_path}")
        src = Path(tmp) / (metal_path.stem + ".mcpu.cpp")
        src.write_text(pre.source)
        # Front end only (no optimisation yet, so every division is still one), then the division model, then the
        # optimiser, SanitizerCoverage load/store hooks and code generation on the rewritten IR.
        ir = Path(tmp) / (metal_path.stem + ".ll")
        coverage = "-fsanitize-coverage=func,trace-loads,trace-stores"
        _run([clang(), *COMMON_FLAGS, *math, opt, "-gline-tables-only", "-fPIC", coverage, "-fvisibility=hidden",
              f'-DMCPU_SOURCE_PATH="{metal_path.resolve()}"', "-include", str(SHIM), "-S", "-emit-llvm",
              "-Xclang", "-disable-llvm-passes", str(src), "-o", str(ir)], f"compiling {metal_path}")
        ir.write_text(reciprocal_divisions(ir.read_text()))
        cmd = [clang(), *math[:1], opt, "-fPIC", "-shared", coverage, "-x", "ir", str(ir), "-o", str(out_path) + ".tmp"]
        lib = _builtins_lib()
        if lib:
            cmd += ["-x", "none", lib]  # compiler-rt: the bfloat conversions
        _run(cmd, f"compiling {metal_path}")
        os.replace(str(out_path) + ".tmp", out_path)
    return out_path


_FDIV = re.compile(r"^(\s*)(%[-\w.$]+|%\"[^\"]*\") = fdiv ((?:(?:fast|reassoc|nnan|ninf|nsz|arcp|contract|afn) )*)"
                   r"(float|<(\d+) x float>) (.*)$", re.M)


def _split_operands(s: str) -> List[str]:
    out, depth, cur = [], 0, []
    for c in s:
        if c in "<([{":
            depth += 1
        elif c in ">)]}":
            depth -= 1
        if c == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    out.append("".join(cur).strip())
    return out


def reciprocal_divisions(ir: str) -> str:
    """Fast math's division: every fp32 `fdiv` the compiler may turn into a reciprocal multiply (flag arcp, which fast
    math sets) becomes x * (1 / y), the reciprocal a correctly rounded IEEE division of its own. With denormals
    flushed, x / y is then 0 for |y| > 2^126 whatever x is, and inf for a denormal y, as on a GPU that divides this
    way. The new instructions carry no fast-math flags, so the optimiser cannot fold them back into one division."""
    counter = [0]

    def one(m: "re.Match[str]") -> str:
        indent, name, flags, ty, lanes, rest = m.groups()
        if "arcp" not in flags.split() and "fast" not in flags.split():
            return m.group(0)
        parts = _split_operands(rest)
        if len(parts) < 2 or parts[0].startswith("!") or parts[1].startswith("!"):
            return m.group(0)
        x, y, tail = parts[0], parts[1], "".join(", " + p for p in parts[2:])
        one_ = "1.000000e+00" if lanes is None else "<" + ", ".join(["float 1.000000e+00"] * int(lanes)) + ">"
        counter[0] += 1
        rcp = f"%mcpu.rcp.{counter[0]}"
        return f"{indent}{rcp} = fdiv {ty} {one_}, {y}{tail}\n{indent}{name} = fmul {ty} {x}, {rcp}{tail}"

    return _FDIV.sub(one, ir)


def compile_cached(metal_path, include_dirs: Sequence[str] = (), defines: Optional[Dict[str, str]] = None,
                   fast_math: bool = True) -> Path:
    """Compiles (or reuses) a kernel library keyed by the preprocessed source, the flags and the emulator itself."""
    metal_path = Path(metal_path)
    text = _preprocess(metal_path, include_dirs, defines or {})
    h = hashlib.sha256()
    h.update(text.encode())
    h.update(repr((fast_math, sorted((defines or {}).items()))).encode())
    emulator = [SHIM, SHIM_CORE, Path(__file__), HERE / "runtime" / "mcpu_abi.h"]
    h.update(_file_hash(emulator).encode())
    out = cache_dir() / f"{metal_path.stem}{'-fastmath' if fast_math else ''}-{h.hexdigest()[:16]}.so"
    if not out.exists():
        compile_to(metal_path, out, include_dirs, defines, fast_math)
    return out


def build_runtime(out_dir=None) -> Path:
    """Builds libmetal_cpu.so (not instrumented) into `out_dir`, or into the cache keyed by its sources. The soname is
    the file name: the tests' cached runtime and a package build's libmetal_cpu.so stay two runtimes in one process
    (the dynamic linker would otherwise hand the package the first one loaded)."""
    if out_dir is None:
        out = cache_dir() / f"libmetal_cpu-{_file_hash(RUNTIME_SOURCES)}.so"
        if out.exists():
            return out
    else:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        out = Path(out_dir) / "libmetal_cpu.so"
    tmp = str(out) + f".{os.getpid()}.tmp"
    _run([clang(), "-x", "c++", "-std=c++17", "-O2", "-g", "-fPIC", "-shared", "-Wall", "-Wextra",
          f"-Wl,-soname,{out.name}", str(HERE / "runtime" / "runtime.cpp"), "-o", tmp, "-ldl", "-lstdc++"],
         "building the metal_cpu runtime")
    os.replace(tmp, out)
    return out
