"""Every variant builds, runs forward and backward on a padded batch with masks, and returns the right shapes;
config rules; torchvision-name loading; the official key mapping."""
import pytest
import torch

from detrcore.models import (DETR, DeformableDETR, HungarianMatcher, LossWeights, ModelConfig, SetCriterion,
                             build_model)
from detrcore.models.backbone import ResNetBackbone
from detrcore.models.official import map_official_state_dict, official_config
from detrcore.nn import Linear, MultiheadAttention

SMALL = dict(num_classes=5, backbone="resnet18", enc_layers=2, dec_layers=2, hidden_dim=64, nheads=4, num_queries=12,
             dim_feedforward=128)
VARIANTS = {
    "detr": dict(arch="detr"),
    "detr_dc5": dict(arch="detr", dilation=True),
    "detr_prenorm_learned": dict(arch="detr", pre_norm=True, position_embedding="learned"),
    "deformable": dict(),
    "deformable_refine": dict(with_box_refine=True),
    "deformable_two_stage": dict(two_stage=True),
    "deformable_two_stage_reparam": dict(two_stage=True, box_reparam=True),
    "deformable_pan": dict(neck="pan", with_box_refine=True),
}


def padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 96, 128, generator=g)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 70:], mask[1, :, 100:] = True, True
    images[1][:, mask[1]] = 0
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.5, 0.1, 0.2]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    return images, mask, targets


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_forward_backward_shapes(name):
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL, **VARIANTS[name])
    model = build_model(cfg)
    images, mask, targets = padded_batch()
    out = model(images, mask)
    C = cfg.num_classes + (1 if cfg.arch == "detr" else 0)
    assert out["pred_logits"].shape == (2, 12, C) and out["pred_boxes"].shape == (2, 12, 4)
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    assert all(a["pred_boxes"].shape == (2, 12, 4) for a in out["aux_outputs"])
    assert ("enc_outputs" in out) == cfg.two_stage
    if not cfg.box_reparam:
        assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    crit = SetCriterion(cfg.num_classes, HungarianMatcher(focal=cfg.focal, cost_class=2.0 if cfg.focal else 1.0),
                        LossWeights(loss_ce=2.0 if cfg.focal else 1.0), focal=cfg.focal)
    losses = crit(out, targets)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None]
    # layer1/conv1 are frozen; every trainable parameter must receive a gradient
    assert not no_grad, no_grad
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone.body.layer1"))


def test_padding_does_not_leak_into_valid_outputs():
    torch.manual_seed(1)
    model = build_model(ModelConfig(**SMALL, arch="detr", dropout=0.0)).eval()
    images, mask, _ = padded_batch()
    out1 = model(images, mask)
    noisy = images.clone()
    noisy[1][:, mask[1]] = 100.0  # change only the padding
    out2 = model(noisy, mask)
    # convolutions see a few padded pixels near the border; the transformer ignores padded positions
    assert (out1["pred_logits"][0] == out2["pred_logits"][0]).all()


def test_no_mask_means_no_padding():
    torch.manual_seed(2)
    model = build_model(ModelConfig(**SMALL)).eval()
    images, _, _ = padded_batch()
    torch.testing.assert_close(model(images)["pred_boxes"], model(images, torch.zeros(2, 96, 128, dtype=torch.bool))["pred_boxes"])
    with pytest.raises(ValueError, match="mask"):
        model(images, torch.zeros(2, 95, 128, dtype=torch.bool))
    with pytest.raises(ValueError, match="images"):
        model(images[:, :2])


def test_initialisation_follows_the_papers():
    model = build_model(ModelConfig(**SMALL, with_box_refine=True))
    import math

    for head in model.class_embed:
        torch.testing.assert_close(head.bias, torch.full_like(head.bias, -math.log(99)))
    for head in model.bbox_embed:
        assert (head.layers[-1].weight == 0).all()
    assert (model.bbox_embed[0].layers[-1].bias[2:] == -2).all()
    shared = build_model(ModelConfig(**SMALL))
    assert isinstance(shared.class_embed, torch.nn.Linear)  # one head shared by every layer without refinement


