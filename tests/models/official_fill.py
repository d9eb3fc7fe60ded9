"""The deterministic weights of the parity fixtures: every tensor of an official state dict is filled from a
generator seeded by its key name, so a fixture stores only key names and shapes, never weights.

Used both by tests/fixtures/make_official_fixtures.py (which runs the official code once) and by the parity tests.
"""
from __future__ import annotations

import math
import zlib

import torch


def fill_value(key: str, shape, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The value of state-dict entry `key` with `shape`.

    BatchNorm statistics: running_mean 0, running_var 1 (num_batches_tracked 0); BatchNorm/LayerNorm/GroupNorm
    scales 1 + N(0, 0.1); other 1-D tensors (biases, embeddings of one row) N(0, 0.1); the rest N(0, 1/fan_in)
    with fan_in = prod(shape[1:]) (He-like scale keeps a 50-layer ResNet's activations finite).
    """
    shape = tuple(int(s) for s in shape)
    if key.endswith("running_mean") or key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64 if key.endswith("num_batches_tracked") else dtype)
    if key.endswith("running_var"):
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if len(shape) <= 1:
        leaf = key.rsplit(".", 1)[-1]
        is_norm_scale = leaf == "weight" and any(n in key for n in ("bn", "norm", "downsample.1", ".1.weight"))
        x = 1.0 + 0.1 * x if is_norm_scale else 0.1 * x
    else:
        fan_in = math.prod(shape[1:])
        x = x * math.sqrt(2.0 / fan_in)
    return x.to(dtype)


def official_input():
    """The parity input: two float32 images, the second padded bottom-right (64x96 inside 96x128, so even the
    stride-32 level of a ResNet-50 has padding). Returns ([img0, img1], images [2, 3, 96, 128], mask [2, 96, 128]
    True on padding)."""
    g = torch.Generator().manual_seed(0)
    img0 = torch.randn(3, 96, 128, generator=g, dtype=torch.float32)
    img1 = torch.randn(3, 64, 96, generator=g, dtype=torch.float32)
    images = torch.zeros(2, 3, 96, 128, dtype=torch.float32)
    images[0] = img0
    images[1, :, :64, :96] = img1
    mask = torch.ones(2, 96, 128, dtype=torch.bool)
    mask[0] = False
    mask[1, :64, :96] = False
    return [img0, img1], images, mask
