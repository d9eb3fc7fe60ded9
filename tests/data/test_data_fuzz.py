"""Data faults, generated: a small valid COCO dataset is mutated at random and then loaded and iterated in both
`on_error` modes, each sample also passed through the train and eval transforms.

Mutations: annotation/image/category fields set to junk of every JSON type (numbers at and past the int64/float
limits, NaN/inf, integers of 4 000 digits, strings, lists and objects nested 600 deep), near-valid ids (unknown
category or image ids, 0, duplicates, integral floats), bboxes of 4 numbers (negative, zero, tiny, huge, NaN/inf)
or of the wrong length/type, iscrowd junk, long/odd file names, keys removed, duplicated or non-object entries,
broken top-level lists; the JSON file truncated, bit-flipped, re-encoded (UTF-16, BOM), nested 100 000 deep,
holding an integer Python cannot parse, not JSON or not an object; image files re-encoded in another format or
pixel mode (JPEG, GIF, BMP, TIFF, WebP, PPM, TGA, PCX; L, P, RGBA, 1, I;16, F, CMYK) and then truncated,
bit-flipped in the header or the body, emptied, replaced by text or deleted; images replaced by ones of another
size (1 to 300 pixels a side), with the JSON's width/height following or not.

Property: either it works, with every sample meeting the documented contract before and after the transforms and
`coco_gt` fit for the evaluator (unique positive annotation ids, finite boxes inside their image), or it raises
ValueError / FileNotFoundError naming the JSON or image file; never another exception type, and in "skip" mode at
most one warning, which counts the problems."""
from __future__ import annotations

import copy
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from detrcore.data import CocoDetection, eval_transforms, load_image, train_transforms
from tests.data.conftest import write_png

IMAGES = [(1, "a.png", 40, 30), (2, "b.png", 33, 21), (3, "c.png", 25, 25)]
BASE = {
    "images": [{"id": i, "file_name": n, "width": w, "height": h} for i, n, w, h in IMAGES],
    "annotations": [{"id": k + 1, "image_id": 1 + k % 3, "category_id": (3, 7)[k % 2],
                     "bbox": [2 + k, 3, 10, 8], "area": 80, "iscrowd": 0} for k in range(6)],
    "categories": [{"id": 3, "name": "box"}, {"id": 7, "name": "hole"}],
}
NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TRANSFORMS = {"train": train_transforms(NORMALIZATION, scales=(32, 48), max_size=64),
              "eval": eval_transforms(NORMALIZATION, size=48, max_size=64)}

# Values json.dumps cannot make (or that are slow to draw) are placeholders, substituted in the JSON text.
SUBSTITUTES = {'"@deep"': "[" * 600 + "]" * 600, '"@bigint"': "9" * 4000}

numbers = st.one_of(
    st.sampled_from([0, -1, 1, 0.5, -0.0, 1e-300, 1e-10, 2**31, 2**63, 2**64, 10**20, 1e300, 1.7976931348623157e308,
                     math.nan, math.inf, -math.inf, "@bigint"]),
    st.integers(), st.floats())
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=4))
junk = st.one_of(scalars, st.lists(scalars, max_size=6), st.dictionaries(st.text(max_size=3), scalars, max_size=3),
                 st.just("@deep"))
ids = st.one_of(st.sampled_from([0, -1, 1, 2, 3, 4, 7, 8, 1.0, 3.0, 2.5, "1", "3", True, 2**63, 2**64, 1e300]), junk)
bboxes = st.one_of(st.lists(numbers, min_size=4, max_size=4), st.lists(st.integers(-5, 50), min_size=4, max_size=4),
                   st.lists(scalars, max_size=6), junk)
sizes = st.one_of(st.sampled_from([0, None, 1, 21, 25, 30, 33, 40, 2**31, 10**40]), numbers, junk)
FIELDS = {
    "ann": {"bbox": bboxes, "category_id": ids, "image_id": ids, "id": ids, "area": st.one_of(numbers, junk),
            "iscrowd": st.one_of(st.sampled_from([0, 1, True, False, None, "0", 2, math.nan, [0]]), junk)},
    "img": {"id": ids, "width": sizes, "height": sizes,
            "file_name": st.one_of(st.sampled_from(["a.png", "b.png", "x" * 300, "../a.png", "", ".", "a.png/",
                                                    "a\x00.png"]), junk)},
    "cat": {"id": ids, "name": junk},
}
COUNTS = {"ann": 6, "img": 3, "cat": 2}
LISTS = {"ann": "annotations", "img": "images", "cat": "categories"}

