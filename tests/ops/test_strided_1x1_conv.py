"""detrcore.nn.Conv2d: strided 1x1 float32 CPU convolutions in training as a stride-1 convolution over the
subsampled input — values and all gradients against float64 F.conv2d (odd sizes, unequal strides, non-contiguous
inputs, an input without gradient), double backward, the cases that stay torch's convolution, and ResNet's
downsampling shortcuts taking it."""
import pytest
import torch
import torch.nn.functional as F

from detrcore.models.backbone import ResNet
from detrcore.nn import Conv2d
from detrcore.nn import conv as conv_mod
from tests.ops.conv_checks import assert_double_backward_matches

# (in, out, stride, batch, H, W): ResNet-50's layer3 shortcut at the CPU benchmark's size, odd sizes (the last
# row / column kept or not), unequal strides, a 1-pixel map.
CASES = [(512, 1024, 2, 2, 32, 40), (7, 5, 2, 3, 9, 11), (6, 4, (3, 2), 2, 10, 7), (3, 8, 2, 1, 1, 1)]


def reference(conv, x, g, params):
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    p64 = [p.detach().double().requires_grad_() for p in params]
    out = F.conv2d(x64, p64[0], p64[1] if conv.bias is not None else None, conv.stride)
    wanted = ([x64] if x.requires_grad else []) + p64
    return out, torch.autograd.grad(out, wanted, g.double())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "no_input_grad"])
def test_values_and_gradients_match_float64_conv(case, bias, layout):
    cin, cout, stride, B, H, W = case
    torch.manual_seed(0)
    conv = Conv2d(cin, cout, 1, stride, bias=bias)
    x = torch.randn(B, cin, H, W)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.cat([x, x], 3)[..., ::2]  # every other column of a wider map: a strided view
    x.requires_grad_(layout != "no_input_grad")
    assert conv._strided_1x1_applies(x)
    calls = []
    original = conv_mod._Subsample.forward
    conv_mod._Subsample.forward = staticmethod(lambda ctx, *a: calls.append(1) or original(ctx, *a))
    try:
        out = conv(x)
    finally:
        conv_mod._Subsample.forward = staticmethod(original)
    assert calls, "the strided 1x1 path did not run"
    g = torch.randn_like(out)
    params = [conv.weight] + ([conv.bias] if bias else [])
    grads = torch.autograd.grad(out, ([x] if x.requires_grad else []) + params, g)
    ref, ref_grads = reference(conv, x, g, params)
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-3)
    if x.requires_grad:  # positions the convolution skips get exactly zero gradient
        sh, sw = conv.stride
        skipped = torch.ones(H, W, dtype=torch.bool)
        skipped[::sh, ::sw] = False
        assert torch.all(grads[0][:, :, skipped] == 0)


def test_double_backward_matches_torch():
    torch.manual_seed(0)
    conv = Conv2d(6, 5, 1, 2)
    ref = torch.nn.Conv2d(6, 5, 1, 2)
    ref.load_state_dict(conv.state_dict())
    assert_double_backward_matches(conv, ref, torch.randn(2, 6, 7, 9, requires_grad=True))


@pytest.mark.parametrize("what", ["no_grad", "stride_1", "padding", "float64", "autocast", "3x3"])
def test_other_cases_are_torchs_convolution(what):
    torch.manual_seed(0)
    kw = dict(kernel_size=3 if what == "3x3" else 1, stride=1 if what == "stride_1" else 2,
              padding=1 if what in ("padding", "3x3") else 0)
    dtype = torch.float64 if what == "float64" else torch.float32
    conv = Conv2d(8, 4, **kw).to(dtype)
    ref = torch.nn.Conv2d(8, 4, **kw).to(dtype)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 8, 9, 9, dtype=dtype, requires_grad=what != "no_grad")
    if what == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not conv._strided_1x1_applies(x)
            assert torch.equal(conv(x), ref(x))
        return
    if what == "no_grad":  # inference: torch's strided convolution, exactly
        conv.weight.requires_grad_(False)
        conv.bias.requires_grad_(False)
        assert torch.equal(conv(x), ref(x))
        return
    assert not conv._strided_1x1_applies(x)
    assert torch.equal(conv(x), ref(x))


def test_resnet_shortcuts_use_it():
    body = ResNet("resnet50")
    shortcuts = [layer[0].downsample[0] for layer in (body.layer2, body.layer3, body.layer4)]
    assert all(isinstance(c, Conv2d) and c.kernel_size == (1, 1) and c.stride == (2, 2) for c in shortcuts)
    x = torch.randn(1, shortcuts[0].in_channels, 8, 10, requires_grad=True)
    assert shortcuts[0]._strided_1x1_applies(x)
