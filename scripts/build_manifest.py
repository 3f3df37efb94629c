"""What kernel-builder sees of this checkout: the files build.toml lists, and the staging folder that holds only them.

kernel-builder copies into its build only the files that build.toml lists ([torch] src and every [kernel.*] src,
paths kept), the Python package torch-ext/<name>/ (taken whole) and compiles with the `include` directories the
sections name. A header that a listed file includes but build.toml does not list is missing there, so the Mac build
fails where a build from the source tree would not notice. The emulated build (scripts/build_emulated.py) therefore
compiles from a stage made here, and tests/test_build_manifest.py checks the list itself.

Standard library only (reading build.toml needs tomllib: Python >= 3.11, what the development set-up runs).
"""

import base64
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

# Quoted includes that kernel-builder generates, so they are never listed: registration.h (op registration and the
# Python module init, for torch-ext sources) and the embedded metallib header (the Metal launcher includes it through
# the EMBEDDED_METALLIB_HEADER macro).
BUILDER_PROVIDED = {"registration.h"}
BUILDER_PROVIDED_MACROS = {"EMBEDDED_METALLIB_HEADER"}

# Sources under the checked trees that are deliberately not part of the build (path -> why).
EXCLUDED: Dict[str, str] = {}

CHECKED_TREES = ("flash_sdpa", "torch-ext")
SOURCE_SUFFIXES = (".metal", ".h", ".cpp", ".mm")

# #embed "file" (the Mac glue embeds the tensor-ops library's source, metal_launch.mm) resolves as a quoted include.
_QUOTED_INCLUDE = re.compile(r'^\s*#\s*(include|embed)\s+"([^"]+)"', re.M)
_MACRO_INCLUDE = re.compile(r"^\s*#\s*include\s+([A-Za-z_]\w*)\s*$", re.M)


@dataclass
class Section:
    name: str  # "torch" or "kernel.<name>"
    src: List[str]
    include: List[str]
    language: str = ""  # a kernel's language (edition 6: "cpp-metal"), "" for [torch]


@dataclass
class Manifest:
    root: Path
    package: str  # the Python package directory under torch-ext/
    sections: List[Section] = field(default_factory=list)

    @property
    def listed(self) -> List[str]:
        seen: List[str] = []
        for s in self.sections:
            seen += [p for p in s.src if p not in seen]
        return seen

    def sources(self, suffix: str) -> List[str]:
        return [p for p in self.listed if p.endswith(suffix)]

    def include_dirs(self) -> List[str]:
        dirs: List[str] = []
        for s in self.sections:
            dirs += [d for d in s.include if d not in dirs]
        return dirs


def read(root: Path, toml_text: Optional[str] = None) -> Manifest:
    """build.toml of `root` (or `toml_text`) as the sections kernel-builder builds."""
    import tomllib  # Python >= 3.11; imported here so that a Mac's older Python can import stale_build

    root = Path(root)
    cfg = tomllib.loads(toml_text if toml_text is not None else (root / "build.toml").read_text())
    name = cfg["general"]["name"]
    m = Manifest(root=root, package=name.replace("-", "_"))
    torch = cfg.get("torch", {})
    m.sections.append(Section("torch", list(torch.get("src", [])), list(torch.get("include", []))))
    for kname, k in sorted(cfg.get("kernel", {}).items()):
        m.sections.append(Section(f"kernel.{kname}", list(k.get("src", [])), list(k.get("include", [])),
                                  k.get("language", k.get("backend", ""))))
    return m


def unresolved_includes(m: Manifest) -> List[str]:
    """Every quoted #include (or #embed) of a listed file that does not resolve to a listed file, as "file: include".
    A quoted include resolves against the including file's directory, then the include directories of build.toml."""
    listed = set(m.listed)
    problems = []
    for rel in m.listed:
        path = m.root / rel
        if not path.is_file():
            problems.append(f"{rel}: listed in build.toml but missing from the checkout")
            continue
        text = path.read_text()
        for macro in _MACRO_INCLUDE.findall(text):
            if macro not in BUILDER_PROVIDED_MACROS:
                problems.append(f"{rel}: #include {macro} (a macro kernel-builder does not define)")
        for directive, inc in _QUOTED_INCLUDE.findall(text):
            if inc in BUILDER_PROVIDED:
                continue
            candidates = [(Path(rel).parent / inc).as_posix()] + [(Path(d) / inc).as_posix()
                                                                  for d in m.include_dirs()]
            candidates = [_normalise(c) for c in candidates]
            if not any(c in listed for c in candidates):
                found = [c for c in candidates if (m.root / c).is_file()]
                hint = f" (exists as {found[0]}: add it to build.toml)" if found else ""
                problems.append(f'{rel}: #{directive} "{inc}" is not a file build.toml lists{hint}')
    return problems


