"""A PAN neck (top-down then bottom-up fusion) that keeps each level's channel count, so it drops in between a
backbone and the detector's input projections."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class PAN(nn.Module):
    """Path aggregation over backbone levels ordered fine to coarse (strides 8, 16, 32, ...).

    Top-down: p_i = c_i + conv1x1(upsample(p_{i+1})); bottom-up: n_{i+1} = p_{i+1} + conv3x3/2(n_i); each conv is
    followed by ReLU. Output i has input i's channels and size.
    """

    def __init__(self, channels: list[int]):
        super().__init__()
        self.top_down = nn.ModuleList(nn.Conv2d(channels[i + 1], channels[i], 1) for i in range(len(channels) - 1))
        self.bottom_up = nn.ModuleList(nn.Conv2d(channels[i], channels[i + 1], 3, stride=2, padding=1)
                                       for i in range(len(channels) - 1))

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        p = list(feats)
        for i in range(len(p) - 2, -1, -1):
            up = F.interpolate(p[i + 1], size=p[i].shape[-2:], mode="nearest")
            p[i] = p[i] + F.relu(self.top_down[i](up))
        n = [p[0]]
        for i in range(len(p) - 1):
            down = F.relu(self.bottom_up[i](n[i]))
            n.append(p[i + 1] + F.interpolate(down, size=p[i + 1].shape[-2:], mode="nearest"))
        return n
