"""nn.Linear whose float32 CPU matmuls run through oneDNN or BLAS, whichever this machine runs faster per shape.

torch's CPU `F.linear` in float32 calls the BLAS it was built with (MKL in the PyPI wheels). On an AMD EPYC Zen 4
(AVX-512, 2 threads) MKL's sgemm reaches 130-190 GFLOP/s at the model's shapes ([2660, 256] x [256, 1024] and the
like) where oneDNN's matmul, which torch also ships, reaches 190-220 (the machine's FMA peak is ~230). On a Zen 3 EPYC
(AVX2) the order turns by shape: MKL 5-19 % faster for the decoder's [600, 256] products and the encoder's
feed-forward forward, oneDNN 16-20 % faster for the input gradient through a transposed [256, 1024] weight (timed
inside the training step, alternating). So the forward and the input gradient go through `product`, which times
both backends on a shape's first calls and keeps the faster (see `product`); the weight gradient (a product with the
long axis as its inner dimension) stays a BLAS `mm`, which oneDNN beat on neither machine. Measured gain in a whole
Deformable DETR training step: see the README.

Same parameters, names and results as nn.Linear (checkpoints load unchanged; results equal up to float32 summation
order). Everything else — other dtypes, autocast, CUDA, 1-D inputs, torch.compile, torch.func transforms, a torch
without the oneDNN op, or DETRCORE_ONEDNN_LINEAR=0 in the environment — is `F.linear`.
"""
from __future__ import annotations

import os
import platform
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrcore.ops._lib import eager_fast_path


def _onednn_linear_op():
    """torch's oneDNN linear op, or None: switched off, not an x86-64 CPU (measured there only), a torch without
    the op, or one whose op does not take these arguments or disagrees with F.linear on a small probe."""
    if (os.environ.get("DETRCORE_ONEDNN_LINEAR", "1") == "0" or not torch.backends.mkldnn.is_available()
            or platform.machine().lower() not in ("x86_64", "amd64")):
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise.default
        x, w, b = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(4, 3), torch.arange(4.0)
        if torch.equal(op(x, w, b, "none", [], ""), F.linear(x, w, b)) and torch.equal(
                op(x, w.t().contiguous().t(), None, "none", [], ""), F.linear(x, w)):
            return op
    except (AttributeError, RuntimeError, TypeError):  # a torch built without it, or another signature
        pass
    return None


_ONEDNN = _onednn_linear_op()


def _onednn_linear_add_op():
    """torch's oneDNN linear with a tensor added in the product (`_linear_pointwise.binary`, "add"), or None; probed
    as above."""
    if _ONEDNN is None:
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise.binary
        x, w, acc = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(4, 3), torch.arange(8.0).view(2, 4)
        if torch.equal(op(x, acc, w, None, "add"), F.linear(x, w) + acc):
            return op
    except (AttributeError, RuntimeError, TypeError):  # a torch without it, or another signature
        pass
    return None


_ONEDNN_ADD = _onednn_linear_add_op()


def _mm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias [N]) -> [M, N] by oneDNN; weight may be a strided view."""
    return _ONEDNN(x, weight, bias, "none", [], "")


def _mm_add(x: Tensor, weight: Tensor, acc: Tensor) -> Tensor:
    """acc + x @ weight^T (acc [M, N]), the sum fused into the product where torch's op has its binary form."""
    if _ONEDNN_ADD is None:
        return acc + _mm(x, weight, None)
    return _ONEDNN_ADD(x, acc, weight, None, "add")


# product's backend per shape: "auto" (timed, below), "onednn" or "blas" (DETRCORE_LINEAR_BACKEND in the environment).
BACKEND = os.environ.get("DETRCORE_LINEAR_BACKEND", "auto")
if BACKEND not in ("auto", "onednn", "blas"):
    raise ValueError(f"DETRCORE_LINEAR_BACKEND must be auto, onednn or blas, got {BACKEND!r}")
# Timed calls per backend on a shape class before the choice, after one untimed call each (oneDNN builds its kernels
# on a shape's first call). The fastest of them counts: interference from the host only ever adds time.
TRIALS = 3
_clock = time.perf_counter
_choices: dict[tuple, "_Choice"] = {}


class _Choice:
    """A shape class's timings so far (per backend: 0 oneDNN, 1 BLAS) and, once each has TRIALS, the choice."""

    __slots__ = ("times", "calls", "best")

    def __init__(self):
        self.times, self.calls, self.best = ([], []), 0, None

    def record(self, backend: int, seconds: float) -> None:
        self.calls += 1
        if self.calls > 2:  # the first call of each backend is its warm-up
            self.times[backend].append(seconds)
        if min(len(t) for t in self.times) >= TRIALS:
            self.best = 0 if min(self.times[0]) <= min(self.times[1]) else 1


