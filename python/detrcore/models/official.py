"""Loading the official DETR (facebookresearch/detr) and Deformable DETR (fundamentalvision/Deformable-DETR)
checkpoints, strictly, through one documented key mapping.

The mapping (official key -> detrcore key):
1. `backbone.0.body.*` -> `backbone.body.*` (the official Joiner wraps the backbone at index 0).
2. `transformer.decoder.bbox_embed.*` and `transformer.decoder.class_embed.*` are the same tensors as the
   top-level `bbox_embed.*` / `class_embed.*` (the official code registers the heads twice for refinement and
   two-stage); they are checked equal and dropped (detrcore passes the heads to the decoder instead).
3. Deformable DETR without refinement repeats one shared head per decoder layer (`class_embed.0..5` hold the
   same tensors); detrcore keeps one module: `class_embed.0.*` -> `class_embed.*` (the copies are checked equal).
4. Everything else keeps its name (detrcore uses the official module names).
After mapping, the state dict loads with `strict=True`: every official key is used and none is missing.
"""
from __future__ import annotations

import os
import re

import torch
from torch import Tensor, nn

from .config import ModelConfig, build_model

VARIANTS = {
    "detr_r50": dict(arch="detr"),
    "detr_r50_dc5": dict(arch="detr", dilation=True),
    "deformable_detr": dict(arch="deformable_detr"),
    "deformable_detr_refine": dict(arch="deformable_detr", with_box_refine=True),
    "deformable_detr_two_stage": dict(arch="deformable_detr", with_box_refine=True, two_stage=True),
}


def official_config(variant: str, num_classes: int = 91, num_queries: int | None = None) -> ModelConfig:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    return ModelConfig(num_classes=num_classes, backbone="resnet50", num_queries=num_queries, **VARIANTS[variant])


def map_official_state_dict(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Applies the key mapping above; raises ValueError on anything it cannot account for."""
    out: dict[str, Tensor] = {}
    shared_heads = cfg.arch == "deformable_detr" and not cfg.with_box_refine
    for key, value in state.items():
        if key.startswith("transformer.decoder.bbox_embed.") or key.startswith("transformer.decoder.class_embed."):
            top = key[len("transformer.decoder."):]
            if top not in state or not torch.equal(state[top], value):
                raise ValueError(f"{key} differs from {top}: not an official checkpoint layout")
            continue
        if shared_heads:
            m = re.match(r"(class_embed|bbox_embed)\.(\d+)\.(.*)", key)
            if m:
                first = f"{m.group(1)}.0.{m.group(3)}"
                if not torch.equal(state[first], value):
                    raise ValueError(f"{key} differs from {first}: expected one head shared by every layer")
                if m.group(2) != "0":
                    continue
                key = f"{m.group(1)}.{m.group(3)}"
        if key.startswith("backbone.0.body."):
            key = "backbone.body." + key[len("backbone.0.body."):]
        out[key] = value
    return out


def load_official(checkpoint: str | os.PathLike | dict, variant: str, num_classes: int = 91,
                  num_queries: int | None = None) -> nn.Module:
    """Builds the detrcore model for `variant` and loads an official checkpoint into it strictly.

    checkpoint: a path to an official `.pth` (a dict with "model"), or that dict, or the state dict itself.
    variant: detr_r50, detr_r50_dc5, deformable_detr, deformable_detr_refine, deformable_detr_two_stage (the
        official "++ two-stage", which includes box refinement).
    num_classes: object classes without no-object; the official COCO checkpoints use 91.
    num_queries: None for the official 100 (DETR) / 300 (Deformable); two-stage uses it as its top-k proposals.
    """
    cfg = official_config(variant, num_classes, num_queries)
    if isinstance(checkpoint, (str, os.PathLike)):
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise TypeError("checkpoint must be a path, an official checkpoint dict or a state dict")
    head = next((k for k in ("class_embed.weight", "class_embed.0.weight") if k in state), None)
    if head is not None:
        rows = state[head].shape[0]
        want = num_classes + 1 if cfg.arch == "detr" else num_classes
        if rows != want:
            raise ValueError(
                f"the checkpoint's class head has {rows} outputs but num_classes={num_classes} needs {want} for "
                f"{variant} (num_classes excludes no-object; DETR adds one logit for it)"
            )
    model = build_model(cfg)
    model.load_state_dict(map_official_state_dict(state, cfg), strict=True)
    return model
