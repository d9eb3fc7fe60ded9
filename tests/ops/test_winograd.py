"""Winograd F(2x2, 3x3) convolutions (detrcore.nn.Conv2d's 3x3 stride-1 CPU path, cpp/winograd.*): each native
transform against its matrix definition, each adjoint by the dot-product identity, the convolution against
F.conv2d in float64 and float32 (odd sizes, bias, batch 1 and 3), gradcheck / gradgradcheck, the module's dispatch
and fallbacks, thread-count independence and named errors."""
import pytest
import torch
import torch.nn.functional as F

from detrcore import _C
from detrcore.nn import Conv2d
from detrcore.nn import conv as conv_module

# The transforms' matrices (Lavin & Gray 2016).
BT = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64)
G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
AT = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float64)

SHAPES = [(1, 1, 1, 1, 1), (2, 3, 5, 7, 9), (1, 4, 6, 2, 3), (3, 5, 2, 6, 4), (2, 16, 8, 11, 10)]  # N, C, K, H, W


def tiles(n, h, w):
    return n * ((h + 1) // 2) * ((w + 1) // 2)


def patches(x):
    """The 4x4 input patches at stride 2 (padding 1, zero past the image), [N, C, TH, TW, 4, 4]."""
    n, c, h, w = x.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    xp = F.pad(x, (1, 2 * tw + 1 - w, 1, 2 * th + 1 - h))
    return xp.unfold(2, 4, 2).unfold(3, 4, 2)


def run(fn, *args, threads=2):
    fn(*args, num_threads=threads)
    return args[-1]


@pytest.mark.parametrize("shape", SHAPES)
def test_transforms_match_their_matrix_definitions(shape):
    n, c, k, h, w = shape
    torch.manual_seed(0)
    x, wt = torch.randn(n, c, h, w, dtype=torch.float64), torch.randn(k, c, 3, 3, dtype=torch.float64)
    t = tiles(n, h, w)
    u = run(_C.winograd_weight, wt, torch.empty(16, k, c, dtype=torch.float64))
    torch.testing.assert_close(u, torch.einsum("ip,kcpq,jq->ijkc", G, wt, G).reshape(16, k, c), rtol=0, atol=1e-14)
    v = run(_C.winograd_input, x, torch.empty(16, c, t, dtype=torch.float64))
    want = torch.einsum("ip,nchwpq,jq->ijcnhw", BT, patches(x), BT).reshape(16, c, t)
    torch.testing.assert_close(v, want, rtol=0, atol=1e-13)
    m = torch.randn(16, k, t, dtype=torch.float64)
    bias = torch.randn(k, dtype=torch.float64)
    y = run(_C.winograd_output, m, bias, torch.empty(n, k, h, w, dtype=torch.float64))
    th, tw = (h + 1) // 2, (w + 1) // 2
    blocks = torch.einsum("ai,ijknyx,bj->knyaxb", AT, m.view(4, 4, k, n, th, tw), AT)  # [K, N, TH, 2, TW, 2]
    full = blocks.reshape(k, n, 2 * th, 2 * tw).permute(1, 0, 2, 3)[:, :, :h, :w] + bias.view(1, k, 1, 1)
    torch.testing.assert_close(y, full, rtol=0, atol=1e-13)


@pytest.mark.parametrize("shape", SHAPES)
def test_adjoints_satisfy_the_dot_product_identity(shape):
    """<T a, b> == <a, T* b> for every transform T and its adjoint T*: the backward's transforms are exact
    transposes of the forward's."""
    n, c, k, h, w = shape
    torch.manual_seed(1)
    f64 = dict(dtype=torch.float64)
    t = tiles(n, h, w)
    pairs = [(_C.winograd_weight, _C.winograd_weight_adjoint, (k, c, 3, 3), (16, k, c)),
             (_C.winograd_input, _C.winograd_input_adjoint, (n, c, h, w), (16, c, t)),
             (lambda m, out, num_threads: _C.winograd_output(m, None, out, num_threads=num_threads),
              _C.winograd_output_adjoint, (16, k, t), (n, k, h, w))]
    for fwd, adj, a_shape, b_shape in pairs:
        a, b = torch.randn(a_shape, **f64), torch.randn(b_shape, **f64)
        ta = run(fwd, a, torch.empty(b_shape, **f64))
        tb = run(adj, b, torch.empty(a_shape, **f64))
        assert abs((ta * b).sum() - (a * tb).sum()) < 1e-11 * max(1.0, float(ta.abs().sum()))


def winograd_conv(x, w, b=None):
    return conv_module._WinogradConv.apply(x, w, b)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_convolution_and_gradients_match_conv2d(shape, bias, dtype):
    n, c, k, h, w = shape
    torch.manual_seed(2)
    x = torch.randn(n, c, h, w, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(k, c, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(k, dtype=torch.float64, requires_grad=True) if bias else None
    ref = F.conv2d(x, wt, b, padding=1)
    g = torch.randn_like(ref)
    inputs = [x, wt] + ([b] if bias else [])
    want = torch.autograd.grad(ref, inputs, g)
    xs, ws = x.detach().to(dtype).requires_grad_(), wt.detach().to(dtype).requires_grad_()
    bs = b.detach().to(dtype).requires_grad_() if bias else None
    out = winograd_conv(xs, ws, bs)
    got = torch.autograd.grad(out, [xs, ws] + ([bs] if bias else []), g.to(dtype))
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5 * c)
    torch.testing.assert_close(out.double(), ref, **tol)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, **tol)


def test_gradcheck_and_gradgradcheck():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(winograd_conv, (x, w, b))
    assert torch.autograd.gradgradcheck(winograd_conv, (x, w, b))


def test_only_the_needed_gradients():
    torch.manual_seed(4)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    winograd_conv(x, w).sum().backward()
    assert x.grad is None and w.grad is not None
    torch.testing.assert_close(w.grad, torch.autograd.grad(F.conv2d(x, w, padding=1).sum(), w)[0])


def test_transforms_are_independent_of_the_thread_count():
    torch.manual_seed(5)
    x, g = torch.randn(2, 40, 13, 17), torch.randn(2, 40, 13, 17)
    wt, t = torch.randn(40, 40, 3, 3), tiles(2, 13, 17)
    m = torch.randn(16, 40, t)
    for fn, a, shape in [(_C.winograd_input, x, (16, 40, t)), (_C.winograd_output_adjoint, g, (16, 40, t)),
                         (_C.winograd_input_adjoint, m, x.shape), (_C.winograd_weight, wt, (16, 40, 40)),
                         (_C.winograd_weight_adjoint, torch.randn(16, 40, 40), wt.shape)]:
        outs = [run(fn, a, torch.empty(shape), threads=n) for n in (1, 2, 3)]
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def backbone_conv(cin=128, cout=128, bias=False):
    torch.manual_seed(6)
    conv = Conv2d(cin, cout, 3, 1, 1, bias=bias)
    ref = torch.nn.Conv2d(cin, cout, 3, 1, 1, bias=bias).double()
    ref.load_state_dict(conv.state_dict())
    return conv, ref


@pytest.mark.parametrize("bias", [True, False])
def test_module_takes_winograd_for_a_backbone_shape(bias, monkeypatch):
    """ResNet-50's layer3 3x3 convolution at the CPU benchmark's size (128 tiles and up), in training: Winograd,
    with the values and all gradients of torch's float64 convolution; without gradients torch's convolution."""
    conv, ref = backbone_conv(bias=bias)
    calls = []
    real = conv_module._winograd_forward
    monkeypatch.setattr(conv_module, "_winograd_forward", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 128, 16, 20, requires_grad=True)
    out = conv(x)
    g = torch.randn_like(out)
    params = [conv.weight] + ([conv.bias] if bias else [])
    got = torch.autograd.grad(out, [x] + params, g)
    xd = x.detach().double().requires_grad_()
    want_out = ref(xd)
    want = torch.autograd.grad(want_out, [xd] + list(ref.parameters()), g.double())
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-4)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-3)
    assert len(calls) == 1
    with torch.no_grad():  # inference: torch's convolution (a forward alone gains too little)
        torch.testing.assert_close(conv(x), out.detach(), rtol=1e-5, atol=1e-4)
    conv.requires_grad_(False)
    conv(x.detach())
    assert len(calls) == 1


