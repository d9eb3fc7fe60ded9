"""DDP under torchrun (gloo on the CPU, nccl on GPUs), and the progress bar. Everything is a no-op for a single
process, so the training loop reads the same either way."""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as td
from torch import nn


def is_distributed() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if is_distributed() else 0


def world_size() -> int:
    return td.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Joins the process group torchrun describes in the environment (WORLD_SIZE > 1); otherwise nothing."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    td.init_process_group(backend=backend)


def cleanup() -> None:
    if is_distributed():
        td.barrier()
        td.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        td.barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    if not is_distributed():
        return model
    ids = [device.index] if device.type == "cuda" else None
    # Heads not used by the loss (e.g. aux heads with aux_loss off) must not stall the all-reduce.
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def set_epoch(loader, epoch: int, seed: int) -> None:
    """Reseeds the loader's shuffling per epoch, so a resumed run sees the batches an uninterrupted one would."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    gen = getattr(loader, "generator", None)
    if gen is not None:
        gen.manual_seed(seed * 1000 + epoch)


def average_stats(stats: dict) -> dict:
    """Averages numeric stats over ranks."""
    if not is_distributed():
        return stats
    keys = sorted(k for k, v in stats.items() if isinstance(v, (int, float)))
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
    td.all_reduce(t)
    return {**stats, **{k: float(v) / world_size() for k, v in zip(keys, t.tolist())}}


class progress:
    """A one-line progress bar on stderr (rank 0 only): done/total, rate, ETA and the latest values."""

    def __init__(self, total: int, desc: str = "", min_interval: float = 0.5):
        self.total, self.desc = total, desc
        self.tty = sys.stderr.isatty()
        # Into a log file: a full line every 30 s instead of redrawing one line.
        self.min_interval = min_interval if self.tty else 30.0
        self.n, self.start, self.last = 0, time.time(), time.time() if not self.tty else 0.0
        self.enabled = is_main()
        self.values: dict = {}

    def update(self, k: int = 1, **values) -> None:
        self.n += k
        self.values = values
        now = time.time()
        if self.enabled and (now - self.last >= self.min_interval or (self.tty and self.n == self.total)):
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        width = 24
        filled = int(width * self.n / max(self.total, 1))
        vals = " ".join(f"{k} {v:.4g}" for k, v in self.values.items())
        line = (f"{self.desc} [{'#' * filled}{'.' * (width - filled)}] {self.n}/{self.total} "
                f"{rate:.2f} it/s ETA {_fmt(eta)} {vals}")
        sys.stderr.write("\r" + line[:160].ljust(80) if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.n and self.tty:
            self._draw(time.time())
            sys.stderr.write("\n")
            sys.stderr.flush()


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    return f"{m}:{s:02d}"
