"""Runs Metal dispatches on an NVIDIA GPU: PTX from msl/cuda/compiler.py, CUDA torch tensors, the driver API
through ctypes (libcuda), on torch's current stream (so torch events and CUDA graphs see the launches).

    lib = Library(".cache/metal_cuda/paged_decode_attention-<hash>")      # a folder from compiler.build()
    lib.dispatch("paged_decode_float16_d128", threadgroups=(s, h, b), threads_per_threadgroup=(128, 1, 1),
                 buffers={0: q, 1: (cache, byte_offset)}, bytes={11: params_bytes}, constants={0: True})
    run_plan(libs, plan)   # a list of dispatch dicts, e.g. from the planner extension (planner_ext.py)

A pipeline is (kernel, function-constant values): each gets its own loaded module, whose __constant__ globals hold
the values, as Metal specialises a pipeline. setBytes data is uploaded to a small device buffer and bound at its
[[buffer]] index. Checks as on Metal, but loud: every buffer the kernel declares must be bound, the threadgroup
size must not exceed max_total_threads_per_threadgroup (Metal would silently run nothing).
"""

import ctypes
import json
import struct
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from ..frontend import FC_TYPES, MAX_BUFFERS, constant_bits

_TYPE_NAMES = {v: k for k, v in FC_TYPES.items()}


class CudaError(RuntimeError):
    pass


class _Driver:
    """The few CUDA driver entry points the launcher needs."""

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")
        torch.cuda.init()
        torch.zeros(1, device="cuda")  # makes torch's primary context current on this thread
        ctx = ctypes.c_void_p()
        self.check(self.lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:
            raise CudaError("no current CUDA context after torch initialised the device")

    def check(self, rc, what):
        if rc != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(rc, ctypes.byref(name))
            raise CudaError(f"{what} failed: {name.value.decode() if name.value else rc}")

    def load(self, ptx: bytes):
        mod = ctypes.c_void_p()
        log = ctypes.create_string_buffer(16384)
        # CU_JIT_ERROR_LOG_BUFFER = 5, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES = 6
        opts = (ctypes.c_int * 2)(5, 6)
        vals = (ctypes.c_void_p * 2)(ctypes.cast(log, ctypes.c_void_p), ctypes.c_void_p(len(log)))
        rc = self.lib.cuModuleLoadDataEx(ctypes.byref(mod), ctypes.c_char_p(ptx + b"\0"), 2, opts, vals)
        if rc != 0:
            raise CudaError(f"cuModuleLoadDataEx failed ({rc}): {log.value.decode(errors='replace')}")
        return mod

    def function(self, mod, name: str):
        f = ctypes.c_void_p()
        self.check(self.lib.cuModuleGetFunction(ctypes.byref(f), mod, name.encode()), f"cuModuleGetFunction {name}")
        return f

    def global_ptr(self, mod, name: str):
        ptr, size = ctypes.c_uint64(), ctypes.c_size_t()
        rc = self.lib.cuModuleGetGlobal_v2(ctypes.byref(ptr), ctypes.byref(size), mod, name.encode())
        return (ptr.value, size.value) if rc == 0 else (None, 0)

    def write(self, dptr: int, data: bytes):
        buf = ctypes.create_string_buffer(data, len(data))
        self.check(self.lib.cuMemcpyHtoD_v2(ctypes.c_uint64(dptr), buf, ctypes.c_size_t(len(data))), "cuMemcpyHtoD")

    def attribute(self, f, attr: int) -> int:
        v = ctypes.c_int()
        self.check(self.lib.cuFuncGetAttribute(ctypes.byref(v), attr, f), "cuFuncGetAttribute")
        return v.value

    def launch(self, f, grid, block, shared: int, stream: int, args: ctypes.Structure):
        params = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.byref(args), ctypes.c_void_p))
        self.check(self.lib.cuLaunchKernel(f, ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]), ctypes.c_uint(grid[2]),
                                           ctypes.c_uint(block[0]), ctypes.c_uint(block[1]), ctypes.c_uint(block[2]),
                                           ctypes.c_uint(shared), ctypes.c_void_p(stream), params, None),
                   "cuLaunchKernel")


