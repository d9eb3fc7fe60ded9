"""Training curves and detection pictures, written as PNG files atomically.

matplotlib is imported lazily and drives its Agg canvas directly (no pyplot, so the process's global backend is
left alone); detection pictures use Pillow only. Every PNG goes to a temporary file beside the target and is then
moved into place with os.replace, so a reader never sees a half-written file.
"""
from __future__ import annotations

import colorsys
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from detrcore._io import atomic_path as _atomic_path

# Keys read from each epoch's dict by plot_curves; the first key present (and finite) wins.
LOSS_TERMS = ("loss_ce", "loss_bbox", "loss_giou")
_CURVES = {
    "train loss": ("train_loss", "loss"),
    **{f"train {t}": (f"train_{t}", t) for t in LOSS_TERMS},
    "val loss": ("val_loss", "test_loss"),
}
_METRICS = {"AP": ("AP", "val_AP"), "AP50": ("AP50", "val_AP50")}


def _scalar(entry: dict, keys: Sequence[str]) -> float | None:
    for k in keys:
        v = entry.get(k)
        if v is None:
            continue
        v = float(v.item() if isinstance(v, torch.Tensor) else v)
        if math.isfinite(v):
            return v
    return None


def _series(history: list[dict], keys: Sequence[str]) -> tuple[list[float], list[float]]:
    """(epochs, values) for the epochs that have one of `keys`; an epoch is entry["epoch"] or its 1-based index."""
    xs, ys = [], []
    for i, entry in enumerate(history):
        v = _scalar(entry, keys)
        if v is not None:
            xs.append(float(entry.get("epoch", i + 1)))
            ys.append(v)
    return xs, ys


