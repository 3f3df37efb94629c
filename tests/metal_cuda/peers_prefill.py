"""The prefill peers, fetched and built here, never committed: MLX 0.32.4's steel attention and llama.cpp's tiled
flash attention (the Metal sources in the `llama_cpp_python` 0.3.36 sdist), compiled to PTX by the project's
MSL-to-PTX route (msl.cuda.compiler), under each simdgroup_matrix lowering, into the ignored folder .peers/.

    python3 -m tests.metal_cuda.peers_prefill fetch     # pip download + extract (needs the package registry)
    python3 -m tests.metal_cuda.peers_prefill build [--mma 1 0] [--ptxas]   # PTX into .peers/ptx/<peer>-mma<N>/
    python3 -m tests.metal_cuda.peers_prefill build --peer mlx-nax --mma 1 [--ptxas]   # MLX's NAX attention
    python3 -m tests.metal_cuda.peers_prefill check-nax [--dtype bfloat16] [--d 256] [--S 128 200]  # on the emulator

    python3 -m tests.metal_cuda.peers_prefill pack      # .cache/prefill_carry.tgz: proxy cache + .peers/ptx + licenses

Carry `.cache/prefill_carry.tgz` to the GPU machine and unpack it there (`tar xzf`); bench_prefill.py launches the
kernels as MLX's and ggml's host code would. Nothing under .peers/ may enter the repository: `fetch` adds it to
.git/info/exclude.

Which instances (the shapes of the prefill table: D = 64, 128, 256; fp16 and bf16):
- MLX (no NAX, i.e. a pre-M5 GPU): `steel_attention_<T>_bq32_bk<BK>_bd<D>_bv<D>_wm4_wn<WN>_mask<T>`, the template
  `attention<T, 32, BK, D, D, 4, WN, T, float>`. BK = 32 below D = 128, else 16, WN = 1 (MLX's host code up to
  0.32.2); D = 256 takes WN = 2 in 0.32.4 (the wheel's metallib holds only wm4_wn2 instances at bd256, with BK 16
  and 32): both are built, and MLX_D256_BK says which the launcher uses (an inference, see MLX_PLAN in
  bench_prefill.py). Causality, alignment, mask and sinks are function constants (one PTX serves all).
- MLX NAX (an M5 GPU, Metal 4 tensor ops; `build --peer mlx-nax`, PTX in .peers/ptx/mlx-nax-mma<N>/, N = 1 or 2: the
  proxy lowers the tensor ops on tensor cores only): see mlx_nax_instances().
- llama.cpp: `kernel_flash_attn_ext_{f16,bf16}_dk<D>_dv<D>`; its function constants (mask, sinks, softcap, padding,
  nsg...) are baked per variant (FC_VARIANTS), one PTX each, as Metal builds one pipeline per set.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[2]
PEERS = ROOT / ".peers"
DOWNLOADS = PEERS / "downloads"
PTX = PEERS / "ptx"

MLX_WHEEL = ("mlx-metal", "0.32.4")
LLAMA_SDIST = ("llama_cpp_python", "0.3.36")
MLX_KERNELS = "mlx/include/mlx/backend/metal/kernels/"  # inside the wheel
LLAMA_METAL = "vendor/llama.cpp/ggml/src/ggml-metal/"    # inside the sdist
LLAMA_FILES = ("vendor/llama.cpp/LICENSE", "vendor/llama.cpp/ggml/src/ggml-common.h")

HEAD_DIMS = (64, 128, 256)
DTYPES = {"float16": "half", "bfloat16": "bfloat"}  # MLX's type names -> MSL


# ---- MLX --------------------------------------------------------------------------------------------------------
# MSL's `constant` is `const` on the proxy, so `static constant constexpr const` repeats it; Apple's pragmas.
PEER_FLAGS = ["-Wno-duplicate-decl-specifier", "-Wno-unknown-pragmas"]


def mlx_instances() -> List[dict]:
    """Every MLX steel-attention instance the prefill table may launch (see the module docstring)."""
    out = []
    for tname, t in DTYPES.items():
        for d in HEAD_DIMS:
            configs = [(32 if d < 128 else 16, 1)] if d < 256 else [(16, 2), (32, 2)]
            for bk, wn in configs:
                name = f"steel_attention_{tname}_bq32_bk{bk}_bd{d}_bv{d}_wm4_wn{wn}_mask{tname}"
                out.append(dict(name=name, dtype=tname, D=d, bq=32, bk=bk, wm=4, wn=wn,
                                template=f"attention<{t}, 32, {bk}, {d}, {d}, 4, {wn}, {t}, float>"))
    return out


# Harness stand-ins, searched before MLX's own include folder, written at build time from the fetched headers (the
# repository holds only these rules); no kernel body is touched.
# - bf16_math.h adds bfloat overloads of the stdlib math and simd functions through Apple's compiler builtins
#   (__metal_fabs, __metal_simd_sum...): the proxy's shim already defines them for bfloat, so it is empty here.
# - utils.h is MLX's grab bag (complex numbers with address-space-qualified constructors, indexing helpers). Steel
#   attention uses only the type names and Limits<T>: the stand-in is utils.h's Limits section and the typedefs.
# - steel/utils/type_traits.h specialises pointer_element on each address space, which the proxy erases (four
#   identical specialisations): the stand-in keeps the `thread T*` one, as `T*`.
MLX_KERNELS_DIR = "mlx/backend/metal/kernels/"


def _mlx_utils_standin(utils: str) -> str:
    start = utils.index("template <typename U>\nstruct Limits")
    end = utils.index("};", utils.index("struct Limits<bool>")) + 2
    return ("// peers_prefill.py stand-in: MLX utils.h's Limits section (MIT, LICENSE-MLX) and its type names.\n"
            "#pragma once\n#include <metal_stdlib>\n#include \"mlx/backend/metal/kernels/defines.h\"\n"
            "typedef half float16_t;\ntypedef bfloat bfloat16_t;\n\n" + utils[start:end] + "\n")


def _mlx_type_traits_standin(traits: str) -> str:
    specialisation = (r"template <typename T>\s*struct pointer_element<(?:device|constant|threadgroup) T\*> "
                      r"\{[^}]*\};\s*")
    out, n = re.subn(specialisation, "", traits)
    out = out.replace("struct pointer_element<thread T*>", "struct pointer_element<T*>")
    if n != 3 or "pointer_element<T*>" not in out:
        raise SystemExit("steel/utils/type_traits.h changed: update _mlx_type_traits_standin")
    return "// peers_prefill.py stand-in: MLX's steel/utils/type_traits.h, one pointer_element (MIT).\n" + out


def mlx_include_dirs() -> List[str]:
    src = PEERS / "mlx" / "include" / MLX_KERNELS_DIR
    standins = {
        "bf16_math.h": "// peers_prefill.py stand-in: the proxy's shim provides the bfloat overloads.\n#pragma once\n",
        "utils.h": _mlx_utils_standin((src / "utils.h").read_text()),
        "steel/utils/type_traits.h": _mlx_type_traits_standin((src / "steel/utils/type_traits.h").read_text()),
    }
    over = PEERS / "harness" / "mlx_overrides" / MLX_KERNELS_DIR
    for rel, text in standins.items():
        (over / rel).parent.mkdir(parents=True, exist_ok=True)
        (over / rel).write_text(text)
    return [str(PEERS / "harness" / "mlx_overrides"), str(PEERS / "mlx" / "include")]


def mlx_harness() -> str:
    lines = ["// Generated by tests/metal_cuda/peers_prefill.py: MLX's steel attention instances (MIT, LICENSE-MLX).",
             '#include "mlx/backend/metal/kernels/utils.h"',
             '#include "mlx/backend/metal/kernels/steel/attn/kernels/steel_attention.h"', ""]
    for i in mlx_instances():
        lines.append(f'template [[host_name("{i["name"]}")]] [[kernel]] decltype({i["template"]}) {i["template"]};')
    return "\n".join(lines) + "\n"


# ---- MLX NAX -----------------------------------------------------------------------------------------------------
# MLX's host code for a GPU with NAX (sdpa_full_self_attention_nax in mlx/backend/metal/
# scaled_dot_product_attention.cpp, read in a stored ml-explore/mlx version, commit 00703ea, not the 0.32.4 tag
# itself; the 0.32.4 wheel's headers hold the two kernels it names, with these template parameters), for
# fp16 / bf16 and D in 64, 96, 128, 256: bq = 64, bk = 32, wm = 4; D = 256 splits the head dimension over wn = 2
# simdgroups (attention_nax_dsplit, host name `steel_attention_dsplit_...`), the others take wn = 1 (attention_nax,
# `steel_attention_...`, no `_bv` in the name). Grid (NQ, H, B), threadgroup (32, wm, wn); function constants 200,
# 201, 300, 301, 302 as in the steel kernel (save_lse, 303, is declared by the kernel and left false). For D = 256,
# causal, no mask, kL % bk != 0 the host widens kL to a multiple of bk when K / V have backing rows: not needed for
# the table (S is a multiple of 32 in every row).
# The kernels index the slots of Metal 4 cooperative tensors themselves (Apple's M5 element layout of
# matmul2d<(16, 32, 16), execution_simdgroup>); the proxy follows that layout under MSL_NAX_FRAGMENT_LAYOUT
# (msl/cuda/shim/metal_tensor_ops.h), defined for this build only.
NAX_BQ, NAX_BK, NAX_WM = 64, 32, 4
# A compiler flag, not a `defines` entry: those reach the source's preprocessing, not the shim the compile includes.
NAX_FLAGS = ["-DMSL_NAX_FRAGMENT_LAYOUT=1"]


def mlx_nax_instances() -> List[dict]:
    out = []
    for tname, t in DTYPES.items():
        for d in HEAD_DIMS:
            wn = 2 if d == 256 else 1
            if wn == 1:
                name = f"steel_attention_{tname}_bq{NAX_BQ}_bk{NAX_BK}_bd{d}_wm{NAX_WM}_wn{wn}_mask{tname}"
                template = f"attention_nax<{t}, {NAX_BQ}, {NAX_BK}, {d}, {d}, {NAX_WM}, {wn}, {t}, float>"
            else:
                name = f"steel_attention_dsplit_{tname}_bq{NAX_BQ}_bk{NAX_BK}_bd{d}_wm{NAX_WM}_wn{wn}_mask{tname}"
                template = f"attention_nax_dsplit<{t}, {NAX_BQ}, {NAX_BK}, {d}, {NAX_WM}, {wn}, {t}, float>"
            out.append(dict(name=name, dtype=tname, D=d, bq=NAX_BQ, bk=NAX_BK, wm=NAX_WM, wn=wn, template=template))
    return out


def mlx_nax_harness(instances=None, cpu: bool = False) -> str:
    """The instances' source; cpu: for the emulator (msl.cpu, -Werror), with the warnings PEER_FLAGS silence on the
    proxy (and fast math's infinity warning) turned off in the file itself."""
    quiet = ["#pragma clang diagnostic ignored \"" + w + "\"" for w in
             ("-Wduplicate-decl-specifier", "-Wunknown-pragmas", "-Wnan-infinity-disabled")] if cpu else []
    lines = ["// Generated by tests/metal_cuda/peers_prefill.py: MLX's NAX attention instances (MIT, LICENSE-MLX).",
             *quiet,
             '#include "mlx/backend/metal/kernels/utils.h"',
             '#include "mlx/backend/metal/kernels/steel/attn/kernels/steel_attention_nax.h"', ""]
    instances = instances or mlx_nax_instances()
    for i in instances:
        lines.append(f'template [[host_name("{i["name"]}")]] [[kernel]] decltype({i["template"]}) {i["template"]};')
    if cpu:
        # The emulator's kernel table evaluates max_total_threads_per_threadgroup(WM * WN * 32) at file scope.
        (wm, wn), = {(i["wm"], i["wn"]) for i in instances}
        lines.append(f"constexpr int WM = {wm}, WN = {wn};")
    return "\n".join(lines) + "\n"


# ---- llama.cpp --------------------------------------------------------------------------------------------------
# ggml's host code (ggml-metal-ops.cpp, flash_attn_ext, non-vec path) for prefill: nqptg = 8 queries and ncpsg = 64
# keys per threadgroup; nsg = 4 simdgroups (8 for D >= 512, not built). Function constants (ggml-metal-device.cpp):
# baked per variant, the values the table's launches use (no mask buffer beyond causal, no sinks / bias / softcap).
GGML_NQPTG, GGML_NCPSG = 8, 64
GGML_FC_BASE = 400  # FC_FLASH_ATTN_EXT in ggml-metal-impl.h (checked against the header at build time)


def ggml_instances() -> List[dict]:
    out = []
    for tname, short in (("float16", "f16"), ("bfloat16", "bf16")):
        for d in HEAD_DIMS:
            out.append(dict(name=f"kernel_flash_attn_ext_{short}_dk{d}_dv{d}", dtype=tname, D=d))
    return out


# ---- fetch ------------------------------------------------------------------------------------------------------
def _exclude_peers():
    exclude = Path(subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout.strip())
    exclude = exclude if exclude.is_absolute() else ROOT / exclude
    lines = exclude.read_text().splitlines() if exclude.exists() else []
    if "/.peers/" not in lines:
        exclude.parent.mkdir(parents=True, exist_ok=True)
        exclude.write_text("\n".join(lines + ["/.peers/"]) + "\n")


def fetch():
    _exclude_peers()
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(DOWNLOADS)]
    if not list(DOWNLOADS.glob("mlx_metal-0.32.4-*.whl")):
        subprocess.run(pip + [f"{MLX_WHEEL[0]}=={MLX_WHEEL[1]}", "--platform", "macosx_15_0_arm64",
                              "--only-binary=:all:", "--python-version", "3.12"], check=True)
    if not list(DOWNLOADS.glob("llama_cpp_python-0.3.36.tar.gz")):
        subprocess.run(pip + ["--no-binary", ":all:",
                              f"{LLAMA_SDIST[0]}=={LLAMA_SDIST[1]}"], check=True)
    # MLX: the kernel headers (include/mlx/backend/metal/kernels/...) and the wheel's LICENSE.
    mlx = PEERS / "mlx"
    shutil.rmtree(mlx, ignore_errors=True)
    with zipfile.ZipFile(next(DOWNLOADS.glob("mlx_metal-0.32.4-*.whl"))) as z:
        for n in z.namelist():
            if n.startswith(MLX_KERNELS) and n.endswith(".h"):
                dst = mlx / "include" / n[len("mlx/include/"):]
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(z.read(n))
            elif n.endswith(".dist-info/licenses/LICENSE"):
                (PEERS / "LICENSE-MLX").write_bytes(z.read(n))
    # llama.cpp: the Metal kernels, the host code that launches them (read, not compiled) and its LICENSE.
    llama = PEERS / "llama.cpp"
    shutil.rmtree(llama, ignore_errors=True)
    with tarfile.open(next(DOWNLOADS.glob("llama_cpp_python-0.3.36.tar.gz"))) as t:
        prefix = "llama_cpp_python-0.3.36/"
        for m in t.getmembers():
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else ""
            if not m.isfile():
                continue
            if rel.startswith(LLAMA_METAL) or rel in LLAMA_FILES:
                dst = llama / rel[len("vendor/llama.cpp/"):]
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(t.extractfile(m).read())
    shutil.copy(llama / "LICENSE", PEERS / "LICENSE-llama.cpp")
    print(f"fetched into {PEERS}: mlx {sum(1 for _ in (mlx / 'include').rglob('*.h'))} headers, llama.cpp "
          f"{sum(1 for _ in llama.rglob('*') if _.is_file())} files")


