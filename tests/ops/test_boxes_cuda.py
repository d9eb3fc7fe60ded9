"""CUDA-only behaviour of the box ops: streams, determinism, autocast, device placement (skip without a GPU)."""
import pytest
import torch

from detrcore import ops
from tests._grid import HAS_CUDA

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]


def _boxes(n, seed):
    g = torch.Generator().manual_seed(seed)
    c, wh = torch.rand(n, 2, generator=g), 0.05 + 0.3 * torch.rand(n, 2, generator=g)
    return torch.cat([c - wh / 2, c + wh / 2], 1).cuda()


def test_runs_on_the_current_non_default_stream():
    a, b = _boxes(300, 0), _boxes(50, 1)
    want = ops.generalized_box_iou(a, b)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = ops.generalized_box_iou(a, b)
        loss = ops.generalized_box_iou_loss(a[:50], b, "sum")
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(loss, ops.generalized_box_iou_loss(a[:50], b, "sum"))


def test_backward_is_bitwise_deterministic():
    a, b = _boxes(900, 2), _boxes(100, 3)
    grads = []
    for _ in range(3):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        ops.generalized_box_iou(x, y).square().sum().backward()
        grads.append((x.grad, y.grad))
    for gx, gy in grads[1:]:
        assert torch.equal(gx, grads[0][0]) and torch.equal(gy, grads[0][1])


def test_matches_the_cpu_kernel():
    a, b = _boxes(77, 4).double(), _boxes(13, 5).double()
    for op in (ops.box_iou, ops.generalized_box_iou):
        torch.testing.assert_close(op(a, b).cpu(), op(a.cpu(), b.cpu()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast(dtype):
    a, b = _boxes(30, 6), _boxes(7, 7)
    with torch.autocast("cuda", dtype=dtype):
        x = torch.nn.functional.linear(a, torch.eye(4, device="cuda"))  # autocast output: half precision
        out = ops.generalized_box_iou(x, b)
    assert out.dtype == torch.float32  # promoted with the float32 boxes2
    torch.testing.assert_close(out, ops.generalized_box_iou(a, b), rtol=2e-2, atol=2e-2)


def test_second_device_if_present():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    a, b = _boxes(10, 8).to("cuda:1"), _boxes(4, 9).to("cuda:1")
    out = ops.generalized_box_iou(a, b)
    assert out.device == a.device
    torch.testing.assert_close(out.cpu(), ops.generalized_box_iou(a.cpu(), b.cpu()))
