"""nn.Conv2d whose weight-heavy, small-output float32 CPU convolutions run as unfold + oneDNN matmul.

Deformable DETR's extra feature level is a 3x3 stride-2 convolution from C5 (2048 channels) to 256: a 19 MB weight
and, at the CPU benchmark's size, 40 output positions. torch's oneDNN convolution reorders that weight into its
blocked layout on every call (forward, input gradient) and the weight gradient back out of it, and runs the
products at 40-70 GFLOP/s. As a matrix product over the unfolded input ([B*L, Cin*k*k] x [Cin*k*k, Cout], oneDNN's
matmul, which reads the weight as it is) the forward takes 3.4 ms instead of 5.0 and the backward 6.3 instead of 12
(2 threads, Zen 4). Everything else — larger outputs, light weights, other dtypes, autocast, CUDA, groups,
dilation, torch.compile — is torch's convolution. Same parameters and names as nn.Conv2d.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrcore.ops._lib import under_torch_func

from . import onednn_linear
from .onednn_linear import _mm

# The regime measured to gain: few output positions (B * Ho * Wo) and a long unfolded row (Cin * kh * kw).
MAX_POSITIONS, MIN_ROW = 256, 4096


class Conv2d(nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        if not self._unfold_applies(x):
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                        or (self.bias is not None and self.bias.requires_grad)):
            return _UnfoldConv.apply(x, self.weight, self.bias, self.stride, self.padding)
        with torch.no_grad():
            return _UnfoldConv.forward(None, x, self.weight, self.bias, self.stride, self.padding)

    def _unfold_applies(self, x: Tensor) -> bool:
        if (onednn_linear._ONEDNN is None or x.dim() != 4 or x.device.type != "cpu" or x.dtype != torch.float32
                or self.weight.dtype != torch.float32 or (self.bias is not None and self.bias.dtype != torch.float32)
                or self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros"
                or isinstance(self.padding, str) or x.shape[1] != self.in_channels
                or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()
                or under_torch_func()):  # torch.func: torch's convolution
            return False
        kh, kw = self.kernel_size
        ho = (x.shape[2] + 2 * self.padding[0] - kh) // self.stride[0] + 1
        wo = (x.shape[3] + 2 * self.padding[1] - kw) // self.stride[1] + 1
        return ho > 0 and wo > 0 and x.shape[0] * ho * wo <= MAX_POSITIONS and self.in_channels * kh * kw >= MIN_ROW


class _UnfoldConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding) -> Tensor:
        B, _, H, W = x.shape
        cout, kh, kw = weight.shape[0], weight.shape[2], weight.shape[3]
        ho, wo = (H + 2 * padding[0] - kh) // stride[0] + 1, (W + 2 * padding[1] - kw) // stride[1] + 1
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
            inputs = [x, weight, bias]
            wanted = [t for t, need in zip(inputs, ctx.needs_input_grad) if need and t is not None]
            grads = iter(torch.autograd.grad(F.conv2d(x, weight, bias, stride, padding), wanted, grad,
                                             create_graph=True))
            return (*(next(grads) if need and t is not None else None
                      for t, need in zip(inputs, ctx.needs_input_grad)), None, None)
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
