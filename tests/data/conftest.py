"""Helpers for the data tests: tiny synthetic images and COCO files written into tmp_path."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def write_png(path: Path, width: int = 64, height: int = 48, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def write_coco(folder: Path, images, annotations, categories, json_name: str = "_annotations.coco.json",
               json_dir: Path | None = None, write_images: bool = True) -> Path:
    """images: [(id, file_name, w, h)]; annotations: [(image_id, category_id, [x, y, w, h], extra dict)]."""
    folder.mkdir(parents=True, exist_ok=True)
    if write_images:
        for k, (_, name, w, h) in enumerate(images):
            write_png(folder / name, w, h, seed=k)
    anns = []
    for k, a in enumerate(annotations):
        image_id, cat, bbox = a[:3]
        extra = a[3] if len(a) > 3 else {}
        anns.append({"id": k + 1, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": 0, **extra})
    data = {"images": [{"id": i, "file_name": n, "width": w, "height": h} for i, n, w, h in images],
            "annotations": anns, "categories": categories}
    path = (json_dir or folder) / json_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def tiny_coco(tmp_path):
    """3 images of 64x48; categories with ids 7, 3, 10 (unsorted in the file); image 3 has no annotations."""
    images = [(1, "a.png", 64, 48), (2, "b.png", 64, 48), (3, "c.png", 64, 48)]
    annotations = [(1, 7, [10, 5, 20, 10]), (1, 3, [0, 0, 64, 48]), (2, 10, [30.5, 20, 10, 8]),
                   (2, 3, [50, 40, 30, 30])]  # the last one is clipped to [50, 40, 64, 48]
    cats = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}, {"id": 10, "name": "ten"}]
    json_path = write_coco(tmp_path / "imgs", images, annotations, cats)
    return tmp_path / "imgs", json_path