@pytest.mark.parametrize("what", ["few_tiles", "many_tiles", "few_channels", "stride", "dilation", "float64",
                                  "channels_last", "autocast", "kernel5"])
def test_other_cases_are_torchs_convolution(what, monkeypatch):
    monkeypatch.setattr(conv_module, "_winograd_forward", lambda *a: pytest.fail("Winograd path taken"))
    cin, kw, shape, dtype = 128, dict(kernel_size=3, stride=1, padding=1), (2, 128, 16, 20), torch.float32
    if what == "few_tiles":
        shape = (2, 128, 8, 10)  # 40 tiles: ResNet-50's layer4 at the CPU benchmark's size
    elif what == "many_tiles":
        shape = (2, 128, 100, 152)  # 7600 tiles x 128 channels: a 62 MB transformed input, past the measured gain
    elif what == "few_channels":
        cin, shape = 64, (2, 64, 16, 20)
    elif what == "stride":
        kw["stride"] = 2
    elif what == "dilation":
        kw.update(dilation=2, padding=2)
    elif what == "float64":
        dtype = torch.float64
    elif what == "kernel5":
        kw.update(kernel_size=5, padding=2)
    torch.manual_seed(7)
    conv = Conv2d(cin, 128, **kw).to(dtype)
    ref = torch.nn.Conv2d(cin, 128, **kw).to(dtype)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(shape, dtype=dtype, requires_grad=True)  # training: the case Winograd would take
    if what == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if what == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(conv(x), ref(x))
        return
    assert not conv._winograd_applies(x)
    assert torch.equal(conv(x), ref(x))


