"""Attention pictures: where the last decoder layer of a Deformable DETR looks, for its top-scoring queries.

For each feature level one panel shows the image, each query's predicted box, and the query's sampling points
(all heads and points of that level) coloured and sized by their attention weight.
"""
from __future__ import annotations

import os

import torch

from detrcore._io import atomic_path


@torch.no_grad()
def attention_picture(model, image: torch.Tensor, batch: torch.Tensor, mask: torch.Tensor, path: str | os.PathLike,
                      queries: int = 5) -> dict:
    """image: the original [3, H, W] in [0, 1]; batch/mask: its model input. Returns what was drawn."""
    from matplotlib import cm
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    layers = getattr(getattr(getattr(model, "transformer", None), "decoder", None), "layers", None)
    if not layers or not hasattr(layers[-1], "cross_attn"):
        raise ValueError("attention pictures show deformable attention: use a Deformable DETR checkpoint")
    attn = layers[-1].cross_attn
    attn.record_sampling = True
    try:
        out = model(batch, mask)
        locations, weights = attn.last_sampling  # [1, Q, H, L, P, 2], [1, Q, H, L, P]
    finally:
        attn.record_sampling, attn.last_sampling = False, None
    scores = out["pred_logits"][0].float().sigmoid().max(-1).values  # [Q]
    k = min(queries, scores.numel())
    top = scores.topk(k).indices
    H, W = image.shape[-2:]
    L = locations.shape[3]
    fig = Figure(figsize=(4.0 * L, 4.4))
    FigureCanvasAgg(fig)
    picture = image.permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    colors = [cm.tab10(i % 10) for i in range(k)]
    for lvl in range(L):
        ax = fig.add_subplot(1, L, lvl + 1)
        ax.imshow(picture)
        for i, q in enumerate(top.tolist()):
            pts = locations[0, q, :, lvl].reshape(-1, 2).float().cpu()  # [heads * points, 2] normalised (x, y)
            w = weights[0, q, :, lvl].reshape(-1).float().cpu()
            ax.scatter(pts[:, 0] * W, pts[:, 1] * H, c=w, cmap="magma", vmin=0, vmax=float(weights[0, q].max()),
                       s=8 + 120 * w / w.max().clamp_min(1e-9), edgecolors=colors[i], linewidths=0.6)
            cx, cy, bw, bh = out["pred_boxes"][0, q].float().cpu().tolist()
            ax.add_patch(Rectangle(((cx - bw / 2) * W, (cy - bh / 2) * H), bw * W, bh * H, fill=False,
                                   edgecolor=colors[i], lw=1.5))
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.set_title(f"level {lvl}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"last decoder layer: sampling points of the top {k} queries (colour/size = attention weight)",
                 fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return {"queries": top.tolist(), "scores": scores[top].tolist(), "levels": L}
