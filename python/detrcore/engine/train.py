"""The training loop, readable top to bottom: data -> model -> optimizer and schedule -> epochs of
(train, evaluate, log, checkpoint). Host-device synchronisation points are marked "SYNC".

Single process, or DDP under `torchrun --nproc_per_node N` (gloo on the CPU, nccl on GPUs): every rank trains on
its shard, only rank 0 writes files, evaluation gathers every rank's detections.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from detrcore._io import append_text
from detrcore.models import HungarianMatcher, PostProcess, SetCriterion, build_model

from . import distributed as dist
from .checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state
from .config import TrainConfig


# ---------------------------------------------------------------------------------------------------------------
# Optimizer, schedule, EMA
def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: the backbone at lr * lr_backbone_mult, Deformable's sampling offsets and reference points at
    lr * lr_linear_proj_mult, everything else at lr. Frozen parameters are left out."""
    groups = {"backbone": [], "linear_proj": [], "rest": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            groups["backbone"].append(p)
        elif "sampling_offsets" in name or "reference_points" in name:
            groups["linear_proj"].append(p)
        else:
            groups["rest"].append(p)
    mult = {"backbone": cfg.lr_backbone_mult, "linear_proj": cfg.lr_linear_proj_mult, "rest": 1.0}
    return [{"params": ps, "lr": cfg.lr * mult[k], "name": k} for k, ps in groups.items() if ps]


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning-rate multiplier at optimizer step `step`."""
    epoch = step / max(steps_per_epoch, 1)
    if cfg.schedule == "step":
        drop = cfg.lr_drop_epoch if cfg.lr_drop_epoch is not None else max(1, round(0.8 * cfg.epochs))
        return 0.1 if epoch >= drop else 1.0
    warm = cfg.warmup_epochs
    if warm > 0 and epoch < warm:
        start = cfg.warmup_lr / cfg.lr
        return start + (1 - start) * epoch / warm
    progress = (epoch - warm) / max(cfg.epochs - warm, 1e-9)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class ModelEMA:
    """Exponential moving average of the weights (with the usual warm-up of the decay)."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / 2000))
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(d).add_(m.detach(), alpha=1 - d)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RunState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_ap: float = -1.0
    history: list = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if dist.is_distributed() and torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX tiles, as torch's kernels use them)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None) or all(probe is None for probe in probes)


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return contextlib.nullcontext()
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device; use 'bf16' on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)


def to_device(targets: list[dict], device) -> list[dict]:
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


class NonFiniteLoss(FloatingPointError):
    pass


def train_one_epoch(model, criterion, loader, optimizer, scheduler, scaler, ema, cfg: TrainConfig, state: RunState,
                    device, epoch: int, log, diag=None) -> dict:
    model.train()
    criterion.train()
    totals: dict[str, float] = {}
    batches, skipped = 0, 0
    n = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch * cfg.grad_accum)
    bar = dist.progress(total=n, desc=f"epoch {epoch + 1}/{cfg.epochs}")
    optimizer.zero_grad(set_to_none=True)
    for i, (images, mask, targets) in enumerate(loader):
        if i >= n:
            break
        images, mask, targets = images.to(device), mask.to(device), to_device(targets, device)
        with autocast(cfg, device):
            outputs = model(images, mask)
            losses = criterion(outputs, targets)  # SYNC: the matcher's one device->host transfer
        loss = losses["loss"]
        if not torch.isfinite(loss):  # SYNC
            bad = [k for k, v in losses.items() if k != "loss" and not torch.isfinite(v)]
            msg = (f"non-finite loss at epoch {epoch + 1}, step {state.step}, batch {i}: "
                   f"{', '.join(bad) or 'loss'} (lower the lr, enable clipping, or check the data)")
            if cfg.nonfinite == "stop":
                raise NonFiniteLoss(msg)
            log(f"warning: {msg}; step skipped")
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            continue
        scaled = loss / cfg.grad_accum
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        last = i + 1 == n
        if (i + 1) % cfg.grad_accum == 0 or last:
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = None
            if cfg.clip_max_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
            if diag is not None:
                if grad_norm is None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
                diag.log_step({"epoch": epoch + 1, "step": state.step + 1, "loss": float(loss.detach()),
                               "grad_norm": float(grad_norm), "lr": optimizer.param_groups[-1]["lr"]})  # SYNC
                if last:  # the epoch's last step: gradient distributions before the update
                    diag.capture(dist.unwrap(model), "gradients", epoch + 1)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            scheduler.step()
            if ema is not None:
                ema.update(dist.unwrap(model))
            if grad_norm is not None:
                totals["grad_norm"] = totals.get("grad_norm", 0.0) + float(grad_norm)  # SYNC
        batches += 1
        for k, v in losses.items():
            if k == "loss" or k in ("loss_ce", "loss_bbox", "loss_giou"):
                totals[k] = totals.get(k, 0.0) + float(v.detach())  # SYNC (cheap: the loss is already on host)
        bar.update(1, loss=totals["loss"] / batches, lr=optimizer.param_groups[-1]["lr"])
    bar.close()
    steps = max(1, math.ceil(batches / cfg.grad_accum))
    stats = {f"train_{k}": v / max(batches, 1) for k, v in totals.items() if k != "grad_norm"}
    if "grad_norm" in totals:
        stats["train_grad_norm"] = totals["grad_norm"] / steps
    stats["skipped_steps"] = skipped
    return dist.average_stats(stats)


