"""Opt-in training diagnostics (TrainConfig.diagnostics): per layer-group distributions of weights and gradients
over training, drawn as histogram PNGs, and the gradient norm of every optimizer step in steps.jsonl.

Groups: backbone, encoder attention, encoder FFN, decoder attention, decoder FFN, heads, other (projections,
embeddings). A group whose gradients collapse towards zero (or explode) is the usual culprit of slow convergence.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from detrcore._io import atomic_path, write_text_atomic

GROUPS = ["backbone", "encoder attention", "encoder ffn", "decoder attention", "decoder ffn", "heads", "other"]
BINS, LO, HI = 60, -10.0, 2.0  # histogram of log10 |x|


def group_of(name: str) -> str:
    if name.startswith("backbone."):
        return "backbone"
    if name.startswith(("class_embed", "bbox_embed")):
        return "heads"
    for part in ("encoder", "decoder"):
        if f".{part}." in f".{name}":
            attn = any(k in name for k in ("self_attn", "cross_attn", "multihead_attn"))
            return f"{part} {'attention' if attn else 'ffn'}"
    return "other"


class Diagnostics:
    def __init__(self, out: str | os.PathLike):
        self.out = Path(out) / "diagnostics"
        self.records: dict[str, list] = {"weights": [], "gradients": []}

    def capture(self, model: nn.Module, kind: str, epoch: int) -> None:
        """Histograms of log10|weight| (kind="weights") or log10|grad| (kind="gradients") per group."""
        values: dict[str, list] = {g: [] for g in GROUPS}
        for name, p in model.named_parameters():
            t = p.detach() if kind == "weights" else p.grad
            if t is None or (kind == "gradients" and not p.requires_grad):
                continue
            values[group_of(name)].append(t.float().abs().flatten())
        hists = {}
        for g, parts in values.items():
            if not parts:
                continue
            x = torch.cat(parts)
            logs = torch.log10(x.clamp_min(10.0**LO))
            counts = torch.histc(logs, bins=BINS, min=LO, max=HI)
            hists[g] = {"counts": (counts / counts.sum().clamp_min(1)).tolist(), "norm": float(x.norm()),
                        "zeros": float((x == 0).float().mean())}
        self.records[kind].append({"epoch": epoch, "groups": hists})

    def log_step(self, record: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "steps.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def write(self) -> None:
        """diagnostics/{weights,gradients}.png and histograms.json (atomic writes)."""
        self.out.mkdir(parents=True, exist_ok=True)
        for kind, recs in self.records.items():
            if recs:
                _plot(kind, recs, self.out / f"{kind}.png")
        write_text_atomic(self.out / "histograms.json", json.dumps(self.records))


def _plot(kind: str, recs: list, path: Path) -> None:
    from matplotlib import cm
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [g for g in GROUPS if any(g in r["groups"] for r in recs)]
    cols = 3
    rows = math.ceil(len(groups) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
    FigureCanvasAgg(fig)
    centers = [LO + (HI - LO) * (i + 0.5) / BINS for i in range(BINS)]
    epochs = [r["epoch"] for r in recs]
    for i, g in enumerate(groups):
        ax = fig.add_subplot(rows, cols, i + 1)
        for r in recs:
            if g in r["groups"]:
                shade = (r["epoch"] - min(epochs)) / max(1, max(epochs) - min(epochs))
                ax.plot(centers, r["groups"][g]["counts"], color=cm.viridis(shade), lw=1.2)
        ax.set_title(f"{g} ({kind})", fontsize=9)
        ax.set_xlabel(f"log10 |{'w' if kind == 'weights' else 'grad'}|", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{kind} per layer group, epochs {min(epochs)}..{max(epochs)} (dark -> light)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
