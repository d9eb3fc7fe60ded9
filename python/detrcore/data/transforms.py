"""Detection transforms without torchvision: each maps (image, target) -> (image, target).

Contract:
    image:  float Tensor[3, H, W] (values in [0, 1] until Normalize)
    target: dict with "boxes" float Tensor[N, 4] in xyxy absolute pixels of the CURRENT image, "labels" Tensor[N],
            "size" int64 Tensor[2] = current (h, w); other keys pass through. Per-box keys (PER_BOX_KEYS) are
            filtered together, so labels stay aligned with boxes.
    Normalize is the last step: it standardises the image and turns boxes into normalised cxcywh in [0, 1]
    relative to the transformed image size (what the DETR losses expect).
Randomness comes from torch's global generator (DataLoader seeds it per worker).
Resizing: F.interpolate(mode="bilinear", antialias=True, align_corners=False).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Compose", "RandomHorizontalFlip", "RandomResize", "RandomSizeCrop", "RandomSelect", "Normalize",
           "resize", "crop", "hflip", "train_transforms", "eval_transforms", "PER_BOX_KEYS"]

PER_BOX_KEYS = ("boxes", "labels", "area", "iscrowd")  # filtered together when boxes are dropped


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive), from torch's generator."""
    return int(torch.randint(low, high + 1, ()).item())


def _hw(image: Tensor) -> tuple[int, int]:
    return int(image.shape[-2]), int(image.shape[-1])


# ---- functional forms ----
def hflip(image: Tensor, target: dict) -> tuple[Tensor, dict]:
    """Mirrors left-right; x -> W - x (x0 and x1 swap roles)."""
    _, w = _hw(image)
    target = dict(target)
    if "boxes" in target:
        b = target["boxes"]  # [N, 4]
        target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=-1)
    return image.flip(-1), target


def resize(image: Tensor, target: dict, size: tuple[int, int]) -> tuple[Tensor, dict]:
    """Resizes to exactly `size` = (h, w); boxes (and area) scale with the image."""
    h, w = _hw(image)
    oh, ow = int(size[0]), int(size[1])
    if (oh, ow) != (h, w):
        image = F.interpolate(image[None], size=(oh, ow), mode="bilinear", antialias=True,
                              align_corners=False)[0]  # [3, oh, ow]
    sx, sy = ow / w, oh / h
    target = dict(target)
    if "boxes" in target:
        b = target["boxes"] * target["boxes"].new_tensor([sx, sy, sx, sy])
        # the rounded scale can put an edge on the border a hair outside (21 * (11 / 21) = 11.000001 in float32,
        # which a flip then turns into x0 = -1e-6): boxes stay inside the image
        target["boxes"] = torch.minimum(b.clamp(min=0), b.new_tensor([ow, oh, ow, oh]))
    if "area" in target:
        target["area"] = target["area"] * (sx * sy)
    target["size"] = torch.tensor([oh, ow], dtype=torch.int64)
    return image, target


def crop(image: Tensor, target: dict, top: int, left: int, height: int, width: int) -> tuple[Tensor, dict]:
    """Crops the region [top, top+height) x [left, left+width); boxes are shifted, clipped to the crop, and those
    with no area left are dropped together with their labels (all PER_BOX_KEYS)."""
    image = image[:, top:top + height, left:left + width]
    target = dict(target)
    if "boxes" in target:
        b = target["boxes"] - target["boxes"].new_tensor([left, top, left, top])  # [N, 4]
        b = torch.minimum(b.clamp(min=0), b.new_tensor([width, height, width, height]))
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])  # [N]
        target["boxes"] = b
        if "area" in target:
            target["area"] = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        for k in PER_BOX_KEYS:
            if k in target:
                target[k] = target[k][keep]
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    return image, target


def size_with_aspect_ratio(hw: tuple[int, int], size: int, max_size: int | None = None) -> tuple[int, int]:
    """(h, w) whose shorter side is `size` (shrunk so the longer side stays <= max_size), as DETR computes it; the
    shorter side is at least 1 pixel (with max_size=400 a 1x1000 image stays 1x1000: rounding would make it 0x0)."""
    h, w = hw
    if max_size is not None:
        short, long = float(min(h, w)), float(max(h, w))
        if long / short * size > max_size:
            size = max(1, int(round(max_size * short / long)))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