# ---- build ------------------------------------------------------------------------------------------------------
def _ptxas_all(out: Path) -> Dict[str, dict]:
    """ptxas -v of every kernel under `out` (one manifest, or one per variant folder)."""
    from . import targets

    usage = {}
    for manifest in sorted(out.rglob("manifest.json")):
        m = json.loads(manifest.read_text())
        prefix = "" if manifest.parent == out else manifest.parent.name + ":"
        for host, info in sorted(m["kernels"].items()):
            usage[prefix + host] = targets.ptxas_usage(manifest.parent / info["ptx"])
    return usage


def build_mlx(mma: int, jobs: int) -> Path:
    return _build_mlx_harness("mlx_prefill", mlx_harness(), mlx_instances(), f"mlx-mma{mma}", mma, jobs, PEER_FLAGS)


def build_mlx_nax(mma: int, jobs: int) -> Path:
    if mma == 0:
        raise SystemExit("mlx-nax: the proxy lowers the opt-in tensor-ops layout on tensor cores only (--mma 1 or 2)")
    return _build_mlx_harness("mlx_nax_prefill", mlx_nax_harness(), mlx_nax_instances(), f"mlx-nax-mma{mma}", mma,
                              jobs, PEER_FLAGS + NAX_FLAGS)


def _build_mlx_harness(name: str, text: str, instances: List[dict], folder: str, mma: int, jobs: int,
                       flags: List[str]) -> Path:
    """One of MLX's generated harnesses (.peers/harness/<name>.metal) to PTX in .peers/ptx/<folder>, each kernel
    bounded by its max_total_threads attribute (WM * WN * 32)."""
    from msl.cuda import compiler

    harness = PEERS / "harness" / f"{name}.metal"
    harness.parent.mkdir(parents=True, exist_ok=True)
    harness.write_text(text)
    out = PTX / folder
    if (out / "manifest.json").exists():
        shutil.rmtree(out)
    threads = {i["name"]: i["wm"] * i["wn"] * 32 for i in instances}
    return compiler.build(harness, mlx_include_dirs(), simdgroup_mma=mma, out_dir=out, jobs=jobs, extra_flags=flags,
                          max_threads=threads.get)