field_edit = st.one_of(*[st.tuples(st.just(kind), st.integers(0, COUNTS[kind] - 1), st.just(key), values)
                         for kind, fields in FIELDS.items() for key, values in fields.items()])
key_drop = st.tuples(st.just("drop"), st.sampled_from(list(FIELDS)), st.integers(0, 5),
                     st.sampled_from(["id", "bbox", "category_id", "image_id", "file_name", "width", "height"]))
structural = st.tuples(st.sampled_from(["dup_ann", "dup_img", "not_object", "top_level"]), st.integers(0, 5), junk)

FORMATS = [("PNG", "RGB"), ("PNG", "L"), ("PNG", "P"), ("PNG", "RGBA"), ("PNG", "I;16"), ("PNG", "1"),
           ("JPEG", "RGB"), ("JPEG", "CMYK"), ("BMP", "RGB"), ("GIF", "P"), ("TIFF", "RGB"), ("TIFF", "I;16"),
           ("TIFF", "F"), ("WEBP", "RGB"), ("PPM", "RGB"), ("TGA", "RGB"), ("PCX", "RGB"), ("JPEG", "L"),
           ("PNG", "LA")]
DAMAGE = ["none", "truncate", "poke_header", "flip", "empty", "text", "delete"]
file_fault = st.tuples(st.just("file"), st.integers(0, 2), st.sampled_from(FORMATS), st.sampled_from(DAMAGE),
                       st.integers(0, 10**6))
side = st.one_of(st.sampled_from([1, 2, 300]), st.integers(1, 300))  # extreme aspect ratios are common
resized = st.tuples(st.just("resize"), st.integers(0, 2), side, side, st.booleans())
JSON_DAMAGE = ["truncate", "flip", "utf16", "bom", "deep", "hugeint", "not_json", "list"]


def encode(width: int, height: int, seed: int, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """Random pixels as an image file of `fmt` in pixel `mode`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    img = img.convert(mode) if mode in ("RGB", "L", "P", "RGBA", "1", "CMYK", "LA") else img.convert("L").convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def damage(raw: bytes, how: str, seed: int) -> bytes | None:
    """The bytes after `how` (None: delete the file)."""
    if how == "delete":
        return None
    if how == "empty":
        return b""
    if how == "text":
        return b"not an image"
    if not raw or how == "none":
        return raw
    if how == "truncate":
        return raw[: seed % len(raw)]
    b = bytearray(raw)
    if how == "poke_header":  # two bytes of the header (size, mode, offsets) set to an extreme: a 16-bit field
        i = seed % max(1, min(len(b), 64) - 1)  # becomes 0, 32 767, 32 896 or 65 535
        b[i: i + 2] = bytes([(0, 0x7F, 0x80, 0xFF)[seed // 64 % 4]] * 2)[: len(b) - i]
        return bytes(b)
    for k in range(1 + seed % 8):
        b[(seed * (k + 7919)) % len(b)] ^= 1 << (k % 8)
    return bytes(b)


def apply(data: dict, edits) -> dict:
    data = copy.deepcopy(data)
    for edit in edits:
        try:
            _apply_one(data, edit)
        except (KeyError, IndexError, TypeError, AttributeError):
            pass  # an earlier edit replaced the list or entry this one targets
    return data


def _apply_one(data: dict, edit) -> None:
    kind = edit[0]
    if kind in FIELDS:
        data[LISTS[kind]][edit[1]][edit[2]] = edit[3]
    elif kind == "drop":
        data[LISTS[edit[1]]][edit[2]].pop(edit[3], None)
    elif kind == "dup_ann":
        data["annotations"].append(copy.deepcopy(data["annotations"][edit[1]]))
    elif kind == "dup_img":
        data["images"].append(copy.deepcopy(data["images"][edit[1] % 3]))
    elif kind == "not_object":
        data["annotations"][edit[1]] = edit[2]
    elif kind == "top_level":
        data[("images", "annotations", "categories")[edit[1] % 3]] = edit[2]


def json_bytes(data: dict, how: str | None, seed: int) -> bytes:
    text = json.dumps(data, allow_nan=True)
    for placeholder, value in SUBSTITUTES.items():
        text = text.replace(placeholder, value)
    if how == "truncate":
        return text[: seed % len(text)].encode()
    if how == "flip":
        return damage(text.encode(), "flip", seed)
    if how == "utf16":
        return text.encode("utf-16")
    if how == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    if how == "deep":
        return ("[" * 100_000 + "]" * 100_000).encode()
    if how == "hugeint":  # valid JSON that Python refuses to parse (more than 4 300 digits)
        return ('{"x": ' + "9" * 5000 + ", " + text[1:]).encode()
    if how == "not_json":
        return b"images: [1, 2]"
    if how == "list":
        return b"[]"
    return text.encode()


def check_sample(image, target, ds: CocoDetection, index: int) -> None:
    """The contract of CocoDetection[i] (coco.py's docstring)."""
    info = ds.image_info(index)
    assert image.dtype == torch.float32 and image.shape == (3, info["height"], info["width"])
    assert 0 <= image.min() and image.max() <= 1
    boxes, labels = target["boxes"], target["labels"]
    assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4) and torch.isfinite(boxes).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= info["width"]).all() and (boxes[:, 3] <= info["height"]).all()
    assert labels.dtype == torch.int64 and ((labels >= 0) & (labels < ds.num_classes)).all()
    assert target["image_id"] == info["id"] and target["orig_size"].tolist() == [info["height"], info["width"]]


