"""detrcore.nn.dropout_add_norm: norm(x + dropout(a)) as one autograd node on the CPU in training - bit-equal to the
three modules with the same RNG state (values and every gradient), double backward against torch's ops with the same
mask, the cases that stay the modules; and the native dropout_add kernel it runs on."""
import pytest
import torch
import torch.nn.functional as F

from detrcore import _C
from detrcore.nn import Dropout, dropout_add_norm


def node_name(t):
    return type(t.grad_fn).__name__


def modules(c=16, p=0.3, seed=0):
    torch.manual_seed(seed)
    norm = torch.nn.LayerNorm(c)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    return Dropout(p), norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 16), (2, 5, 16), (1, 1, 16), (3000, 16)])
def test_fused_equals_the_three_modules(dtype, shape):
    drop, norm = modules()
    norm.to(dtype)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    a = torch.randn(shape, dtype=dtype, requires_grad=True)
    params = [x, a, norm.weight, norm.bias]
    torch.manual_seed(5)
    fused = dropout_add_norm(x, a, drop, norm)
    assert node_name(fused) == "_DropoutAddNormBackward"
    torch.manual_seed(5)
    composite = norm(x + drop(a))
    assert node_name(composite) != "_DropoutAddNormBackward"
    assert torch.equal(fused, composite)
    g = torch.randn_like(fused)
    for got, want in zip(torch.autograd.grad(fused, params, g), torch.autograd.grad(composite, params, g)):
        assert torch.equal(got, want)
    assert 0 < (drop(a) == 0).float().mean() < 1  # the mask is exercised


def test_only_the_needed_gradients_and_sliced_inputs():
    drop, norm = modules()
    norm.weight.requires_grad_(False)
    base = torch.randn(9, 32)
    x, a = base[:, ::2], torch.randn(9, 16, requires_grad=True)  # x: no gradient, not contiguous
    torch.manual_seed(1)
    out = dropout_add_norm(x, a, drop, norm)
    grads = torch.autograd.grad(out.square().sum(), [a, norm.bias])
    torch.manual_seed(1)
    want = torch.autograd.grad(norm(x + drop(a)).square().sum(), [a, norm.bias])
    for got, w in zip(grads, want):
        assert torch.equal(got, w)


def test_double_backward_matches_torch_ops_with_the_same_mask():
    drop, norm = modules()
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    norm.double()
    with torch.no_grad():
        torch.manual_seed(5)
        kept = drop(torch.ones_like(a))  # the mask, scaled
    params = [x, a, norm.weight, norm.bias]
    torch.manual_seed(5)
    out = dropout_add_norm(x, a, drop, norm)
    ref = F.layer_norm(x + a * kept, (16,), norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g1 = torch.autograd.grad(out.square().sum(), params, create_graph=True)
    g2 = torch.autograd.grad(ref.square().sum(), params, create_graph=True)
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u, v)
    h1 = torch.autograd.grad(sum(t.sum() for t in g1), params)
    h2 = torch.autograd.grad(sum(t.sum() for t in g2), params)
    for u, v in zip(h1, h2):
        torch.testing.assert_close(u, v)


def test_other_cases_are_the_modules():
    drop, norm = modules()
    x, a = torch.randn(5, 16, requires_grad=True), torch.randn(5, 16, requires_grad=True)
    drop.eval()
    assert torch.equal(dropout_add_norm(x, a, drop, norm), norm(x + a))
    drop.train()
    for d, n, xx, aa in [(Dropout(0.0), norm, x, a), (Dropout(0.3, relu=True), norm, x, a),
                         (drop, torch.nn.LayerNorm(16, elementwise_affine=False), x, a),
                         (drop, norm, x.bfloat16(), a.bfloat16())]:
        torch.manual_seed(2)
        got = dropout_add_norm(xx, aa, d, n)
        assert node_name(got) != "_DropoutAddNormBackward"
        torch.manual_seed(2)
        assert torch.equal(got, n(xx + d(aa)))
    with torch.no_grad():  # nothing to differentiate: the modules
        torch.manual_seed(2)
        assert dropout_add_norm(x, a, drop, norm).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert node_name(dropout_add_norm(x, a, drop, norm)) != "_DropoutAddNormBackward"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 7, 40000])
def test_dropout_add_kernel(dtype, n):
    """out = residual + dropout(input) with the mask of `_C.dropout` for the same seed, the dropped term rounded to
    the dtype first (as the two ops); any thread count."""
    g = torch.Generator().manual_seed(n)
    a, x = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    d = torch.empty_like(a)
    _C.dropout(a, d, 77, 0.4, False)
    want = x + d
    for threads in (1, 2, 3):
        out = torch.empty_like(a)
        _C.dropout_add(a, x, out, 77, 0.4, num_threads=threads)
        assert torch.equal(out, want)
    with pytest.raises(ValueError, match="overlaps"):
        _C.dropout_add(a, x, a, 77, 0.4)  # not in place
    with pytest.raises(ValueError, match="p must be"):
        _C.dropout_add(a, x, torch.empty_like(a), 77, 1.0)
    with pytest.raises(ValueError):
        _C.dropout_add(a, x[:-1] if n > 1 else x.repeat(2), torch.empty_like(a), 77, 0.4)
