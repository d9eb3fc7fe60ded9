"""Box ops: detrcore's native kernels vs plain PyTorch (the formulas DETR and torchvision use), same run."""
from __future__ import annotations

import torch

from detrcore import ops

from ._common import machine, print_table, time_call

# Pairwise shapes: (batch, N, M); elementwise ops use the N * batch boxes of the first operand.
SHAPES = [(1, 300, 50), (1, 900, 100), (16, 300, 50)]
LOSS_SIZES = [50, 100, 800]  # matched pairs per step: one image, a large image, 16 images x 50 targets


# ---- plain PyTorch baselines, as users write them (DETR's util/box_ops.py style, batched by broadcasting) ----
def torch_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = torch.max(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.min(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    iou = inter / union
    lt2 = torch.min(a[..., :, None, :2], b[..., None, :, :2])
    rb2 = torch.max(a[..., :, None, 2:], b[..., None, :, 2:])
    wh2 = (rb2 - lt2).clamp(min=0)
    area = wh2[..., 0] * wh2[..., 1]
    return iou - (area - union) / area


def torch_giou_loss_paired(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    wh = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area_a + area_b - inter
    wh2 = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0)
    enclose = wh2[:, 0] * wh2[:, 1]
    return 1 - (inter / union - (enclose - union) / enclose)


def torch_giou_loss_diag(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1 - torch.diag(torch_giou(a, b))  # DETR's loss_boxes: the diagonal of an N x N matrix


def torch_cxcywh_to_xyxy(x: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def torch_inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def random_boxes(shape, device, dtype, generator) -> torch.Tensor:
    """xyxy boxes with centres in [0, 1] and sizes in [0.02, 0.5]."""
    c = torch.rand(*shape, 2, generator=generator).to(device, dtype)
    wh = (0.02 + 0.48 * torch.rand(*shape, 2, generator=generator)).to(device, dtype)
    return torch.cat([c - wh / 2, c + wh / 2], dim=-1)


def _fwd_bwd(fn, inputs):
    out = fn(*inputs)
    grad = torch.randn_like(out)

    def step():
        torch.autograd.grad(fn(*inputs), inputs, grad)

    return step


def run(device: str = "cpu", dtype: torch.dtype = torch.float32, repeats: int = 7) -> dict:
    g = torch.Generator().manual_seed(0)
    sync = device.startswith("cuda")
    rows, records = [], []

    def measure(op, shape, ours, base, base_name):
        t_ours = time_call(ours, repeats=repeats, sync=sync)
        t_base = time_call(base, repeats=repeats, sync=sync)
        rec = {"op": op, "shape": shape, "baseline": base_name, "ours_us": t_ours * 1e6,
               "baseline_us": t_base * 1e6, "speedup": t_base / t_ours}
        records.append(rec)
        rows.append([op, shape, base_name, rec["baseline_us"], rec["ours_us"], rec["speedup"]])

    for B, N, M in SHAPES:
        shape = f"{B}x({N}x{M})" if B > 1 else f"{N}x{M}"
        a = random_boxes((B, N) if B > 1 else (N,), device, dtype, g)
        b = random_boxes((B, M) if B > 1 else (M,), device, dtype, g)
        with torch.no_grad():
            measure("generalized_box_iou fwd", shape, lambda: ops.generalized_box_iou(a, b),
                    lambda: torch_giou(a, b), "torch")
        ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()
        measure("generalized_box_iou fwd+bwd", shape, _fwd_bwd(ops.generalized_box_iou, (ag, bg)),
                _fwd_bwd(torch_giou, (ag, bg)), "torch")
        with torch.no_grad():
            measure("box_iou fwd", shape, lambda: ops.box_iou(a, b),
                    lambda: torch_giou(a, b), "torch giou")  # torch's IoU is a prefix of its GIoU
        cx = ops.box_xyxy_to_cxcywh(a).requires_grad_()
        measure("box_cxcywh_to_xyxy fwd+bwd", f"{B * N} boxes", _fwd_bwd(ops.box_cxcywh_to_xyxy, (cx,)),
                _fwd_bwd(torch_cxcywh_to_xyxy, (cx,)), "torch")
        p = torch.rand(B * N, 4, generator=g).to(device, dtype).requires_grad_()
        measure("inverse_sigmoid fwd+bwd", f"{B * N}x4", _fwd_bwd(ops.inverse_sigmoid, (p,)),
                _fwd_bwd(torch_inverse_sigmoid, (p,)), "torch")

    for n in LOSS_SIZES:
        a = random_boxes((n,), device, dtype, g).requires_grad_()
        b = random_boxes((n,), device, dtype, g).requires_grad_()
        ours = _fwd_bwd(lambda x, y: ops.generalized_box_iou_loss(x, y, "sum"), (a, b))
        measure("giou_loss (paired) fwd+bwd", f"N={n}", ours,
                _fwd_bwd(lambda x, y: torch_giou_loss_paired(x, y).sum(), (a, b)), "torch paired")
        measure("giou_loss (paired) fwd+bwd", f"N={n}", ours,
                _fwd_bwd(lambda x, y: torch_giou_loss_diag(x, y).sum(), (a, b)), "torch 1-diag(NxN)")

    print(f"\nbox ops on {device} ({dtype}), {torch.get_num_threads()} threads, median of {repeats} (µs)")
    table = print_table(["op", "shape", "baseline", "baseline µs", "ours µs", "speedup"], rows)
    return {"benchmark": "box_ops", "device": device, "dtype": str(dtype), "machine": machine(),
            "results": records, "table": table}
