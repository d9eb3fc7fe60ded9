"""The ops under torch.func transforms (grad, vmap): the native ops' autograd has no functorch rules, so there they
compute their pure-PyTorch twins; gradients and batched values match the eager ops'."""
import pytest
import torch

from detrcore import ops
from detrcore.ops import reference
from tests.ops.test_deform_attn import make_inputs


def _boxes(n, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64)
    return torch.cat([xy, xy + 0.1 + torch.rand(n, 2, generator=g, dtype=torch.float64)], -1)


CASES = {
    "box_cxcywh_to_xyxy": lambda a, b: ops.box_cxcywh_to_xyxy(a).square().sum(),
    "box_xyxy_to_cxcywh": lambda a, b: ops.box_xyxy_to_cxcywh(a).square().sum(),
    "box_iou": lambda a, b: ops.box_iou(a, b).square().sum(),
    "generalized_box_iou": lambda a, b: ops.generalized_box_iou(a, b).square().sum(),
    "generalized_box_iou_loss": lambda a, b: ops.generalized_box_iou_loss(a, b, "mean"),
    "inverse_sigmoid": lambda a, b: ops.inverse_sigmoid(a * 0.5).square().sum(),
}


@pytest.mark.parametrize("name", list(CASES))
def test_box_ops_grad_and_vmap(name):
    fn = CASES[name]
    a, b = _boxes(5, 0), _boxes(5, 1)
    got = torch.func.grad(fn, argnums=(0, 1))(a, b)
    ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()
    fn(ag, bg).backward()
    torch.testing.assert_close(got[0], ag.grad)
    torch.testing.assert_close(got[1], torch.zeros_like(b) if bg.grad is None else bg.grad)
    batched = torch.func.vmap(fn)(torch.stack([a, b]), torch.stack([b, a]))  # one value per batch element
    torch.testing.assert_close(batched, torch.stack([fn(a, b), fn(b, a)]))


def test_ms_deform_attn_grad_is_the_eager_ops():
    value, ss, ls, loc, aw = make_inputs(dtype=torch.float64)

    def f(v, lc, w):
        return ops.ms_deform_attn(v, ss, ls, lc, w).square().sum()

    got = torch.func.grad(f, argnums=(0, 1, 2))(value, loc, aw)
    leaves = [t.clone().requires_grad_() for t in (value, loc, aw)]
    f(*leaves).backward()
    for g, leaf in zip(got, leaves):
        torch.testing.assert_close(g, leaf.grad)
    torch.testing.assert_close(torch.func.vmap(lambda v: ops.ms_deform_attn(v[None], ss, ls, loc[:1], aw[:1])[0])(
        value[:1]), reference.ms_deform_attn(value[:1], ss, ls, loc[:1], aw[:1]))
