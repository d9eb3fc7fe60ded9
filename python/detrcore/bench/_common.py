"""Timing, tables and JSON records shared by the benchmarks."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from detrcore import _allocator
from detrcore._io import write_text_atomic


def time_call(fn: Callable[[], object], repeats: int = 7, min_time: float = 0.05, sync: bool = False) -> float:
    """Median seconds per call of fn over `repeats` timed batches, each at least `min_time` long."""
    fn()  # warm-up (and lazy initialisation)
    if sync:
        torch.cuda.synchronize()
    number, t = 1, 0.0
    while True:  # calibrate the batch size
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter() - t0
        if t >= min_time or number >= 1 << 20:
            break
        number *= 2 if t == 0 else max(2, min(10, int(min_time / t) + 1))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        if sync:
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) / number)
    return statistics.median(samples)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 7, min_time: float = 0.05,
                     sync: bool = False) -> dict[str, list[float]]:
    """Seconds per call of each fn, `repeats` samples each, taken round-robin (one timed batch of each fn per
    round, batches calibrated to `min_time`), so a shared machine's slow drifts hit every fn alike. Compare
    with `ratio`: the median of the per-round ratios."""
    numbers = {}
    for name, fn in fns.items():
        fn()  # warm-up (and lazy initialisation)
        number = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            if sync:
                torch.cuda.synchronize()
            t = time.perf_counter() - t0
            if t >= min_time or number >= 1 << 20:
                break
            number *= 2 if t == 0 else max(2, min(10, int(min_time / t) + 1))
        numbers[name] = number
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(numbers[name]):
                fn()
            if sync:
                torch.cuda.synchronize()
            samples[name].append((time.perf_counter() - t0) / numbers[name])
    return samples


def ratio(baseline: list[float], ours: list[float]) -> float:
    """The median over rounds of baseline time / our time."""
    return statistics.median(b / o for b, o in zip(baseline, ours))


def machine() -> dict:
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "malloc_tuned": _allocator._applied,
    }
    try:
        import detrcore.ops as ops

        info["detrcore"] = ops.build_info()
    except ImportError:
        pass
    info.update(_cpu())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ISA extensions the CPU kernels' speed turns on (oneDNN, MKL and our clones pick their code by them): recorded
# because a "2-core AMD EPYC" has been a Zen 4 with AVX-512 + bf16 one day and a Zen 3 with AVX2 the next.
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


def _cpu() -> dict:
    """The CPU's model name, family / model numbers and ISA flags from /proc/cpuinfo (Linux; {} elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name"), "cpu_family_model": [fields.get("cpu family"), fields.get("model")],
            "cpu_isa": [f for f in _ISA_FLAGS if f in flags]}


def print_table(headers: list[str], rows: Iterable[list]) -> str:
    rows = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    text = "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
    print(text, flush=True)
    return text


def _fmt(c) -> str:
    if isinstance(c, float):
        return f"{c:.2f}" if abs(c) < 100 else f"{c:.0f}"
    return str(c)


def write_json(record: dict, path: str | os.PathLike) -> Path:
    """Writes the record atomically (temp file + rename) and returns the path."""
    return write_text_atomic(path, json.dumps(record, indent=2) + "\n")