GGML_KERNELS = PEERS / "llama.cpp" / "ggml" / "src" / "ggml-metal"
# The kernels' template parameters that name vector types (q4_t, k4x4_t, s2_t...): their C-style casts convert.
GGML_CAST_TYPES = r"[a-z]+[248](?:x[48])?_t"
# `#pragma unroll (MIN(...))`: clang -E leaves pragma arguments unexpanded, so the compile needs common.h's MIN.
GGML_FLAGS = ["-DMIN(x,y)=((x) < (y) ? (x) : (y))", "-DMAX(x,y)=((x) > (y) ? (x) : (y))"]


def ggml_variants() -> List[dict]:
    """One build per set of baked function constants: the attention kernel without and with a mask (causal rows
    take ggml's mask + block-map path), and the block-map kernel (kernel_flash_attn_ext_blk) for the masked runs.
    The table's key counts are multiples of 64 (no K/V padding pass) and its query counts multiples of 8
    (bc_mask off)."""
    out = []
    for mask in (False, True):
        for d in HEAD_DIMS:
            out.append(dict(tag=f"fa_d{d}_mask{int(mask)}", source="fa_f16.metal", D=d, mask=mask,
                            kernels=[i["name"] for i in ggml_instances() if i["D"] == d],
                            baked={"FC_flash_attn_ext_has_mask": mask, "FC_flash_attn_ext_has_sinks": False,
                                   "FC_flash_attn_ext_has_bias": False, "FC_flash_attn_ext_has_scap": False,
                                   "FC_flash_attn_ext_has_kvpad": False, "FC_flash_attn_ext_bc_mask": False,
                                   "FC_flash_attn_ext_ns10": d, "FC_flash_attn_ext_ns20": d,
                                   "FC_flash_attn_ext_nsg": 4}))
    out.append(dict(tag="blk", source="fa_aux.metal", kernels=["kernel_flash_attn_ext_blk"],
                    baked={"FC_flash_attn_ext_blk_nqptg": GGML_NQPTG, "FC_flash_attn_ext_blk_ncpsg": GGML_NCPSG}))
    return out


