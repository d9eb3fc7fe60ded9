"""Transforms keep boxes consistent with the image: flips, resizes, crops, normalisation, the recipes."""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from detrcore.data import (Compose, Normalize, RandomHorizontalFlip, RandomResize, RandomSelect, RandomSizeCrop,
                           eval_transforms, train_transforms)
from detrcore.data.transforms import crop, hflip, resize, size_with_aspect_ratio

NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _sample(h=48, w=64, boxes=((10, 5, 30, 15), (0, 0, 64, 48), (40, 30, 50, 45))):
    image = torch.rand(3, h, w)
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = len(b)
    target = {"boxes": b, "labels": torch.arange(n), "area": (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]),
              "iscrowd": torch.zeros(n, dtype=torch.int64), "image_id": 5,
              "orig_size": torch.tensor([h, w]), "size": torch.tensor([h, w])}
    return image, target


def test_hflip_twice_is_identity():
    image, target = _sample()
    once_img, once = hflip(image, target)
    torch.testing.assert_close(once["boxes"][0], torch.tensor([34.0, 5, 54, 15]))  # x -> 64 - x
    torch.testing.assert_close(once_img[..., 0], image[..., -1])
    twice_img, twice = hflip(once_img, once)
    assert torch.equal(twice_img, image) and torch.equal(twice["boxes"], target["boxes"])
    assert torch.equal(twice["labels"], target["labels"])
    assert target["boxes"][0, 0] == 10  # the input target is not modified


def test_random_flip_probability():
    image, target = _sample()
    assert torch.equal(RandomHorizontalFlip(1.0)(image, target)[0], image.flip(-1))
    assert RandomHorizontalFlip(0.0)(image, target)[0] is image


def test_resize_scales_boxes():
    image, target = _sample()
    out, t = resize(image, target, (24, 96))
    assert out.shape == (3, 24, 96) and t["size"].tolist() == [24, 96]
    torch.testing.assert_close(t["boxes"], target["boxes"] * torch.tensor([1.5, 0.5, 1.5, 0.5]))
    torch.testing.assert_close(t["area"], target["area"] * 0.75)
    assert t["orig_size"].tolist() == [48, 64]


def test_resize_keeps_a_constant_image_constant():
    out, _ = resize(torch.full((3, 40, 60), 0.25), {"size": torch.tensor([40, 60])}, (17, 93))
    torch.testing.assert_close(out, torch.full((3, 17, 93), 0.25))


@pytest.mark.parametrize("hw,size,max_size,want", [((48, 64), 32, None, (32, 42)), ((64, 48), 32, None, (42, 32)),
                                                   ((100, 400), 200, 400, (100, 400)), ((48, 64), 48, 1000, (48, 64)),
                                                   ((1, 1000), 320, 400, (1, 1000)), ((2, 900), 320, 400, (1, 450)),
                                                   ((300, 1), 32, 64, (300, 1))])
def test_size_with_aspect_ratio(hw, size, max_size, want):
    assert size_with_aspect_ratio(hw, size, max_size) == want


# Found by tests/data/test_data_fuzz.py: the shorter side rounded to 0 (RuntimeError from F.interpolate).
@pytest.mark.parametrize("hw", [(1, 1000), (1000, 1), (2, 900), (300, 1)])
def test_recipes_on_extreme_aspect_ratios(hw):
    image, target = _sample(*hw, boxes=((0, 0, hw[1], hw[0]),))
    for transform in (eval_transforms(NORM), train_transforms(NORM, scales=(32, 48), max_size=64)):
        for _ in range(4):
            out, t = transform(image, target)
            assert min(out.shape[-2:]) >= 1 and t["size"].tolist() == list(out.shape[-2:])
            torch.testing.assert_close(t["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0]]))


def test_random_resize_shorter_side():
    image, target = _sample()
    for _ in range(5):
        out, t = RandomResize([20, 30], max_size=100)(image, target)
        assert min(out.shape[-2:]) in (20, 30) and t["size"].tolist() == list(out.shape[-2:])


def test_crop_clips_drops_and_keeps_labels_aligned():
    image, target = _sample()
    out, t = crop(image, target, top=10, left=20, height=20, width=25)
    assert out.shape == (3, 20, 25) and t["size"].tolist() == [20, 25]
    torch.testing.assert_close(out, image[:, 10:30, 20:45])
    # box 0 (10,5,30,15) -> (0,0,10,5); box 1 (whole image) -> whole crop; box 2 (40,30,..) starts at the crop's
    # bottom edge: no area left, dropped
    assert t["labels"].tolist() == [0, 1]
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.0, 0, 10, 5], [0, 0, 25, 20]]))
    torch.testing.assert_close(t["area"], torch.tensor([50.0, 500.0]))
    assert t["iscrowd"].shape == (2,) and t["image_id"] == 5


def test_random_size_crop_bounds():
    image, target = _sample()
    for _ in range(20):
        out, t = RandomSizeCrop(20, 40)(image, target)
        assert 20 <= out.shape[-1] <= 40 and 20 <= out.shape[-2] <= 40
    out, _ = RandomSizeCrop(100, 200)(image, target)  # larger than the image: the whole image
    assert out.shape == image.shape
    with pytest.raises(ValueError, match="min_size"):
        RandomSizeCrop(50, 10)


