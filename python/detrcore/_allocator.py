"""Process-wide glibc malloc settings for CPU training, applied by the `detrcore` command line and the
benchmarks (never on `import detrcore`: a library must not change its host process's allocator).

glibc serves blocks above its mmap threshold with fresh mmap()ed pages and returns freed heap tops to the
system, so a training step's many multi-megabyte activations and gradients are page-faulted in and zeroed by
the kernel again and again (11 000-41 000 minor faults per Deformable DETR step at 2 x 256 x 320 measured; a
fresh 5.6 MB grad_value costs ~0.7 ms of faults). Serving blocks up to 32 MB from the heap and keeping freed
memory (up to 1 GB) brought that to 3-4 000. Set DETRCORE_MALLOC_TUNING=0 to leave malloc alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_applied = False


def tune_cpu_allocator() -> bool:
    """Applies the settings once per process; True if they are in effect (glibc on Linux, not disabled)."""
    global _applied
    if _applied:
        return True
    if os.environ.get("DETRCORE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _applied
