"""The command line's malloc settings: applied once, switchable off, and in effect: a 20 MB block then comes from
glibc's heap (below the program break) instead of a fresh mmap() (each case in a fresh interpreter: the settings
are process-wide; the speed effect is measured by the benchmarks, not asserted here)."""
import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import ctypes, ctypes.util
    from detrcore import tune_cpu_allocator
    tuned = tune_cpu_allocator()
    assert tune_cpu_allocator() == tuned  # idempotent
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = libc.malloc(20 << 20)
    in_heap = block < libc.sbrk(0)  # mmap()ed blocks live far above the program break
    libc.free(block)
    print(tuned, in_heap)
""")


def probe(env_value):
    env = dict(os.environ)
    env.pop("DETRCORE_MALLOC_TUNING", None)
    if env_value is not None:
        env["DETRCORE_MALLOC_TUNING"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    tuned, in_heap = out.split()
    return tuned == "True", in_heap == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_tuned_allocator_serves_large_blocks_from_the_heap():
    assert probe(None) == (True, True)
    assert probe("0") == (False, False)  # glibc's default: a fresh mmap() for a block this size
