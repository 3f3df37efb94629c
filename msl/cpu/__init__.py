"""Metal on the CPU: run real .metal kernels on CPU tensors (see README.md in this folder)."""

import ctypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from ..frontend import FC_TYPES, MAX_BUFFERS, MetalCompileError, constant_bits
from .compiler import build_runtime, compile_cached, compile_to

__all__ = ["MetalCPUError", "MetalCompileError", "Runtime", "Library", "DispatchStats", "compile", "compile_to",
           "build_runtime", "runtime", "set_options", "get_options"]

SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}


class MetalCPUError(RuntimeError):
    """A dispatch failed: a race, an overrun, a divergent barrier, a deadlock... (the message says where)."""


class _Buffer(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32), ("data", ctypes.c_void_p), ("length", ctypes.c_uint64)]


class _Bytes(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32), ("data", ctypes.c_void_p), ("length", ctypes.c_uint64)]


class _Constant(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32), ("type", ctypes.c_uint32), ("bits", ctypes.c_uint32)]


class _Desc(ctypes.Structure):
    _fields_ = [("kernel", ctypes.c_char_p),
                ("buffers", ctypes.POINTER(_Buffer)), ("num_buffers", ctypes.c_uint32),
                ("bytes", ctypes.POINTER(_Bytes)), ("num_bytes", ctypes.c_uint32),
                ("constants", ctypes.POINTER(_Constant)), ("num_constants", ctypes.c_uint32),
                ("threadgroup_memory_lengths", ctypes.POINTER(ctypes.c_uint32)),
                ("num_threadgroup_memory_lengths", ctypes.c_uint32),
                ("threadgroups", ctypes.c_uint32 * 3), ("threads_per_threadgroup", ctypes.c_uint32 * 3)]


class _Stats(ctypes.Structure):
    _fields_ = [("kernel", ctypes.c_char * 128), ("threadgroups", ctypes.c_uint64), ("threads", ctypes.c_uint64),
                ("loaded", ctypes.c_uint64 * MAX_BUFFERS), ("stored", ctypes.c_uint64 * MAX_BUFFERS),
                ("threadgroup_loaded", ctypes.c_uint64), ("threadgroup_stored", ctypes.c_uint64)]


class _Options(ctypes.Structure):
    _fields_ = [("schedule", ctypes.c_uint32), ("seed", ctypes.c_uint64), ("check_races", ctypes.c_uint32)]


@dataclass
class DispatchStats:
    """Per dispatch: bytes loaded from / stored to each buffer index, threadgroups and threads launched."""
    kernel: str
    threadgroups: int
    threads: int
    loaded: Dict[int, int] = field(default_factory=dict)
    stored: Dict[int, int] = field(default_factory=dict)
    threadgroup_loaded: int = 0
    threadgroup_stored: int = 0

    @staticmethod
    def _from(s: _Stats) -> "DispatchStats":
        return DispatchStats(s.kernel.decode(), s.threadgroups, s.threads,
                             {i: s.loaded[i] for i in range(MAX_BUFFERS) if s.loaded[i]},
                             {i: s.stored[i] for i in range(MAX_BUFFERS) if s.stored[i]},
                             s.threadgroup_loaded, s.threadgroup_stored)


class Runtime:
    """One loaded libmetal_cpu.so (the tests' own, or the one inside the emulated package build)."""

    def __init__(self, path):
        self.path = str(path)
        self.lib = ctypes.CDLL(self.path)
        L = self.lib
        L.mcpu_open.restype = ctypes.c_void_p
        L.mcpu_open.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
        L.mcpu_dispatch.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Desc), ctypes.c_char_p, ctypes.c_size_t]
        L.mcpu_stats_count.restype = ctypes.c_uint64
        L.mcpu_stats_get.argtypes = [ctypes.c_uint64, ctypes.POINTER(_Stats)]
        L.mcpu_set_options.argtypes = [ctypes.POINTER(_Options)]
        L.mcpu_get_options.argtypes = [ctypes.POINTER(_Options)]

    def open(self, so_path) -> ctypes.c_void_p:
        err = ctypes.create_string_buffer(4096)
        h = self.lib.mcpu_open(str(so_path).encode(), err, len(err))
        if not h:
            raise MetalCPUError(err.value.decode())
        return h

    def set_options(self, schedule: Optional[str] = None, seed: Optional[int] = None,
                    check_races: Optional[bool] = None) -> None:
        o = self._get()
        if schedule is not None:
            o.schedule = SCHEDULES[schedule]
        if seed is not None:
            o.seed = seed
        if check_races is not None:
            o.check_races = int(bool(check_races))
        self.lib.mcpu_set_options(ctypes.byref(o))

    def get_options(self) -> dict:
        o = self._get()
        return {"schedule": {v: k for k, v in SCHEDULES.items()}[o.schedule], "seed": o.seed,
                "check_races": bool(o.check_races)}

    def _get(self) -> _Options:
        o = _Options()
        self.lib.mcpu_get_options(ctypes.byref(o))
        return o

    def reset_stats(self) -> None:
        self.lib.mcpu_stats_reset()

    def stats(self) -> list:
        """DispatchStats of the dispatches since the last reset_stats() (the last 256 at most)."""
        out = []
        for i in range(self.lib.mcpu_stats_count()):
            s = _Stats()
            if self.lib.mcpu_stats_get(i, ctypes.byref(s)) == 0:
                out.append(DispatchStats._from(s))
        return out


_default_runtime: Optional[Runtime] = None


def runtime() -> Runtime:
    """The runtime built from this folder's sources (cached)."""
    global _default_runtime
    if _default_runtime is None:
        _default_runtime = Runtime(build_runtime())
    return _default_runtime


