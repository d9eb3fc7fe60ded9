"""detrcore.ops: native detection ops as ordinary PyTorch ops (autograd, torch.compile, CPU and CUDA).

Importing this package needs only torch and numpy.
"""
from ._lib import build_info, cuda_available
from .assignment import batched_linear_sum_assignment, linear_sum_assignment
from .deform_attn import ms_deform_attn, ms_deform_attn_packed
from .fused_dropout import dropout
from .boxes import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    generalized_box_iou_loss,
    inverse_sigmoid,
)

__all__ = [
    "build_info",
    "cuda_available",
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_iou",
    "generalized_box_iou",
    "generalized_box_iou_loss",
    "inverse_sigmoid",
    "dropout",
    "linear_sum_assignment",
    "ms_deform_attn",
    "ms_deform_attn_packed",
    "batched_linear_sum_assignment",
]
