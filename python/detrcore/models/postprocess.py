"""From raw model outputs to scored, labelled boxes in pixels."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from detrcore.ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Converts `pred_logits` [B, Q, C] and `pred_boxes` [B, Q, 4] (normalised cxcywh) into detections.

    Args:
        focal: sigmoid head (Deformable DETR): the `top_k` best (query, class) pairs over Q x C. Otherwise a
            softmax head (DETR): one detection per query, its best real class (the last logit, no-object, is
            dropped).
        top_k: detections kept per image for sigmoid heads.
    forward(outputs, target_sizes [B, 2] as (height, width)) returns one dict per image with `scores` [K],
    `labels` [K] (contiguous class indices) and `boxes` [K, 4] xyxy in pixels, sorted by score (sigmoid heads).
    """

    def __init__(self, focal: bool = False, top_k: int = 100):
        super().__init__()
        self.focal, self.top_k = focal, top_k

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict]:
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        B, Q, C = logits.shape
        if target_sizes.shape != (B, 2):
            raise ValueError(f"target_sizes must be [B={B}, 2] (height, width), got {tuple(target_sizes.shape)}")
        if self.focal:
            k = min(self.top_k, Q * C)
            scores, flat = logits.sigmoid().flatten(1).topk(k, dim=1)  # [B, k]
            labels = flat % C
            boxes = boxes.gather(1, (flat // C)[..., None].expand(-1, -1, 4))  # [B, k, 4]
        else:
            scores, labels = logits.softmax(-1)[..., :-1].max(-1)  # [B, Q]
        h, w = target_sizes.to(boxes).unbind(1)
        scale = torch.stack([w, h, w, h], dim=1)[:, None, :]  # [B, 1, 4]
        xyxy = box_cxcywh_to_xyxy(boxes) * scale
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, xyxy)]
