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


def fill_state_dict(keys_and_shapes, dtype: torch.dtype = torch.float64) -> dict:
    return {k: fill_value(k, s, dtype) for k, s in keys_and_shapes}
