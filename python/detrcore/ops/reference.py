"""Slow, readable pure-PyTorch twins of every native op: the test oracle and the documentation of the math.

They compute the same function as the native kernels, degenerate cases included (see `boxes.py`), in plain
autograd-able PyTorch. Not for speed.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([0.5 * (x0 + x1), 0.5 * (y0 + y1), x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes `[..., 4] -> [...]`; inverted boxes are empty."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _pairwise_terms(boxes1: Tensor, boxes2: Tensor):
    a, b = boxes1.unsqueeze(-2), boxes2.unsqueeze(-3)  # [..., N, 1, 4], [..., 1, M, 4]
    lt = torch.maximum(a[..., :2], b[..., :2])  # [..., N, M, 2]
    rb = torch.minimum(a[..., 2:], b[..., 2:])  # [..., N, M, 2]
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]  # [..., N, M]
    union = box_area(boxes1).unsqueeze(-1) + box_area(boxes2).unsqueeze(-2) - inter
    safe_union = torch.where(union > 0, union, torch.ones_like(union))
    iou = torch.where(union > 0, inter / safe_union, torch.zeros_like(union))
    enc_lt = torch.minimum(a[..., :2], b[..., :2])
    enc_rb = torch.maximum(a[..., 2:], b[..., 2:])
    enc_wh = (enc_rb - enc_lt).clamp(min=0)
    enclose = enc_wh[..., 0] * enc_wh[..., 1]  # [..., N, M]
    return iou, union, enclose


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """`[..., N, 4] x [..., M, 4] -> [..., N, M]`, 0 where the union is empty."""
    return _pairwise_terms(boxes1, boxes2)[0]


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """`[..., N, 4] x [..., M, 4] -> [..., N, M]`; equals IoU where the enclosing box is empty."""
    iou, union, enclose = _pairwise_terms(boxes1, boxes2)
    safe = torch.where(enclose > 0, enclose, torch.ones_like(enclose))
    return torch.where(enclose > 0, iou - (safe - union) / safe, iou)


def generalized_box_iou_loss(boxes1: Tensor, boxes2: Tensor, reduction: str = "none") -> Tensor:
    """Paired: `1 - GIoU(boxes1[i], boxes2[i])`, written as the diagonal of the pairwise matrix (slow)."""
    a, b = boxes1.reshape(-1, 4), boxes2.reshape(-1, 4)
    giou = generalized_box_iou(a.unsqueeze(1), b.unsqueeze(1))  # [N, 1, 1]
    loss = (1 - giou.reshape(-1)).reshape(boxes1.shape[:-1])
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def linear_sum_assignment(cost, maximize: bool = False):
    """Exhaustive search over all assignments: the oracle for tiny matrices (both sides <= 8).

    Returns (rows, cols) in scipy's convention, or raises ValueError like scipy.
    """
    import itertools

    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"expected a matrix (2-D array), got a {c.ndim}-D array")
    if maximize:
        c = -c
    if np.isnan(c).any() or np.isneginf(c).any():
        raise ValueError("matrix contains invalid numeric entries")
    transposed = c.shape[0] > c.shape[1]
    if transposed:
        c = c.T
    nr, nc = c.shape
    best, best_cols = np.inf, None
    for cols in itertools.permutations(range(nc), nr):
        total = sum(c[i, j] for i, j in enumerate(cols))
        if total < best:
            best, best_cols = total, cols
    if nr and best_cols is None:
        raise ValueError("cost matrix is infeasible")
    rows = np.arange(nr, dtype=np.int64)
    cols = np.asarray(best_cols if nr else [], dtype=np.int64)
    if transposed:
        order = np.argsort(cols)
        rows, cols = cols[order], rows[order]
    return rows, cols


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention through `grid_sample`, one level at a time.

    value [B, S, H, D], spatial_shapes [L, 2] (h, w), sampling_locations [B, Q, H, L, P, 2] normalised (x, y),
    attention_weights [B, Q, H, L, P] -> [B, Q, H * D].
    """
    import torch.nn.functional as F

    B, S, H, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] coordinates
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        start = int(level_start_index[lvl])
        v = value[:, start : start + h * w]  # [B, h*w, H, D]
        v = v.permute(0, 2, 3, 1).reshape(B * H, D, h, w)  # [B*H, D, h, w]
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(B * H, Q, P, 2)  # [B*H, Q, P, 2]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2)  # [B*H, D, Q, L, P]
    weights = attention_weights.transpose(1, 2).reshape(B * H, 1, Q, L, P)
    out = (stacked * weights).sum(dim=(-1, -2))  # [B*H, D, Q]
    return out.view(B, H * D, Q).transpose(1, 2).contiguous()  # [B, Q, H*D]