@pytest.mark.parametrize("bad,match", [
    (dict(arch="yolo"), "arch"), (dict(num_classes=0), "num_classes"), (dict(backbone="vgg"), "backbone"),
    (dict(arch="detr", two_stage=True), "Deformable"), (dict(dilation=True), "DETR option"),
    (dict(box_reparam=True), "two_stage"), (dict(hidden_dim=100), "hidden_dim"),
])
def test_config_rules(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**SMALL, **bad})


def test_config_round_trip_and_two_stage_implies_refine():
    cfg = ModelConfig(**SMALL, two_stage=True)
    assert cfg.with_box_refine
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({"archh": "detr"})


def test_resnet_loads_torchvision_names(tmp_path):
    body = ResNetBackbone("resnet18").body
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in body.state_dict().items()}
    for k in list(state):  # torchvision's file also has these
        if k.endswith("running_var"):
            state[k.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    torch.save(state, tmp_path / "resnet18.pth")
    bb = ResNetBackbone("resnet18", weights=tmp_path / "resnet18.pth")
    torch.testing.assert_close(bb.body.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    with pytest.raises(FileNotFoundError, match="never downloads"):
        ResNetBackbone("resnet18", weights=tmp_path / "missing.pth")


def test_dc5_keeps_stride_16():
    bb = ResNetBackbone("resnet18", dilate_c5=True)
    feats = bb.features(torch.randn(1, 3, 64, 96))
    assert feats[-1].shape[-2:] == (4, 6) and bb.strides == [16]
    assert bb.body.layer4[0].conv2.dilation == (1, 1) and bb.body.layer4[1].conv1.dilation == (2, 2)


@pytest.mark.parametrize("variant", ["detr_r50", "deformable_detr", "deformable_detr_refine", "deformable_detr_two_stage"])
def test_official_key_mapping_round_trip(variant):
    """An official-layout state dict (our keys mapped back, duplicates re-created) maps onto the model exactly."""
    cfg = official_config(variant)
    small = ModelConfig.from_dict({**cfg.to_dict(), "enc_layers": 1, "dec_layers": 2, "backbone": "resnet18"})
    model = build_model(small)
    ours = model.state_dict()
    official = {}
    for k, v in ours.items():
        key = "backbone.0.body." + k[len("backbone.body."):] if k.startswith("backbone.body.") else k
        if small.arch == "deformable_detr" and not small.with_box_refine and k.split(".")[0] in ("class_embed", "bbox_embed"):
            for i in range(small.dec_layers):
                official[key.replace(k.split(".")[0], f"{k.split('.')[0]}.{i}", 1)] = v
            continue
        official[key] = v
        if small.with_box_refine and k.split(".")[0] == "bbox_embed":
            official["transformer.decoder." + k] = v
        if small.two_stage and k.split(".")[0] == "class_embed":
            official["transformer.decoder." + k] = v
    mapped = map_official_state_dict(official, small)
    assert set(mapped) == set(ours)
    model.load_state_dict(mapped, strict=True)
    bad = dict(official)
    copies = ("transformer.decoder.bbox_embed", "transformer.decoder.class_embed") if small.with_box_refine else \
        ("class_embed.1.", "bbox_embed.1.")
    dup = next((k for k in bad if k.startswith(copies)), None)
    if dup:
        bad[dup] = bad[dup] + 1
        with pytest.raises(ValueError, match="differs"):
            map_official_state_dict(bad, small)
    else:
        assert small.arch == "detr"


def test_model_classes():
    assert isinstance(build_model(ModelConfig(**SMALL, arch="detr")), DETR)
    assert isinstance(build_model(ModelConfig(**SMALL)), DeformableDETR)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_linear_layer_is_detrcores(name):
    """The transformer's and the heads' linear layers are detrcore.nn.Linear (oneDNN in float32 on the CPU);
    MultiheadAttention's out_proj is torch's class, but its forward computes it through detrcore.nn.linear."""
    model = build_model(ModelConfig(**SMALL, **VARIANTS[name]))
    linears = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears and all(t is Linear for n, t in linears.items() if not n.endswith(".out_proj")), linears
    assert all(type(m) is MultiheadAttention for n, m in model.named_modules()
               if isinstance(m, torch.nn.MultiheadAttention))


@pytest.mark.parametrize("name", ["deformable", "deformable_refine", "deformable_two_stage",
                                  "deformable_two_stage_reparam"])
def test_heads_run_once_per_layer_and_match_per_layer_heads(name):
    """Shared heads run once over all decoder layers; per-layer box heads run once per layer (the decoder's
    refinement output is reused for the predictions). Every layer's predictions equal its heads applied to its
    decoder output, one layer at a time."""
    from detrcore.models.deformable_transformer import refine_boxes

    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL, **VARIANTS[name], dropout=0.0)
    model = build_model(cfg).eval()
    captured, calls = {}, []
    model.transformer.register_forward_hook(lambda m, args, out: captured.update(out))
    box_heads = list(model.bbox_embed) if cfg.with_box_refine else [model.bbox_embed]
    for head in box_heads:
        head.register_forward_hook(lambda m, args, out: calls.append(m))
    images, mask, _ = padded_batch()
    with torch.no_grad():
        out = model(images, mask)
    layers = [*out["aux_outputs"], {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}]
    if cfg.with_box_refine:  # each head once (two-stage: the encoder's head, index dec_layers, as well)
        assert sorted(box_heads.index(m) for m in calls) == list(range(cfg.dec_layers + cfg.two_stage))
    else:
        assert len(calls) == 1
    with torch.no_grad():
        for lvl, (hs, ref) in enumerate(zip(captured["hs"], captured["references"])):
            cls = model.class_embed[lvl] if cfg.with_box_refine else model.class_embed
            box = model.bbox_embed[lvl] if cfg.with_box_refine else model.bbox_embed
            torch.testing.assert_close(layers[lvl]["pred_logits"], cls(hs))
            torch.testing.assert_close(layers[lvl]["pred_boxes"], refine_boxes(box(hs), ref, cfg.box_reparam))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hw", [(8, 10), (7, 9), (1, 1), (2, 5)])
def test_stem_max_pool_matches_torch(hw, dtype):
    from detrcore.models.backbone import max_pool_3x3_s2

    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(sum(hw))).to(dtype)
    x[0, 0, 0, 0] = float("nan")
    x[1, 1].fill_(float("-inf"))
    torch.testing.assert_close(max_pool_3x3_s2(x), torch.nn.functional.max_pool2d(x, 3, 2, 1), equal_nan=True,
                               rtol=0, atol=0)
    # distinct values (no ties): both route each output's gradient to the same maximum
    g = torch.randn(2, 3, (hw[0] + 1) // 2, (hw[1] + 1) // 2)
    x2 = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(1)).requires_grad_()
    y2 = x2.detach().clone().requires_grad_()
    max_pool_3x3_s2(x2).backward(g)
    torch.nn.functional.max_pool2d(y2, 3, 2, 1).backward(g)
    torch.testing.assert_close(x2.grad, y2.grad)  # overlapping windows: sums in another order