def unlisted_sources(m: Manifest) -> List[str]:
    """.metal/.h/.cpp/.mm files under flash_sdpa/ and torch-ext/ that build.toml neither lists nor EXCLUDED names."""
    listed = set(m.listed)
    out = []
    for tree in CHECKED_TREES:
        for p in sorted((m.root / tree).rglob("*")):
            rel = p.relative_to(m.root).as_posix()
            if p.suffix in SOURCE_SUFFIXES and p.is_file() and rel not in listed and rel not in EXCLUDED:
                out.append(rel)
    return out


# The Mac glue that embeds the tensor-ops library's source (#embed, in include order) and compiles it at run time.
TENSOR_OPS_LAUNCHER = "flash_sdpa/metal_launch.mm"
_EMBED = re.compile(r'^\s*#\s*embed\s+"([^"]+)"', re.M)


def tensor_ops_files(root: Path) -> List[str]:
    """The files metal_launch.mm embeds as the tensor-ops library's source, in its order (paths under root)."""
    launcher = Path(root) / TENSOR_OPS_LAUNCHER
    return [(Path(TENSOR_OPS_LAUNCHER).parent / f).as_posix() for f in _EMBED.findall(launcher.read_text())]


def tensor_ops_source(root: Path) -> str:
    """The tensor-ops library's source as the glue assembles it (metal_launch.mm, tensor_ops_source): the embedded
    files concatenated, without the lines that start (after blanks) with `#include "` or `#pragma once`."""
    out = []
    for rel in tensor_ops_files(root):
        for line in (Path(root) / rel).read_text().split("\n"):
            code = line.lstrip(" \t")
            if not (code.startswith('#include "') or code.startswith("#pragma once")):
                out.append(line + "\n")
    return "".join(out)


def _normalise(rel: str) -> str:
    parts: List[str] = []
    for part in rel.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/".join(parts)


def stage(m: Manifest, dest: Path) -> Path:
    """A fresh `dest` holding only what kernel-builder copies: the listed files (paths kept) and the Python package
    torch-ext/<package>/ (taken whole, without byte code)."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for rel in m.listed:
        src = m.root / rel
        if not src.is_file():
            raise FileNotFoundError(f"build.toml lists {rel}, which is not in {m.root}")
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    pkg = Path("torch-ext") / m.package
    shutil.copytree(m.root / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


# What else an emulated build is made of besides the staged files: the emulator toolchain and these scripts.
# (msl/cuda/, the NVIDIA proxy, is not part of it.)
_TOOLCHAIN_GLOBS = ("msl/*.py", "msl/shim/**/*", "msl/cpu/**/*", "scripts/build_emulated.py",
                    "scripts/build_manifest.py")


def source_digest(root: Path) -> str:
    """sha256 over everything an emulated build is made from: build.toml, the files it lists, the Python package and the
    emulator toolchain. The build records it (emulated_build.json); tests/conftest.py warns when the checkout's differs
    (a build older than the sources)."""
    root = Path(root)
    m = read(root)
    paths = {root / "build.toml", *(root / p for p in m.listed if (root / p).is_file())}
    paths |= {p for p in (root / "torch-ext" / m.package).rglob("*.py")}
    for pattern in _TOOLCHAIN_GLOBS:
        paths |= {p for p in root.glob(pattern) if p.is_file() and "__pycache__" not in p.parts}
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def variant_digest(variant: Path) -> dict:
    """The `digest` entry of a variant's metadata.json as kernels >= 0.19 checks it on load (kernels-data's
    Digest::hash_variant): base64 sha256 of every file under the variant by relative path, except the top-level
    metadata.json and metadata.json.sigstore, __pycache__ folders and .pyc files."""
    variant = Path(variant)
    files = {}
    for dirpath, dirnames, filenames in os.walk(variant):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(variant).as_posix()
            if rel in ("metadata.json", "metadata.json.sigstore") or name.endswith(".pyc") or not path.is_file():
                continue
            files[rel] = base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode()
    return {"algorithm": "sha256", "files": dict(sorted(files.items()))}


def stale_build(variant: Path, root: Path) -> Optional[str]:
    """Why the emulated build in `variant` does not match the checkout at `root` (None when it does, or when the variant
    is not an emulated build, e.g. kernel-builder's Metal build on a Mac)."""
    variant, root = Path(variant), Path(root)
    if not (variant / "metal_cpu_kernels").is_dir():
        return None
    info = variant / "emulated_build.json"
    if not info.is_file():
        return f"{variant} predates source digests: rebuild with `python3 scripts/build_emulated.py`"
    recorded = json.loads(info.read_text()).get("source-digest")
    if recorded != source_digest(root):
        return (f"{variant} was built from other sources than this checkout's (build.toml, its files, the package or "
                f"the emulator changed since): rebuild with `python3 scripts/build_emulated.py`")
    return None