def test_normalize_image_and_boxes():
    image, target = _sample()
    out, t = Normalize(*NORM)(image, target)
    mean, std = torch.tensor(NORM[0])[:, None, None], torch.tensor(NORM[1])[:, None, None]
    torch.testing.assert_close(out, (image - mean) / std)
    torch.testing.assert_close(t["boxes"][0], torch.tensor([20 / 64, 10 / 48, 20 / 64, 10 / 48]))
    torch.testing.assert_close(t["boxes"][1], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    assert Normalize(*NORM).normalization == NORM
    with pytest.raises(ValueError, match="3 values"):
        Normalize((0.5,), (0.5,))


def test_select_and_compose():
    image, target = _sample()
    a, b = RandomHorizontalFlip(1.0), RandomHorizontalFlip(0.0)
    assert torch.equal(RandomSelect(a, b, p=1.0)(image, target)[0], image.flip(-1))
    assert RandomSelect(a, b, p=0.0)(image, target)[0] is image
    c = Compose([a, a, Normalize(*NORM)])
    assert c.normalization == NORM and Compose([a]).normalization is None
    assert "RandomHorizontalFlip" in repr(c)


@pytest.mark.parametrize("crop_on", [True, False])
def test_recipes(crop_on):
    torch.manual_seed(0)
    tf = train_transforms(NORM, scales=[32, 40, 48], max_size=80, crop=crop_on)
    assert tf.normalization == NORM
    for _ in range(20):
        image, target = _sample()
        out, t = tf(image, target)
        assert min(out.shape[-2:]) in (32, 40, 48) and max(out.shape[-2:]) <= 80
        assert t["size"].tolist() == list(out.shape[-2:])
        assert len(t["labels"]) == len(t["boxes"]) and ((t["boxes"] >= 0) & (t["boxes"] <= 1 + 1e-6)).all()
        assert (t["boxes"][:, 2:] > 0).all()
    out, t = eval_transforms(NORM, size=24, max_size=40)(*_sample())
    assert out.shape == (3, 24, 32) and len(t["boxes"]) == 3


# ---- property: every output box lies in the image and equals the transformed original geometry ----
@st.composite
def _scenes(draw):
    h, w = draw(st.integers(8, 40)), draw(st.integers(8, 40))
    n = draw(st.integers(0, 6))
    boxes = []
    for _ in range(n):
        x0, y0 = draw(st.floats(0, w - 1)), draw(st.floats(0, h - 1))
        boxes.append((x0, y0, draw(st.floats(x0 + 0.5, w)), draw(st.floats(y0 + 0.5, h))))
    ch, cw = draw(st.integers(1, h)), draw(st.integers(1, w))
    top, left = draw(st.integers(0, h - ch)), draw(st.integers(0, w - cw))
    size = (draw(st.integers(4, 50)), draw(st.integers(4, 50)))
    return h, w, boxes, (top, left, ch, cw), size, draw(st.booleans())


@settings(max_examples=80, deadline=None)
@given(_scenes())
# found by CI: 21 * (11 / 21) rounds to 11.000001 in float32, past the border, and the flip made it x0 = -1e-6
@example(scene=(8, 21, [(0.0, 0.0, 21.0, 1.0)], (0, 0, 1, 21), (4, 11), True))
def test_property_crop_resize_flip(scene):
    h, w, boxes, (top, left, ch, cw), (oh, ow), flip = scene
    image, target = _sample(h, w, boxes)
    out, t = crop(image, target, top, left, ch, cw)
    out, t = resize(out, t, (oh, ow))
    if flip:
        out, t = hflip(out, t)
    assert out.shape == (3, oh, ow) and t["size"].tolist() == [oh, ow]
    b = t["boxes"]
    assert ((b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= ow + 1e-4) & (b[:, 3] <= oh + 1e-4)).all()
    assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
    # expected geometry, box by box (labels are the original indices)
    src = target["boxes"].double()  # the float32 inputs, so "no area left" is decided on the same numbers
    want = []
    for x0, y0, x1, y1 in src.tolist():
        x0, x1 = min(max(x0 - left, 0), cw), min(max(x1 - left, 0), cw)
        y0, y1 = min(max(y0 - top, 0), ch), min(max(y1 - top, 0), ch)
        want.append((x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None)
    kept = [i for i, v in enumerate(want) if v is not None]
    assert t["labels"].tolist() == kept
    sx, sy = ow / cw, oh / ch
    for row, i in zip(b.tolist(), kept):
        x0, y0, x1, y1 = want[i]
        x0, y0, x1, y1 = x0 * sx, y0 * sy, x1 * sx, y1 * sy
        if flip:
            x0, x1 = ow - x1, ow - x0
        assert row == pytest.approx([x0, y0, x1, y1], abs=1e-3)
    out, t = Normalize(*NORM)(out, t)
    assert ((t["boxes"] >= -1e-6) & (t["boxes"] <= 1 + 1e-6)).all()