@pytest.mark.parametrize("name", ["deformable", "deformable_refine", "deformable_two_stage"])
def test_encoder_skips_padding_with_the_same_results(name, monkeypatch):
    """skip_padding (the default) runs the encoder on the valid positions only: same outputs and gradients as
    computing every position, and the encoder layers really see fewer rows."""
    from detrcore.models import deformable_transformer as dt

    torch.manual_seed(3)
    cfg = ModelConfig(**{**SMALL, "num_queries": 40}, **VARIANTS[name], dropout=0.0)
    packed = build_model(cfg)
    full = build_model(ModelConfig.from_dict({**cfg.to_dict(), "skip_padding": False}))
    full.load_state_dict(packed.state_dict())
    images, mask, targets = padded_batch()
    shapes = []
    forward = dt.DeformableEncoderLayer.forward
    monkeypatch.setattr(dt.DeformableEncoderLayer, "forward", lambda self, src, *a: shapes.append(src.shape) or
                        forward(self, src, *a))
    from detrcore.nn import MSDeformAttn

    in_place = []  # the attention layers that sampled the packed value in place (rectangular padding)
    forward_packed = MSDeformAttn._forward_packed_value
    monkeypatch.setattr(MSDeformAttn, "_forward_packed_value",
                        lambda self, *a: in_place.append(1) or forward_packed(self, *a))
    heads = []  # two-stage: the rows the encoder-output heads see
    for m in (packed, full):
        if cfg.two_stage:
            m.transformer.enc_output.register_forward_hook(lambda mod, args, out: heads.append(args[0].shape))
    outs = [m(images, mask) for m in (packed, full)]
    (n, c), (b, s, c2) = shapes[0], shapes[cfg.enc_layers]  # packed [N, C]; every position [B, S, C]
    assert len(in_place) == cfg.enc_layers + cfg.dec_layers  # every layer of the packed model, none of the other
    assert b * s * 0.6 < n < b * s and c == c2  # image 1 is ~45 % padding
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(outs[0][key], outs[1][key], rtol=1e-5, atol=1e-5)
        if cfg.two_stage:  # every position's scores and boxes, padding included (its constant row, inf boxes)
            torch.testing.assert_close(outs[0]["enc_outputs"][key], outs[1]["enc_outputs"][key], rtol=1e-5,
                                       atol=1e-5)
    if cfg.two_stage:  # packed: the kept positions plus one zero row; full: [B, S]
        assert heads[0][0] <= n + 1 and tuple(heads[1][:2]) == (b, s)
    crit = SetCriterion(cfg.num_classes, HungarianMatcher(focal=True, cost_class=2.0), LossWeights(loss_ce=2.0),
                        focal=True)
    for m, out in zip((packed, full), outs):
        crit(out, targets)["loss"].backward()
    for (name, p1), p2 in zip(packed.named_parameters(), full.parameters()):
        if p1.grad is not None:
            torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6, msg=name)
    # no padding: nothing to skip, the batch goes through whole
    shapes.clear()
    packed(images)
    assert shapes[0] == (b, s, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_frozen_batchnorm_matches_eval_batchnorm_in_the_input_dtype(dtype):
    from detrcore.models.backbone import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(0)
    bn = FrozenBatchNorm2d(6)
    for name in ("weight", "bias", "running_mean"):
        getattr(bn, name).copy_(torch.randn(6, generator=g))
    bn.running_var.copy_(torch.rand(6, generator=g) + 0.1)
    x = torch.randn(2, 6, 5, 7, generator=g)
    want = torch.nn.functional.batch_norm(x.double(), bn.running_mean.double(), bn.running_var.double(),
                                          bn.weight.double(), bn.bias.double(), False, 0.0, bn.eps)
    if dtype == torch.float64:
        bn = bn.double()  # a float64 model (as for gradcheck) holds float64 statistics
    out = bn(x.to(dtype))
    assert out.dtype == dtype  # a bfloat16 activation is not promoted by the float32 statistics
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    # training (x requires grad): the same forward; the gradient is grad * scale, nothing for the statistics
    xg = x.to(dtype).requires_grad_()
    out2 = bn(xg)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    out2.backward(grad)
    scale = (bn.weight * (bn.running_var + bn.eps).rsqrt()).view(1, -1, 1, 1)
    torch.testing.assert_close(xg.grad.double(), (grad.double() * scale.double()), rtol=tol, atol=tol)
    assert xg.grad.dtype == dtype and not any(b.requires_grad for b in bn.buffers())
    if dtype == torch.float32:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            conv = torch.nn.Conv2d(6, 6, 1)
            assert bn(conv(x)).dtype == torch.bfloat16


def test_frozen_batchnorm_gradcheck():
    from detrcore.models.backbone import FrozenBatchNorm2d

    bn = FrozenBatchNorm2d(3).double()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.uniform_(-2.0, 2.0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bn, (x,))


def _frozen_bn(channels=6, dtype=torch.float32, seed=0):
    from detrcore.models.backbone import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    bn = FrozenBatchNorm2d(channels)
    for name in ("weight", "bias", "running_mean"):
        getattr(bn, name).copy_(torch.randn(channels, generator=g))
    bn.running_var.copy_(torch.rand(channels, generator=g) + 0.1)
    return bn.double() if dtype == torch.float64 else bn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_frozen_batchnorm_residual_relu_matches_torch_ops(dtype, residual, relu, layout):
    """bn(x, r, relu=True) = relu(bn(x) + r), one native pass (contiguous) or torch's ops (channels_last): values
    and the gradients of x and r against float64 autograd through batch_norm, add and relu."""
    bn = _frozen_bn(dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 5, 7, generator=g).to(dtype)
    r = torch.randn(2, 6, 5, 7, generator=g).to(dtype) if residual else None
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    assert bn._native_applies(x, r) == (layout == "contiguous")
    leaves = [x.requires_grad_()] + ([r.requires_grad_()] if residual else [])
    out = bn(x, r, relu=relu)
    assert out.dtype == dtype
    grad = torch.randn(out.shape, generator=g).to(dtype)
    grads = torch.autograd.grad(out, leaves, grad)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.nn.functional.batch_norm(leaves64[0], bn.running_mean.double(), bn.running_var.double(),
                                          bn.weight.double(), bn.bias.double(), False, 0.0, bn.eps)
    if residual:
        want = want + leaves64[1]
    away = want.abs() > 0.1  # off ReLU's kink, where rounding x in bfloat16 may flip the side
    if relu:
        want = want.relu()
    want_grads = torch.autograd.grad(want, leaves64, grad.double())
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    for got, w in zip(grads, want_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double()[away], w[away], rtol=tol, atol=tol)


def test_frozen_batchnorm_residual_relu_gradcheck_and_double_backward():
    bn = _frozen_bn(3, torch.float64)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    r = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    pre = x * scale.view(1, -1, 1, 1) + (bn.bias - bn.running_mean * scale).view(1, -1, 1, 1) + r
    r = torch.where(pre.abs() < 1e-3, r + 0.1, r)  # away from ReLU's kink
    x.requires_grad_(), r.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: bn(a, b, relu=True), (x, r))
    assert torch.autograd.gradgradcheck(lambda a, b: bn(a, b, relu=True), (x, r))