@torch.no_grad()
def evaluate(model, loader, postprocess, evaluator, device, cfg: TrainConfig, keep: int = 0):
    """Runs the model over `loader`, feeds the CocoEvaluator; returns (summary or None off rank 0, samples kept for
    the prediction picture)."""
    model.eval()
    samples = []
    for images, mask, targets in loader:
        images, mask = images.to(device), mask.to(device)
        with autocast(cfg, device):
            outputs = model(images, mask)
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        results = postprocess(outputs, sizes)  # boxes in original pixels
        results = [{k: v.float().cpu() for k, v in r.items()} for r in results]  # SYNC
        evaluator.update({int(t["image_id"]): r for t, r in zip(targets, results)})
        for b in range(len(targets)):
            if len(samples) < keep:
                samples.append((images[b].cpu(), mask[b].cpu(), targets[b], results[b]))
    evaluator.gather()
    return (evaluator.summarize() if dist.is_main() else None), samples


# ---------------------------------------------------------------------------------------------------------------
def fit(cfg: TrainConfig, resume: bool = False, log=print) -> dict:
    """Trains (or resumes) the run described by cfg; returns the final evaluation summary (rank 0)."""
    from .data_setup import build_datasets, make_loader
    from .evaluate import CocoEvaluator, format_table, save_json

    dist.init()
    out = Path(cfg.out)
    main = dist.is_main()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if cfg.amp == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        warnings.warn("amp='bf16' on a CPU without bf16 arithmetic (no AVX512-BF16 or AMX): its bf16 products are "
                      "emulated, ~30x slower than float32 (a Deformable DETR step, Zen 3: 48 s vs 1.6 s); "
                      "amp='none' trains faster here", RuntimeWarning, stacklevel=2)
    seed_everything(cfg.seed + dist.rank())

    # ---- data ----
    train_set, val_set, info = build_datasets(cfg, log)
    if cfg.model.num_classes != info["num_classes"]:
        cfg.model.num_classes = info["num_classes"]  # the data decides; ModelConfig counts object classes only
    train_loader = make_loader(train_set, cfg, train=True)
    val_loader = make_loader(val_set, cfg, train=False)

    # ---- model, loss, optimizer ----
    model = build_model(cfg.model).to(device)
    if cfg.grad_checkpoint:
        _enable_checkpointing(model)
    criterion = SetCriterion(cfg.model.num_classes, HungarianMatcher(cfg.matcher), cfg.loss, focal=cfg.model.focal)
    postprocess = PostProcess(focal=cfg.model.focal)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    ema = ModelEMA(model, cfg.ema_decay) if cfg.ema else None
    state = RunState()

    if resume:
        ckpt_path = out / "last.pt"
        ckpt = load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema"):
            ema.load_state_dict(ckpt["ema"])
        state = RunState(**ckpt["state"])
        set_rng_state(ckpt["rng"])
        log(f"resumed {ckpt_path}: {state.epoch} epochs / {state.step} steps done")
    train_model = dist.wrap(model, device)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        log(f"training {cfg.model.arch} ({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable "
            f"parameters) on {len(train_set)} images, validating on {len(val_set)}, {cfg.epochs} epochs, "
            f"device {device}, {torch.get_num_threads()} threads -> {out}")

    diag = None
    if cfg.diagnostics and main:
        from .diagnostics import Diagnostics

        diag = Diagnostics(out)
    summary = None
    for epoch in range(state.epoch, cfg.epochs):
        dist.set_epoch(train_loader, epoch, cfg.seed)
        t0 = time.time()
        stats = train_one_epoch(train_model, criterion, train_loader, optimizer, scheduler, scaler, ema, cfg, state,
                                device, epoch, log, diag)
        if diag is not None:
            diag.capture(model, "weights", epoch + 1)
            diag.write()
        stats["epoch"], stats["lr"], stats["epoch_seconds"] = epoch + 1, optimizer.param_groups[-1]["lr"], time.time() - t0
        stats["steps"] = state.step
        last_epoch = epoch + 1 == cfg.epochs
        if (epoch + 1) % cfg.eval_every == 0 or last_epoch:
            evaluator = CocoEvaluator(info["val_json"], info["label_to_category_id"])
            eval_model = ema.module if ema is not None else model
            summary, samples = evaluate(eval_model, val_loader, postprocess, evaluator, device, cfg,
                                        keep=cfg.visualize if main else 0)
            if main:
                stats.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
                save_json(summary, out / "eval.json")
                if cfg.visualize:
                    _prediction_picture(samples, info, out / "predictions.png", train_set)
        state.epoch = epoch + 1
        state.history.append(stats)
        if main:
            ckpt = {"config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                    "ema": ema.state_dict() if ema else None, "state": state.__dict__, "rng": rng_state(),
                    "classes": info["class_names"], "label_to_category_id": info["label_to_category_id"]}
            atomic_save(ckpt, out / "last.pt")
            ap = stats.get("AP")
            if ap is not None and ap > state.best_ap:
                state.best_ap = ap
                atomic_save({**ckpt, "state": state.__dict__}, out / "best.pt")
            _log_epoch(out, stats, log)  # after the checkpoint is durable
            _plot(out, state.history)
        dist.barrier()
    if main and summary is not None:
        log(format_table(summary))
    dist.cleanup()
    return summary or {}


