"""Hungarian matching of predictions to ground truth, for every decoder layer in one host round trip.

Costs are computed per image block: predictions [B, Q] against each image's own targets (padded to the largest
target count in the batch), never the full (B*Q) x sum(T) matrix DETR builds. All layers' blocks travel to the
host in one transfer (the single synchronisation of a training step's matching) and are solved together by the
native batched solver, in parallel threads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detrcore.ops import batched_linear_sum_assignment, box_cxcywh_to_xyxy, generalized_box_iou

Indices = list[tuple[Tensor, Tensor]]  # per image: (query indices ascending, matched target indices), int64 CPU


@dataclass
class MatchCost:
    """Weights of the matching cost terms (DETR: 1/5/2; Deformable DETR: 2/5/2 with the focal class cost)."""

    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    focal: bool = False  # sigmoid focal class cost (Deformable DETR) instead of -softmax probability (DETR)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of queries to targets per image.

    Targets are a list (one per image) of dicts with `labels` [T] int64 and `boxes` [T, 4] normalised cxcywh.
    Returns, per image, `(query_idx, target_idx)`: int64 CPU tensors of length min(Q, T), queries ascending.
    """

    TERMS = ("class", "bbox", "giou")

    def __init__(self, cost: MatchCost | None = None, **kwargs):
        super().__init__()
        self.cost = cost or MatchCost(**kwargs)
        c = self.cost
        if c.cost_class == 0 and c.cost_bbox == 0 and c.cost_giou == 0:
            raise ValueError("all matching cost weights are zero")

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> Indices:
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(self, layers: list[dict], targets: list[dict]) -> list[Indices]:
        """Matches every layer's outputs (dicts with `pred_logits` [B, Q, C], `pred_boxes` [B, Q, 4]) at once."""
        B, Q = layers[0]["pred_logits"].shape[:2]
        if len(targets) != B:
            raise ValueError(f"got {len(targets)} target dicts for a batch of {B} images")
        sizes = [len(t["boxes"]) for t in targets]
        T = max(sizes, default=0)
        if T == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            return [[(empty, empty) for _ in range(B)] for _ in layers]
        device = layers[0]["pred_logits"].device
        labels, boxes, valid = _pad_targets(targets, T, device)  # [B, T], [B, T, 4], [B, T]

        costs, flags = [], []
        for out in layers:
            terms = self._cost_terms(out["pred_logits"], out["pred_boxes"], labels, boxes)  # 3 x [B, Q, T]
            valid_q = valid[:, None, :]  # [B, 1, T]
            # a NaN in any real entry of a term is an error that names the term and the image
            flags.append(torch.stack([(t.isnan() & valid_q).flatten(1).any(1) for t in terms]))  # [3, B]
            costs.append(sum(w * t for w, t in zip(self._weights(), terms)))  # [B, Q, T]
        cost = torch.stack(costs)  # [layers, B, Q, T]
        flag = torch.stack(flags)  # [layers, 3, B]
        # The one device->host transfer (and synchronisation) of the matching.
        packed = torch.cat([cost.float().flatten(), flag.float().flatten()]).cpu()
        cost = packed[: cost.numel()].view(cost.shape)
        flag = packed[cost.numel():].view(flag.shape).bool()
        if flag.any():
            layer, term, image = (int(i) for i in flag.nonzero()[0])
            raise ValueError(
                f"matching cost '{self.TERMS[term]}' is NaN for image {image} (decoder output {layer}): "
                "the predictions contain NaN or inf (check the loss scale / learning rate)"
            )
        blocks = [cost[l, b, :, : sizes[b]] for l in range(len(layers)) for b in range(B)]  # strided views
        solved = batched_linear_sum_assignment(blocks)
        return [solved[l * B : (l + 1) * B] for l in range(len(layers))]

    def _weights(self) -> tuple[float, float, float]:
        return self.cost.cost_class, self.cost.cost_bbox, self.cost.cost_giou

    def _cost_terms(self, logits: Tensor, pred_boxes: Tensor, labels: Tensor, boxes: Tensor):
        """3 x [B, Q, T]: class, L1 and (negative) GIoU costs of every query against its image's targets."""
        c = self.cost
        index = labels[:, None, :].expand(-1, logits.shape[1], -1)  # [B, Q, T]
        if c.focal:
            prob = logits.float().sigmoid()
            neg = (1 - c.focal_alpha) * prob.pow(c.focal_gamma) * -(1 - prob + 1e-8).log()
            pos = c.focal_alpha * (1 - prob).pow(c.focal_gamma) * -(prob + 1e-8).log()
            cost_class = (pos - neg).gather(2, index)
        else:
            cost_class = -logits.float().softmax(-1).gather(2, index)
        pred = pred_boxes.float()
        cost_bbox = torch.cdist(pred, boxes, p=1)  # [B, Q, T]
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(boxes))  # [B, Q, T]
        return cost_class, cost_bbox, cost_giou


def _pad_targets(targets: list[dict], T: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Stacks per-image targets, padded to T: labels [B, T] (pad 0), boxes [B, T, 4] (pad a valid unit box),
    valid [B, T]."""
    B = len(targets)
    labels = torch.zeros(B, T, dtype=torch.int64, device=device)
    boxes = torch.full((B, T, 4), 0.5, device=device)
    valid = torch.zeros(B, T, dtype=torch.bool, device=device)
    for b, t in enumerate(targets):
        n = len(t["boxes"])
        if n:
            labels[b, :n] = t["labels"].to(device)
            boxes[b, :n] = t["boxes"].to(device=device, dtype=boxes.dtype)
            valid[b, :n] = True
    return labels, boxes, valid
