"""detrcore.nn.Conv2d: weight-heavy, small-output float32 CPU convolutions as unfold + oneDNN matmul — values and
all gradients against float64 F.conv2d, non-contiguous inputs, the cases that stay torch's convolution (exactly),
double backward, torch.compile and parameter names."""
import pytest
import torch
import torch.nn.functional as F

from detrcore.nn import Conv2d
from detrcore.nn import onednn_linear
from tests.ops.conv_checks import assert_double_backward_matches

pytestmark = pytest.mark.skipif(onednn_linear._ONEDNN is None, reason="oneDNN linear op unavailable here")

# (in, out, kernel, stride, padding, batch, H, W): the first is Deformable DETR's extra level at the CPU benchmark
# size; odd sizes, stride 1, no padding, a 1x1 kernel with a long row.
CASES = [(2048, 256, 3, 2, 1, 2, 8, 10), (1024, 48, 3, 1, 1, 1, 5, 7), (1024, 32, 3, 2, 0, 3, 9, 6),
         (8192, 16, 1, 1, 0, 2, 3, 3), (700, 40, (3, 5), (1, 2), (1, 2), 2, 4, 9)]


def make(case, bias=True, seed=0):
    cin, cout, k, stride, padding, B, H, W = case
    torch.manual_seed(seed)
    conv = Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
    x = torch.randn(B, cin, H, W)
    return conv, x


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_values_and_gradients_match_float64_conv(case, bias, layout):
    conv, x = make(case, bias)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.cat([x, x], 3)[..., ::2]  # every other column of a wider map: a strided view
    x.requires_grad_()
    assert conv._unfold_applies(x)
    out = conv(x)
    g = torch.randn_like(out)
    params = [conv.weight] + ([conv.bias] if bias else [])
    grads = torch.autograd.grad(out, [x, *params], g)

    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    ref = F.conv2d(x64, p64[0], p64[1] if bias else None, conv.stride, conv.padding)
    ref_grads = torch.autograd.grad(ref, [x64, *p64], g.double())
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-3)


def test_only_the_needed_gradients_and_no_grad():
    conv, x = make(CASES[0])
    conv.weight.requires_grad_(False)
    x.requires_grad_()
    out = conv(x)
    (gx,) = torch.autograd.grad(out.sum(), [x])
    torch.testing.assert_close(gx, torch.autograd.grad(F.conv2d(x, conv.weight, conv.bias, 2, 1).sum(), [x])[0],
                               rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        y = conv(x)
    assert y.grad_fn is None
    torch.testing.assert_close(y, F.conv2d(x, conv.weight, conv.bias, 2, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("what", ["large_output", "light_weight", "float64", "groups", "dilation", "autocast",
                                  "same_padding", "resnet_layer4"])
def test_other_cases_are_torchs_convolution(what):
    kw = dict(stride=2, padding=1)
    cin, cout, B, H, W, dtype = 2048, 256, 2, 8, 10, torch.float32
    if what == "large_output":
        H, W = 40, 40
    elif what == "light_weight":
        cin = 64
    elif what == "resnet_layer4":  # ResNet-50 layer4's 3x3: slower this way (Winograd F(2x2) in training, below)
        cin, cout, kw = 512, 512, dict(stride=1, padding=1)
    elif what == "float64":
        dtype = torch.float64
    elif what == "groups":
        kw["groups"] = 2
    elif what == "dilation":
        kw["dilation"] = 2
    elif what == "same_padding":
        kw = dict(padding="same")
    torch.manual_seed(0)
    conv = Conv2d(cin, cout, 3, **kw).to(dtype)
    ref = torch.nn.Conv2d(cin, cout, 3, **kw).to(dtype)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(B, cin, H, W, dtype=dtype)
    if what == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not conv._unfold_applies(x)
            assert torch.equal(conv(x), ref(x))
        return
    assert not conv._unfold_applies(x)
    if what == "resnet_layer4":
        assert conv._winograd_tile(x) == 2
        with torch.no_grad():  # 512 channels: past a forward alone's Winograd regime
            assert torch.equal(conv(x), ref(x))
        return
    assert torch.equal(conv(x), ref(x))


def test_double_backward_matches_torch():
    conv, x = make(CASES[1])
    ref = torch.nn.Conv2d(1024, 48, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    assert_double_backward_matches(conv, ref, x.requires_grad_(), weight_tol=(1e-3, 1e-2))


def test_torch_func_takes_torchs_convolution():
    conv, x = make(CASES[1])
    got = torch.func.grad(lambda x: conv(x).square().sum())(x)
    xg = x.clone().requires_grad_()
    conv(xg).square().sum().backward()
    torch.testing.assert_close(got, xg.grad, rtol=1e-4, atol=1e-4)


def test_torch_compile_and_state_dict_names():
    conv, x = make(CASES[0])
    assert list(conv.state_dict()) == ["weight", "bias"]
    compiled = torch.compile(conv, fullgraph=True)
    torch.testing.assert_close(compiled(x), F.conv2d(x, conv.weight, conv.bias, 2, 1), rtol=1e-4, atol=1e-4)
