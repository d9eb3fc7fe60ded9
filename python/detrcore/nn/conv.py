"""nn.Conv2d with faster float32 CPU paths (two of them also in inference) for DETR's backbones and necks.

Winograd: in training, 3x3 convolutions with stride 1, padding 1 and enough channels and positions (every ResNet
bottleneck's middle convolution after the first of a stage, up to a size) run as Winograd convolutions (Lavin &
Gray 2016; `cpp/winograd.h`): native input / output / weight transforms around batched matrix products (torch.bmm).
F(4x4, 3x3) (36 products, 4x fewer multiplies than a direct convolution) where a map has at least 40 4x4 tiles,
else F(2x2, 3x3) (16 products, 2.25x fewer): with few tiles the products' short rows cost more than the multiplies
saved. Forward + backward, 2 threads, Zen 4, direct / F(2x2) / F(4x4), in ms: ResNet-50's layer2 3x3 convolution
at the CPU benchmark's size ([2, 128, 32, 40]) 11.7 / 8.8 / 6.0, layer3 ([2, 256, 16, 20], 40 tiles) 11.6 / 8.4 /
7.6, layer3 at 800 x 1216 ([2, 256, 50, 76]) 130 / 108 / 51. F(2x2)'s constants are 0, +-1 and +-1/2, exact in
floating point; F(4x4)'s reach 8 and 1/24: its float32 rounding error is ~10x that of torch's convolution (rms,
256 channels: relative 2.4e-6; F(2x2)'s 1.6x).
In a forward with nothing to differentiate (inference; frozen layers in training, their BatchNorm folded in by
`detrcore.models.backbone.conv_bn`, the ReLU and residual add fused into the output transform) F(4x4) alone, where
it measured 1.2-2.4x faster than torch's convolution (64 to 256 channels, 128-2560 tiles; WINOGRAD_FORWARD_*).

Unfold: weight-heavy convolutions with few output positions run as unfold + oneDNN matmul. Deformable DETR's extra
feature level is a 3x3 stride-2 convolution from C5 (2048 channels) to 256: a 19 MB weight and, at the CPU
benchmark's size, 40 output positions. torch's oneDNN convolution reorders that weight into its blocked layout on
every call (forward, input gradient) and the weight gradient back out of it, and runs the products at 40-70
GFLOP/s. As a matrix product over the unfolded input ([B*L, Cin*k*k] x [Cin*k*k, Cout], oneDNN's matmul, which
reads the weight as it is) the forward takes 3.4 ms instead of 5.0 and the backward 6.3 instead of 12.

Strided 1x1: a 1x1 convolution with stride s > 1 and no padding (ResNet's downsampling shortcuts) reads only
every s-th row and column, so in training it runs as a stride-1 1x1 convolution over that subsampled input
(copied contiguous), with the input gradient scattered back into zeros. torch's oneDNN kernels for the strided
form are slower, most in the backward; timed inside the CPU benchmark's training step (in one process,
interleaved with torch's convolution): the three shortcuts' forward + backward 37.3 -> 33.5 ms per step.

1x1 weight gradients: in training, a 1x1 stride-1 convolution with at least twice as many input as output channels
(ResNet bottlenecks' first) computes its weight gradient itself, sum_n grad[n] x[n]^T over the images' [channels,
positions] views, as oneDNN matmuls that read the NCHW tensors as they are (the forward and the input gradient stay
torch's). torch's oneDNN convolution backward computes it in its blocked layout and reorders it out, and that
reorder is slow for such weights (1.5 ms for layer4's [512, 2048] one, 2.7 GB/s). Inside the CPU benchmark's
training step (profiled, per step): ResNet-50's [256, 1024], [512, 1024], [512, 2048], [128, 512] and [256, 512] 1x1
convolutions' backward 25.3 -> 22.8, 8.1 -> 6.9, 11.0 -> 8.1, 12.4 -> 11.4 and 15.0 -> 13.9 ms; with fewer input
than output channels the second image's product (its sum fused) costs what the reorder saved. The step 1.004x (in
one process, 60 interleaved rounds: median ratio, trimmed mean and ratio of the minima alike).

Everything else — other shapes and dtypes, autocast, CUDA, groups, dilation, channels-last inputs, torch.compile,
torch.func — is torch's convolution. Same parameters and names as nn.Conv2d.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrcore.ops import _lib
from detrcore.ops._lib import _C, under_torch_func

from . import onednn_linear
from .onednn_linear import _mm, _mm_add

# The regime measured to gain: few output positions (B * Ho * Wo) and a long unfolded row (Cin * kh * kw). ResNet-50
# layer4's 3x3 convolutions (a 4608 row, 160 positions at the CPU benchmark's size) are 1 % slower on the training
# step this way than as oneDNN convolutions (in one process, 15 rounds): they stay convolutions (in training the
# stride-1 ones Winograd F(2x2), below).
MAX_POSITIONS, MIN_ROW = 256, 8192
# Winograd's regime, measured on forward + backward (2 threads): products of at least this many channels each way
# and 2x2 output tiles, and transformed tensors ([16, channels, tiles]) of at most 2**19 * 16 elements (32 MB in
# float32: 1.4-1.6x faster up to there, e.g. layer3 at 800 x 1216; past it, at 62 MB, 0.8-1.0x; Zen 4). Few tiles:
# on a Zen 3 EPYC (AVX2) F(2x2) vs torch's oneDNN convolution at 128 / 256 / 512 channels: 40 tiles (ResNet-50's
# layer4 at the CPU benchmark's size, 2 x 8 x 10) 1.13 / 1.30 / 1.40x, 48-80 tiles 1.18-1.24 / 1.39-1.45 /
# 1.46-1.84x, 20 tiles 0.89 / 0.89 / 1.0x; on a Zen 4 (AVX-512) layer4's 40 tiles measured no faster, not slower.
# Below 40, torch.bmm's small products and the transforms cost more than the multiplies saved. In training only: in
# a forward alone F(2x2) gains too little (0.6-1.4x by shape); F(4x4)'s regime there is below.
WINOGRAD_MIN_CHANNELS, WINOGRAD_MIN_TILES, WINOGRAD_MAX_PLANE = 128, 40, 1 << 19
# F(4x4, 3x3) where a map has at least 40 4x4 tiles (1.5-2.5x faster than direct there, and faster than F(2x2);
# at 35 tiles even with F(2x2), at 20-24 slower than it) and its transformed tensors [36, channels, tiles] stay
# within 2**18 * 36 elements (the largest measured, layer2 at 800 x 1216 at 35 MB, 1.3x faster than direct where
# F(2x2) is 0.74x).
WINOGRAD4_MIN_TILES, WINOGRAD4_MAX_PLANE = 40, 1 << 18
# A forward with nothing to differentiate (inference, frozen layers): F(4x4, 3x3) alone (F(2x2) gains too little
# there), with 64 to 256 channels, 128 to 2560 4x4 tiles and transformed tensors of at most 2**18 * 36 elements.
# Measured (2 threads, Zen 4, 1 or 2 images, the weight transformed on every call, ReLU fused; torch's oneDNN
# convolution with its bias and ReLU fused / F(4x4)): 1.26-1.55x with 64 channels from 160 to 2560 tiles (2 x 32 x
# 40 .. 2 x 128 x 160, 1 x 150 x 228); 1.17-1.45x at 2 x 128 x 32 x 40, 1.8-1.9x at 128 channels and 640-1900 tiles
# (up to 2 x 100 x 152); 1.4x at 2 x 256 x 24 x 32, 1.6-2.4x at 256 channels and 160-640 tiles. Slower: 40-60 tiles
# (0.67-1.07x), 64 channels at 3800-7600 tiles (1 x 200 x 304 .. 2 x 200 x 304: 0.6-0.85x, the transforms then
# memory-bound) and 512 channels (0.7-1.5x by run: a 38 MB transformed weight).
WINOGRAD_FORWARD_CHANNELS, WINOGRAD_FORWARD_TILES = (64, 256), (128, 2560)
# 1x1 convolutions whose weight gradient `_PointwiseConv` computes: in_channels >= this many times out_channels.
POINTWISE_MIN_RATIO = 2


def _output_size(h: int, w: int, kernel, stride, padding, dilation=(1, 1)) -> tuple[int, int]:
    """(Ho, Wo) of a convolution."""
    return ((h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1,
            (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1)


def _winograd_tiles(n: int, h: int, w: int, tile: int = 2) -> int:
    """The number of tile x tile output tiles of n images of h x w (the transformed tensors' last dimension)."""
    return n * -(-h // tile) * -(-w // tile)


class Conv2d(nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        training = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                                or (b is not None and b.requires_grad))
        tile = self._winograd_tile(x, training)
        if tile and training:
            return _WinogradConv.apply(x, w, b, tile)
        if tile:  # nothing to differentiate
            return _winograd_forward(x, w, b, tile)[0]
        if training and self._pointwise_applies(x):
            return _PointwiseConv.apply(x, w, b)
        if training and self._strided_1x1_applies(x):
            return F.conv2d(_Subsample.apply(x, self.stride), w, b)
        if not self._unfold_applies(x):
            return super().forward(x)
        if training:
            return _UnfoldConv.apply(x, w, b, self.stride, self.padding)
        with torch.no_grad():
            return _UnfoldConv.forward(None, x, w, b, self.stride, self.padding)

    def _cpu_fp32_eager(self, x: Tensor) -> bool:
        return (x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and (self.bias is None or self.bias.dtype == torch.float32)
                and self.groups == 1 and self.dilation == (1, 1) and self.padding_mode == "zeros"
                and not isinstance(self.padding, str) and x.shape[1] == self.in_channels
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
                and not under_torch_func())  # torch.func: torch's convolution

    def _winograd_tile(self, x: Tensor, training: bool = True) -> int:
        """The Winograd output tile (4 or 2) this convolution takes for x in training, or (training=False) in a
        forward with nothing to differentiate; 0: none."""
        if not (self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self._cpu_fp32_eager(x) and x.is_contiguous() and self.weight.is_contiguous()):
            return 0
        n, _, h, w = x.shape
        fewest, channels = sorted((self.in_channels, self.out_channels))
        tiles4 = _winograd_tiles(n, h, w, 4)
        if not training:
            return 4 if (WINOGRAD_FORWARD_CHANNELS[0] <= fewest and channels <= WINOGRAD_FORWARD_CHANNELS[1]
                         and WINOGRAD_FORWARD_TILES[0] <= tiles4 <= WINOGRAD_FORWARD_TILES[1]
                         and tiles4 * channels <= WINOGRAD4_MAX_PLANE) else 0
        if fewest < WINOGRAD_MIN_CHANNELS:
            return 0
        if tiles4 >= WINOGRAD4_MIN_TILES and tiles4 * channels <= WINOGRAD4_MAX_PLANE:
            return 4
        tiles = _winograd_tiles(n, h, w)
        return 2 if WINOGRAD_MIN_TILES <= tiles and tiles * channels <= WINOGRAD_MAX_PLANE else 0

    def _pointwise_applies(self, x: Tensor) -> bool:
        """A 1x1 stride-1 convolution whose weight gradient `_PointwiseConv` computes."""
        return (onednn_linear._ONEDNN is not None and self.kernel_size == (1, 1) and self.padding == (0, 0)
                and self.stride == (1, 1) and self.in_channels >= POINTWISE_MIN_RATIO * self.out_channels
                and self._cpu_fp32_eager(x) and x.is_contiguous() and self.weight.is_contiguous())

    def _strided_1x1_applies(self, x: Tensor) -> bool:
        return (self.kernel_size == (1, 1) and self.stride != (1, 1) and self.padding == (0, 0)
                and self._cpu_fp32_eager(x))

    def _unfold_applies(self, x: Tensor) -> bool:
        if onednn_linear._ONEDNN is None or not self._cpu_fp32_eager(x):
            return False
        kh, kw = self.kernel_size
        ho, wo = _output_size(x.shape[2], x.shape[3], self.kernel_size, self.stride, self.padding)
        return ho > 0 and wo > 0 and x.shape[0] * ho * wo <= MAX_POSITIONS and self.in_channels * kh * kw >= MIN_ROW


class _UnfoldConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding) -> Tensor:
        B, _, H, W = x.shape
        cout, kh, kw = weight.shape[0], weight.shape[2], weight.shape[3]
        ho, wo = _output_size(H, W, (kh, kw), stride, padding)
        cols = F.unfold(x.detach(), (kh, kw), padding=padding, stride=stride)  # [B, Cin*kh*kw, L]
        rows = cols.transpose(1, 2).reshape(B * ho * wo, -1)  # [B*L, Cin*kh*kw], contiguous
        out = _mm(rows, weight.detach().reshape(cout, -1), None if bias is None else bias.detach())  # [B*L, Cout]
        if ctx is not None:
            ctx.save_for_backward(x, weight, bias, rows)
            ctx.geometry = (B, H, W, ho, wo, stride, padding)
            ctx.has_bias = bias is not None
        return out.view(B, ho * wo, cout).transpose(1, 2).reshape(B, cout, ho, wo)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, bias, rows = ctx.saved_tensors
        B, H, W, ho, wo, stride, padding = ctx.geometry
        cout, kh, kw = weight.shape[0], weight.shape[2], weight.shape[3]
        if torch.is_grad_enabled():  # create_graph=True: torch's differentiable convolution, differentiated
            return *_conv_grads_differentiably(x, weight, bias, grad, ctx.needs_input_grad, stride, padding), None, None
        g = grad.flatten(2).transpose(1, 2).reshape(B * ho * wo, cout)  # [B*L, Cout]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            d_rows = _mm(g, weight.detach().reshape(cout, -1).t(), None)  # [B*L, Cin*kh*kw]
            grad_x = F.fold(d_rows.view(B, ho * wo, -1).transpose(1, 2), (H, W), (kh, kw), padding=padding,
                            stride=stride)
        if ctx.needs_input_grad[1]:
            grad_w = _mm(g.t().contiguous(), rows.t(), None).view(weight.shape)  # [Cout, B*L] x [B*L, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None, None


class _PointwiseConv(torch.autograd.Function):
    """F.conv2d(x, weight, bias) of a 1x1 stride-1 convolution (x contiguous NCHW); the backward's weight gradient
    as oneDNN matmuls over [C, H*W] views (see the module's docstring), its input gradient torch's."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        return F.conv2d(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, bias = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: torch's differentiable convolution, differentiated
            return _conv_grads_differentiably(x, weight, bias, grad, ctx.needs_input_grad, (1, 1), (0, 0))
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [0, 0], [1, 1], False,
                                                         [0, 0], 1, [True, False, False])[0]
        if need_w:
            n, k = grad.shape[:2]
            g, xs = grad.view(n, k, -1), x.view(n, x.shape[1], -1)  # [N, K, HW], [N, C, HW]
            grad_w = _mm(g[0], xs[0], None)  # grad[0] [K, HW] @ x[0]^T -> [K, C]
            for i in range(1, n):
                grad_w = _mm_add(g[i], xs[i], grad_w)
            grad_w = grad_w.view(weight.shape)
        if bias is not None and need_b:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


class _Subsample(torch.autograd.Function):
    """x[:, :, ::sh, ::sw], contiguous; the backward scatters the gradient into zeros of x's shape in one pass
    (autograd's two slice backwards would build two zero tensors)."""

    @staticmethod
    def forward(ctx, x: Tensor, stride) -> Tensor:
        ctx.shape, ctx.stride = x.shape, stride
        return x[:, :, :: stride[0], :: stride[1]].contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        sh, sw = ctx.stride
        grad_x = grad.new_zeros(ctx.shape)
        grad_x[:, :, ::sh, ::sw] = grad  # differentiable: create_graph works too
        return grad_x, None


def _winograd_forward(x: Tensor, weight: Tensor, bias: Tensor | None, tile: int, residual: Tensor | None = None,
                      relu: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """y = conv2d(x, weight, bias, padding=1) through Winograd F(tile x tile, 3x3), then + residual and ReLU if
    given (fused into the output transform); also the transformed weight U [P, K, C] and input V [P, C, T] the
    backward multiplies with (P = (tile + 2)**2). x, weight, residual: contiguous, not to be differentiated."""
    n, c, h, w = x.shape
    k, threads, points = weight.shape[0], _lib.num_threads(), (tile + 2) ** 2
    u = x.new_empty(points, k, c)
    _C.winograd_weight(weight, u, num_threads=threads, tile=tile)
    v = x.new_empty(points, c, _winograd_tiles(n, h, w, tile))
    _C.winograd_input(x, v, num_threads=threads, tile=tile)
    y = x.new_empty(n, k, h, w)
    _C.winograd_output(torch.bmm(u, v), bias, y, num_threads=threads, tile=tile, residual=residual, relu=relu)
    return y, u, v


class _WinogradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, tile: int = 2) -> Tensor:
        y, u, v = _winograd_forward(x.detach(), weight.detach(), None if bias is None else bias.detach(), tile)
        ctx.save_for_backward(x, weight, bias, u, v)
        ctx.tile = tile
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, bias, u, v = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: torch's differentiable convolution, differentiated
            return *_conv_grads_differentiably(x, weight, bias, grad, ctx.needs_input_grad, (1, 1), (1, 1)), None
        threads, tile = _lib.num_threads(), ctx.tile
        grad = grad.contiguous()
        grad_m = grad.new_empty(u.shape[0], u.shape[1], v.shape[2])
        _C.winograd_output_adjoint(grad, grad_m, num_threads=threads, tile=tile)
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = torch.empty_like(x)
            _C.winograd_input_adjoint(torch.bmm(u.transpose(1, 2), grad_m), grad_x, num_threads=threads, tile=tile)
        if need_w:
            grad_w = torch.empty_like(weight)
            _C.winograd_weight_adjoint(torch.bmm(grad_m, v.transpose(1, 2)), grad_w, num_threads=threads, tile=tile)
        if bias is not None and need_b:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


def _conv_grads_differentiably(x, weight, bias, grad, needs_input_grad, stride, padding) -> tuple:
    """(grad_x, grad_weight, grad_bias) of F.conv2d through torch's own differentiable ops (double backward)."""
    inputs = (x, weight, bias)
    needs = [need and t is not None for t, need in zip(inputs, needs_input_grad[:3])]
    return _lib.create_graph_grads(F.conv2d(x, weight, bias, stride, padding), inputs, needs, grad)
