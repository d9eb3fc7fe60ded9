"""Winograd F(2x2, 3x3) and F(4x4, 3x3) convolutions (detrcore.nn.Conv2d's 3x3 stride-1 CPU path,
cpp/winograd.*): each native transform against its matrix definition, each adjoint by the dot-product identity, the
convolution against F.conv2d in float64 and float32 (odd sizes, bias, batch 1 and 3), gradcheck / gradgradcheck, the
module's choice of tile and fallbacks (in training and in a forward alone), the output transform's residual / ReLU
epilogue, thread-count independence and named errors."""
import pytest
import torch
import torch.nn.functional as F

from detrcore import _C
from detrcore.nn import Conv2d
from detrcore.nn import conv as conv_module

# The transforms' matrices (Lavin & Gray 2016), by output tile: B^T, G, A^T.
MATRICES = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0],
         [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
         [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}
TILES = sorted(MATRICES)

SHAPES = [(1, 1, 1, 1, 1), (2, 3, 5, 7, 9), (1, 4, 6, 2, 3), (3, 5, 2, 6, 4), (2, 16, 8, 11, 10),
          (1, 3, 2, 9, 13)]  # N, C, K, H, W


def matrices(tile):
    return [torch.tensor(m, dtype=torch.float64) for m in MATRICES[tile]]


def points(tile):
    return (tile + 2) ** 2


def tiles(n, h, w, tile=2):
    return n * -(-h // tile) * -(-w // tile)


def patches(x, tile):
    """The (tile + 2)^2 input patches at stride tile (padding 1, zero past the image), [N, C, TH, TW, a, a]."""
    n, c, h, w = x.shape
    th, tw, a = -(-h // tile), -(-w // tile), tile + 2
    xp = F.pad(x, (1, tile * tw + 1 - w, 1, tile * th + 1 - h))
    return xp.unfold(2, a, tile).unfold(3, a, tile)


def run(fn, *args, threads=2, tile=2):
    fn(*args, num_threads=threads, tile=tile)
    return args[-1]


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape", SHAPES)
def test_transforms_match_their_matrix_definitions(shape, tile):
    n, c, k, h, w = shape
    bt, g, at = matrices(tile)
    a, p = tile + 2, points(tile)
    torch.manual_seed(0)
    x, wt = torch.randn(n, c, h, w, dtype=torch.float64), torch.randn(k, c, 3, 3, dtype=torch.float64)
    t = tiles(n, h, w, tile)
    u = run(_C.winograd_weight, wt, torch.empty(p, k, c, dtype=torch.float64), tile=tile)
    torch.testing.assert_close(u, torch.einsum("ip,kcpq,jq->ijkc", g, wt, g).reshape(p, k, c), rtol=0, atol=1e-14)
    v = run(_C.winograd_input, x, torch.empty(p, c, t, dtype=torch.float64), tile=tile)
    want = torch.einsum("ip,nchwpq,jq->ijcnhw", bt, patches(x, tile), bt).reshape(p, c, t)
    torch.testing.assert_close(v, want, rtol=0, atol=1e-13)
    m = torch.randn(p, k, t, dtype=torch.float64)
    bias = torch.randn(k, dtype=torch.float64)
    y = run(_C.winograd_output, m, bias, torch.empty(n, k, h, w, dtype=torch.float64), tile=tile)
    th, tw = -(-h // tile), -(-w // tile)
    blocks = torch.einsum("ai,ijknyx,bj->knyaxb", at, m.view(a, a, k, n, th, tw), at)  # [K, N, TH, tile, TW, tile]
    full = blocks.reshape(k, n, tile * th, tile * tw).permute(1, 0, 2, 3)[:, :, :h, :w] + bias.view(1, k, 1, 1)
    torch.testing.assert_close(y, full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_output_epilogue_adds_the_residual_then_clamps(tile, dtype):
    """winograd_output(..., residual, relu): relu(transform + bias + residual), each part alone too; a NaN stays NaN
    through the ReLU (as torch.relu); a residual of another shape or overlapping out is a named error."""
    n, k, h, w = 2, 5, 7, 9
    torch.manual_seed(11)
    m, bias = torch.randn(points(tile), k, tiles(n, h, w, tile), dtype=dtype), torch.randn(k, dtype=dtype)
    r = torch.randn(n, k, h, w, dtype=dtype)
    r[1, 2, 3, 4] = float("nan")
    plain = run(_C.winograd_output, m, bias, torch.empty(n, k, h, w, dtype=dtype), tile=tile)
    for residual, relu in [(None, True), (r, False), (r, True)]:
        out = torch.empty(n, k, h, w, dtype=dtype)
        _C.winograd_output(m, bias, out, num_threads=2, tile=tile, residual=residual, relu=relu)
        want = plain + (0 if residual is None else residual)
        torch.testing.assert_close(out, want.relu() if relu else want, rtol=0, atol=0, equal_nan=True)
        assert (out < 0).any() != relu
    assert out[1, 2, 3, 4].isnan()
    with pytest.raises(ValueError, match="residual"):
        _C.winograd_output(m, bias, out, tile=tile, residual=r[:, :, :, :8].contiguous())
    with pytest.raises(ValueError, match="overlaps"):
        _C.winograd_output(m, bias, out, tile=tile, residual=out)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape", SHAPES)
def test_adjoints_satisfy_the_dot_product_identity(shape, tile):
    """<T a, b> == <a, T* b> for every transform T and its adjoint T*: the backward's transforms are exact
    transposes of the forward's."""
    n, c, k, h, w = shape
    torch.manual_seed(1)
    f64 = dict(dtype=torch.float64)
    t, p = tiles(n, h, w, tile), points(tile)
    pairs = [(_C.winograd_weight, _C.winograd_weight_adjoint, (k, c, 3, 3), (p, k, c)),
             (_C.winograd_input, _C.winograd_input_adjoint, (n, c, h, w), (p, c, t)),
             (lambda m, out, **kw: _C.winograd_output(m, None, out, **kw),
              _C.winograd_output_adjoint, (p, k, t), (n, k, h, w))]
    for fwd, adj, a_shape, b_shape in pairs:
        a, b = torch.randn(a_shape, **f64), torch.randn(b_shape, **f64)
        ta = run(fwd, a, torch.empty(b_shape, **f64), tile=tile)
        tb = run(adj, b, torch.empty(a_shape, **f64), tile=tile)
        assert abs((ta * b).sum() - (a * tb).sum()) < 1e-11 * max(1.0, float(ta.abs().sum()))


def winograd_conv(x, w, b=None, tile=2):
    return conv_module._WinogradConv.apply(x, w, b, tile)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_convolution_and_gradients_match_conv2d(shape, bias, dtype, tile):
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
    out = winograd_conv(xs, ws, bs, tile)
    got = torch.autograd.grad(out, [xs, ws] + ([bs] if bias else []), g.to(dtype))
    # float32: F(4x4)'s larger constants (up to 8, and G's 1/24) round a few times more than F(2x2)'s.
    scale = {2: 2e-5, 4: 1e-4}[tile] * c
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=scale)
    torch.testing.assert_close(out.double(), ref, **tol)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, **tol)


def test_float32_rounding_stays_near_a_direct_convolution():
    """ResNet-size sums (C = 256, outputs of rms ~1): the float32 error against a float64 convolution, as a multiple
    of torch's own float32 convolution's (rms): F(2x2) measured 1.6x, F(4x4) 10.7x (a relative rms error of 2.4e-6;
    its transforms' constants reach 8 and 1/24)."""
    torch.manual_seed(8)
    x, wt = torch.randn(2, 256, 16, 20), torch.randn(256, 256, 3, 3) / 48
    ref = F.conv2d(x.double(), wt.double(), padding=1)

    def rms(y):
        return float((y.double() - ref).pow(2).mean().sqrt())

    direct = rms(F.conv2d(x, wt, padding=1))
    assert rms(winograd_conv(x, wt, None, 2)) <= 3 * direct
    assert rms(winograd_conv(x, wt, None, 4)) <= 20 * direct
    assert rms(winograd_conv(x, wt, None, 4)) <= 1e-5 * float(ref.pow(2).mean().sqrt())


@pytest.mark.parametrize("tile", TILES)
def test_gradcheck_and_gradgradcheck(tile):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: winograd_conv(*a, tile=tile), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda *a: winograd_conv(*a, tile=tile), (x, w, b))


@pytest.mark.parametrize("tile", TILES)
def test_only_the_needed_gradients(tile):
    torch.manual_seed(4)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    winograd_conv(x, w, None, tile).sum().backward()
    assert x.grad is None and w.grad is not None
    torch.testing.assert_close(w.grad, torch.autograd.grad(F.conv2d(x, w, padding=1).sum(), w)[0])


@pytest.mark.parametrize("tile", TILES)
def test_transforms_are_independent_of_the_thread_count(tile):
    torch.manual_seed(5)
    x, g = torch.randn(2, 40, 13, 17), torch.randn(2, 40, 13, 17)
    wt, t, p = torch.randn(40, 40, 3, 3), tiles(2, 13, 17, tile), points(tile)
    m = torch.randn(p, 40, t)
    for fn, a, shape in [(_C.winograd_input, x, (p, 40, t)), (_C.winograd_output_adjoint, g, (p, 40, t)),
                         (_C.winograd_input_adjoint, m, x.shape), (_C.winograd_weight, wt, (p, 40, 40)),
                         (_C.winograd_weight_adjoint, torch.randn(p, 40, 40), wt.shape)]:
        outs = [run(fn, a, torch.empty(shape), threads=n, tile=tile) for n in (1, 2, 3)]
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def backbone_conv(cin=128, cout=128, bias=False):
    torch.manual_seed(6)
    conv = Conv2d(cin, cout, 3, 1, 1, bias=bias)
    ref = torch.nn.Conv2d(cin, cout, 3, 1, 1, bias=bias).double()
    ref.load_state_dict(conv.state_dict())
    return conv, ref


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape, tile", [((2, 128, 16, 20), 4), ((2, 128, 16, 16), 2), ((2, 128, 8, 10), 2)])
def test_module_takes_winograd_for_a_backbone_shape(bias, shape, tile, monkeypatch):
    """ResNet-50's layer3 (and layer4's) 3x3 convolution at the CPU benchmark's size, in training: Winograd F(4x4) at
    40 4x4 tiles and more, F(2x2) below with 40 2x2 tiles and more, with the values and all gradients of torch's
    float64 convolution; without gradients torch's convolution."""
    conv, ref = backbone_conv(bias=bias)
    calls = []
    real = conv_module._winograd_forward
    monkeypatch.setattr(conv_module, "_winograd_forward", lambda *a: calls.append(a[-1]) or real(*a))
    x = torch.randn(shape, requires_grad=True)
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
    assert calls == [tile]
    with torch.no_grad():  # inference: torch's convolution (32 or 40 4x4 tiles: below a forward alone's regime)
        torch.testing.assert_close(conv(x), out.detach(), rtol=1e-5, atol=1e-4)
    conv.requires_grad_(False)
    conv(x.detach())
    assert calls == [tile]


@pytest.mark.parametrize("frozen", [False, True])
def test_a_forward_alone_takes_f4_in_its_regime(frozen, monkeypatch):
    """Without gradients (no_grad, or frozen weights and an input that needs none): F(4x4) from 128 4x4 tiles with
    64 to 256 channels (ResNet-50's layer2 at the CPU benchmark's size: 160 tiles), with the values of torch's
    float64 convolution; torch's convolution below 128 or past 2560 tiles, past 256 or under 64 channels and past
    2**18 * 36 transformed elements."""
    calls = []
    real = conv_module._winograd_forward
    monkeypatch.setattr(conv_module, "_winograd_forward", lambda *a: calls.append(a[3]) or real(*a))
    conv, ref = backbone_conv(bias=True)
    x = torch.randn(2, 128, 32, 40)
    if frozen:
        conv.requires_grad_(False)
        out = conv(x)
    else:
        with torch.no_grad():
            out = conv(x)
    assert calls == [4] and out.grad_fn is None
    torch.testing.assert_close(out.double(), ref(x.double()).detach(), rtol=1e-5, atol=1e-4)
    assert conv._winograd_tile(torch.randn(2, 128, 16, 20), training=False) == 0  # 40 tiles
    assert conv._winograd_tile(torch.randn(2, 128, 128, 160), training=False) == 0  # 2560 tiles x 128 > 2**18
    for cin in (32, 512):
        wide = Conv2d(cin, 128, 3, 1, 1)
        assert wide._winograd_tile(torch.randn(2, cin, 32, 40), training=False) == 0
        assert wide._winograd_tile(torch.randn(2, cin, 32, 40)) == (4 if cin == 512 else 0)  # training's regime
    narrow = Conv2d(64, 64, 3, 1, 1)
    assert narrow._winograd_tile(torch.randn(2, 64, 64, 80), training=False) == 4
    assert narrow._winograd_tile(torch.randn(1, 64, 200, 304), training=False) == 0  # 3800 tiles


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_frozen_conv_bn_takes_f4_with_its_epilogue(residual, relu, monkeypatch):
    """A frozen 3x3 convolution + BatchNorm (ResNet-50's layer1 in training) in the forward regime: the BN folded
    in, the residual add and ReLU in the output transform; the values of bn(conv(x), r, relu) in float64."""
    from detrcore.models import backbone as bb

    calls = []
    real = bb._winograd_forward
    monkeypatch.setattr(bb, "_winograd_forward", lambda *a: calls.append(a[3:]) or real(*a))
    torch.manual_seed(12)
    conv = Conv2d(64, 64, 3, 1, 1, bias=False).requires_grad_(False)
    bn = bb.FrozenBatchNorm2d(64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 64, 32, 40)
    r = torch.randn(2, 64, 32, 40) if residual else None
    got = bb.conv_bn(conv, bn, x, r, relu=relu)
    assert len(calls) == 1 and calls[0][0] == 4 and (calls[0][1] is r) and calls[0][2] == relu
    want = bn.double()._torch_forward(conv.double()(x.double()), None if r is None else r.double(), relu)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("what", ["few_tiles", "many_tiles", "few_channels", "stride", "dilation", "float64",
                                  "channels_last", "autocast", "kernel5"])
def test_other_cases_are_torchs_convolution(what, monkeypatch):
    monkeypatch.setattr(conv_module, "_winograd_forward", lambda *a: pytest.fail("Winograd path taken"))
    cin, kw, shape, dtype = 128, dict(kernel_size=3, stride=1, padding=1), (2, 128, 16, 20), torch.float32
    if what == "few_tiles":
        shape = (1, 128, 8, 10)  # 20 2x2 tiles, 6 4x4
    elif what == "many_tiles":  # past the measured gains: 3200 4x4 tiles x 128 channels (59 MB transformed input)
        shape = (2, 128, 128, 200)
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
    assert conv._winograd_tile(x) == 0
    assert torch.equal(conv(x), ref(x))


def test_backbone_bottlenecks_use_it():
    from detrcore.models.backbone import Bottleneck

    block = Bottleneck(512, 128)
    assert isinstance(block.conv2, Conv2d) and block.conv2._winograd_tile(torch.randn(2, 128, 32, 40)) == 4
    assert list(block.conv2.state_dict()) == ["weight"]


@pytest.mark.parametrize("call", ["dtype", "shape", "kernel", "out_shape", "device", "readonly", "strided", "tile",
                                  "tile_shape"])
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
        elif call == "tile":
            _C.winograd_input(x, v, tile=3)
        elif call == "tile_shape":  # F(4x4) takes [36, C, T]
            _C.winograd_input(x, v, tile=4)
        else:
            _C.winograd_input_adjoint(torch.randn(16, 2, 8)[..., ::2], torch.empty(1, 2, 4, 4))
    assert any(name in str(e.value) for name in ("input", "out", "weight", "m", "grad", "tile"))


@pytest.mark.parametrize("tile", TILES)
def test_empty_batch_is_a_no_op(tile):
    x, v = torch.empty(0, 3, 4, 4), torch.empty(points(tile), 3, 0)
    _C.winograd_input(x, v, tile=tile)
    _C.winograd_output_adjoint(x, v, tile=tile)
    _C.winograd_input_adjoint(v, x, tile=tile)
    _C.winograd_output(v, None, x, tile=tile)