def check_transformed(image, target, seed: int) -> None:
    """The contract after Normalize (transforms.py's docstring), for both recipes."""
    for name, transform in TRANSFORMS.items():
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            out, t = transform(image, target)
        assert out.ndim == 3 and out.shape[0] == 3 and min(out.shape[1:]) >= 1, (name, out.shape)
        assert t["size"].tolist() == list(out.shape[1:]) and torch.isfinite(out).all(), name
        boxes = t["boxes"]  # [N, 4] normalised cxcywh
        assert boxes.shape == (len(t["labels"]), 4) and torch.isfinite(boxes).all(), (name, boxes)
        assert ((boxes >= 0) & (boxes <= 1 + 1e-6)).all(), (name, boxes)


def check_coco_gt(ds: CocoDetection) -> None:
    """What the evaluator relies on: unique positive annotation ids (pycocotools scores duplicate ids, and an id of
    0, wrongly), known images and categories, finite boxes of positive size inside their image."""
    gt = ds.coco_gt
    ann_ids = [a["id"] for a in gt["annotations"] if "id" in a]
    assert len(ann_ids) == len(set(ann_ids)) and all(type(i) is int and 0 < i < 2**63 for i in ann_ids), ann_ids
    size = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
    cats = {c["id"] for c in gt["categories"]}
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        width, height = size[a["image_id"]]
        assert a["category_id"] in cats and a["iscrowd"] in (0, 1)
        assert all(math.isfinite(v) for v in (x, y, w, h, a["area"])) and w > 0 and h > 0 and a["area"] > 0, a
        assert x >= 0 and y >= 0 and x + w <= width * (1 + 1e-6) and y + h <= height * (1 + 1e-6), a


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.one_of(field_edit, key_drop, structural), max_size=4),
       files=st.lists(st.one_of(file_fault, resized), max_size=2),
       json_damage=st.one_of(st.none(), st.sampled_from(JSON_DAMAGE)), seed=st.integers(0, 10**6),
       mode=st.sampled_from(["skip", "raise"]))
def test_mutated_datasets_load_or_fail_clearly(tmp_path_factory, edits, files, json_damage, seed, mode):
    root = tmp_path_factory.mktemp("fuzz")
    data = copy.deepcopy(BASE)
    for k, (_, name, w, h) in enumerate(IMAGES):
        write_png(root / name, w, h, seed=k)
    for fault in files:
        i, name = fault[1], IMAGES[fault[1]][1]
        if fault[0] == "resize":  # a valid image of another size; the JSON says so too, or not
            (root / name).write_bytes(encode(fault[2], fault[3], seed))
            if fault[4]:
                data["images"][i].update(width=fault[2], height=fault[3])
        else:
            _, _, (fmt, pixel_mode), how, fault_seed = fault
            raw = damage(encode(data["images"][i]["width"], data["images"][i]["height"], i, fmt, pixel_mode), how,
                         fault_seed)
            if raw is None:
                (root / name).unlink(missing_ok=True)
            else:
                (root / name).write_bytes(raw)
    json_path = root / "ann.json"
    json_path.write_bytes(json_bytes(apply(data, edits), json_damage, seed))
    named = (str(json_path), *(str(root / n) for _, n, _, _ in IMAGES))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = CocoDetection(root, json_path, on_error=mode)
        except (ValueError, FileNotFoundError) as e:
            assert any(name in str(e) for name in named), f"{type(e).__name__} names no file: {e}"
            event(f"construction: {type(e).__name__}")
            return
        event(f"constructed, {'with' if ds.problems else 'no'} problems")
        for i in range(len(ds)):
            try:
                image, target = ds[i]
            except (ValueError, FileNotFoundError) as e:  # a corrupt image is found when it is read
                assert str(ds.image_info(i)["path"]) in str(e), e
                event(f"sample: {type(e).__name__}")
                continue
            check_sample(image, target, ds, i)
            check_transformed(image, target, seed + i)
            event(f"sample with {('0', '1', '2+')[min(len(target['labels']), 2)]} boxes")
        check_coco_gt(ds)
    ours = [w for w in caught if str(json_path) in str(w.message)]
    assert len(ours) <= 1, [str(w.message) for w in ours]
    if mode == "skip" and ds.problems:
        assert len(ours) == 1 and f"skipped {sum(ds.problems.values())} problem" in str(ours[0].message)
    if mode == "raise":
        assert not ds.problems and not ours