def test_frozen_batchnorm_follows_its_buffers_and_names_bad_arguments():
    from detrcore import _C

    bn = _frozen_bn()
    x = torch.randn(2, 6, 3, 3)
    before = bn(x)
    bn.load_state_dict({k: v * 2 for k, v in bn.state_dict().items()})  # new statistics: new scale and shift
    after = bn(x)
    want = torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    torch.testing.assert_close(after, want)
    assert not torch.allclose(before, after)
    scale, shift = bn.affine()
    with pytest.raises(TypeError, match="scale"):
        _C.frozen_bn(x, None, scale.double(), shift, torch.empty_like(x), False)
    with pytest.raises(ValueError, match="residual"):
        _C.frozen_bn(x, torch.zeros(2, 6, 3, 4), scale, shift, torch.empty_like(x), False)
    with pytest.raises(ValueError, match="shift"):
        _C.frozen_bn(x, None, scale, shift[:5], torch.empty_like(x), False)


def test_frozen_batchnorm_under_torch_compile_and_off_the_native_path():
    """torch.compile traces torch's ops; a channels-last input takes them in eager mode: both with the light
    backward, matching the native path's values and gradients."""
    bn = _frozen_bn()
    x = torch.randn(2, 6, 5, 7)
    r = torch.randn(2, 6, 5, 7)
    results = []
    for run in ("native", "channels_last", "compiled"):
        xi = (x.contiguous(memory_format=torch.channels_last) if run == "channels_last" else x.clone()).requires_grad_()
        ri = r.clone().requires_grad_()
        fn = torch.compile(bn) if run == "compiled" else bn
        out = fn(xi, ri, relu=True)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), xi.grad, ri.grad))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            torch.testing.assert_close(got, want)