def set_options(**kw) -> None:
    runtime().set_options(**kw)


def get_options() -> dict:
    return runtime().get_options()


def _pointer_and_length(obj) -> Tuple[int, int]:
    """(address, byte length) of a CPU torch tensor, a numpy array or a bytearray, from its first element to its
    last reachable one."""
    try:
        import torch
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "cpu":
                raise ValueError("metal_cpu buffers must be CPU tensors")
            if obj.numel() == 0:
                return obj.data_ptr(), 0
            extent = 1 + sum((s - 1) * st for s, st in zip(obj.shape, obj.stride()))
            return obj.data_ptr(), extent * obj.element_size()
    except ImportError:
        pass
    import numpy as np
    if isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous:
            raise ValueError("metal_cpu: numpy buffers must be C-contiguous")
        return obj.ctypes.data, obj.nbytes
    if isinstance(obj, bytearray):
        return ctypes.addressof((ctypes.c_char * len(obj)).from_buffer(obj)), len(obj)
    raise TypeError(f"metal_cpu: unsupported buffer type {type(obj).__name__}")


def _as_bytes(obj) -> bytes:
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj)
    if isinstance(obj, ctypes.Structure) or isinstance(obj, ctypes.Array):
        return ctypes.string_at(ctypes.addressof(obj), ctypes.sizeof(obj))
    try:
        import numpy as np
        if isinstance(obj, (np.ndarray, np.generic)):
            return np.ascontiguousarray(obj).tobytes()
    except ImportError:
        pass
    raise TypeError(f"metal_cpu: cannot pass {type(obj).__name__} as bytes")


def _constant(index: int, v) -> _Constant:
    if isinstance(v, tuple):
        ty, val = v
    elif isinstance(v, bool):
        ty, val = "bool", v
    elif isinstance(v, int):
        ty, val = "int", v
    else:
        ty, val = "float", v
    return _Constant(index, FC_TYPES[ty], constant_bits(ty, val))


class Library:
    """A compiled .metal file."""

    def __init__(self, so_path, rt: Optional[Runtime] = None):
        self.path = Path(so_path)
        self.runtime = rt or runtime()
        self.handle = self.runtime.open(self.path)

    def dispatch(self, kernel: str, threadgroups: Sequence[int], threads_per_threadgroup: Sequence[int],
                 buffers: Optional[Dict[int, object]] = None, bytes: Optional[Dict[int, object]] = None,
                 constants: Optional[Dict[int, object]] = None, threadgroup_memory: Optional[Dict[int, int]] = None,
                 schedule: Optional[str] = None, seed: Optional[int] = None,
                 check_races: Optional[bool] = None) -> DispatchStats:
        """Runs one dispatchThreadgroups. Buffers are used in place; returns the dispatch's traffic counts."""
        bufs, keep = [], []
        for i, b in (buffers or {}).items():
            obj, offset = b if isinstance(b, tuple) else (b, 0)
            ptr, length = _pointer_and_length(obj)
            bufs.append(_Buffer(i, ptr + offset, max(length - offset, 0)))
        byts = []
        for i, b in (bytes or {}).items():
            data = ctypes.create_string_buffer(_as_bytes(b))
            keep.append(data)
            byts.append(_Bytes(i, ctypes.addressof(data), len(data.raw) - 1 if len(data.raw) else 0))
        consts = [_constant(i, v) for i, v in (constants or {}).items()]
        tgm = threadgroup_memory or {}
        tg_lengths = (ctypes.c_uint32 * (max(tgm) + 1 if tgm else 1))()
        for i, n in tgm.items():
            tg_lengths[i] = n
        d = _Desc()
        d.kernel = kernel.encode()
        d.buffers = (_Buffer * max(len(bufs), 1))(*bufs)
        d.num_buffers = len(bufs)
        d.bytes = (_Bytes * max(len(byts), 1))(*byts)
        d.num_bytes = len(byts)
        d.constants = (_Constant * max(len(consts), 1))(*consts)
        d.num_constants = len(consts)
        d.threadgroup_memory_lengths = tg_lengths
        d.num_threadgroup_memory_lengths = len(tg_lengths) if tgm else 0
        d.threadgroups = (ctypes.c_uint32 * 3)(*(list(threadgroups) + [1, 1])[:3])
        d.threads_per_threadgroup = (ctypes.c_uint32 * 3)(*(list(threads_per_threadgroup) + [1, 1])[:3])

        rt = self.runtime
        saved = rt._get() if (schedule, seed, check_races) != (None, None, None) else None
        if saved is not None:
            rt.set_options(schedule=schedule, seed=seed, check_races=check_races)
        try:
            err = ctypes.create_string_buffer(8192)
            before = rt.lib.mcpu_stats_count()
            rc = rt.lib.mcpu_dispatch(self.handle, ctypes.byref(d), err, len(err))
        finally:
            if saved is not None:
                rt.lib.mcpu_set_options(ctypes.byref(saved))
        if rc != 0:
            raise MetalCPUError(err.value.decode(errors="replace"))
        s = _Stats()
        rt.lib.mcpu_stats_get(before, ctypes.byref(s))
        return DispatchStats._from(s)


def compile(metal_path, include_dirs: Sequence[str] = (), defines: Optional[Dict[str, str]] = None,
            fast_math: bool = True, extra_flags: Sequence[str] = ()) -> Library:
    """Compiles (cached by source hash) and loads a .metal file. fast_math=True is Metal's default (fast:: math for the
    plain names, denormals flushed, division as x * (1 / y)); False is -fno-fast-math (precise:: math, IEEE).
    extra_flags: compiler flags for the source with the shim (compiler.compile_to)."""
    return Library(compile_cached(metal_path, include_dirs, defines, fast_math, extra_flags))
