"""Box ops as PyTorch custom ops over the native kernels (CPU: float32/float64; CUDA: float16, bfloat16,
float32, float64 with float32 accumulation). Each op has a fake impl (torch.compile, meta tensors) and a
native backward, and a readable twin in `reference.py`.

Boxes are `[..., 4]`, either (x0, y0, x1, y1) "xyxy" or (cx, cy, w, h) "cxcywh". Definitions, including the
degenerate cases (each is exact where the usual formula is defined, and finite everywhere):

- area(box) = max(x1 - x0, 0) * max(y1 - y0, 0): an inverted box (x1 < x0 or y1 < y0) is empty.
- IoU = inter / union, and 0 when union == 0 (two empty boxes do not overlap).
- GIoU = IoU - (C - union) / C with C the area of the smallest enclosing box, and GIoU = IoU when C == 0.
  So GIoU of an empty box with anything that does not cover it is IoU - 1 + union / C, in [-1, 1].
- inverse_sigmoid(x, eps) = log(max(c, eps) / max(1 - c, eps)), c = clamp(x, 0, 1): finite for every x.
Gradients follow PyTorch's conventions for the same expressions written with clamp/minimum/maximum (a clamp
at its bound passes the gradient; a min/max tie splits it in half).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _lib, reference
from ._lib import _C

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_iou",
    "generalized_box_iou",
    "generalized_box_iou_loss",
    "inverse_sigmoid",
]

_CXCYWH_TO_XYXY, _XYXY_TO_CXCYWH = 0, 1
_TRANSPOSE = {0: 2, 1: 3, 2: 0, 3: 1}  # kind -> the kind that applies its transposed (gradient) map


def _native(t: Tensor) -> Tensor:
    # detach(): Tensor.__dlpack__ refuses tensors that require grad; contiguous(): the kernels' layout.
    return t.detach().contiguous()


def _run(fn, *tensors: Tensor, **kwargs) -> None:
    ref = tensors[0]
    if ref.is_cuda:
        with torch.cuda.device(ref.device):
            fn(*tensors, **kwargs, stream=_lib.stream_of(ref))
    else:
        fn(*tensors, **kwargs, num_threads=_lib.num_threads())


# ---------------------------------------------------------------------------------------------------------
# Conversions: a linear map per box, its own transpose for the backward.
@torch.library.custom_op("detrcore::box_map", mutates_args=(), device_types=("cpu", "cuda"))
def _box_map(boxes: Tensor, kind: int) -> Tensor:
    x = _native(boxes)
    out = x.new_empty(x.shape)
    _run(_C.box_map, x, out, kind=kind)
    return out


@_box_map.register_fake
def _(boxes, kind):
    return boxes.new_empty(boxes.shape)


def _box_map_setup(ctx, inputs, output):
    ctx.kind = inputs[1]


def _box_map_backward(ctx, grad):
    return _box_map(grad, _TRANSPOSE[ctx.kind]), None


_box_map.register_autograd(_box_map_backward, setup_context=_box_map_setup)


# ---------------------------------------------------------------------------------------------------------
# Pairwise IoU / GIoU: boxes1 [B, N, 4], boxes2 [B, M, 4] -> [B, N, M].
@torch.library.custom_op("detrcore::box_pairwise", mutates_args=(), device_types=("cpu", "cuda"))
def _box_pairwise(boxes1: Tensor, boxes2: Tensor, giou: bool) -> Tensor:
    a, b = _native(boxes1), _native(boxes2)
    out = a.new_empty((a.shape[0], a.shape[1], b.shape[1]))
    _run(_C.box_pairwise, a, b, out, giou=giou)
    return out


@_box_pairwise.register_fake
def _(boxes1, boxes2, giou):
    return boxes1.new_empty((boxes1.shape[0], boxes1.shape[1], boxes2.shape[1]))


@torch.library.custom_op("detrcore::box_pairwise_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _box_pairwise_backward(grad: Tensor, boxes1: Tensor, boxes2: Tensor, giou: bool) -> tuple[Tensor, Tensor]:
    g, a, b = _native(grad), _native(boxes1), _native(boxes2)
    ga, gb = a.new_empty(a.shape), b.new_empty(b.shape)
    _run(_C.box_pairwise_backward, g, a, b, ga, gb, giou=giou)
    return ga, gb


@_box_pairwise_backward.register_fake
def _(grad, boxes1, boxes2, giou):
    return boxes1.new_empty(boxes1.shape), boxes2.new_empty(boxes2.shape)


def _pairwise_setup(ctx, inputs, output):
    boxes1, boxes2, giou = inputs
    ctx.save_for_backward(boxes1, boxes2)
    ctx.giou = giou


def _pairwise_backward(ctx, grad):
    boxes1, boxes2 = ctx.saved_tensors
    ga, gb = _box_pairwise_backward(grad, boxes1, boxes2, ctx.giou)
    return ga, gb, None


_box_pairwise.register_autograd(_pairwise_backward, setup_context=_pairwise_setup)


# ---------------------------------------------------------------------------------------------------------
# Paired GIoU loss: boxes1 [N, 4], boxes2 [N, 4] -> [N] = 1 - GIoU(boxes1[i], boxes2[i]).
@torch.library.custom_op("detrcore::giou_loss", mutates_args=(), device_types=("cpu", "cuda"))
def _giou_loss(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    a, b = _native(boxes1), _native(boxes2)
    out = a.new_empty(a.shape[:1])
    _run(_C.giou_loss, a, b, out)
    return out


@_giou_loss.register_fake
def _(boxes1, boxes2):
    return boxes1.new_empty(boxes1.shape[:1])


@torch.library.custom_op("detrcore::giou_loss_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _giou_loss_backward(grad: Tensor, boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    g, a, b = _native(grad), _native(boxes1), _native(boxes2)
    ga, gb = a.new_empty(a.shape), b.new_empty(b.shape)
    _run(_C.giou_loss_backward, g, a, b, ga, gb)
    return ga, gb


@_giou_loss_backward.register_fake
def _(grad, boxes1, boxes2):
    return boxes1.new_empty(boxes1.shape), boxes2.new_empty(boxes2.shape)


def _giou_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _giou_loss_bwd(ctx, grad):
    boxes1, boxes2 = ctx.saved_tensors
    return _giou_loss_backward(grad, boxes1, boxes2)


_giou_loss.register_autograd(_giou_loss_bwd, setup_context=_giou_loss_setup)


# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("detrcore::inverse_sigmoid", mutates_args=(), device_types=("cpu", "cuda"))
def _inverse_sigmoid(x: Tensor, eps: float) -> Tensor:
    xc = _native(x)
    out = xc.new_empty(xc.shape)
    _run(_C.inverse_sigmoid, xc, out, eps=eps)
    return out


@_inverse_sigmoid.register_fake
def _(x, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("detrcore::inverse_sigmoid_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _inverse_sigmoid_backward(grad: Tensor, x: Tensor, eps: float) -> Tensor:
    g, xc = _native(grad), _native(x)
    gx = xc.new_empty(xc.shape)
    _run(_C.inverse_sigmoid_backward, g, xc, gx, eps=eps)
    return gx


@_inverse_sigmoid_backward.register_fake
def _(grad, x, eps):
    return x.new_empty(x.shape)


def _inverse_sigmoid_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.eps = inputs[1]


def _inverse_sigmoid_bwd(ctx, grad):
    (x,) = ctx.saved_tensors
    return _inverse_sigmoid_backward(grad, x, ctx.eps), None


_inverse_sigmoid.register_autograd(_inverse_sigmoid_bwd, setup_context=_inverse_sigmoid_setup)


# ---------------------------------------------------------------------------------------------------------
# Public API: argument checks with named errors, dtype handling, shape bookkeeping.
def _check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be on the CPU or a CUDA device, got {t.device}")


def _check_boxes(t, name: str) -> None:
    _check_tensor(t, name)
    if t.dim() < 1 or t.shape[-1] != 4:
        raise ValueError(f"{name} must have boxes in its last dimension ([..., 4]), got shape {tuple(t.shape)}")


def _compute_dtype(*ts: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the result, dtype the kernel runs in): the CPU kernels run float32/float64 only."""
    dtype = ts[0].dtype
    for t in ts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if ts[0].device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return dtype, torch.float32
    return dtype, dtype


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _same_device(a: Tensor, b: Tensor, an: str, bn: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{an} and {bn} must be on the same device, got {a.device} and {b.device}")


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(cx, cy, w, h) -> (x0, y0, x1, y1) for boxes `[..., 4]`; negative sizes pass through unchanged."""
    _check_boxes(boxes, "boxes")
    if _lib.under_torch_func():
        return reference.box_cxcywh_to_xyxy(boxes)
    dtype, run = _compute_dtype(boxes)
    return _cast(_box_map(_cast(boxes, run), _CXCYWH_TO_XYXY), dtype)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(x0, y0, x1, y1) -> (cx, cy, w, h) for boxes `[..., 4]`; inverted boxes give negative sizes."""
    _check_boxes(boxes, "boxes")
    if _lib.under_torch_func():
        return reference.box_xyxy_to_cxcywh(boxes)
    dtype, run = _compute_dtype(boxes)
    return _cast(_box_map(_cast(boxes, run), _XYXY_TO_CXCYWH), dtype)


def _pairwise(boxes1: Tensor, boxes2: Tensor, giou: bool) -> Tensor:
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    _same_device(boxes1, boxes2, "boxes1", "boxes2")
    if boxes1.dim() < 2 or boxes2.dim() < 2 or boxes1.shape[:-2] != boxes2.shape[:-2]:
        raise ValueError(
            "boxes1 and boxes2 must be [N, 4] and [M, 4], or batches [..., N, 4] and [..., M, 4] with the same "
            f"leading dimensions; got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    if _lib.under_torch_func():
        return (reference.generalized_box_iou if giou else reference.box_iou)(boxes1, boxes2)
    dtype, run = _compute_dtype(boxes1, boxes2)
    lead, n, m = boxes1.shape[:-2], boxes1.shape[-2], boxes2.shape[-2]
    if not lead:  # the common case: one image
        return _cast(_box_pairwise(_cast(boxes1, run)[None], _cast(boxes2, run)[None], giou)[0], dtype)  # [N, M]
    batch = math.prod(lead)
    a = _cast(boxes1, run).reshape(batch, n, 4)  # [B, N, 4]
    b = _cast(boxes2, run).reshape(batch, m, 4)  # [B, M, 4]
    return _cast(_box_pairwise(a, b, giou).reshape(*lead, n, m), dtype)  # [..., N, M]


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of xyxy boxes: `[N, 4] x [M, 4] -> [N, M]` (or batched `[..., N, 4] x [..., M, 4]`)."""
    return _pairwise(boxes1, boxes2, False)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise GIoU of xyxy boxes: `[N, 4] x [M, 4] -> [N, M]` (or batched), values in [-1, 1]."""
    return _pairwise(boxes1, boxes2, True)


def generalized_box_iou_loss(boxes1: Tensor, boxes2: Tensor, reduction: str = "none") -> Tensor:
    """Paired GIoU loss `1 - GIoU(boxes1[i], boxes2[i])` of xyxy boxes `[N, 4]`, in O(N).

    reduction: "none" -> `[N]`, "mean" -> scalar (0-size input gives NaN, like torch.mean), "sum" -> scalar.
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f'reduction must be "none", "mean" or "sum", got {reduction!r}')
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    _same_device(boxes1, boxes2, "boxes1", "boxes2")
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"boxes1 and boxes2 must have the same shape [..., 4], got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    if _lib.under_torch_func():
        return reference.generalized_box_iou_loss(boxes1, boxes2, reduction)
    dtype, run = _compute_dtype(boxes1, boxes2)
    lead = boxes1.shape[:-1]
    a, b = _cast(boxes1, run).reshape(-1, 4), _cast(boxes2, run).reshape(-1, 4)  # [N, 4]
    loss = _cast(_giou_loss(a, b).reshape(lead), dtype)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """`log(max(c, eps) / max(1 - c, eps))` with `c = clamp(x, 0, 1)`: the inverse of sigmoid, finite everywhere."""
    _check_tensor(x, "x")
    eps = float(eps)
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    if _lib.under_torch_func():
        return reference.inverse_sigmoid(x, eps)
    dtype, run = _compute_dtype(x)
    return _cast(_inverse_sigmoid(_cast(x, run), eps), dtype)