def test_backbone_bottlenecks_use_it():
    from detrcore.models.backbone import Bottleneck

    block = Bottleneck(512, 128)
    assert isinstance(block.conv2, Conv2d) and block.conv2._winograd_applies(torch.randn(2, 128, 32, 40))
    assert list(block.conv2.state_dict()) == ["weight"]


@pytest.mark.parametrize("call", ["dtype", "shape", "kernel", "out_shape", "device", "readonly", "strided"])
def test_bad_arguments_are_named_errors(call):
    x, v = torch.randn(1, 2, 4, 4), torch.empty(16, 2, 4)
    with pytest.raises((TypeError, ValueError)) as e:
        if call == "dtype":
            _C.winograd_input(x.half(), v.half())
        elif call == "shape":
            _C.winograd_input(x[0], v)
        elif call == "kernel":
            _C.winograd_weight(torch.randn(2, 2, 5, 5), torch.empty(16, 2, 2))
        elif call == "out_shape":
            _C.winograd_output(torch.randn(16, 2, 3), None, torch.empty(1, 2, 4, 4))
        elif call == "device":
            _C.winograd_input(x.to("meta"), v)
        elif call == "readonly":
            import numpy as np

            out = np.empty((16, 2, 4), dtype=np.float32)
            out.setflags(write=False)
            _C.winograd_input(x.numpy(), out)
        else:
            _C.winograd_input_adjoint(torch.randn(16, 2, 8)[..., ::2], torch.empty(1, 2, 4, 4))
    assert any(name in str(e.value) for name in ("input", "out", "weight", "m", "grad"))


def test_empty_batch_is_a_no_op():
    x, v = torch.empty(0, 3, 4, 4), torch.empty(16, 3, 0)
    _C.winograd_input(x, v)
    _C.winograd_output_adjoint(x, v)
    _C.winograd_input_adjoint(v, x)
    _C.winograd_output(v, None, x)
