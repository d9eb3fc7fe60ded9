"""detrcore.nn.Conv2d: 1x1 stride-1 float32 CPU convolutions that narrow the channels compute their weight gradient
as oneDNN matmuls in training (`_PointwiseConv`) — values and all gradients against float64 F.conv2d (odd sizes,
batch 1 and 3, bias, an input without gradient), double backward, the cases that stay torch's convolution, the
fused product-and-sum helper with and without torch's binary op, and ResNet bottlenecks taking it."""
import pytest
import torch
import torch.nn.functional as F

from detrcore.models.backbone import Bottleneck
from detrcore.nn import Conv2d
from detrcore.nn import conv as conv_mod
from detrcore.nn import onednn_linear
from tests.ops.conv_checks import assert_double_backward_matches

# (in, out, batch, H, W): ResNet-50's layer3 bottleneck's first convolution at the CPU benchmark's size, odd sizes,
# batch 1 and 3, a 1-pixel map, exactly the minimum ratio.
CASES = [(1024, 256, 2, 16, 20), (9, 4, 3, 5, 7), (6, 3, 1, 4, 6), (8, 2, 2, 1, 1), (16, 8, 2, 3, 3)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_values_and_gradients_match_float64_conv(case, bias, input_grad):
    cin, cout, b, h, w = case
    torch.manual_seed(0)
    conv = Conv2d(cin, cout, 1, bias=bias)
    x = torch.randn(b, cin, h, w, requires_grad=input_grad)
    assert conv._pointwise_applies(x)
    out = conv(x)
    assert type(out.grad_fn).__name__ == "_PointwiseConvBackward"
    g = torch.randn_like(out)
    params = [conv.weight] + ([conv.bias] if bias else [])
    grads = torch.autograd.grad(out, ([x] if input_grad else []) + params, g)
    x64 = x.detach().double().requires_grad_(input_grad)
    p64 = [p.detach().double().requires_grad_() for p in params]
    ref = F.conv2d(x64, p64[0], p64[1] if bias else None)
    want = torch.autograd.grad(ref, ([x64] if input_grad else []) + p64, g.double())
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-4)
    for got, exp in zip(grads, want, strict=True):
        torch.testing.assert_close(got, exp.float(), rtol=1e-4, atol=1e-3)


def test_double_backward_matches_torch():
    torch.manual_seed(0)
    conv = Conv2d(6, 3, 1)
    ref = torch.nn.Conv2d(6, 3, 1)
    ref.load_state_dict(conv.state_dict())
    assert_double_backward_matches(conv, ref, torch.randn(2, 6, 5, 7, requires_grad=True))


@pytest.mark.parametrize("what", ["widening", "stride", "padding", "float64", "autocast", "channels_last", "3x3",
                                  "no_grad"])
def test_other_cases_are_torchs_convolution(what, monkeypatch):
    monkeypatch.setattr(conv_mod._PointwiseConv, "apply", lambda *a: pytest.fail("pointwise path taken"))
    torch.manual_seed(0)
    cout = 8 if what == "widening" else 4
    kw = dict(kernel_size=3 if what == "3x3" else 1, stride=2 if what == "stride" else 1,
              padding=1 if what in ("padding", "3x3") else 0)
    dtype = torch.float64 if what == "float64" else torch.float32
    conv = Conv2d(8, cout, **kw).to(dtype)
    ref = torch.nn.Conv2d(8, cout, **kw).to(dtype)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 8, 9, 9, dtype=dtype, requires_grad=what != "no_grad")
    if what == "channels_last":
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    if what == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not conv._pointwise_applies(x)
            assert torch.equal(conv(x), ref(x))
        return
    if what == "no_grad":  # inference: nothing to differentiate, torch's convolution
        conv.requires_grad_(False)
        assert torch.equal(conv(x), ref(x))
        return
    if what != "stride":  # a strided one takes the subsampling path (tests/ops/test_strided_1x1_conv.py)
        assert not conv._pointwise_applies(x)
    torch.testing.assert_close(conv(x), ref(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_product_and_sum_with_and_without_the_binary_op(fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(onednn_linear, "_ONEDNN_ADD", None)
    elif onednn_linear._ONEDNN_ADD is None:
        pytest.skip("torch has no binary oneDNN linear here")
    torch.manual_seed(1)
    x, w, acc = torch.randn(5, 7), torch.randn(3, 7), torch.randn(5, 3)
    torch.testing.assert_close(onednn_linear._mm_add(x, w, acc), acc + x @ w.t(), rtol=1e-6, atol=1e-6)
    ws = torch.randn(7, 3).t()  # a transposed [3, 7] view as the weight operand, as the convolution passes
    torch.testing.assert_close(onednn_linear._mm_add(x, ws, acc), acc + x @ ws.t(), rtol=1e-6, atol=1e-6)


def test_resnet_bottlenecks_use_it_where_they_narrow():
    block = Bottleneck(1024, 256)
    x = torch.randn(2, 1024, 4, 5, requires_grad=True)
    assert isinstance(block.conv1, Conv2d) and block.conv1._pointwise_applies(x)
    assert not isinstance(block.conv3, Conv2d)  # 256 -> 1024 widens: torch's
    assert list(block.state_dict())[:2] == ["conv1.weight", "bn1.weight"]
