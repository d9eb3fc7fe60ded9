"""A tiny COCO-format dataset (Roboflow layout) written into a temporary folder for engine and CLI tests."""
import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_tiny_dataset(root: Path, n_train: int = 6, n_val: int = 3, size: int = 96, seed: int = 0) -> Path:
    """Images with bright rectangles (class 'box', id 3) and dark ones (class 'hole', id 7) on noise."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("valid", n_val)):
        d = root / split
        d.mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            img = rng.integers(90, 140, size=(size, size, 3), dtype=np.uint8)
            for k in range(1 + i % 2):
                w, h = rng.integers(12, 28, size=2)
                x, y = rng.integers(0, size - w), rng.integers(0, size - h)
                cat = 3 if k == 0 else 7
                img[y : y + h, x : x + w] = 240 if cat == 3 else 15
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat,
                             "bbox": [int(x), int(y), int(w), int(h)], "area": int(w * h), "iscrowd": 0})
            name = f"img{i}.png"
            Image.fromarray(img).save(d / name)
            images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        coco = {"images": images, "annotations": anns,
                "categories": [{"id": 3, "name": "box"}, {"id": 7, "name": "hole"}]}
        (d / "_annotations.coco.json").write_text(json.dumps(coco))
    return root


TINY_MODEL = ["model.backbone=\"resnet18\"", "model.backbone_weights=null", "model.train_backbone=true",
              "model.hidden_dim=32", "model.nheads=4", "model.enc_layers=1", "model.dec_layers=2",
              "model.dim_feedforward=64", "model.num_queries=10", "train_sizes=[96]", "max_size=96", "eval_size=96",
              "crop=false", "visualize=2", "threads=1"]
