"""Compare DETR variants on the same data: each trains with the same data, schedule, image size and seed, is
evaluated, and lands in one Markdown table, one CSV and one PNG of AP and loss curves.

Resumable per variant: a finished variant (its `result.json`) is not trained again; an interrupted one resumes
from its last checkpoint.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

from detrcore._io import atomic_path, write_text_atomic

from .config import TrainConfig

# Architecture switches per variant, on top of the base config's model (the bundled-data defaults: frozen
# EfficientNet-Lite0, d=128). DC5 needs a ResNet and no PyPI package ships ResNet ImageNet weights: it trains a
# ResNet-18 DC5 from scratch unless model.backbone_weights names a torchvision ResNet-18 state-dict file (set
# model.backbone too for another depth).
VARIANTS = {
    "detr": {"arch": "detr", "with_box_refine": False, "num_queries": 50, "dropout": 0.1},
    "detr-dc5": {"arch": "detr", "with_box_refine": False, "num_queries": 50, "dropout": 0.1,
                 "backbone": "resnet18", "dilation": True, "train_backbone": True},
    "deformable": {"with_box_refine": False},
    "deformable-refine": {"with_box_refine": True},
    "deformable-two-stage": {"with_box_refine": True, "two_stage": True},
}


def variant_config(base: TrainConfig, name: str, out: Path) -> TrainConfig:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    d = base.to_dict()
    model = dict(d["model"])
    model.update(VARIANTS[name])
    if name == "detr-dc5" and not str(model.get("backbone_weights") or "").endswith((".pth", ".pt")):
        model["backbone_weights"] = None  # the package weights are EfficientNet's; ResNet weights come from a file
    d["model"] = model
    d["out"] = str(out / name)
    return TrainConfig.from_dict(d)


def compare(base: TrainConfig, variants: list[str], out: str | os.PathLike, log=print) -> list[dict]:
    """Trains and evaluates each variant (skipping finished ones); writes compare.md, compare.csv, compare.png."""
    from .train import fit

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in variants:
        cfg = variant_config(base, name, out)
        run = Path(cfg.out)
        result_path = run / "result.json"
        if result_path.is_file():
            log(f"{name}: already trained ({result_path})")
        else:
            resume = (run / "last.pt").is_file()
            log(f"{name}: {'resuming' if resume else 'training'} -> {run}")
            t0 = time.time()
            summary = fit(cfg, resume=resume, log=log)
            history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            seconds = sum(h.get("epoch_seconds", 0.0) for h in history)
            images = _train_images(run)
            params = _parameters(cfg)
            result = {"variant": name, "summary": summary, "train_seconds": seconds,
                      "wall_seconds": time.time() - t0, "images_per_second": images * cfg.epochs / max(seconds, 1e-9),
                      "parameters": params["total"], "trainable_parameters": params["trainable"]}
            write_text_atomic(result_path, json.dumps(result, indent=2))
        result = json.loads(result_path.read_text())
        result["history"] = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        rows.append(result)
    write_text_atomic(out / "compare.md", markdown_table(rows))
    write_text_atomic(out / "compare.csv", csv_table(rows))
    plot_comparison(rows, out / "compare.png")
    log(markdown_table(rows))
    return rows


def _train_images(run: Path) -> int:
    cfg = json.loads((run / "config.json").read_text())
    from .data_setup import resolve_splits

    split = resolve_splits(cfg["data"], log=lambda *a: None)["train"]
    return len(json.loads(Path(split[1]).read_text())["images"])


def _parameters(cfg: TrainConfig) -> dict:
    from detrcore.models import ModelConfig, build_model

    m = ModelConfig.from_dict({**cfg.model.to_dict(), "backbone_weights": None})
    model = build_model(m)
    if cfg.model.backbone_weights is not None and not cfg.model.train_backbone:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    return {"total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


METRICS = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"]


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown_table(rows: list[dict]) -> str:
    head = ["variant", *METRICS, "per-class AP", "params (M)", "trainable (M)", "train time (s)", "images/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    for r in rows:
        s = r["summary"]
        per_class = ", ".join(f"{c['name']} {_pct(c['AP'])}" for c in s.get("per_class", []))
        lines.append("| " + " | ".join([r["variant"], *(_pct(s.get(k)) for k in METRICS), per_class,
                                         f"{r['parameters'] / 1e6:.2f}", f"{r['trainable_parameters'] / 1e6:.2f}",
                                         f"{r['train_seconds']:.0f}", f"{r['images_per_second']:.2f}"]) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    classes = [c["name"] for c in rows[0]["summary"].get("per_class", [])] if rows else []
    w.writerow(["variant", *METRICS, *(f"AP_{c}" for c in classes), "parameters", "trainable_parameters",
                "train_seconds", "images_per_second"])
    for r in rows:
        s = r["summary"]
        per = {c["name"]: c["AP"] for c in s.get("per_class", [])}
        w.writerow([r["variant"], *(s.get(k) for k in METRICS), *(per.get(c) for c in classes), r["parameters"],
                    r["trainable_parameters"], round(r["train_seconds"], 2), round(r["images_per_second"], 3)])
    return buf.getvalue()


def plot_comparison(rows: list[dict], path: Path) -> None:
    """One PNG: AP50 and training loss per epoch, one line per variant."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax_ap, ax_loss = fig.subplots(1, 2)
    for r in rows:
        hist = r["history"]
        ap = [(h["epoch"], h["AP50"]) for h in hist if h.get("AP50") is not None]
        loss = [(h["epoch"], h["train_loss"]) for h in hist if h.get("train_loss") is not None]
        if ap:
            ax_ap.plot(*zip(*ap), marker="o", label=r["variant"])
        if loss:
            ax_loss.plot(*zip(*loss), marker=".", label=r["variant"])
    ax_ap.set(title="validation AP50", xlabel="epoch", ylim=(0, None))
    ax_loss.set(title="training loss", xlabel="epoch")
    for ax in (ax_ap, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
