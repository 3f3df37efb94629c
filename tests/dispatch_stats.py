"""The emulated build's per-dispatch counters (msl/cpu runtime: kernel name, grid, bytes loaded / stored per buffer),
read through the runtime instance the loaded extension dispatches to."""

import ctypes
from pathlib import Path
from typing import Callable, List


class Stats(ctypes.Structure):
    _fields_ = [("kernel", ctypes.c_char * 128), ("threadgroups", ctypes.c_uint64), ("threads", ctypes.c_uint64),
                ("loaded", ctypes.c_uint64 * 31), ("stored", ctypes.c_uint64 * 31),
                ("threadgroup_loaded", ctypes.c_uint64), ("threadgroup_stored", ctypes.c_uint64)]


def recorded(fn: Callable[[], object]) -> List[Stats]:
    """Runs fn() and returns the counters of the dispatches it made, in order. Whichever loaded libmetal_cpu*.so
    counts the calls: the tests' own emulator and the package's share one soname, so the first one loaded serves
    both."""
    libs = []
    for path in sorted({line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                        if "libmetal_cpu" in line and line.split()[-1].endswith(".so")}):
        lib = ctypes.CDLL(path)
        lib.mcpu_stats_count.restype = ctypes.c_uint64
        lib.mcpu_stats_get.argtypes = [ctypes.c_uint64, ctypes.POINTER(Stats)]
        libs.append(lib)
    for lib in libs:
        lib.mcpu_stats_reset()
    fn()
    lib = max(libs, key=lambda lib: lib.mcpu_stats_count())
    stats = []
    for i in range(lib.mcpu_stats_count()):
        s = Stats()
        lib.mcpu_stats_get(i, ctypes.byref(s))
        stats.append(s)
    return stats
