"""A post-norm transformer's residual step, `norm(x + dropout(a))`, as one autograd node on the CPU.

In training on the CPU (float32 / float64, native dropout) the dropout and the residual sum are one pass of
detrcore's kernel (`_C.dropout_add`: the dropped term is never written out) and the layer norm is torch's, all in one
autograd.Function: the forward makes two passes over [tokens, C] instead of three, and the engine runs one node
instead of three (dropout, add, norm). Same dropout draw as `Dropout` (same mask from the same generator state), same
values and gradients bit for bit as the three modules; everything else - eval, p = 0, other dtypes, autocast, CUDA,
torch.compile, torch.func, a norm other than an affine nn.LayerNorm over the last dimension - is the three modules.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrcore.ops import _lib
from detrcore.ops._lib import _C

from .dropout import Dropout


def dropout_add_norm(x: Tensor, a: Tensor, dropout: Dropout, norm: nn.LayerNorm) -> Tensor:
    """`norm(x + dropout(a))`: x the residual stream, a the sublayer's output, both [..., C]."""
    p = dropout.p
    if (dropout.training and 0.0 < p < 1.0 and not dropout.relu and torch.is_grad_enabled()
            and type(norm) is nn.LayerNorm and norm.weight is not None and norm.bias is not None
            and norm.normalized_shape == (x.shape[-1],) and x.shape == a.shape and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and a.dtype == x.dtype and norm.weight.dtype == x.dtype
            and norm.bias.dtype == x.dtype and x.numel() > 0 and not torch.is_autocast_enabled("cpu")
            and _lib.eager_fast_path(x, a)):
        # The seed as detrcore.ops.dropout draws it: the same mask as the modules from the same RNG state.
        seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
        return _DropoutAddNorm.apply(x, a, norm.weight, norm.bias, seed, float(p), norm.eps)
    return norm(x + dropout(a))


class _DropoutAddNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, weight: Tensor, bias: Tensor, seed: int, p: float, eps: float) -> Tensor:
        xd, ad = x.detach().contiguous(), a.detach().contiguous()
        s = torch.empty_like(xd)
        _C.dropout_add(ad, xd, s, seed, p, num_threads=_lib.num_threads())
        y, mean, rstd = torch.native_layer_norm(s, (s.shape[-1],), weight.detach(), bias.detach(), eps)
        ctx.save_for_backward(x, a, weight, bias, s, mean, rstd)
        ctx.seed, ctx.p, ctx.eps = seed, p, eps
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, a, weight, bias, s, mean, rstd = ctx.saved_tensors
        need_x, need_a, need_w, need_b = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # create_graph=True: through torch's differentiable ops, with the same mask
            return _differentiable_grads(ctx, grad)
        grad_s, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
            grad.contiguous(), s, (s.shape[-1],), mean, rstd, weight.detach(), bias.detach(),
            [need_x or need_a, need_w, need_b])
        grad_a = None
        if need_a:
            grad_a = torch.empty_like(grad_s)
            _C.dropout_backward(grad_s, grad_a, ctx.seed, ctx.p, num_threads=_lib.num_threads())
        return grad_s if need_x else None, grad_a, grad_w, grad_b, None, None, None


def _differentiable_grads(ctx, grad: Tensor) -> tuple:
    """The gradients through torch's ops on the saved inputs (themselves differentiable): the forward recomputed with
    its mask, regenerated from the seed (kept elements scaled by 1 / (1 - p), the others 0)."""
    x, a, weight, bias = ctx.saved_tensors[:4]
    kept = torch.empty_like(a.detach())
    _C.dropout(torch.ones_like(kept), kept, ctx.seed, ctx.p, False, num_threads=_lib.num_threads())
    y = F.layer_norm(x + a * kept, (x.shape[-1],), weight, bias, ctx.eps)
    return _lib.create_graph_grads(y, (x, a, weight, bias), ctx.needs_input_grad[:4], grad) + (None, None, None)