_DRIVER: Optional[_Driver] = None


def driver() -> _Driver:
    global _DRIVER
    if _DRIVER is None:
        _DRIVER = _Driver()
    return _DRIVER


class _Args(ctypes.Structure):  # mcu_args in shim/metal_stdlib.h
    _fields_ = [("buffers", ctypes.c_uint64 * MAX_BUFFERS), ("threadgroup_offsets", ctypes.c_uint32 * MAX_BUFFERS)]


def _constant_bits(value, declared: str):
    """(type, bits) from a CPU-API style value (True, 3, 0.5, ("uint", 7)) or a planner triple (index, type, bits)."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        ty, v = value
    else:
        ty, v = declared, value
    return ty, constant_bits(ty, v)


class Pipeline:
    def __init__(self, lib: "Library", kernel: str, constants: Dict[int, object]):
        d = driver()
        info = lib.manifest["kernels"][kernel]
        self.kernel, self.info = kernel, info
        self.module = d.load((lib.path / info["ptx"]).read_bytes())
        self.function = d.function(self.module, info["symbol"])
        given = dict(constants)
        for fc in info["function_constants"]:
            ptr, _ = d.global_ptr(self.module, fc["name"])
            dptr, _ = d.global_ptr(self.module, fc["defined_symbol"])
            if ptr is None:
                continue
            if fc["index"] in given:
                ty, bits = _constant_bits(given.pop(fc["index"]), fc["type"])
                if ty != fc["type"]:
                    raise CudaError(f"{kernel}: function constant {fc['name']} is {fc['type']}, given {ty}")
                d.write(ptr, struct.pack("<I", bits)[:1] if ty == "bool" else struct.pack("<I", bits))
                d.write(dptr, b"\x01")
        declared = {fc["index"] for fc in info["function_constants"]}
        unknown = set(given) - declared
        if unknown:
            raise CudaError(f"{kernel}: no function constant with index {sorted(unknown)}")
        self.num_regs = d.attribute(self.function, 4)      # CU_FUNC_ATTRIBUTE_NUM_REGS
        self.local_bytes = d.attribute(self.function, 3)   # CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES
        self.shared_bytes = d.attribute(self.function, 1)  # CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES
        self.max_threads = d.attribute(self.function, 0)   # CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK


class Library:
    """One compiled .metal file: a folder with manifest.json and one PTX per kernel."""

    def __init__(self, path):
        self.path = Path(path)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self._pipelines: Dict[tuple, Pipeline] = {}

    def kernels(self) -> Sequence[str]:
        return list(self.manifest["kernels"])

    def pipeline(self, kernel: str, constants: Optional[Dict[int, object]] = None) -> Pipeline:
        if kernel not in self.manifest["kernels"]:
            raise CudaError(f"{self.manifest['source']}: no kernel named {kernel!r}")
        key = (kernel, tuple(sorted((constants or {}).items(), key=lambda kv: kv[0])))
        if key not in self._pipelines:
            self._pipelines[key] = Pipeline(self, kernel, constants or {})
        return self._pipelines[key]

    def prepare(self, kernel: str, threadgroups, threads_per_threadgroup, buffers=None, bytes=None,
                constants=None, threadgroup_memory=None) -> "Prepared":
        """Binds everything once: Prepared.launch() then only launches (benchmarks, graph capture)."""
        pipe = self.pipeline(kernel, constants)
        info = pipe.info
        args = _Args()
        keep = []
        bound = {}
        for idx, t in (buffers or {}).items():
            off = 0
            if isinstance(t, tuple):
                t, off = t
            if not (isinstance(t, torch.Tensor) and t.is_cuda):
                raise CudaError(f"{kernel}: buffer {idx} must be a CUDA tensor")
            bound[idx] = t.data_ptr() + off  # data_ptr() includes storage_offset() * element_size()
            keep.append(t)
        for idx, data in (bytes or {}).items():
            if isinstance(data, ctypes.Structure):
                data = ctypes.string_at(ctypes.addressof(data), ctypes.sizeof(data))
            elif isinstance(data, torch.Tensor):
                data = data.cpu().numpy().tobytes()
            elif hasattr(data, "tobytes"):
                data = data.tobytes()
            dev = torch.frombuffer(bytearray(data), dtype=torch.uint8).to("cuda")
            bound[idx] = dev.data_ptr()
            keep.append(dev)
        offsets, total = {}, 0
        for idx, length in sorted((threadgroup_memory or {}).items()):
            offsets[idx] = total
            total += (int(length) + 15) // 16 * 16
        for p in info["params"]:
            if p["kind"] == "buffer":
                if p["index"] not in bound:
                    raise CudaError(f"{kernel}: [[buffer({p['index']})]] ({p['name']}) is not bound")
                args.buffers[p["index"]] = bound[p["index"]]
            elif p["kind"] == "threadgroup":
                if p["index"] not in offsets:
                    raise CudaError(f"{kernel}: [[threadgroup({p['index']})]] ({p['name']}) has no length")
                args.threadgroup_offsets[p["index"]] = offsets[p["index"]]
        tg = tuple(int(x) for x in threadgroups) + (1,) * (3 - len(threadgroups))
        tpt = tuple(int(x) for x in threads_per_threadgroup) + (1,) * (3 - len(threads_per_threadgroup))
        n = tpt[0] * tpt[1] * tpt[2]
        limit = info["max_threads"] or 1024
        if n > limit or n > pipe.max_threads:
            raise CudaError(f"{kernel}: {n} threads per threadgroup > max_total_threads_per_threadgroup "
                            f"{limit} (CUDA limit {pipe.max_threads})")
        if tg[1] > 65535 or tg[2] > 65535:
            raise CudaError(f"{kernel}: grid {tg} exceeds CUDA's 65535 in y/z")
        if total + pipe.shared_bytes > 48 * 1024:
            raise CudaError(f"{kernel}: {total + pipe.shared_bytes} bytes of threadgroup memory")
        return Prepared(pipe, tg, tpt, total, args, keep)

    def dispatch(self, kernel, threadgroups, threads_per_threadgroup, buffers=None, bytes=None, constants=None,
                 threadgroup_memory=None):
        p = self.prepare(kernel, threadgroups, threads_per_threadgroup, buffers, bytes, constants, threadgroup_memory)
        p.launch()
        return p


class Prepared:
    def __init__(self, pipe, grid, block, shared, args, keep):
        self.pipeline, self.grid, self.block, self.shared, self.args, self._keep = pipe, grid, block, shared, args, keep

    def launch(self, stream: Optional[int] = None):
        if 0 in self.grid:
            return
        s = torch.cuda.current_stream().cuda_stream if stream is None else stream
        driver().launch(self.pipeline.function, self.grid, self.block, self.shared, s, self.args)


def find_library(libs: Dict[str, Library], kernel: str) -> Library:
    for lib in libs.values():
        if kernel in lib.manifest["kernels"]:
            return lib
    raise CudaError(f"no library holds kernel {kernel!r}")


def prepare_plan(libs: Dict[str, Library], plan) -> list:
    """A launch plan (list of dispatch dicts: kernel, constants [(index, type, bits)], buffers [(index, tensor)],
    bytes [(index, bytes)], threadgroup_memory [(index, length)], threadgroups, threads_per_threadgroup)."""
    out = []
    for d in plan:
        lib = find_library(libs, d["kernel"])
        constants = {i: (_TYPE_NAMES[ty], (bits != 0) if ty == 0 else bits if ty != 3 else
                         struct.unpack("<f", struct.pack("<I", bits))[0]) for i, ty, bits in d["constants"]}
        out.append(lib.prepare(d["kernel"], d["threadgroups"], d["threads_per_threadgroup"],
                               buffers=dict(d["buffers"]), bytes=dict(d["bytes"]), constants=constants,
                               threadgroup_memory=dict(d.get("threadgroup_memory", []))))
    return out


def run_plan(libs: Dict[str, Library], plan) -> list:
    prepared = prepare_plan(libs, plan)
    for p in prepared:
        p.launch()
    return prepared
