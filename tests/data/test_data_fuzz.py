"""Data faults, generated: a small valid COCO dataset is mutated at random (annotation and image entries given junk
values of every JSON type, keys removed, duplicates, non-object entries, broken top-level lists, truncated or
invalid JSON; image files truncated, bit-flipped, emptied, replaced by text or deleted) and then loaded and
iterated in both `on_error` modes. Property: either it works, with every sample meeting the documented contract,
or it raises ValueError / FileNotFoundError naming the JSON or image file; never another exception type, and in
"skip" mode at most one (counted) warning."""
from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detrcore.data import CocoDetection
from tests.data.conftest import write_png

IMAGES = [(1, "a.png", 40, 30), (2, "b.png", 33, 21), (3, "c.png", 25, 25)]
BASE = {
    "images": [{"id": i, "file_name": n, "width": w, "height": h} for i, n, w, h in IMAGES],
    "annotations": [{"id": k + 1, "image_id": 1 + k % 3, "category_id": (3, 7)[k % 2],
                     "bbox": [2 + k, 3, 10, 8], "area": 80, "iscrowd": 0} for k in range(6)],
    "categories": [{"id": 3, "name": "box"}, {"id": 7, "name": "hole"}],
}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**15, 10**15),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4))
junk = st.one_of(scalars, st.lists(scalars, max_size=6), st.dictionaries(st.text(max_size=3), scalars, max_size=3))

ann_edit = st.tuples(st.just("ann"), st.integers(0, 5),
                     st.sampled_from(["bbox", "category_id", "image_id", "id", "area", "iscrowd"]), junk)
ann_drop = st.tuples(st.just("ann_drop"), st.integers(0, 5), st.sampled_from(["bbox", "category_id", "image_id"]))
img_edit = st.tuples(st.just("img"), st.integers(0, 2), st.sampled_from(["id", "file_name", "width", "height"]), junk)
cat_edit = st.tuples(st.just("cat"), st.integers(0, 1), st.sampled_from(["id", "name"]), junk)
structural = st.tuples(st.sampled_from(["dup_ann", "dup_img", "ann_not_object", "top_level"]), st.integers(0, 5), junk)
file_fault = st.tuples(st.just("file"), st.integers(0, 2),
                       st.sampled_from(["truncate", "flip", "empty", "text", "delete"]), st.integers(0, 10**6))
json_fault = st.sampled_from([None, None, None, "truncate", "not_json", "list"])


def apply(data: dict, edits) -> dict:
    data = copy.deepcopy(data)
    for edit in edits:
        try:
            _apply_one(data, edit)
        except (KeyError, IndexError, TypeError, AttributeError):
            pass  # an earlier edit replaced the list this one targets
    return data


def _apply_one(data: dict, edit) -> None:
    kind = edit[0]
    if kind == "ann":
        data["annotations"][edit[1]][edit[2]] = edit[3]
    elif kind == "ann_drop":
        data["annotations"][edit[1]].pop(edit[2], None)
    elif kind == "img":
        data["images"][edit[1]][edit[2]] = edit[3]
    elif kind == "cat":
        data["categories"][edit[1]][edit[2]] = edit[3]
    elif kind == "dup_ann":
        data["annotations"].append(copy.deepcopy(data["annotations"][edit[1]]))
    elif kind == "dup_img":
        data["images"].append(copy.deepcopy(data["images"][edit[1] % 3]))
    elif kind == "ann_not_object":
        data["annotations"][edit[1]] = edit[2]
    elif kind == "top_level":
        data[("images", "annotations", "categories")[edit[1] % 3]] = edit[2]


def damage_file(path: Path, how: str, seed: int) -> None:
    if not path.exists():
        return  # deleted by an earlier fault
    raw = path.read_bytes()
    if not raw and how in ("truncate", "flip"):
        return
    if how == "truncate":
        path.write_bytes(raw[: seed % len(raw)])
    elif how == "flip":
        b = bytearray(raw)
        for k in range(1 + seed % 8):
            i = (seed * (k + 7919)) % len(b)
            b[i] ^= 1 << (k % 8)
        path.write_bytes(bytes(b))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "text":
        path.write_text("not an image")
    elif how == "delete":
        path.unlink()


def check_sample(image, target, ds: CocoDetection, index: int) -> None:
    info = ds.image_info(index)
    assert image.dtype == torch.float32 and image.shape == (3, info["height"], info["width"])
    boxes, labels = target["boxes"], target["labels"]
    assert boxes.shape == (len(labels), 4) and torch.isfinite(boxes).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= info["width"]).all() and (boxes[:, 3] <= info["height"]).all()
    assert ((labels >= 0) & (labels < ds.num_classes)).all()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.one_of(ann_edit, ann_drop, img_edit, cat_edit, structural), max_size=4),
       files=st.lists(file_fault, max_size=2), json_damage=json_fault, mode=st.sampled_from(["skip", "raise"]))
def test_mutated_datasets_load_or_fail_clearly(tmp_path_factory, edits, files, json_damage, mode):
    root = tmp_path_factory.mktemp("fuzz")
    for k, (_, name, w, h) in enumerate(IMAGES):
        write_png(root / name, w, h, seed=k)
    for _, i, how, seed in files:
        damage_file(root / IMAGES[i][1], how, seed)
    text = json.dumps(apply(BASE, edits), allow_nan=True)
    if json_damage == "truncate":
        text = text[: len(text) // 2]
    elif json_damage == "not_json":
        text = "images: [1, 2]"
    elif json_damage == "list":
        text = "[]"
    json_path = root / "ann.json"
    json_path.write_text(text)
    named = (str(json_path), *(str(root / n) for _, n, _, _ in IMAGES))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = CocoDetection(root, json_path, on_error=mode)
            for i in range(len(ds)):
                try:
                    image, target = ds[i]
                except (ValueError, FileNotFoundError) as e:  # a corrupt image is found when it is read
                    assert str(ds.image_info(i)["path"]) in str(e), e
                    continue
                check_sample(image, target, ds, i)
        except (ValueError, FileNotFoundError) as e:
            assert any(name in str(e) for name in named), f"{type(e).__name__} names no file: {e}"
            return
    ours = [w for w in caught if str(json_path) in str(w.message)]
    assert len(ours) <= 1, [str(w.message) for w in ours]
    if mode == "skip" and ds.problems:
        assert len(ours) == 1 and str(sum(ds.problems.values())) in str(ours[0].message)
    if mode == "raise":
        assert not ds.problems
    assert not any(math.isnan(x) for t in ds._targets for x in t["boxes"].ravel().tolist())