def build_ggml(mma: int, jobs: int) -> Path:
    from msl.cuda import compiler

    root = PTX / f"ggml-mma{mma}"
    index = {}
    for v in ggml_variants():
        out = root / v["tag"]
        if (out / "manifest.json").exists():
            shutil.rmtree(out)
        compiler.build(GGML_KERNELS / "kernels" / v["source"], [str(GGML_KERNELS), str(GGML_KERNELS.parent)],
                       defines={"GGML_METAL_HAS_BF16": "1"},
                       simdgroup_mma=mma, out_dir=out, kernels=v["kernels"], jobs=jobs,
                       extra_flags=PEER_FLAGS + GGML_FLAGS, baked_constants=v["baked"], cast_types=GGML_CAST_TYPES)
        index[v["tag"]] = {k: v[k] for k in ("source", "kernels", "baked")}
    (root / "variants.json").write_text(json.dumps(index, indent=1))
    return root


def build(modes, jobs: int, ptxas: bool, peers=("mlx", "ggml")):  # "mlx-nax" on request only
    if not (PEERS / "mlx").exists() or not (PEERS / "llama.cpp").exists():
        raise SystemExit(f"run `python3 -m tests.metal_cuda.peers_prefill fetch` first ({PEERS} is incomplete)")
    report = {}
    for mma in modes:
        for peer, fn in (("mlx", build_mlx), ("ggml", build_ggml), ("mlx-nax", build_mlx_nax)):
            if peer not in peers or (peer == "mlx-nax" and mma == 0):
                continue
            out = fn(mma, jobs)
            print(f"{peer} mma={mma}: {out}")
            if ptxas:
                usage = _ptxas_all(out)
                report[f"{peer}-mma{mma}"] = usage
                for host, u in usage.items():
                    print(f"  {host}: {u['registers']} registers, {u['stack']} B stack, spill "
                          f"{u['spill_stores']} / {u['spill_loads']} B")
    if report:  # merged into the record of earlier builds (a build of one peer keeps the others' entries)
        path = PTX / "ptxas.json"
        path.write_text(json.dumps({**(json.loads(path.read_text()) if path.exists() else {}), **report}, indent=1))