def test_frozen_batchnorm_under_torch_func():
    """torch.func transforms take torch's ops (the native path's autograd.Function has no functorch rules)."""
    bn = _frozen_bn()
    x, r = torch.randn(2, 6, 5, 7), torch.randn(2, 6, 5, 7)
    got = torch.func.grad(lambda x: bn(x, r, relu=True).square().sum())(x)
    xg = x.clone().requires_grad_()
    bn(xg, r, relu=True).square().sum().backward()
    torch.testing.assert_close(got, xg.grad)


@pytest.mark.parametrize("conv_kw", [dict(kernel_size=1), dict(kernel_size=3, padding=1, stride=2),
                                     dict(kernel_size=3, padding=2, dilation=2), dict(kernel_size=7, padding=3,
                                                                                      stride=2, bias=True)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_conv_bn_folds_when_nothing_needs_a_gradient(conv_kw, residual, relu):
    """conv_bn: with no gradient needed, one oneDNN convolution with the BN folded into weight and bias and the
    residual add / ReLU fused: the values of bn(conv(x), r, relu) in float64; with a gradient, the unfused path."""
    from detrcore.models import backbone as bb

    if bb._POINTWISE is None:
        pytest.skip("torch's oneDNN pointwise convolution unavailable here")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 6, bias=conv_kw.pop("bias", False), **conv_kw).requires_grad_(False)  # frozen
    bn = _frozen_bn()
    x = torch.randn(2, 5, 11, 9)
    out_hw = conv(x).shape
    r = torch.randn(out_hw) if residual else None
    calls = []
    ops = bb._POINTWISE
    bb._POINTWISE = tuple((lambda op: lambda *a: calls.append(1) or op(*a))(op) for op in ops)
    try:
        with torch.no_grad():
            got = bb.conv_bn(conv, bn, x, r, relu=relu)
        assert calls, "the folded convolution did not run"
        calls.clear()
        conv.requires_grad_(True)  # trainable, even under no_grad: unfused
        with torch.no_grad():
            bb.conv_bn(conv, bn, x, r, relu=relu)
        assert not calls
        conv.requires_grad_(False)
        x.requires_grad_()  # a gradient needed: the unfused convolution, then the BN
        unfused = bb.conv_bn(conv, bn, x, r, relu=relu)
        assert not calls and unfused.grad_fn is not None
    finally:
        bb._POINTWISE = ops
    c64, bn64 = conv.double(), bn.double()
    want = bn64._torch_forward(c64(x.detach().double()), None if r is None else r.double(), relu)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unfused.detach().double(), want, rtol=1e-5, atol=1e-5)


