"""Drives every CUDA entry point of detrcore.ops once per dtype, small and odd sizes, for compute-sanitizer
(memcheck, racecheck, ...): forward and backward of the box ops and of ms_deform_attn (deterministic backward too),
on the default and on a side stream, with locations outside the maps, empty inputs and a level past S. It checks
results loosely against the CPU kernels, so a wrong kernel fails here too, and exits 1 on a mismatch.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/gpu/sanitize_ops.py
"""
import sys

import torch

from detrcore import ops
from detrcore.ops.deform_attn import level_start_index_of

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
failures = []
worst = {}


def close(name, got, want, dtype):
    """Norm-relative error ||got - want|| / ||want|| against the CPU result, under a per-dtype bound."""
    tol = {torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        failures.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        return
    if got.numel() == 0:
        return
    err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    worst[name.split(" ")[0]] = max(worst.get(name.split(" ")[0], 0.0), err)
    if not err <= tol:  # NaN fails too
        failures.append(f"{name}: relative error {err:.3g} > {tol:g}")


def boxes(n, g):
    c = torch.rand(n, 2, generator=g, dtype=torch.float64)
    wh = 0.05 + 0.5 * torch.rand(n, 2, generator=g, dtype=torch.float64)
    return torch.cat([c, wh], 1)


def box_ops(dtype, stream):
    g = torch.Generator().manual_seed(1)
    for n1, n2 in ((0, 3), (1, 1), (7, 13), (300, 50)):
        a, b = boxes(n1, g), boxes(n2, g)
        for name, fn in (("giou", ops.generalized_box_iou), ("iou", ops.box_iou)):
            ins_cpu = [t.detach().clone().requires_grad_() for t in (a, b)]
            want = fn(*[ops.box_cxcywh_to_xyxy(t) for t in ins_cpu])
            with torch.cuda.stream(stream):
                ins = [t.detach().to("cuda", dtype).requires_grad_() for t in (a, b)]
                got = fn(*[ops.box_cxcywh_to_xyxy(t) for t in ins])
                got.sum().backward() if got.numel() else None
            torch.cuda.synchronize()
            close(f"{name} {n1}x{n2} {dtype}", got, want, dtype)
            if got.numel():
                want.sum().backward()
                for i, (x, y) in enumerate(zip(ins, ins_cpu)):
                    close(f"{name} grad{i} {n1}x{n2} {dtype}", x.grad, y.grad, dtype)
        n = min(n1, n2)
        if n:
            ins_cpu = [ops.box_cxcywh_to_xyxy(t[:n]).requires_grad_() for t in (a, b)]
            want = ops.generalized_box_iou_loss(*ins_cpu, reduction="sum")
            want.backward()
            ins = [t.detach().to("cuda", dtype).requires_grad_() for t in ins_cpu]
            got = ops.generalized_box_iou_loss(*ins, reduction="sum")
            got.backward()
            close(f"giou_loss {n} {dtype}", got, want, dtype)
            close(f"giou_loss grad {n} {dtype}", ins[0].grad, ins_cpu[0].grad, dtype)
            x = torch.rand(n, 4, generator=g, dtype=torch.float64)
            close(f"inverse_sigmoid {n} {dtype}", ops.inverse_sigmoid(x.to("cuda", dtype)), ops.inverse_sigmoid(x),
                  dtype)
            close(f"xyxy_to_cxcywh {n} {dtype}", ops.box_xyxy_to_cxcywh(ins[0]), ops.box_xyxy_to_cxcywh(ins_cpu[0]),
                  dtype)


def msda(dtype, stream, deterministic):
    g = torch.Generator().manual_seed(2)
    cases = (  # (B, H, D, Q, P, shapes)
        (1, 1, 1, 1, 1, ((1, 1),)),
        (2, 3, 30, 7, 3, ((6, 5), (3, 2), (1, 1))),
        (1, 2, 71, 5, 4, ((9, 7), (4, 4))),
        (2, 8, 32, 300, 4, ((32, 24), (16, 12), (8, 6), (4, 3))),
        (1, 2, 1030, 3, 2, ((3, 3),)),
        (2, 2, 8, 0, 2, ((4, 4),)),  # no queries
    )
    for B, H, D, Q, P, shapes in cases:
        ss = torch.tensor(shapes, dtype=torch.int64)
        L, S = len(shapes), int((ss[:, 0] * ss[:, 1]).sum())
        ls = level_start_index_of(ss)
        value = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
        loc = torch.rand(B, Q, H, L, P, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3  # some outside [0, 1]
        aw = torch.rand(B, Q, H, L, P, generator=g, dtype=torch.float64)
        ins_cpu = [t.detach().clone().requires_grad_() for t in (value, loc, aw)]
        want = ops.ms_deform_attn(ins_cpu[0], ss, ls, ins_cpu[1], ins_cpu[2])
        grad = torch.randn(want.shape, generator=g, dtype=torch.float64)
        want.backward(grad)
        torch.use_deterministic_algorithms(deterministic)
        try:
            with torch.cuda.stream(stream):
                ins = [t.detach().to("cuda", dtype).requires_grad_() for t in (value, loc, aw)]
                got = ops.ms_deform_attn(ins[0], ss.cuda(), ls.cuda(), ins[1], ins[2])
                got.backward(grad.to("cuda", dtype))
            torch.cuda.synchronize()
        finally:
            torch.use_deterministic_algorithms(False)
        tag = f"msda B{B} H{H} D{D} Q{Q} P{P} L{L} {dtype} det={deterministic}"
        close(tag, got, want, dtype)
        for name, x, y in zip(("value", "loc", "weights"), ins, ins_cpu):
            # location gradients of half-precision inputs are coarse: compare them in float32 and up only
            if name != "loc" or dtype in (torch.float32, torch.float64):
                close(f"{tag} grad_{name}", x.grad, y.grad, dtype)


def main():
    if not ops.cuda_available():
        print("sanitize_ops: no CUDA device or detrcore built without CUDA kernels; nothing to check")
        return 0
    side = torch.cuda.Stream()
    for dtype in DTYPES:
        for stream in (torch.cuda.current_stream(), side):
            box_ops(dtype, stream)
            msda(dtype, stream, deterministic=False)
        msda(dtype, side, deterministic=True)
    x = torch.randn(1000, device="cuda")
    ops.dropout(x, 0.1, training=True)  # CUDA dropout goes through torch; the call must simply work
    torch.cuda.synchronize()
    print(f"sanitize_ops: {len(failures)} mismatches; worst relative error per op: "
          + ", ".join(f"{k} {v:.2g}" for k, v in sorted(worst.items())))
    for f in failures[:20]:
        print("  ", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
