"""CocoDetection: sample contract, category mapping, on_error skip/raise per problem kind, split discovery."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from detrcore.data import CocoDetection, find_coco_splits, train_transforms

from .conftest import write_coco, write_png

CATS = [{"id": 1, "name": "tree"}]


def test_sample_contract(tiny_coco):
    image_dir, json_path = tiny_coco
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # clean data: no warning
        ds = CocoDetection(image_dir, json_path)
    assert len(ds) == 3 and ds.image_ids == [1, 2, 3] and ds.coco_json_path == json_path
    image, target = ds[1]
    assert image.dtype == torch.float32 and image.shape == (3, 48, 64)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["image_id"] == 2 and isinstance(target["image_id"], int)
    torch.testing.assert_close(target["boxes"], torch.tensor([[30.5, 20, 40.5, 28], [50, 40, 64, 48]]))
    assert target["orig_size"].tolist() == [48, 64] and target["size"].tolist() == [48, 64]
    assert target["orig_size"].dtype == torch.int64
    # an image without annotations is a valid (background) sample
    image, target = ds[2]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_pixels_match_the_file(tiny_coco):
    import numpy as np
    from PIL import Image

    image_dir, json_path = tiny_coco
    image, _ = CocoDetection(image_dir, json_path)[0]
    want = torch.from_numpy(np.array(Image.open(image_dir / "a.png").convert("RGB"))).permute(2, 0, 1) / 255
    torch.testing.assert_close(image, want.float())


def test_category_mapping_round_trip(tiny_coco):
    image_dir, json_path = tiny_coco
    ds = CocoDetection(image_dir, json_path)
    assert ds.num_classes == 3
    assert ds.categories == [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}, {"id": 10, "name": "ten"}]
    assert ds.label_to_category_id == [3, 7, 10] and ds.category_id_to_label == {3: 0, 7: 1, 10: 2}
    assert ds.class_names == ["three", "seven", "ten"]
    file_anns = json.loads(json_path.read_text())["annotations"]
    got = []
    for i in range(len(ds)):
        _, t = ds[i]
        got += [(t["image_id"], ds.label_to_category_id[int(label)]) for label in t["labels"]]
    assert sorted(got) == sorted((a["image_id"], a["category_id"]) for a in file_anns)
    for label, cid in enumerate(ds.label_to_category_id):
        assert ds.category_id_to_label[cid] == label


def test_coco_gt_is_the_cleaned_file(tiny_coco):
    image_dir, json_path = tiny_coco
    gt = CocoDetection(image_dir, json_path).coco_gt
    assert [im["id"] for im in gt["images"]] == [1, 2, 3]
    assert [a["id"] for a in gt["annotations"]] == [1, 2, 3, 4]
    assert [a["category_id"] for a in gt["annotations"]] == [7, 3, 10, 3]
    assert gt["annotations"][3]["bbox"] == [50, 40, 14, 8]  # clipped, xywh
    assert gt["categories"][0] == {"id": 3, "name": "three"}


def test_transforms_and_normalization(tiny_coco):
    image_dir, json_path = tiny_coco
    norm = ((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    ds = CocoDetection(image_dir, json_path, transforms=train_transforms(norm, scales=[32, 40], max_size=64))
    assert ds.normalization == norm
    image, target = ds[0]
    assert min(image.shape[-2:]) in (32, 40) and target["size"].tolist() == list(image.shape[-2:])
    assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
    assert target["orig_size"].tolist() == [48, 64]
    assert CocoDetection(image_dir, json_path).normalization is None


def test_crowd_annotations_are_left_out(tmp_path):
    json_path = write_coco(tmp_path, [(1, "a.png", 64, 48)], [(1, 1, [1, 1, 5, 5]), (1, 1, [2, 2, 9, 9],
                                                                                       {"iscrowd": 1})], CATS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = CocoDetection(tmp_path, json_path)
    assert ds[0][1]["boxes"].shape == (1, 4) and ds.num_crowd_skipped == 1
    assert [(a["id"], a["iscrowd"]) for a in ds.coco_gt["annotations"]] == [(1, 0), (2, 1)]  # COCOeval needs it


# ---- bad input: one case per problem kind: (images, annotations, the problem's name in the warning) ----
def _bad_case(kind, tmp_path):
    images = [(1, "a.png", 64, 48), (2, "b.png", 64, 48)]
    good = (1, 1, [1, 1, 5, 5])
    if kind == "degenerate box":
        return images, [good, (2, 1, [10, 10, 0, 5]), (2, 1, [70, 10, 5, 5])], 2, "b.png"
    if kind == "unknown category id":
        return images, [good, (2, 99, [10, 10, 5, 5])], 1, "b.png"
    if kind == "malformed bbox":
        return images, [good, (2, 1, [10, 10, 5])], 1, "b.png"
    if kind == "annotation of an unknown or skipped image":
        return images, [good, (42, 1, [10, 10, 5, 5])], 1, "42"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["degenerate box", "unknown category id", "malformed bbox",
                                  "annotation of an unknown or skipped image"])
def test_bad_annotations_skip_with_one_counted_warning(kind, tmp_path):
    images, anns, count, name = _bad_case(kind, tmp_path)
    json_path = write_coco(tmp_path, images, anns, CATS)
    with pytest.warns(UserWarning) as record:
        ds = CocoDetection(tmp_path, json_path, on_error="skip")
    assert len(record) == 1
    message = str(record[0].message)
    assert f"{count} x {kind}" in message and str(json_path) in message and name in message
    assert ds.problems[kind] == count
    assert len(ds) == 2 and ds[0][1]["boxes"].shape == (1, 4) and ds[1][1]["boxes"].shape == (0, 4)


@pytest.mark.parametrize("kind", ["degenerate box", "unknown category id", "malformed bbox",
                                  "annotation of an unknown or skipped image"])
def test_bad_annotations_raise(kind, tmp_path):
    images, anns, _, name = _bad_case(kind, tmp_path)
    json_path = write_coco(tmp_path, images, anns, CATS)
    with pytest.raises(ValueError, match=name) as e:
        CocoDetection(tmp_path, json_path, on_error="raise")
    assert str(json_path) in str(e.value)


def test_several_problems_give_one_warning_with_all_counts(tmp_path):
    images = [(1, "a.png", 64, 48), (2, "b.png", 64, 48), (3, "gone.png", 64, 48)]
    anns = [(1, 1, [1, 1, 5, 5]), (1, 5, [1, 1, 5, 5]), (2, 1, [1, 1, 0, 0]), (2, 1, [3, 3, 0, 9]),
            (3, 1, [1, 1, 5, 5])]
    json_path = write_coco(tmp_path, images, anns, CATS)
    (tmp_path / "gone.png").unlink()
    with pytest.warns(UserWarning) as record:
        ds = CocoDetection(tmp_path, json_path)
    assert len(record) == 1
    message = str(record[0].message)
    for part in ("1 x unknown category id", "2 x degenerate box", "1 x missing image file", "gone.png"):
        assert part in message
    assert "annotation of an unknown" not in message  # the missing image's annotation is not double-counted
    assert len(ds) == 2


def test_missing_image_file(tmp_path):
    json_path = write_coco(tmp_path, [(1, "a.png", 64, 48), (2, "b.png", 64, 48)], [(2, 1, [1, 1, 5, 5])], CATS)
    (tmp_path / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="b.png"):
        CocoDetection(tmp_path, json_path, on_error="raise")
    with pytest.warns(UserWarning, match="1 x missing image file.*b.png"):
        ds = CocoDetection(tmp_path, json_path, on_error="skip")
    assert ds.image_ids == [1]


def test_corrupt_image_file(tmp_path):
    json_path = write_coco(tmp_path, [(1, "a.png", 64, 48), (2, "b.png", 64, 48)], [(2, 1, [1, 1, 5, 5])], CATS)
    (tmp_path / "b.png").write_bytes(b"not a png at all")
    ds = CocoDetection(tmp_path, json_path)  # found lazily ...
    ds[0]
    with pytest.raises(ValueError, match="b.png"):
        ds[1]
    with pytest.raises(ValueError, match="b.png"):  # ... or up front on request
        CocoDetection(tmp_path, json_path, on_error="raise", verify_images=True)
    with pytest.warns(UserWarning, match="1 x unreadable image file.*b.png"):
        ds = CocoDetection(tmp_path, json_path, verify_images=True)
    assert ds.image_ids == [1]


def test_image_size_mismatch_is_named(tmp_path):
    json_path = write_coco(tmp_path, [(1, "a.png", 64, 48)], [(1, 1, [1, 1, 5, 5])], CATS)
    write_png(tmp_path / "a.png", 50, 50)
    with pytest.raises(ValueError, match="a.png is 50x50 but .* says 64x48"):
        CocoDetection(tmp_path, json_path)[0]


def test_bad_files_and_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(tmp_path, tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        CocoDetection(tmp_path, tmp_path / "bad.json")
    (tmp_path / "nocats.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="nocats.json: no 'categories'"):
        CocoDetection(tmp_path, tmp_path / "nocats.json")
    with pytest.raises(ValueError, match="on_error"):
        CocoDetection(tmp_path, tmp_path / "nocats.json", on_error="ignore")
    with pytest.raises(FileNotFoundError, match="image folder"):
        CocoDetection(tmp_path / "missing", tmp_path / "nocats.json")


# ---- split discovery ----
def test_roboflow_layout(tmp_path):
    for split in ("train", "valid", "test"):
        write_coco(tmp_path / split, [(1, "a.png", 64, 48)], [(1, 1, [1, 1, 5, 5])], CATS)
    splits = find_coco_splits(tmp_path)
    assert set(splits) == {"train", "val", "test"}
    assert splits["val"] == (tmp_path / "valid", tmp_path / "valid" / "_annotations.coco.json")
    assert len(CocoDetection(*splits["train"])) == 1


def test_coco_layout(tmp_path):
    for split in ("train2017", "val2017"):
        write_coco(tmp_path / split, [(1, "a.png", 64, 48)], [(1, 1, [1, 1, 5, 5])], CATS,
                   json_name=f"instances_{split}.json", json_dir=tmp_path / "annotations")
    splits = find_coco_splits(tmp_path)
    assert splits == {"train": (tmp_path / "train2017", tmp_path / "annotations" / "instances_train2017.json"),
                      "val": (tmp_path / "val2017", tmp_path / "annotations" / "instances_val2017.json")}
    assert len(CocoDetection(*splits["val"])) == 1


def test_single_json(tmp_path):
    json_path = write_coco(tmp_path / "imgs", [(1, "a.png", 64, 48)], [], CATS, json_name="labels.json",
                           json_dir=tmp_path)
    assert find_coco_splits(json_path, image_dir=tmp_path / "imgs") == {"train": (tmp_path / "imgs", json_path)}
    assert find_coco_splits(json_path) == {"train": (tmp_path, json_path)}
    write_coco(tmp_path / "rf", [(1, "a.png", 64, 48)], [], CATS)  # a bare Roboflow split folder
    assert find_coco_splits(tmp_path / "rf")["train"][0] == tmp_path / "rf"


def test_nothing_found_lists_what_was_looked_for(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        find_coco_splits(tmp_path)
    for part in ("_annotations.coco.json", "instances_", "train,valid,test"):
        assert part in str(e.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        find_coco_splits(tmp_path / "nowhere")


# Found by tests/data/test_data_fuzz.py: junk of the wrong JSON type where an id, size, bbox or list belongs.
@pytest.mark.parametrize("field,value,kind", [
    ("category_id", [1], "unknown category id"),  # was: TypeError (unhashable)
    ("image_id", {"a": 1}, "annotation of an unknown or skipped image"),  # was: TypeError
    ("bbox", "1234", "malformed bbox"),  # was: read as the box [1, 2, 3, 4]
])
def test_junk_annotation_fields_are_counted_problems(tmp_path, field, value, kind):
    json_path = write_coco(tmp_path, [(1, "a.png", 64, 48)], [(1, 1, [10, 10, 5, 5]), (1, 1, [1, 1, 5, 5])], CATS)
    data = json.loads(json_path.read_text())
    data["annotations"][1][field] = value
    json_path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=kind):
        ds = CocoDetection(tmp_path, json_path, on_error="skip")
    assert ds.problems == {kind: 1} and ds[0][1]["boxes"].shape == (1, 4)


def test_junk_area_and_id_fall_back(tmp_path):
    json_path = write_coco(tmp_path, [(1, "a.png", 64, 48)], [(1, 1, [10, 10, 5, 4], {"area": "big", "id": "x"})],
                           CATS)  # were: ValueError from float("big") / int("x") naming no file
    ds = CocoDetection(tmp_path, json_path)
    ann = ds.coco_gt["annotations"][0]
    assert ann["area"] == 20.0 and "id" not in ann


@pytest.mark.parametrize("edit", [{"annotations": True}, {"images": [{"id": 1, "file_name": "a.png", "width": "w"}]},
                                  {"categories": [{"id": "one"}]}])
def test_junk_lists_and_entries_name_the_json(tmp_path, edit):
    json_path = write_coco(tmp_path, [(1, "a.png", 64, 48)], [(1, 1, [10, 10, 5, 5])], CATS)
    json_path.write_text(json.dumps({**json.loads(json_path.read_text()), **edit}))
    with pytest.raises(ValueError, match="ann|malformed") as e:  # was: TypeError / bare ValueError
        CocoDetection(tmp_path, json_path)
    assert str(json_path) in str(e.value)


# Found by tests/data/test_data_fuzz.py (second round): values past the int64/float range, bytes that are not UTF-8,
# nesting past the recursion limit, a damaged image header, ids pycocotools mis-scores.
def _edited(tmp_path, edit, anns=((1, 1, [10, 10, 5, 5]), (1, 1, [1, 1, 5, 5]))):
    json_path = write_coco(tmp_path, [(1, "a.png", 64, 48)], list(anns), CATS)
    data = json.loads(json_path.read_text())
    edit(data)
    json_path.write_text(json.dumps(data))
    return json_path


@pytest.mark.parametrize("field,value,kind", [
    ("bbox", [1, 1, 10**400, 5], "malformed bbox"),  # was: OverflowError
    ("bbox", [True, True, 5, 5], "malformed bbox"),  # was: read as [1, 1, 5, 5]
    ("bbox", ["1_0", "2", "5", "5"], "malformed bbox"),  # was: float("1_0") == 10.0
    ("bbox", [1, 1, 1e-10, 5], "degenerate box"),  # was: kept, 0 wide once stored as float32
    ("iscrowd", "0", "malformed annotation"),  # was: truthy, so left out of training as a crowd region
    ("iscrowd", 2, "malformed annotation"),
])
def test_junk_annotation_values_are_counted_problems(tmp_path, field, value, kind):
    json_path = _edited(tmp_path, lambda d: d["annotations"][1].update({field: value}))
    with pytest.warns(UserWarning, match=kind):
        ds = CocoDetection(tmp_path, json_path, on_error="skip")
    assert ds.problems == {kind: 1} and ds[0][1]["boxes"].tolist() == [[10, 10, 15, 15]]
    with pytest.raises(ValueError, match=f"annotation 2 in {json_path}"):
        CocoDetection(tmp_path, json_path, on_error="raise")


@pytest.mark.parametrize("field,value", [("id", 2**70), ("id", 1e300), ("id", 0), ("area", 10**400)],
                         ids=["id-2**70", "id-1e300", "id-0", "area-10**400"])
def test_out_of_range_ids_and_areas_fall_back(tmp_path, field, value):  # were: OverflowError (id, area)
    json_path = _edited(tmp_path, lambda d: d["annotations"][0].update({field: value}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gt = CocoDetection(tmp_path, json_path, on_error="raise").coco_gt
    ann = gt["annotations"][0]
    assert ann["area"] == 25.0 and ("id" not in ann if field == "id" else ann["id"] == 1)


def test_duplicate_or_zero_annotation_ids_do_not_corrupt_the_score(tmp_path):
    """pycocotools indexes ground truth by id: with two boxes of one id it scores one box twice and the other never,
    and it reads a matched id of 0 as "no match" (a perfect prediction scored AP50 0.25)."""
    from detrcore.engine.evaluate import CocoEvaluator

    boxes = [[1, 1, 5, 5], [10, 10, 5, 5], [30, 20, 10, 10]]
    json_path = _edited(tmp_path, lambda d: [a.update(id=i) for a, i in zip(d["annotations"], (0, 4, 4))],
                        [(1, 1, b) for b in boxes])
    with pytest.raises(ValueError, match="annotation 4 .* has the id of an earlier annotation"):
        CocoDetection(tmp_path, json_path, on_error="raise")
    with pytest.warns(UserWarning, match="1 x duplicate annotation id"):
        ds = CocoDetection(tmp_path, json_path)
    assert [a.get("id") for a in ds.coco_gt["annotations"]] == [None, 4]  # the evaluator numbers the first
    _, target = ds[0]
    evaluator = CocoEvaluator(ds.coco_gt, ds.label_to_category_id)
    evaluator.update({1: {"boxes": target["boxes"], "labels": target["labels"],
                          "scores": torch.linspace(0.9, 0.8, len(target["labels"]))}})
    assert evaluator.summarize()["AP50"] == pytest.approx(1.0)


@pytest.mark.parametrize("raw,match", [
    ('{"images": ' + "[" * 100_000, "nested too deeply"),  # was: RecursionError
    ('{"x": ' + "9" * 5000 + "}", "cannot be read as JSON"),  # was: ValueError naming no file
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "is not valid JSON"),  # was: UnicodeDecodeError naming no file
], ids=["nested-100000-deep", "integer-of-5000-digits", "binary"])
def test_unreadable_json_names_the_file(tmp_path, raw, match):
    path = tmp_path / "ann.json"
    path.write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    with pytest.raises(ValueError, match=match) as e:
        CocoDetection(tmp_path, path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_json_with_a_bom_or_in_utf16_is_read(tmp_path, encoding):  # was: rejected / UnicodeDecodeError
    json_path = write_coco(tmp_path, [(1, "a.png", 64, 48)], [(1, 1, [1, 1, 5, 5])], [{"id": 1, "name": "café"}])
    json_path.write_bytes(json_path.read_text().encode(encoding))
    ds = CocoDetection(tmp_path, json_path, on_error="raise")
    assert ds.class_names == ["café"] and len(ds[0][1]["boxes"]) == 1


def test_file_name_the_file_system_refuses_is_a_missing_image(tmp_path):  # was: OSError ENAMETOOLONG
    json_path = _edited(tmp_path, lambda d: d["images"][0].update(file_name="x" * 300))
    with pytest.raises(FileNotFoundError, match="File name too long.*image id 1"):
        CocoDetection(tmp_path, json_path, on_error="raise")
    with pytest.warns(UserWarning, match="1 x missing image file"):
        assert len(CocoDetection(tmp_path, json_path)) == 0


def test_absurd_image_size_names_the_json(tmp_path):  # was: accepted; a box of inf width once stored as float32
    json_path = _edited(tmp_path, lambda d: d["images"][0].update(width=10**40))
    with pytest.raises(ValueError, match="malformed image entry .*not a positive integer below 2\\*\\*31") as e:
        CocoDetection(tmp_path, json_path)
    assert str(json_path) in str(e.value)


def test_any_decoder_failure_names_the_image(tmp_path, monkeypatch):
    """Pillow raises DecompressionBombError (not an OSError) for a header claiming a huge image; other damage makes
    its plugins raise TypeError, struct.error, ... All become ValueError naming the file."""
    from PIL import Image

    from detrcore.data import load_image

    path = write_png(tmp_path / "a.png", 64, 48)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 48 is now more than twice the limit
    with pytest.raises(ValueError, match=f"cannot decode image file {path}: DecompressionBombError"):
        load_image(path)
    monkeypatch.setattr(Image.Image, "convert", lambda *a, **k: (_ for _ in ()).throw(TypeError("plugin bug")))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ValueError, match=f"cannot decode image file {path}: TypeError: plugin bug"):
        load_image(path)


def test_size_mismatch_is_found_before_decoding(tmp_path, monkeypatch):
    """A damaged header can claim a gigapixel image: the JSON's size is compared with the header first."""
    from PIL import Image

    json_path = write_coco(tmp_path, [(1, "a.png", 64, 48)], [(1, 1, [1, 1, 5, 5])], CATS)
    write_png(tmp_path / "a.png", 50, 50)
    monkeypatch.setattr(Image.Image, "convert", lambda *a, **k: pytest.fail("decoded an image of the wrong size"))
    with pytest.raises(ValueError, match="a.png is 50x50 but .* says 64x48"):
        CocoDetection(tmp_path, json_path)[0]