# ---- transform objects ----
class Compose:
    """Applies transforms in order. `normalization` is that of the first Normalize inside (or None)."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    @property
    def normalization(self):
        for t in self.transforms:
            n = getattr(t, "normalization", None)
            if n is not None:
                return n
        return None

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        if torch.rand(()).item() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize:
    """Resizes so the shorter side is one of `sizes` (uniform choice) and the longer side <= max_size."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        if not sizes:
            raise ValueError("RandomResize: sizes must not be empty")
        self.sizes, self.max_size = [int(s) for s in sizes], max_size

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        size = self.sizes[_randint(0, len(self.sizes) - 1)]
        return resize(image, target, size_with_aspect_ratio(_hw(image), size, self.max_size))

    def __repr__(self) -> str:
        return f"RandomResize(sizes={self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crops a random region of width in [min_size, min(W, max_size)] and height in [min_size, min(H, max_size)]
    at a random position (an image smaller than min_size is kept whole along that side)."""

    def __init__(self, min_size: int, max_size: int):
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop: need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = int(min_size), int(max_size)

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        h, w = _hw(image)
        cw = _randint(min(self.min_size, w), min(w, self.max_size))
        ch = _randint(min(self.min_size, h), min(h, self.max_size))
        top, left = _randint(0, h - ch), _randint(0, w - cw)
        return crop(image, target, top, left, ch, cw)

    def __repr__(self) -> str:
        return f"RandomSizeCrop({self.min_size}, {self.max_size})"


class RandomSelect:
    """Applies `a` with probability p, else `b`."""

    def __init__(self, a, b, p: float = 0.5):
        self.a, self.b, self.p = a, b, p

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        return self.a(image, target) if torch.rand(()).item() < self.p else self.b(image, target)

    def __repr__(self) -> str:
        return f"RandomSelect({self.a!r}, {self.b!r}, p={self.p})"


class Normalize:
    """image -> (image - mean) / std per channel; boxes xyxy pixels -> cxcywh normalised by the current (w, h)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"Normalize: mean and std need 3 values (RGB), got {mean!r}, {std!r}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.mean, self.std

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        mean = image.new_tensor(self.mean)[:, None, None]  # [3, 1, 1]
        std = image.new_tensor(self.std)[:, None, None]
        image = (image - mean) / std
        target = dict(target)
        if "boxes" in target:
            h, w = _hw(image)
            b = target["boxes"]  # [N, 4] xyxy pixels
            cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2,
                                  b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=-1)
            target["boxes"] = cxcywh / b.new_tensor([w, h, w, h])
        return image, target

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


# ---- recipes ----
# DETR's crop branch at its 800-px scale: resize to [400, 500, 600], crop 384..600, resize to the train scales.
# Expressed as fractions of the largest train scale so the recipe carries over to small images.
_CROP_RESIZE_FRACTIONS = (0.5, 0.625, 0.75)
_CROP_RANGE_FRACTIONS = (0.48, 0.75)


def train_transforms(normalization, scales: Sequence[int] = (288, 320, 352), max_size: int = 400,
                     crop: bool = True, crop_resize: Sequence[int] | None = None,
                     crop_range: tuple[int, int] | None = None, flip_p: float = 0.5) -> Compose:
    """DETR's training recipe: flip, then (p=0.5) multi-scale resize, or resize -> random crop -> multi-scale resize;
    then Normalize.

    Args:
        normalization: (mean, std), e.g. the backbone's `normalization`.
        scales: shorter-side sizes to pick from (DETR: 480..800 step 32; the default suits ~400-px images).
        max_size: cap on the longer side (DETR: 1333).
        crop: include the crop branch.
        crop_resize / crop_range: the crop branch's pre-resize sizes and (min, max) crop size; None derives them
            from max(scales) with DETR's ratios (400/800, 500/800, 600/800 and 384/800..600/800).
    """
    mean, std = normalization
    scales = [int(s) for s in scales]
    scale_step = RandomResize(scales, max_size=max_size)
    if crop:
        top = max(scales)
        crop_resize = list(crop_resize or [round(f * top) for f in _CROP_RESIZE_FRACTIONS])
        lo, hi = crop_range or tuple(round(f * top) for f in _CROP_RANGE_FRACTIONS)
        scale_step = RandomSelect(scale_step, Compose([RandomResize(crop_resize), RandomSizeCrop(lo, hi),
                                                       RandomResize(scales, max_size=max_size)]))
    return Compose([RandomHorizontalFlip(flip_p), scale_step, Normalize(mean, std)])


def eval_transforms(normalization, size: int = 320, max_size: int | None = 400) -> Compose:
    """Deterministic: shorter side -> size (longer side <= max_size), then Normalize."""
    mean, std = normalization
    return Compose([RandomResize([size], max_size=max_size), Normalize(mean, std)])