def test_conv_bn_refolds_when_a_tensor_changes_and_leaves_other_cases_unfused():
    from detrcore.models import backbone as bb

    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(4, 6, 1, bias=False).requires_grad_(False), _frozen_bn()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        first = bb.conv_bn(conv, bn, x)
        conv.weight.mul_(2)  # in place: a new version of the weight
        bn.running_mean.add_(1)
        second = bb.conv_bn(conv, bn, x)
        torch.testing.assert_close(second, bn(conv(x)), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(first, second)
        for other in (x.double(), x.contiguous(memory_format=torch.channels_last)):
            assert not bb._conv_bn_folds(conv.to(other.dtype), bn.to(other.dtype), other, None)
            conv.float(), bn.float()
        assert not bb._conv_bn_folds(conv, bn, x, torch.randn(1, 6, 5, 4))  # residual of another shape
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not bb._conv_bn_folds(conv, bn, x, None)
    # a frozen convolution's folded weight is kept until its weight changes
    w1, _ = bn.folded(conv)
    assert bn.folded(conv)[0] is w1
    with torch.no_grad():
        conv.weight.add_(1)
    w2, _ = bn.folded(conv)
    assert w2 is not w1 and torch.equal(w2, conv.weight * bn.affine()[0].view(-1, 1, 1, 1))


def test_resnet_inference_with_folded_convolutions_matches_the_unfused_backbone():
    from detrcore.models import backbone as bb

    torch.manual_seed(0)
    for depth in ("resnet18", "resnet50"):
        body = bb.ResNet(depth).eval().requires_grad_(False)  # frozen for inference: the folded path
        for m in body.modules():
            if isinstance(m, bb.FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(), m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
        x = torch.randn(2, 3, 70, 90)
        ops = bb._POINTWISE
        with torch.no_grad():
            folded = body.forward_stages(x)
            bb._POINTWISE = None
            try:
                unfused = body.forward_stages(x)
            finally:
                bb._POINTWISE = ops
        for a, b in zip(folded, unfused):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
