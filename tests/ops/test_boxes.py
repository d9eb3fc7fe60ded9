"""Box ops against their reference twins: values, gradients, degenerate boxes, layouts, errors, opcheck,
gradcheck and torch.compile, on every device and dtype the kernels run in."""
import math

import pytest
import torch

from detrcore import ops
from detrcore import _C
from detrcore.ops import reference
from tests._grid import DEVICES, device_dtypes, tolerances


def boxes_xyxy(*shape, generator, degenerate=False):
    """Random xyxy boxes [*shape, 4]; with `degenerate`, some are empty, inverted, points or duplicates."""
    c = torch.rand(*shape, 2, generator=generator, dtype=torch.float64)
    wh = 0.02 + 0.6 * torch.rand(*shape, 2, generator=generator, dtype=torch.float64)
    b = torch.cat([c - wh / 2, c + wh / 2], dim=-1)
    if degenerate:
        flat = b.view(-1, 4)
        n = flat.shape[0]
        idx = torch.randperm(n, generator=generator)
        k = max(1, n // 6)
        flat[idx[:k], 2] = flat[idx[:k], 0]  # zero width
        flat[idx[k : 2 * k], 2:] = flat[idx[k : 2 * k], :2] - 0.1  # inverted
        flat[idx[2 * k : 3 * k], 2:] = flat[idx[2 * k : 3 * k], :2]  # a point
    return b


PAIRWISE = [
    ("box_iou", ops.box_iou, reference.box_iou),
    ("generalized_box_iou", ops.generalized_box_iou, reference.generalized_box_iou),
]


def _check_close(out, ref, dtype):
    rtol, atol = tolerances(dtype)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("name,op,ref", PAIRWISE)
@pytest.mark.parametrize("shape", [((7,), (5,)), ((1,), (1,)), ((33,), (2,)), ((3, 11), (3, 4)), ((2, 2, 5), (2, 2, 3))])
@pytest.mark.parametrize("degenerate", [False, True])
def test_pairwise_matches_reference(device, dtype, name, op, ref, shape, degenerate):
    g = torch.Generator().manual_seed(hash((name, shape, degenerate)) % 2**31)
    a64 = boxes_xyxy(*shape[0], generator=g, degenerate=degenerate)
    b64 = boxes_xyxy(*shape[1], generator=g, degenerate=degenerate)
    a, b = a64.to(device, dtype), b64.to(device, dtype)
    out = op(a, b)
    assert out.shape == (*shape[0][:-1], shape[0][-1], shape[1][-1])
    _check_close(out, ref(a.double().cpu(), b.double().cpu()), dtype)

    # gradients against the twin's autograd, computed from the same rounded inputs
    a.requires_grad_(), b.requires_grad_()
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    ga, gb = torch.autograd.grad(op(a, b), (a, b), grad.to(device, dtype))
    ra, rb = a.detach().double().cpu().requires_grad_(), b.detach().double().cpu().requires_grad_()
    wa, wb = torch.autograd.grad(ref(ra, rb), (ra, rb), grad)
    rtol, atol = tolerances(dtype)
    scale = 1 + wa.abs().max().item() + wb.abs().max().item()  # gradients of tiny unions are large
    torch.testing.assert_close(ga.double().cpu(), wa, rtol=rtol, atol=atol * scale * 10)
    torch.testing.assert_close(gb.double().cpu(), wb, rtol=rtol, atol=atol * scale * 10)


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_giou_loss_paired_matches_reference(device, dtype):
    g = torch.Generator().manual_seed(1)
    a64, b64 = boxes_xyxy(37, generator=g, degenerate=True), boxes_xyxy(37, generator=g, degenerate=True)
    b64[:5] = a64[:5]  # identical pairs: loss 0 (or 1 for empty boxes, whose IoU is 0)
    a, b = a64.to(device, dtype).requires_grad_(), b64.to(device, dtype).requires_grad_()
    for reduction in ("none", "mean", "sum"):
        out = ops.generalized_box_iou_loss(a, b, reduction)
        ref = reference.generalized_box_iou_loss(a.detach().double().cpu(), b.detach().double().cpu(), reduction)
        _check_close(out.detach(), ref, dtype)
    grad = torch.randn(37, generator=g, dtype=torch.float64)
    ga, gb = torch.autograd.grad(ops.generalized_box_iou_loss(a, b), (a, b), grad.to(device, dtype))
    ra, rb = a.detach().double().cpu().requires_grad_(), b.detach().double().cpu().requires_grad_()
    wa, wb = torch.autograd.grad(reference.generalized_box_iou_loss(ra, rb), (ra, rb), grad)
    rtol, atol = tolerances(dtype)
    scale = 1 + wa.abs().max().item()
    torch.testing.assert_close(ga.double().cpu(), wa, rtol=rtol, atol=10 * atol * scale)
    torch.testing.assert_close(gb.double().cpu(), wb, rtol=rtol, atol=10 * atol * scale)


def test_giou_loss_is_the_diagonal_of_pairwise_giou():
    g = torch.Generator().manual_seed(2)
    a, b = boxes_xyxy(50, generator=g), boxes_xyxy(50, generator=g)
    torch.testing.assert_close(ops.generalized_box_iou_loss(a, b), 1 - torch.diag(ops.generalized_box_iou(a, b)))


def test_giou_loss_accepts_leading_dims_and_empty():
    g = torch.Generator().manual_seed(3)
    a, b = boxes_xyxy(2, 3, generator=g), boxes_xyxy(2, 3, generator=g)
    assert ops.generalized_box_iou_loss(a, b).shape == (2, 3)
    e = torch.zeros(0, 4, dtype=torch.float64)
    assert ops.generalized_box_iou_loss(e, e).shape == (0,)
    assert ops.generalized_box_iou_loss(e, e, "sum").item() == 0.0


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize(
    "name,op,ref",
    [
        ("cxcywh_to_xyxy", ops.box_cxcywh_to_xyxy, reference.box_cxcywh_to_xyxy),
        ("xyxy_to_cxcywh", ops.box_xyxy_to_cxcywh, reference.box_xyxy_to_cxcywh),
    ],
)
def test_conversions_match_reference_and_invert(device, dtype, name, op, ref):
    g = torch.Generator().manual_seed(4)
    x64 = torch.randn(3, 17, 4, generator=g, dtype=torch.float64)
    x = x64.to(device, dtype).requires_grad_()
    out = op(x)
    _check_close(out.detach(), ref(x.detach().double().cpu()), dtype)
    grad = torch.randn(3, 17, 4, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad(out, x, grad.to(device, dtype))
    rx = x.detach().double().cpu().requires_grad_()
    (wx,) = torch.autograd.grad(ref(rx), rx, grad)
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(gx.double().cpu(), wx, rtol=rtol, atol=atol * 10)
    if dtype == torch.float64:
        back = ops.box_xyxy_to_cxcywh(ops.box_cxcywh_to_xyxy(x.detach()))
        torch.testing.assert_close(back, x.detach())


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_inverse_sigmoid_matches_reference(device, dtype):
    g = torch.Generator().manual_seed(5)
    x64 = torch.cat([torch.rand(200, generator=g, dtype=torch.float64),
                     torch.tensor([0.0, 1.0, -0.5, 1.5, 1e-7, 1 - 1e-7, 0.5, 2e-5, 5e-6], dtype=torch.float64)])
    x = x64.to(device, dtype).requires_grad_()
    out = ops.inverse_sigmoid(x)
    ref = reference.inverse_sigmoid(x.detach().double().cpu())
    rtol, atol = tolerances(dtype)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.detach().double().cpu(), ref, rtol=rtol, atol=atol * 20)
    (gx,) = torch.autograd.grad(out.sum(), x)
    rx = x.detach().double().cpu().requires_grad_()
    (wx,) = torch.autograd.grad(reference.inverse_sigmoid(rx).sum(), rx)
    assert torch.isfinite(gx).all()
    torch.testing.assert_close(gx.double().cpu(), wx, rtol=rtol * 10, atol=atol * 10)


def test_inverse_sigmoid_inverts_sigmoid_and_eps():
    z = torch.linspace(-8, 8, 101, dtype=torch.float64)
    torch.testing.assert_close(ops.inverse_sigmoid(torch.sigmoid(z)), z, rtol=1e-8, atol=1e-8)
    x = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert ops.inverse_sigmoid(x, eps=1e-3).tolist() == pytest.approx([math.log(1e-3), -math.log(1e-3)])


# ---- degenerate boxes: defined values, never NaN ----
def test_degenerate_definitions():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    unit = t([0, 0, 1, 1])
    point = t([0.5, 0.5, 0.5, 0.5])
    inverted = t([1, 1, 0, 0])
    far = t([2, 2, 3, 3])
    iou = lambda a, b: ops.box_iou(a[None], b[None]).item()  # noqa: E731
    giou = lambda a, b: ops.generalized_box_iou(a[None], b[None]).item()  # noqa: E731
    assert iou(unit, unit) == 1.0 and giou(unit, unit) == 1.0
    assert iou(point, point) == 0.0 and giou(point, point) == 0.0  # empty union and empty enclosing box
    assert iou(point, unit) == 0.0 and giou(point, unit) == 0.0  # the unit box encloses the point
    assert iou(inverted, unit) == 0.0  # inverted = empty
    assert giou(unit, far) == pytest.approx(-7 / 9)  # enclosing 3x3, union 2
    assert giou(point, far) == pytest.approx(-1 + 1 / 6.25)  # enclosing 2.5x2.5 box holds only `far`
    a = torch.stack([unit, point, inverted, far]).requires_grad_()
    for fn in (ops.box_iou, ops.generalized_box_iou):
        out = fn(a, a)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(a.grad).all()
        a.grad = None
    loss = ops.generalized_box_iou_loss(a, a.flip(0))
    loss.sum().backward()
    assert torch.isfinite(a.grad).all()


# ---- layouts, dtypes, batching ----
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs_give_the_same_result(device):
    g = torch.Generator().manual_seed(6)
    a, b = boxes_xyxy(9, generator=g).to(device), boxes_xyxy(4, generator=g).to(device)
    a_nc = torch.stack([a, torch.zeros_like(a)], dim=1)[:, 0]  # row stride 8
    b_nc = b.t().contiguous().t()  # column-major
    assert not a_nc.is_contiguous() and not b_nc.is_contiguous()
    for op in (ops.box_iou, ops.generalized_box_iou):
        torch.testing.assert_close(op(a_nc, b_nc), op(a, b), rtol=0, atol=0)
    torch.testing.assert_close(ops.generalized_box_iou_loss(a_nc, a_nc.flip(0)), ops.generalized_box_iou_loss(a, a.flip(0)))
    torch.testing.assert_close(ops.box_xyxy_to_cxcywh(a_nc), ops.box_xyxy_to_cxcywh(a))
    x = torch.rand(6, 10, dtype=torch.float64, generator=g).to(device)
    torch.testing.assert_close(ops.inverse_sigmoid(x.t()), ops.inverse_sigmoid(x).t())


def test_batched_pairwise_equals_per_image():
    g = torch.Generator().manual_seed(7)
    a, b = boxes_xyxy(4, 30, generator=g), boxes_xyxy(4, 6, generator=g)
    out = ops.generalized_box_iou(a, b)
    for i in range(4):
        torch.testing.assert_close(out[i], ops.generalized_box_iou(a[i], b[i]), rtol=0, atol=0)


def test_empty_inputs():
    e, b = torch.zeros(0, 4), torch.rand(3, 4)
    assert ops.box_iou(e, b).shape == (0, 3) and ops.generalized_box_iou(b, e).shape == (3, 0)
    a = b.clone().requires_grad_()
    ops.generalized_box_iou(a, e).sum().backward()
    assert a.grad.shape == (3, 4) and (a.grad == 0).all()
    assert ops.box_cxcywh_to_xyxy(e).shape == (0, 4) and ops.inverse_sigmoid(torch.zeros(0)).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu_is_computed_in_float32(dtype):
    g = torch.Generator().manual_seed(8)
    a, b = boxes_xyxy(8, generator=g).to(dtype), boxes_xyxy(5, generator=g).to(dtype)
    out = ops.generalized_box_iou(a, b)
    assert out.dtype == dtype
    torch.testing.assert_close(out, reference.generalized_box_iou(a.float(), b.float()).to(dtype))


def test_mixed_dtypes_promote():
    g = torch.Generator().manual_seed(9)
    a, b = boxes_xyxy(3, generator=g).float(), boxes_xyxy(2, generator=g)
    assert ops.box_iou(a, b).dtype == torch.float64


def test_deterministic_backward_whatever_the_thread_count():
    g = torch.Generator().manual_seed(10)
    a, b = boxes_xyxy(700, generator=g).float(), boxes_xyxy(90, generator=g).float()
    grads = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            ops.generalized_box_iou(x, y).sum().backward()
            grads.append((x.grad, y.grad))
    finally:
        torch.set_num_threads(before)
    for ga, gb in grads[1:]:
        assert torch.equal(ga, grads[0][0]) and torch.equal(gb, grads[0][1])


# ---- autograd machinery: gradcheck, opcheck, torch.compile ----
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    g = torch.Generator().manual_seed(11)
    a = boxes_xyxy(2, 5, generator=g).to(device).requires_grad_()
    b = boxes_xyxy(2, 3, generator=g).to(device).requires_grad_()
    assert torch.autograd.gradcheck(ops.box_iou, (a, b))
    assert torch.autograd.gradcheck(ops.generalized_box_iou, (a, b))
    b2 = boxes_xyxy(2, 5, generator=g).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: ops.generalized_box_iou_loss(x, y, "mean"), (a, b2))
    c = torch.randn(7, 4, dtype=torch.float64, generator=g).to(device).requires_grad_()
    assert torch.autograd.gradcheck(ops.box_cxcywh_to_xyxy, (c,))
    assert torch.autograd.gradcheck(ops.box_xyxy_to_cxcywh, (c,))
    assert torch.autograd.gradgradcheck(ops.box_cxcywh_to_xyxy, (c,))
    x = (0.05 + 0.9 * torch.rand(13, dtype=torch.float64, generator=g)).to(device).requires_grad_()
    assert torch.autograd.gradcheck(ops.inverse_sigmoid, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    g = torch.Generator().manual_seed(12)
    a = boxes_xyxy(2, 5, generator=g).to(device).requires_grad_()
    b = boxes_xyxy(2, 3, generator=g).to(device).requires_grad_()
    grad = torch.randn(2, 5, 3, dtype=torch.float64, generator=g).to(device)
    p, q = a[0].detach().requires_grad_(), a[1].detach().requires_grad_()
    x = torch.rand(11, dtype=torch.float64, generator=g).to(device).requires_grad_()
    cases = [
        (torch.ops.detrcore.box_pairwise.default, (a, b, True)),
        (torch.ops.detrcore.box_pairwise.default, (a, b, False)),
        (torch.ops.detrcore.box_pairwise_backward.default, (grad, a.detach(), b.detach(), True)),
        (torch.ops.detrcore.giou_loss.default, (p, q)),
        (torch.ops.detrcore.giou_loss_backward.default, (grad[0, :, 0], p.detach(), q.detach())),
        (torch.ops.detrcore.box_map.default, (p, 0)),
        (torch.ops.detrcore.box_map.default, (p, 1)),
        (torch.ops.detrcore.inverse_sigmoid.default, (x, 1e-5)),
        (torch.ops.detrcore.inverse_sigmoid_backward.default, (x.detach(), x.detach(), 1e-5)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def loss_fn(pred_cxcywh, tgt_xyxy, ref_points):
        pred = ops.box_cxcywh_to_xyxy(pred_cxcywh)
        cost = -ops.generalized_box_iou(pred, tgt_xyxy)
        loss = ops.generalized_box_iou_loss(pred[: tgt_xyxy.shape[0]], tgt_xyxy, "mean")
        return cost.sum() + loss + ops.inverse_sigmoid(ref_points).sum() + ops.box_iou(pred, tgt_xyxy).mean()

    g = torch.Generator().manual_seed(13)
    pred = torch.cat([torch.rand(10, 2, generator=g), 0.1 + 0.2 * torch.rand(10, 2, generator=g)], 1)
    tgt = boxes_xyxy(4, generator=g).float()
    refp = torch.rand(10, 2, generator=g)
    compiled = torch.compile(loss_fn, fullgraph=True)
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    out_eager, out_compiled = loss_fn(p1, tgt, refp), compiled(p2, tgt, refp)
    torch.testing.assert_close(out_compiled, out_eager)
    out_eager.backward()
    out_compiled.backward()
    torch.testing.assert_close(p2.grad, p1.grad)


# ---- bad input: named errors, never a crash ----
def test_errors_name_the_argument():
    good = torch.rand(3, 4)
    with pytest.raises(ValueError, match="boxes1"):
        ops.box_iou(torch.rand(3, 5), good)
    with pytest.raises(ValueError, match="boxes2"):
        ops.generalized_box_iou(good, torch.rand(3))
    with pytest.raises(TypeError, match="boxes1"):
        ops.box_iou(torch.ones(3, 4, dtype=torch.int64), good)
    with pytest.raises(TypeError, match="boxes2"):
        ops.box_iou(good, [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="leading dimensions"):
        ops.box_iou(torch.rand(2, 3, 4), torch.rand(3, 3, 4))
    with pytest.raises(ValueError, match="same shape"):
        ops.generalized_box_iou_loss(good, torch.rand(2, 4))
    with pytest.raises(ValueError, match="reduction"):
        ops.generalized_box_iou_loss(good, good, "avg")
    with pytest.raises(ValueError, match="eps"):
        ops.inverse_sigmoid(good, eps=0.0)
    with pytest.raises(TypeError, match="x"):
        ops.inverse_sigmoid(torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="boxes"):
        ops.box_cxcywh_to_xyxy(torch.rand(3, 3))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_is_a_named_error():
    with pytest.raises(ValueError, match="same device"):
        ops.box_iou(torch.rand(3, 4), torch.rand(3, 4, device="cuda"))


def test_native_entry_points_check_their_arguments():
    a, out = torch.rand(1, 3, 4), torch.empty(1, 3, 3)
    with pytest.raises(TypeError, match="boxes2"):
        _C.box_pairwise(a, a.double(), out, True)
    with pytest.raises(ValueError, match="contiguous"):
        _C.box_pairwise(torch.rand(1, 4, 3).transpose(1, 2), a, out, True)
    with pytest.raises(ValueError, match="out"):
        _C.box_pairwise(a, a, torch.empty(1, 3, 2), True)
    with pytest.raises(TypeError, match="float32 or float64"):
        _C.box_pairwise(a.half(), a.half(), out.half(), True)
    with pytest.raises(TypeError, match="boxes1"):
        _C.box_pairwise(None, a, out, True)
    with pytest.raises(TypeError, match="DLPack"):
        _C.box_pairwise("boxes", a, out, True)
    with pytest.raises(ValueError, match="kind"):
        _C.box_map(a, torch.empty_like(a), 9)
    with pytest.raises(ValueError, match="eps"):
        _C.inverse_sigmoid(a, torch.empty_like(a), -1.0)
    with pytest.raises(ValueError, match="grad"):
        _C.giou_loss_backward(torch.rand(2), a[0], a[0], torch.empty(3, 4), torch.empty(3, 4))


def test_inverse_sigmoid_eps_boundary_follows_clamp():
    # At x == eps the clamp passes the gradient (torch.clamp's convention): d/dx = 1/x + 1/(1-x).
    x = torch.tensor([1e-5, 1 - 1e-5, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(ops.inverse_sigmoid(x, 1e-5).sum(), x)
    (wx,) = torch.autograd.grad(reference.inverse_sigmoid(x, 1e-5).sum(), x)
    torch.testing.assert_close(gx, wx)
    assert gx[0].item() == pytest.approx(1e5 + 1 / (1 - 1e-5))
