"""collate: zero padding bottom-right, True-on-padding mask, size_divisibility."""
from __future__ import annotations

import functools

import pytest
import torch

from detrcore.data import collate, pad_images


def _batch():
    return [(torch.rand(3, 20, 30) + 0.1, {"image_id": 1}), (torch.rand(3, 25, 10) + 0.1, {"image_id": 2})]


def test_pads_and_masks():
    batch = _batch()
    images, mask, targets = collate(batch)
    assert images.shape == (2, 3, 25, 30) and mask.shape == (2, 25, 30) and mask.dtype == torch.bool
    assert [t["image_id"] for t in targets] == [1, 2] and isinstance(targets, list)
    for b, (image, _) in enumerate(batch):
        h, w = image.shape[1:]
        assert torch.equal(images[b, :, :h, :w], image)
        assert (images[b, :, h:, :] == 0).all() and (images[b, :, :, w:] == 0).all()
        assert not mask[b, :h, :w].any()
        assert mask[b].sum() == 25 * 30 - h * w  # everything else is padding


@pytest.mark.parametrize("d,want", [(1, (25, 30)), (8, (32, 32)), (32, (32, 32)), (5, (25, 30)), (7, (28, 35))])
def test_size_divisibility(d, want):
    images, mask, _ = functools.partial(collate, size_divisibility=d)(_batch())
    assert images.shape[-2:] == want and mask.shape[-2:] == want
    assert mask[0, :20, :30].logical_not().all() and mask[0, 20:].all()


def test_errors():
    with pytest.raises(ValueError, match="empty"):
        collate([])
    with pytest.raises(ValueError, match=r"images\[1\]"):
        pad_images([torch.rand(3, 4, 4), torch.rand(1, 4, 4)])
    with pytest.raises(ValueError, match="size_divisibility"):
        pad_images([torch.rand(3, 4, 4)], 0)


def test_with_a_dataloader():
    loader = torch.utils.data.DataLoader(_batch(), batch_size=2, collate_fn=collate)
    images, mask, targets = next(iter(loader))
    assert images.shape == (2, 3, 25, 30) and len(targets) == 2
