"""In-process A/B of two builds of the native core: each build's `_C` is loaded under a name of its own and swapped
into the ops per timed batch, so the shared machine's drift hits both builds alike (separate processes, minutes
apart, differ by more than most kernel changes on a 2-core VM).

The trap this avoids: a second build loaded as `detrcore._C` is silently the module already imported (CPython keeps
single-phase extension modules by name), and the "A/B" times one build twice. `load_build` refuses that case."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import statistics
import sys
import time
from types import ModuleType

import torch

from detrcore.ops import deform_attn

from . import msda
from ._common import print_table


def load_build(path: str, name: str) -> ModuleType:
    """The extension file at `path` as module `<name>._C` (name: a fresh identifier, not 'detrcore')."""
    if name == "detrcore" or f"{name}._C" in sys.modules:
        raise ValueError(f"{name!r} is taken: load each build under a name of its own")
    loader = importlib.machinery.ExtensionFileLoader(f"{name}._C", path)
    spec = importlib.util.spec_from_file_location(f"{name}._C", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[f"{name}._C"] = module
    return module


def run_msda(builds: dict[str, ModuleType], rounds: int = 15) -> list[dict]:
    """MSDA forward and forward + backward at the CPU benchmark's encoder and decoder shapes, every build timed in
    every round (order alternating); per shape and mode, each build's median and the median per-round ratio of the
    first build's time to each other's (> 1: that build is faster)."""
    names = list(builds)
    original, rows, records = deform_attn._C, [], []
    try:
        for shape, queries in (("encoder", None), ("decoder", 300)):
            value, ss, ls, loc, aw = msda.make_case(msda.CPU_LEVELS, 1, queries, "cpu", torch.float32)
            leaves = [t.clone().requires_grad_() for t in (value, loc, aw)]
            grad = torch.randn(1, loc.shape[1], value.shape[2] * value.shape[3])

            def fwd():
                with torch.no_grad():
                    deform_attn.ms_deform_attn(value, ss, ls, loc, aw)

            def fwd_bwd():
                out = deform_attn.ms_deform_attn(leaves[0], ss, ls, leaves[1], leaves[2])
                torch.autograd.grad(out, leaves, grad)

            calls = 2 if queries is None else 20
            for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                times = {n: [] for n in names}
                for r in range(rounds):
                    for n in names if r % 2 == 0 else names[::-1]:
                        deform_attn._C = builds[n]
                        fn()
                        t0 = time.perf_counter()
                        for _ in range(calls):
                            fn()
                        times[n].append((time.perf_counter() - t0) / calls)
                rec = {"shape": shape, "mode": mode, "us": {n: statistics.median(t) * 1e6 for n, t in times.items()}}
                rec["ratio_vs_first"] = {n: statistics.median(a / b for a, b in zip(times[names[0]], times[n]))
                                         for n in names[1:]}
                records.append(rec)
                rows.append([shape, mode, *(rec["us"][n] for n in names), *rec["ratio_vs_first"].values()])
    finally:
        deform_attn._C = original
    print_table(["shape", "mode", *(f"{n} µs" for n in names), *(f"{names[0]}/{n}" for n in names[1:])], rows)
    return records