def _blas(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias)


_BACKENDS = (_mm, _blas)


def product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias [N]) -> [M, N], by oneDNN or BLAS (weight may be a strided view).

    Auto mode (the default): per shape class - M to the next power of two, K, N, bias or none, the weight's layout,
    the thread count - the first calls alternate the two backends, timed, and from then on the one whose fastest
    call was faster computes it (a training step meets each of its products 6-18 times, so the choice is made in
    its first step or two). The two round differently (float32 summation order); with
    torch.use_deterministic_algorithms(True) in effect, or DETRCORE_LINEAR_BACKEND=onednn, oneDNN always."""
    if BACKEND == "blas":
        return _blas(x, weight, bias)
    if BACKEND == "onednn" or torch.are_deterministic_algorithms_enabled():
        return _mm(x, weight, bias)
    key = (x.shape[0].bit_length(), x.shape[1], weight.shape[0], bias is not None, weight.stride(),
           torch.get_num_threads())
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = _Choice()
    if choice.best is not None:
        return _BACKENDS[choice.best](x, weight, bias)
    backend = choice.calls % 2
    start = _clock()
    out = _BACKENDS[backend](x, weight, bias)
    choice.record(backend, _clock() - start)
    return out


def onednn_applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether `linear` takes the oneDNN path for these arguments."""
    return (_ONEDNN is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
            and x.dim() >= 2 and weight.dim() == 2 and x.shape[-1] == weight.shape[1] and x.numel() > 0
            and weight.shape[0] > 0 and not torch.is_autocast_enabled("cpu")
            and eager_fast_path(x))  # not compiled, traced, under a torch.func transform or a dispatch mode


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`: x [..., K], weight [N, K], bias [N] | None -> [..., N]."""
    if not onednn_applies(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _OneDnnLinearFn.apply(x, weight, bias)
    return _forward(x, weight, bias)  # nothing to differentiate: no autograd node


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    return product(x2.contiguous(), weight, bias).view(*x.shape[:-1], weight.shape[0])


# Split-K weight gradients (weight_grad): the regime measured to gain, timed inside the CPU training step (2 threads,
# Zen 4, in one process against `mm`): a long inner dimension of at least this many rows per thread, and at most this
# many output features. [256, 2660] x [2660, 1024]: 53.3 -> 48.5 ms per step, [256, 2660] x [2660, 256]: 38.4 ->
# 35.9, [384, 2660] x [2660, 256]: 18.0 -> 17.3; slower with 1024 outputs (1.03x the time) or 600 rows (1.07-1.13x).
SPLIT_K_MIN_ROWS, SPLIT_K_MAX_OUT = 1024, 512


def weight_grad(g: Tensor, x: Tensor) -> Tensor:
    """g^T x: a linear layer's weight gradient from its output gradient g [M, N] and input x [M, K] -> [N, K].

    With a long M and few outputs (the regime above) as one partial product per thread over its share of the M
    rows (the batches of one `bmm`), summed: faster there than `mm`, which divides the small output between the
    threads instead. Float rounding differs from `mm` by the summation order only; elsewhere (and with
    create_graph) `mm`."""
    M, N = g.shape
    threads = torch.get_num_threads()
    if (threads < 2 or M % threads or M // threads < SPLIT_K_MIN_ROWS or N > SPLIT_K_MAX_OUT or not g.is_contiguous()
            or not x.is_contiguous() or torch.is_grad_enabled()):
        return g.t().mm(x)
    partial = torch.bmm(g.view(threads, M // threads, N).transpose(1, 2), x.view(threads, M // threads, -1))
    # Two partials: one add, the same sum (22 instead of 59 us for [2, 256, 1024]: the reduction zero-fills first).
    return partial[0] + partial[1] if threads == 2 else partial.sum(0)


class _OneDnnLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).contiguous()  # [M, N]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():  # create_graph=True: torch's differentiable product (double backward)
                grad_x = g.mm(weight).view(x.shape)
            else:
                grad_x = product(g, weight.t(), None).view(x.shape)  # [M, N] @ [N, K]
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(g, x.reshape(-1, x.shape[-1]))  # [N, M] @ [M, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """nn.Linear computed by `linear` (oneDNN for float32 on the CPU)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
