"""The command line's malloc settings: applied once, switchable off, and they make a freed multi-megabyte block
come back without page faults (each case in a fresh interpreter: the settings are process-wide)."""
import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import resource, sys
    import torch
    from detrcore import tune_cpu_allocator
    tuned = tune_cpu_allocator()
    assert tune_cpu_allocator() == tuned  # idempotent
    faults = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(24 << 18)  # 24 MB
        x.fill_(1.0)
        del x
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(tuned, min(faults[1:]))
""")


def probe(env_value):
    env = dict(os.environ)
    env.pop("DETRCORE_MALLOC_TUNING", None)
    if env_value is not None:
        env["DETRCORE_MALLOC_TUNING"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    tuned, faults = out.split()
    return tuned == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_tuned_allocator_reuses_freed_blocks_without_page_faults():
    tuned, faults = probe(None)
    assert tuned
    assert faults < 100, faults  # 24 MB of fresh pages would be ~6000 faults
    off, faults_off = probe("0")
    assert not off
    assert faults_off > 1000, faults_off  # glibc's default: mmap()ed afresh every time