def plot_curves(history: list[dict], path: str | os.PathLike) -> None:
    """PNG with the loss curves per epoch (left) and AP / AP50 per epoch (right).

    history: one dict per epoch. Read keys (first present wins, missing or non-finite values skip that epoch):
        `epoch` (else the 1-based position), total train loss `train_loss` | `loss`, its terms `train_loss_ce` |
        `loss_ce`, `train_loss_bbox` | `loss_bbox`, `train_loss_giou` | `loss_giou`, `val_loss` | `test_loss`,
        and `AP` | `val_AP`, `AP50` | `val_AP50` (fractions in [0, 1], as CocoEvaluator.summarize returns them).
    Points carry markers, so a single epoch is visible. A panel with nothing to draw says so.
    """
    if not history:
        raise ValueError("history is empty: nothing to plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_ap = fig.subplots(1, 2)
    for ax, curves, title in ((ax_loss, _CURVES, "losses"), (ax_ap, _METRICS, "COCO box AP")):
        drawn = 0
        for label, keys in curves.items():
            xs, ys = _series(history, keys)
            if xs:
                style = "--" if label.startswith("val") else "-"
                lw = 2.0 if label in ("train loss", "val loss", "AP") else 1.2
                ax.plot(xs, ys, style, marker="o", markersize=3, linewidth=lw, label=label)
                drawn += 1
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "nothing recorded", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax_ap.set_ylim(0.0, 1.0)
    fig.tight_layout()
    with _atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


# ---------------------------------------------------------------------------------------------------------------
# Detection pictures (Pillow)


def _palette(i: int) -> tuple[int, int, int]:
    """A bright colour per class index, spread around the hue circle by the golden ratio."""
    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


def _to_pil(image) -> Image.Image:
    """A new RGB PIL image from a PIL image, or a tensor / ndarray [3, H, W] (or [1, H, W]) uint8 or float in [0, 1]."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")  # always a copy: the caller's image is never drawn on
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise ValueError(f"image must be [3, H, W] or [1, H, W], got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"image must be uint8 or floating point in [0, 1], got {arr.dtype}")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"float image values must lie in [0, 1] (got [{lo:.3g}, {hi:.3g}]); "
                             "undo the mean/std normalisation first")
        arr = np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    arr = np.ascontiguousarray(np.repeat(arr, 3, axis=0) if arr.shape[0] == 1 else arr).transpose(1, 2, 0)  # [H,W,3]
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def _rows(x, dtype, width: int | None = None) -> np.ndarray:
    if x is None:
        return np.zeros((0,) if width is None else (0, width), dtype=dtype)
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    arr = arr.astype(dtype, copy=False)
    return arr.reshape(-1, width) if width is not None else arr.reshape(-1)


def draw_detections(image, boxes, labels=None, scores=None, class_names: Sequence[str] | None = None,
                    color: str | tuple[int, int, int] | None = None, width: int = 2) -> Image.Image:
    """Draws boxes with "name score" captions on a copy of `image` and returns it.

    Args:
        image: PIL image, or tensor / ndarray [3, H, W] (or [1, H, W]) uint8, or float in [0, 1].
        boxes: [K, 4] xyxy in pixels of `image`.
        labels: [K] contiguous class indices (optional); named by `class_names[label]` when given.
        scores: [K] (optional); shown with two decimals.
        color: one colour for every box (a Pillow colour name or RGB tuple); None colours each class differently.
        width: box line width in pixels.
    """
    img = _to_pil(image)
    boxes = _rows(boxes, np.float64, 4)  # [K, 4]
    K = len(boxes)
    labels = _rows(labels, np.int64) if labels is not None else None
    scores = _rows(scores, np.float64) if scores is not None else None
    for name, arr in (("labels", labels), ("scores", scores)):
        if arr is not None and len(arr) != K:
            raise ValueError(f"{name} has {len(arr)} entries for {K} boxes")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for i in range(K):
        x0, y0, x1, y1 = boxes[i].tolist()
        label = int(labels[i]) if labels is not None else None
        c = color if color is not None else _palette(label if label is not None else 0)
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=c, width=width)
        parts = []
        if label is not None:
            parts.append(class_names[label] if class_names is not None and 0 <= label < len(class_names)
                         else str(label))
        if scores is not None:
            parts.append(f"{scores[i]:.2f}")
        if parts:
            text = " ".join(parts)
            l, t, r, b = draw.textbbox((0, 0), text, font=font)
            tw, th = r - l, b - t
            ty = y0 - th - 4 if y0 - th - 4 >= 0 else y0  # above the box, or inside when at the top edge
            draw.rectangle([x0, ty, x0 + tw + 4, ty + th + 4], fill=c)
            draw.text((x0 + 2 - l, ty + 2 - t), text, fill=(0, 0, 0), font=font)
    return img


def detection_grid(samples: Sequence[tuple], class_names: Sequence[str] | None, path: str | os.PathLike,
                   thresholds: Sequence[float] = (0.5, 0.75), max_images: int = 8,
                   cell_size: int = 320) -> Image.Image:
    """PNG grid: one row per image; columns = ground truth, then the predictions scoring >= each threshold.

    samples: (image, gt_boxes [G, 4], gt_labels [G], pred_boxes [K, 4], pred_labels [K], pred_scores [K]) with
        boxes xyxy in pixels of that image (see `draw_detections` for the image forms). Only the first
        `max_images` are drawn. Each image is scaled to fit a `cell_size` square before drawing, so captions keep
        one size. Returns the grid as a PIL image as well.
    """
    samples = list(samples)[:max_images]
    if not samples:
        raise ValueError("samples is empty: nothing to draw")
    titles = ["ground truth"] + [f"predictions, score >= {t:.2f}" for t in thresholds]
    font = ImageFont.load_default()
    header, pad = 18, 4
    cols, rows = len(titles), len(samples)
    grid = Image.new("RGB", (cols * (cell_size + pad) + pad, header + rows * (cell_size + pad) + pad), (40, 40, 40))
    draw = ImageDraw.Draw(grid)
    for j, title in enumerate(titles):
        draw.text((pad + j * (cell_size + pad) + 2, 3), title, fill=(255, 255, 255), font=font)
    for i, (image, gt_boxes, gt_labels, pred_boxes, pred_labels, pred_scores) in enumerate(samples):
        img = _to_pil(image)
        s = cell_size / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BILINEAR)
        pb = _rows(pred_boxes, np.float64, 4) * s  # [K, 4]
        pl, ps = _rows(pred_labels, np.int64), _rows(pred_scores, np.float64)  # [K], [K]
        cells = [draw_detections(img, _rows(gt_boxes, np.float64, 4) * s, _rows(gt_labels, np.int64), None,
                                 class_names)]
        for t in thresholds:
            keep = ps >= t
            cells.append(draw_detections(img, pb[keep], pl[keep], ps[keep], class_names))
        y = header + pad + i * (cell_size + pad)
        for j, cell in enumerate(cells):
            grid.paste(cell, (pad + j * (cell_size + pad), y))
    with _atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return grid