def check_nax_cpu(dtype: str = "float16", d: int = 128, S: int = 128, H: int = 2, Hkv: int = 1, causal: bool = True,
                  schedule: str = "random", seed: int = 3) -> float:
    """One MLX NAX instance on the CPU emulator (msl.cpu, with the opt-in layout), launched as MLX's host code does
    (bench_prefill.mlx_nax_plan), against torch's SDPA in fp32: the check that the opt-in layout is the one MLX's
    fragment code assumes (a wrong layout scrambles S and O). Returns the relative error; raises above the bound."""
    import torch
    import torch.nn.functional as F

    from msl import cpu as metal_cpu

    from .bench_prefill import Row, check, mlx_nax_plan, mlx_strides

    inst = [i for i in mlx_nax_instances() if i["dtype"] == dtype and i["D"] == d]
    harness = PEERS / "harness" / f"mlx_nax_cpu_{dtype}_d{d}.metal"
    harness.parent.mkdir(parents=True, exist_ok=True)
    harness.write_text(mlx_nax_harness(inst, cpu=True))
    lib = metal_cpu.compile(harness, mlx_include_dirs(), extra_flags=NAX_FLAGS)
    r = Row(1, H, Hkv, S, d, {"float16": "fp16", "bfloat16": "bf16"}[dtype], causal)
    dt = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(S + d)
    q, k, v = (torch.randn(1, S, h, d, generator=g).to(dt) for h in (H, Hkv, Hkv))  # [B, S, H, D]
    out = torch.full_like(q, float("nan"))
    scale = d ** -0.5
    plan = mlx_nax_plan(r, *mlx_strides(q, k, v, out), scale)
    scratch = torch.zeros(64, dtype=torch.float32)
    lib.dispatch(plan.kernel, plan.grid, plan.threads, buffers={0: q, 1: k, 2: v, 3: out, 5: scratch, 6: scratch,
                 7: scratch, 8: scratch}, bytes={4: bytes(plan.params)}, constants=plan.constants,
                 schedule=schedule, seed=seed)
    kr, vr = (x.transpose(1, 2).float().repeat_interleave(H // Hkv, dim=1) for x in (k, v))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2).float(), kr, vr, is_causal=causal,
                                         scale=scale).transpose(1, 2)
    return check(out, ref, f"MLX {plan.kernel} on the emulator", r.dtype)


CARRY = ROOT / ".cache" / "prefill_carry.tgz"


def pack() -> Path:
    """One compressed file for the GPU machine (carry is limited to 64 MiB; the PTX of both lowerings and the peers
    is ~65 MiB as text, ~10x less compressed): the proxy cache's indexes and the folders they name, .peers/ptx and the
    peers' licenses. There: `tar xzf .cache/prefill_carry.tgz`."""
    import tarfile

    from msl.cuda import compiler

    cache = compiler.cache_dir()
    members = [PEERS / "ptx", PEERS / "LICENSE-MLX", PEERS / "LICENSE-llama.cpp"]
    for index in sorted(cache.glob("index*.json")):
        members.append(index)
        members += [cache / e["path"] for e in json.loads(index.read_text()).values()]
    CARRY.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(CARRY, "w:gz") as t:
        for m in dict.fromkeys(members):
            t.add(m, arcname=str(m.relative_to(ROOT)))
    return CARRY


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch")
    sub.add_parser("pack", help="the proxy cache + .peers/ptx in one file to carry: .cache/prefill_carry.tgz")
    c = sub.add_parser("check-nax", help="one MLX NAX instance on the CPU emulator against torch's SDPA")
    c.add_argument("--dtype", default="float16", choices=list(DTYPES))
    c.add_argument("--d", type=int, default=128, choices=HEAD_DIMS)
    c.add_argument("--S", type=int, nargs="+", default=[128])
    c.add_argument("--heads", type=int, nargs=2, default=[2, 1], metavar=("H", "HKV"))
    c.add_argument("--no-causal", action="store_true")
    b = sub.add_parser("build")
    b.add_argument("--mma", type=int, nargs="+", default=[1, 0], help="simdgroup_matrix lowerings to build")
    b.add_argument("--jobs", type=int, default=2)
    b.add_argument("--ptxas", action="store_true", help="record ptxas -v registers / spills (.peers/ptx/ptxas.json)")
    b.add_argument("--peer", nargs="+", default=["mlx", "ggml"], choices=["mlx", "ggml", "mlx-nax"],
                   help="mlx-nax: MLX's NAX (M5 tensor-ops) attention, --mma 1 / 2 only (0 is skipped)")
    a = ap.parse_args()
    if a.cmd == "fetch":
        fetch()
    elif a.cmd == "check-nax":
        for S in a.S:
            err = check_nax_cpu(a.dtype, a.d, S, *a.heads, causal=not a.no_causal)
            print(f"MLX NAX {a.dtype} D={a.d} S={S} H={a.heads[0]}/{a.heads[1]}{'' if a.no_causal else ' causal'}: "
                  f"relative error {err:.3g} against SDPA (fp32) on the emulator")
    elif a.cmd == "pack":
        out = pack()
        print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB")
    else:
        build(a.mma, a.jobs, a.ptxas, a.peer)


if __name__ == "__main__":
    main()
