"""The set-prediction loss of the DETR family: match, then classify every query and regress the matched boxes.

`num_classes` counts object classes only, never the no-object class. DETR-style (softmax) heads output
num_classes + 1 logits, the last being "no object"; Deformable-style (sigmoid focal) heads output num_classes
logits and "no object" is all-negative. The criterion asserts this on every call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrcore.ops import box_cxcywh_to_xyxy, generalized_box_iou_loss

from .matcher import HungarianMatcher, Indices


@dataclass
class LossWeights:
    """Loss weights (DETR: class 1, L1 5, GIoU 2, no-object 0.1; Deformable DETR: class 2, L1 5, GIoU 2)."""

    loss_ce: float = 1.0
    loss_bbox: float = 5.0
    loss_giou: float = 2.0
    eos_coef: float = 0.1  # weight of the no-object class in the softmax cross-entropy
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    extra: dict = field(default_factory=dict)  # per-key overrides, e.g. {"loss_ce_enc": 1.0}


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """Focal loss of RetinaNet, summed over queries and classes and divided by the number of boxes (the
    normalisation of Deformable DETR: its mean over queries times the query count)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum() / num_boxes


class SetCriterion(nn.Module):
    """Hungarian-matched detection loss with auxiliary (per decoder layer) and two-stage encoder terms.

    Args:
        num_classes: object classes, not counting no-object.
        matcher: the HungarianMatcher (its `focal` setting should agree with `focal` here).
        weights: LossWeights.
        focal: sigmoid focal classification (Deformable DETR) instead of softmax cross-entropy (DETR).
    Returns (forward): a dict of every loss term (suffix `_i` for auxiliary layer i, `_enc` for the two-stage
    encoder proposals) plus `loss`, their weighted sum.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weights: LossWeights | None = None,
                 focal: bool = False):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes, self.matcher, self.focal = num_classes, matcher, focal
        self.weights = weights or LossWeights()
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = self.weights.eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        layers = [outputs, *outputs.get("aux_outputs", [])]
        suffixes = ["", *(f"_{i}" for i in range(len(layers) - 1))]
        if "enc_outputs" in outputs:  # two-stage: class-agnostic proposals against every target
            layers.append(outputs["enc_outputs"])
            suffixes.append("_enc")
        enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
        all_targets = [enc_targets if s == "_enc" else targets for s in suffixes]

        indices = self.matcher.match_layers(layers[: len(layers) - ("enc_outputs" in outputs)], targets)
        if "enc_outputs" in outputs:
            indices.append(self.matcher(outputs["enc_outputs"], enc_targets))
        num_boxes = self._num_boxes(targets, outputs["pred_logits"].device)

        losses: dict[str, Tensor] = {}
        for out, tgts, idx, suffix in zip(layers, all_targets, indices, suffixes):
            for k, v in self._layer_losses(out, tgts, idx, num_boxes, agnostic=suffix == "_enc").items():
                losses[k + suffix] = v
        losses["loss"] = sum(self._weight(k) * v for k, v in losses.items())
        return losses

    def _weight(self, key: str) -> float:
        if key in self.weights.extra:
            return self.weights.extra[key]
        base = key.split("_")[0] + "_" + key.split("_")[1]  # loss_ce_3 -> loss_ce
        return getattr(self.weights, base)

    def _num_boxes(self, targets: list[dict], device) -> float:
        n = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(n)
            n = n / torch.distributed.get_world_size()
        return max(float(n.item()), 1.0)

    def _layer_losses(self, out: dict, targets: list[dict], indices: Indices, num_boxes: float,
                      agnostic: bool = False) -> dict[str, Tensor]:
        logits, pred_boxes = out["pred_logits"], out["pred_boxes"]  # [B, Q, C'], [B, Q, 4]
        B, Q, C = logits.shape
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(logits.device)
        query_idx = torch.cat([q for q, _ in indices]).to(logits.device)
        matched_labels = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)])
        matched_labels = matched_labels.to(logits.device)

        if self.focal:
            if not agnostic and C != self.num_classes:
                raise ValueError(f"a sigmoid (focal) head must output num_classes = {self.num_classes} logits, got {C}")
            onehot = torch.zeros_like(logits)
            onehot[batch_idx, query_idx, matched_labels] = 1.0
            loss_ce = sigmoid_focal_loss(logits, onehot, num_boxes, self.weights.focal_alpha,
                                         self.weights.focal_gamma)
        else:
            if C != self.num_classes + 1:
                raise ValueError(
                    f"a softmax head must output num_classes + 1 = {self.num_classes + 1} logits (the last is "
                    f"no-object), got {C}"
                )
            target_classes = torch.full((B, Q), self.num_classes, dtype=torch.int64, device=logits.device)
            target_classes[batch_idx, query_idx] = matched_labels
            loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.dtype))

        src = pred_boxes[batch_idx, query_idx]  # [K, 4] cxcywh
        tgt = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)])
        tgt = tgt.to(src)
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        loss_giou = generalized_box_iou_loss(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt), "sum") / num_boxes
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
