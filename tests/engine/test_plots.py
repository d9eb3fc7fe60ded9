"""Training curves, detection drawings and the detection grid: valid PNG files, written atomically."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detrcore.engine import detection_grid, draw_detections, plot_curves

CLASS_NAMES = ["cat", "dog", "bird"]


def assert_png(path):
    """A readable, non-empty PNG and nothing else in its folder (no temporary file left)."""
    assert path.stat().st_size > 0
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 0 and im.height > 0
        size = im.size
    assert os.listdir(path.parent) == [path.name]
    return size


def full_history(n=3):
    return [{"epoch": e, "train_loss": 3.0 - e, "train_loss_ce": 1.0 / (e + 1), "train_loss_bbox": 0.5 / (e + 1),
             "train_loss_giou": 0.7 / (e + 1), "val_loss": 3.2 - e, "AP": 0.1 * e, "AP50": 0.2 * e}
            for e in range(n)]


@pytest.mark.parametrize("history", [
    pytest.param(full_history(), id="full"),
    pytest.param(full_history(1), id="single_epoch"),
    pytest.param([{"loss": 2.0}, {"loss": 1.5, "loss_ce": 0.7}, {"loss": torch.tensor(1.2), "AP": 0.3}],
                 id="missing_keys"),
    pytest.param([{"train_loss": 2.0, "AP": None}, {"train_loss": float("nan")}], id="no_ap_and_nan"),
    pytest.param([{"epoch": 0}], id="nothing_to_plot"),
])
def test_plot_curves_writes_png(tmp_path, history):
    path = tmp_path / "curves" / "curves.png"
    plot_curves(history, path)
    w, h = assert_png(path)
    assert w > h  # two panels side by side


def test_plot_curves_rejects_empty_history(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_curves([], tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


def test_plot_curves_leaves_global_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    plot_curves(full_history(), tmp_path / "c.png")
    assert matplotlib.get_backend() == before


def make_image(H=60, W=80):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 50, (3, H, W), dtype=torch.uint8, generator=g)  # dark, so boxes stand out


@pytest.mark.parametrize("kind", ["uint8", "float", "pil", "numpy", "gray"])
def test_draw_detections_image_forms(kind):
    img = make_image()
    src = {"uint8": img, "float": img.float() / 255, "pil": Image.fromarray(img.permute(1, 2, 0).numpy()),
           "numpy": img.numpy(), "gray": img[:1]}[kind]
    out = draw_detections(src, torch.tensor([[10., 20, 50, 55]]), torch.tensor([1]), torch.tensor([0.87]),
                          CLASS_NAMES, color=(255, 0, 0))
    assert isinstance(out, Image.Image) and out.size == (80, 60) and out.mode == "RGB"
    px = np.asarray(out)
    assert tuple(px[40, 10]) == (255, 0, 0)  # left edge of the box
    assert tuple(px[54, 30]) == (255, 0, 0)  # bottom edge
    if kind == "pil":
        assert np.asarray(src).max() < 50  # the caller's image is not drawn on
    if kind == "float":
        np.testing.assert_array_equal(px[5, 70], img[:, 5, 70].numpy())  # untouched pixel round-trips


def test_draw_detections_per_class_colours_and_no_boxes():
    img = make_image()
    out = draw_detections(img, [[5, 5, 30, 30], [40, 10, 70, 50]], [0, 1], None, CLASS_NAMES)
    px = np.asarray(out)
    assert tuple(px[20, 5]) != tuple(px[30, 40])  # class 0 and class 1 in different colours
    empty = draw_detections(img, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    np.testing.assert_array_equal(np.asarray(empty), img.permute(1, 2, 0).numpy())


def test_draw_detections_bad_inputs():
    img = make_image()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        draw_detections(img.float(), [[0, 0, 5, 5]])  # 0..255 floats: not in [0, 1]
    with pytest.raises(ValueError, match="shape"):
        draw_detections(img.permute(1, 2, 0), [[0, 0, 5, 5]])  # HWC
    with pytest.raises(ValueError, match="labels"):
        draw_detections(img, [[0, 0, 5, 5]], labels=[0, 1])


def make_samples(n):
    g = torch.Generator().manual_seed(1)
    samples = []
    for i in range(n):
        H, W = (60, 90) if i % 2 else (120, 80)
        image = torch.rand(3, H, W, generator=g)
        gt_boxes = torch.tensor([[5., 5, 40, 40], [20, 10, 70, 55]])
        samples.append((image, gt_boxes, torch.tensor([0, 2]), gt_boxes + 2, torch.tensor([0, 2]),
                        torch.tensor([0.9, 0.6])))
    return samples


def test_detection_grid(tmp_path):
    path = tmp_path / "grid.png"
    grid = detection_grid(make_samples(3), CLASS_NAMES, path, thresholds=(0.5, 0.75), cell_size=100)
    w, h = assert_png(path)
    assert (w, h) == grid.size
    assert w == 3 * 104 + 4  # ground truth + 2 thresholds
    assert h == 18 + 3 * 104 + 4  # header + 3 rows


def test_detection_grid_max_images_and_one_threshold(tmp_path):
    path = tmp_path / "grid.png"
    detection_grid(make_samples(5), None, path, thresholds=(0.3,), max_images=2, cell_size=64)
    w, h = assert_png(path)
    assert (w, h) == (2 * 68 + 4, 18 + 2 * 68 + 4)


def test_detection_grid_empty_raises(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        detection_grid([], CLASS_NAMES, tmp_path / "g.png")
    assert os.listdir(tmp_path) == []
