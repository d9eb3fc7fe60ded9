"""Batching images of different sizes: zero-pad to a common size and return the padding mask.

Contract of `collate(batch)`, batch = [(image Tensor[3, H_i, W_i], target dict), ...]:
    images: Tensor[B, 3, Hmax, Wmax], each image at the top-left, zeros bottom-right
    mask:   bool Tensor[B, Hmax, Wmax], True on padding (DETR's convention: True = not a pixel)
    targets: list of the B target dicts, unchanged
`size_divisibility` (default 1 = pad only to the largest image, as DETR does) rounds Hmax and Wmax up to a
multiple: 32 keeps every backbone stride's feature map aligned and gives fewer distinct shapes (helps
cudnn.benchmark / torch.compile) at the cost of more padding. Use
`functools.partial(collate, size_divisibility=32)` as a DataLoader collate_fn (picklable for workers).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["collate", "pad_images"]


def pad_images(images: Sequence[Tensor], size_divisibility: int = 1) -> tuple[Tensor, Tensor]:
    """Pads [C, H_i, W_i] tensors into (Tensor[B, C, Hmax, Wmax], mask bool Tensor[B, Hmax, Wmax])."""
    if not images:
        raise ValueError("pad_images: empty batch")
    if size_divisibility < 1:
        raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
    c = images[0].shape[0]
    for i, im in enumerate(images):
        if im.dim() != 3 or im.shape[0] != c:
            raise ValueError(f"images[{i}] has shape {tuple(im.shape)}; expected [{c}, H, W] like images[0]")
    hmax = max(int(im.shape[1]) for im in images)
    wmax = max(int(im.shape[2]) for im in images)
    d = size_divisibility
    hmax, wmax = (hmax + d - 1) // d * d, (wmax + d - 1) // d * d
    out = images[0].new_zeros(len(images), c, hmax, wmax)  # [B, C, Hmax, Wmax]
    mask = torch.ones(len(images), hmax, wmax, dtype=torch.bool, device=images[0].device)  # [B, Hmax, Wmax]
    for i, im in enumerate(images):
        h, w = im.shape[1:]
        out[i, :, :h, :w] = im
        mask[i, :h, :w] = False
    return out, mask


def collate(batch: Sequence[tuple[Tensor, dict]], size_divisibility: int = 1) -> tuple[Tensor, Tensor, list]:
    """[(image, target)] -> (images [B,3,Hmax,Wmax], mask [B,Hmax,Wmax] True on padding, [target])."""
    if not batch:
        raise ValueError("collate: empty batch")
    images, targets = zip(*batch)
    padded, mask = pad_images(images, size_divisibility)
    return padded, mask, list(targets)
