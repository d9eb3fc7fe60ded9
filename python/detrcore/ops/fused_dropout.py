"""Dropout on the CPU without a stored mask: one pass over memory instead of torch's three (bernoulli_, div,
mul), and a fused ReLU + dropout for feed-forward blocks.

The keep/drop decision for element i of a call compares a 32-bit draw with p * 2^32: the high (even i) or low
(odd i) half of output i // 2 of a SplitMix64 stream whose seed is drawn from torch's default CPU generator (so
`torch.manual_seed` makes runs repeatable and checkpointed RNG states resume them exactly). The backward
regenerates the mask from the seed; for `relu=True` it needs only the output (out > 0 exactly where the input was
positive and kept). Results do not depend on the thread count.

CPU tensors of float32, float64 and bfloat16 (what CPU autocast produces; computed in float32, rounded once) run
natively. CUDA tensors, and float16 on the CPU, go through torch's own `F.dropout` (one fused kernel on CUDA).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _lib
from ._lib import _C

__all__ = ["dropout"]

_NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _native(t: Tensor) -> Tensor:
    return t.detach().contiguous()


@torch.library.custom_op("detrcore::dropout", mutates_args=(), device_types="cpu")
def _dropout(x: Tensor, seed: Tensor, p: float, relu: bool) -> Tensor:
    x = _native(x)
    out = torch.empty_like(x)
    _C.dropout(x, out, int(seed), p, relu, num_threads=_lib.num_threads())
    return out


@_dropout.register_fake
def _(x, seed, p, relu):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("detrcore::dropout_backward", mutates_args=(), device_types="cpu")
def _dropout_backward(grad: Tensor, seed: Tensor, p: float) -> Tensor:
    grad = _native(grad)
    out = torch.empty_like(grad)
    _C.dropout_backward(grad, out, int(seed), p, num_threads=_lib.num_threads())
    return out


@_dropout_backward.register_fake
def _(grad, seed, p):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


@torch.library.custom_op("detrcore::relu_dropout_backward", mutates_args=(), device_types="cpu")
def _relu_dropout_backward(grad: Tensor, output: Tensor, p: float) -> Tensor:
    grad = _native(grad)
    out = torch.empty_like(grad)
    _C.relu_dropout_backward(grad, _native(output), out, p, num_threads=_lib.num_threads())
    return out


@_relu_dropout_backward.register_fake
def _(grad, output, p):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _register_self_derivative(op) -> None:
    """The backward ops (grad, seed or output, p) are linear in the gradient with the same mask: each is its own
    derivative (double backward; the saved seed / output gets no gradient: the mask is piecewise constant in it)."""

    def setup_context(ctx, inputs, output):
        _, saved, ctx.p = inputs
        ctx.save_for_backward(saved)

    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        return op(grad, saved, ctx.p), None, None

    op.register_autograd(backward, setup_context=setup_context)


_register_self_derivative(_dropout_backward)
_register_self_derivative(_relu_dropout_backward)


def _setup_context(ctx, inputs, output):
    _, seed, ctx.p, ctx.relu = inputs
    ctx.save_for_backward(output if ctx.relu else seed)


def _backward(ctx, grad):
    (saved,) = ctx.saved_tensors
    if ctx.relu:
        return _relu_dropout_backward(grad, saved, ctx.p), None, None, None
    return _dropout_backward(grad, saved, ctx.p), None, None, None


_dropout.register_autograd(_backward, setup_context=_setup_context)


def dropout(input: Tensor, p: float = 0.5, training: bool = True, *, relu: bool = False,
            generator: torch.Generator | None = None) -> Tensor:
    """`F.dropout(input, p, training)`, or `F.dropout(F.relu(input), p, training)` with `relu=True`.

    Kept elements are scaled by 1 / (1 - p). On the CPU in float32/float64/bfloat16 the native kernel runs (seeded
    from `generator`, torch's default CPU generator if None); elsewhere (and under torch.func transforms) torch's
    dropout.
    """
    if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be a number in [0, 1], got {p!r}")
    if not isinstance(input, Tensor):
        raise TypeError(f"dropout: input must be a torch.Tensor, got {type(input).__name__}")
    if not training or p == 0.0:
        return F.relu(input) if relu else input
    if (p == 1.0 or input.device.type != "cpu" or input.dtype not in _NATIVE_DTYPES
            or _lib.under_torch_func()):  # (neither autograd.Function has functorch rules)
        return F.dropout(F.relu(input) if relu else input, p, True)
    seed = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, generator=generator)
    if torch.compiler.is_compiling():
        return _dropout(input, seed, float(p), relu)
    return _EagerDropout.apply(input, seed, float(p), relu)


class _EagerDropout(torch.autograd.Function):
    """The custom op's computation without its dispatch: in eager mode torch.library's custom-op machinery costs
    70-150 us per forward + backward here (0.18 -> 0.10 ms for a [600, 256] dropout), ~5 ms per Deformable DETR
    training step. torch.compile traces the custom op instead (same kernels, same seed, same results)."""

    @staticmethod
    def forward(ctx, x: Tensor, seed: Tensor, p: float, relu: bool) -> Tensor:
        x = _native(x)
        out = torch.empty_like(x)
        _C.dropout(x, out, int(seed), p, relu, num_threads=_lib.num_threads())
        ctx.p, ctx.relu = p, relu
        ctx.save_for_backward(out if relu else seed)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: the custom ops' backward, exactly as the compiled path
            return _backward(ctx, grad)
        (saved,) = ctx.saved_tensors
        grad = _native(grad)
        out = torch.empty_like(grad)
        if ctx.relu:
            _C.relu_dropout_backward(grad, _native(saved), out, ctx.p, num_threads=_lib.num_threads())
        else:
            _C.dropout_backward(grad, out, int(saved), ctx.p, num_threads=_lib.num_threads())
        return out, None, None, None