@pytest.mark.filterwarnings("ignore:::PIL")  # Pillow's own warnings about the damage ("Corrupt EXIF data", ...)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(FORMATS), how=st.sampled_from(DAMAGE[:-1]), seed=st.integers(0, 10**6),
       width=st.integers(1, 48), height=st.integers(1, 48))
def test_damaged_image_files_decode_or_fail_clearly(tmp_path_factory, fmt, how, seed, width, height):
    """The decoder surface alone, many formats: an image file decodes to the contract or raises ValueError naming
    the file (Pillow's own exceptions vary by format: OSError, SyntaxError, DecompressionBombError, TypeError...)."""
    path = tmp_path_factory.mktemp("img") / "x.png"
    path.write_bytes(damage(encode(width, height, seed, *fmt), how, seed))
    try:
        image = load_image(path)
    except ValueError as e:
        assert str(path) in str(e), e
        assert how != "none", e  # an undamaged file always decodes
        event(f"ValueError ({type(e.__cause__).__name__})")
        return
    event("decoded")
    assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == 3
    assert 0 <= image.min() and image.max() <= 1
    if how == "none":
        assert image.shape[1:] == (height, width)


@pytest.mark.filterwarnings("ignore:::PIL")
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: "-".join(f))
def test_every_header_byte_set_to_an_extreme(tmp_path, fmt):
    """A sweep, not a sample: each of the first 64 bytes set to 0x00 and to 0xFF in turn (size fields become 0 or
    huge: Pillow then raises DecompressionBombError, which is not an OSError). The image decodes to the contract
    or raises ValueError naming the file."""
    raw, path = encode(33, 21, 1, *fmt), tmp_path / "x.png"
    outcomes = set()
    for i in range(min(64, len(raw))):
        for value in (0x00, 0xFF):
            path.write_bytes(raw[:i] + bytes([value]) + raw[i + 1:])
            try:
                image = load_image(path)
            except ValueError as e:
                assert str(path) in str(e), e
                outcomes.add("ValueError")
                continue
            assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == 3
            assert 0 <= image.min() and image.max() <= 1
            outcomes.add("decoded")
    assert "ValueError" in outcomes, f"no poke broke {fmt}: the sweep tests nothing"


def test_fuzz_inputs_are_what_they_claim(tmp_path):
    """The generators themselves: damaged files really are damaged, the JSON damage really changes the bytes, and
    an unmutated dataset loads cleanly (otherwise every property above would pass vacuously)."""
    raw = encode(40, 30, 0, "TIFF", "RGB")
    assert damage(raw, "poke_header", 12345) != raw and damage(raw, "flip", 12345) != raw
    assert len(damage(raw, "truncate", 12345)) < len(raw) and damage(raw, "delete", 0) is None
    text = json_bytes(BASE, None, 0)
    for how in JSON_DAMAGE:
        assert json_bytes(BASE, how, 777) != text, how
    assert b"[[[[" in json_bytes(apply(BASE, [("ann", 0, "bbox", "@deep")]), None, 0)
    for k, (_, name, w, h) in enumerate(IMAGES):
        write_png(tmp_path / name, w, h, seed=k)
    (tmp_path / "ann.json").write_bytes(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = CocoDetection(tmp_path, tmp_path / "ann.json", on_error="raise")
    assert len(ds) == 3 and sum(len(ds[i][1]["labels"]) for i in range(3)) == 6
