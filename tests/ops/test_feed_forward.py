"""detrcore.nn.feed_forward: linear2(ReLU + dropout(linear1(x))) as one autograd node on the CPU in float32 training —
bit-equal to the three modules with the same RNG state (values and every gradient but linear1's bias gradient, which
the masking pass sums in double: within float32 rounding), only the needed gradients, double backward against
torch's ops with the same mask, and the cases that stay the three modules."""

B1 = 2  # the index of linear1's bias among [x, l1.weight, l1.bias, l2.weight, l2.bias]
import pytest
import torch
import torch.nn.functional as F

from detrcore.nn import Dropout, Linear, feed_forward
from detrcore.nn import onednn_linear

pytestmark = pytest.mark.skipif(onednn_linear._ONEDNN is None, reason="oneDNN linear op unavailable here")


def block(c=16, f=40, out=12, p=0.3, seed=0):
    torch.manual_seed(seed)
    return Linear(c, f), Dropout(p, relu=True), Linear(f, out)


def node_name(t):
    return type(t.grad_fn).__name__


@pytest.mark.parametrize("shape", [(7, 16), (2, 5, 16), (1, 1, 16), (3, 33, 16)])
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_fused_block_equals_the_three_modules(shape, layout):
    l1, drop, l2 = block()
    x = torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2] if layout == "sliced" else torch.randn(shape)
    x.requires_grad_()
    params = [x, l1.weight, l1.bias, l2.weight, l2.bias]
    torch.manual_seed(5)
    fused = feed_forward(x, l1, drop, l2)
    assert node_name(fused) == "_FeedForwardBackward"
    torch.manual_seed(5)
    composite = l2(drop(l1(x)))
    assert node_name(composite) != "_FeedForwardBackward"
    assert torch.equal(fused, composite)
    g = torch.randn_like(fused)
    pairs = zip(torch.autograd.grad(fused, params, g), torch.autograd.grad(composite, params, g))
    for i, (got, want) in enumerate(pairs):
        if i == B1:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got, want)
    with torch.no_grad():  # the ReLU and the dropout both zero some elements: both masks are exercised
        torch.manual_seed(5)
        hidden = drop(l1(x))
    assert 0 < (l1(x) > 0).float().mean() < 1 and (hidden == 0).float().mean() > (l1(x) <= 0).float().mean()


def test_only_the_needed_gradients():
    l1, drop, l2 = block()
    l1.weight.requires_grad_(False)
    x = torch.randn(9, 16)  # no gradient for the input either
    torch.manual_seed(1)
    out = feed_forward(x, l1, drop, l2)
    grads = torch.autograd.grad(out.square().sum(), [l1.bias, l2.weight, l2.bias])
    torch.manual_seed(1)
    want = torch.autograd.grad(l2(drop(l1(x))).square().sum(), [l1.bias, l2.weight, l2.bias])
    torch.testing.assert_close(grads[0], want[0], rtol=1e-6, atol=1e-6)  # linear1's bias: summed in double
    for a, b in zip(grads[1:], want[1:]):
        assert torch.equal(a, b)


def test_double_backward_matches_torch_ops_with_the_same_mask():
    l1, drop, l2 = block()
    x = torch.randn(2, 5, 16, requires_grad=True)
    with torch.no_grad():
        torch.manual_seed(5)
        kept = (drop(l1(x)) > 0).float() / (1 - drop.p)
    params = [x, l1.weight, l1.bias, l2.weight, l2.bias]
    torch.manual_seed(5)
    out = feed_forward(x, l1, drop, l2)
    ref = F.linear(torch.relu(F.linear(x, l1.weight, l1.bias)) * kept, l2.weight, l2.bias)
    torch.testing.assert_close(out, ref)
    g1 = torch.autograd.grad(out.square().sum(), params, create_graph=True)
    g2 = torch.autograd.grad(ref.square().sum(), params, create_graph=True)
    h1 = torch.autograd.grad(sum(g.square().sum() for g in g1), params)
    h2 = torch.autograd.grad(sum(g.square().sum() for g in g2), params)
    for a, b in zip(g1 + h1, g2 + h2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("what", ["eval", "p0", "no_grad", "float64", "autocast", "no_bias", "plain_dropout"])
def test_other_cases_are_the_three_modules(what):
    l1, drop, l2 = block(p=0.0 if what == "p0" else 0.3)
    if what == "eval":
        drop.eval()
    if what == "float64":
        l1, l2 = l1.double(), l2.double()
    if what == "no_bias":
        l1 = Linear(16, 40, bias=False)
    if what == "plain_dropout":
        drop = Dropout(0.3)
    x = torch.randn(4, 16, dtype=torch.float64 if what == "float64" else torch.float32, requires_grad=True)
    torch.manual_seed(2)
    if what == "no_grad":
        with torch.no_grad():
            out = feed_forward(x, l1, drop, l2)
        torch.manual_seed(2)
        with torch.no_grad():
            assert torch.equal(out, l2(drop(l1(x))))
        return
    if what == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = feed_forward(x, l1, drop, l2)
            assert node_name(out) != "_FeedForwardBackward"
        return
    out = feed_forward(x, l1, drop, l2)
    assert node_name(out) != "_FeedForwardBackward"
    torch.manual_seed(2)
    assert torch.equal(out, l2(drop(l1(x))))


def test_transformer_layers_use_it():
    from detrcore.models.deformable_transformer import DeformableEncoderLayer

    layer = DeformableEncoderLayer(32, 64, 0.1, 2, 4, 2)
    x = torch.randn(11, 32, requires_grad=True)
    out = feed_forward(x, layer.linear1, layer.act_dropout, layer.linear2)
    assert node_name(out) == "_FeedForwardBackward"