def _enable_checkpointing(model: nn.Module) -> None:
    """Wraps every encoder and decoder layer's forward in torch.utils.checkpoint."""
    from torch.utils.checkpoint import checkpoint

    layers = []
    transformer = getattr(model, "transformer", None)
    for part in ("encoder", "decoder"):
        layers += list(getattr(getattr(transformer, part, None), "layers", []))
    for layer in layers:
        fwd = layer.forward
        layer.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **k)


METRIC_COLUMNS = ["epoch", "steps", "lr", "train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou",
                  "train_grad_norm", "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR_100",
                  "epoch_seconds", "skipped_steps"]


def _log_epoch(out: Path, stats: dict, log) -> None:
    append_text(out / "metrics.jsonl", json.dumps(stats) + "\n")
    row = io.StringIO(newline="")
    w = csv.DictWriter(row, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    if not (out / "metrics.csv").exists():
        w.writeheader()
    w.writerow(stats)
    append_text(out / "metrics.csv", row.getvalue())
    _tensorboard(out, stats)
    shown = ", ".join(f"{k} {stats[k]:.4g}" for k in ("train_loss", "AP", "AP50", "epoch_seconds") if k in stats)
    log(f"epoch {stats['epoch']}: {shown}")


_TB = {}


def _tensorboard(out: Path, stats: dict) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: CSV / JSONL only
        return
    writer = _TB.setdefault(str(out), SummaryWriter(str(out / "tensorboard")))
    for k, v in stats.items():
        if isinstance(v, (int, float)) and k != "epoch":
            writer.add_scalar(k, v, stats["epoch"])
    writer.flush()


def _plot(out: Path, history: list) -> None:
    try:
        from .plots import plot_curves
    except ImportError:
        return
    plot_curves(history, out / "curves.png")


def _prediction_picture(samples, info, path: Path, dataset) -> None:
    from .plots import detection_grid

    mean, std = dataset.normalization
    mean, std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    rows = []
    for image, mask, target, result in samples:
        valid = ~mask
        h, w = int(valid[:, 0].sum()), int(valid[0].sum())
        img = (image[:, :h, :w] * std + mean).clamp(0, 1)
        # ground truth: normalised cxcywh -> pixels of the shown (transformed) image
        cx, cy, bw, bh = target["boxes"].unbind(-1)
        gt = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
        oh, ow = (int(x) for x in target["orig_size"])
        scale = torch.tensor([w / ow, h / oh, w / ow, h / oh])
        rows.append((img, gt, target["labels"], result["boxes"] * scale, result["labels"], result["scores"]))
    detection_grid(rows, info["class_names"], path)
