"""VOC -> COCO and YOLO -> COCO: round trips through CocoDetection, and errors that name the file/line."""
from __future__ import annotations

import json

import pytest
import torch

from detrcore.data import CocoDetection, voc_to_coco, yolo_to_coco
from detrcore.data.convert import _parse_names_block

from .conftest import write_png


def _voc(path, filename, w, h, objects):
    objs = "".join(f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{a}</xmin><ymin>{b}</ymin>"
                   f"<xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>" for n, (a, b, c, d) in objects)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><filename>{filename}</filename><size><width>{w}</width><height>{h}</height>"
                    f"<depth>3</depth></size>{objs}</annotation>")


@pytest.fixture
def voc_set(tmp_path):
    write_png(tmp_path / "img" / "a.png", 64, 48)
    write_png(tmp_path / "img" / "b.jpg", 40, 30, seed=1)
    _voc(tmp_path / "xml" / "a.xml", "a.png", 64, 48, [("tree", (1, 2, 11, 22)), ("bush", (30, 30, 70, 47))])
    _voc(tmp_path / "xml" / "b.xml", "", 40, 30, [("tree", (5, 5, 6, 7))])  # no <filename>: found by stem
    return tmp_path


def test_voc_round_trip(voc_set):
    out = voc_set / "out" / "coco.json"
    coco = voc_to_coco(voc_set / "xml", voc_set / "img", out)
    assert json.loads(out.read_text()) == coco
    assert coco["categories"] == [{"id": 1, "name": "bush"}, {"id": 2, "name": "tree"}]  # sorted names
    assert [im["file_name"] for im in coco["images"]] == ["a.png", "b.jpg"]
    ds = CocoDetection(voc_set / "img", out)
    _, t = ds[0]
    torch.testing.assert_close(t["boxes"], torch.tensor([[1.0, 2, 11, 22], [30, 30, 64, 47]]))  # clipped
    assert [ds.class_names[int(k)] for k in t["labels"]] == ["tree", "bush"]
    _, t = ds[1]
    torch.testing.assert_close(t["boxes"], torch.tensor([[5.0, 5, 6, 7]]))
    assert not list(out.parent.glob(".*.tmp"))  # no temp file left behind


def test_voc_given_categories(voc_set):
    coco = voc_to_coco(voc_set / "xml", voc_set / "img", voc_set / "c.json", categories=["tree", "bush", "rock"])
    assert [c["name"] for c in coco["categories"]] == ["tree", "bush", "rock"]
    with pytest.raises(ValueError, match=r"a.xml.*'bush'"):
        voc_to_coco(voc_set / "xml", voc_set / "img", voc_set / "c.json", categories=["tree"])


def test_voc_errors_name_the_file(voc_set):
    (voc_set / "xml" / "c.xml").write_text("<annotation><filename>a.png")
    with pytest.raises(ValueError, match="c.xml: malformed XML"):
        voc_to_coco(voc_set / "xml", voc_set / "img", voc_set / "o.json")
    _voc(voc_set / "xml" / "c.xml", "zzz.png", 5, 5, [])
    with pytest.raises(FileNotFoundError, match="c.xml: no image found"):
        voc_to_coco(voc_set / "xml", voc_set / "img", voc_set / "o.json")
    _voc(voc_set / "xml" / "c.xml", "a.png", 99, 99, [])
    with pytest.raises(ValueError, match="c.xml: <size> says 99x99"):
        voc_to_coco(voc_set / "xml", voc_set / "img", voc_set / "o.json")
    _voc(voc_set / "xml" / "c.xml", "a.png", 64, 48, [("tree", (5, 5, "x", 9))])
    with pytest.raises(ValueError, match=r"c.xml: object #0 \(tree\)"):
        voc_to_coco(voc_set / "xml", voc_set / "img", voc_set / "o.json")
    _voc(voc_set / "xml" / "c.xml", "a.png", 64, 48, [("tree", (9, 5, 9, 9))])
    with pytest.raises(ValueError, match="c.xml: object #0.*no area"):
        voc_to_coco(voc_set / "xml", voc_set / "img", voc_set / "o.json")
    assert not (voc_set / "o.json").exists()  # nothing written on failure


@pytest.fixture
def yolo_set(tmp_path):
    root = tmp_path / "ds"
    write_png(root / "images" / "a.png", 64, 48)
    write_png(root / "images" / "b.png", 40, 30, seed=1)
    write_png(root / "images" / "c.png", 40, 30, seed=2)  # no label file: background image
    (root / "labels").mkdir()
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.25 0.5\n\n1 0.125 0.25 0.25 0.5\n")
    (root / "labels" / "b.txt").write_text("1 0.95 0.5 0.2 0.2\n")  # right edge clipped
    return root


def test_yolo_round_trip_with_data_yaml(yolo_set):
    (yolo_set / "data.yaml").write_text("path: .\ntrain: images\nnames:\n  0: tree\n  1: bush\n")
    coco = yolo_to_coco(yolo_set, yolo_set / "coco.json")
    assert coco["categories"] == [{"id": 1, "name": "tree"}, {"id": 2, "name": "bush"}]
    ds = CocoDetection(yolo_set / "images", yolo_set / "coco.json")
    _, t = ds[0]
    torch.testing.assert_close(t["boxes"], torch.tensor([[24.0, 12, 40, 36], [0, 0, 16, 24]]))
    assert t["labels"].tolist() == [0, 1] and ds.class_names == ["tree", "bush"]
    _, t = ds[1]
    torch.testing.assert_close(t["boxes"], torch.tensor([[34.0, 12, 40, 18]]))
    assert ds[2][1]["boxes"].shape == (0, 4)


def test_yolo_class_names_sources(yolo_set):
    (yolo_set / "labels" / "classes.txt").write_text("oak\npine\n")
    coco = yolo_to_coco(yolo_set / "images", yolo_set / "c.json")  # the images folder itself; labels beside it
    assert [c["name"] for c in coco["categories"]] == ["oak", "pine"]
    coco = yolo_to_coco(yolo_set, yolo_set / "c.json", class_names=["x", "y", "z"])
    assert [c["name"] for c in coco["categories"]] == ["x", "y", "z"]
    (yolo_set / "labels" / "classes.txt").unlink()
    coco = yolo_to_coco(yolo_set, yolo_set / "c.json")  # nothing: "0", "1"
    assert [c["name"] for c in coco["categories"]] == ["0", "1"]


def test_yolo_labels_next_to_images(tmp_path):
    write_png(tmp_path / "a.png", 64, 48)
    (tmp_path / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    coco = yolo_to_coco(tmp_path, tmp_path / "out.json", class_names=["tree"])
    assert coco["annotations"][0]["bbox"] == [16.0, 12.0, 32.0, 24.0]


@pytest.mark.parametrize("line,match", [("0 0.5 0.5 0.2", "5 values"), ("0 0.1 0.1 0.1 0.1 0.2 0.2", "polygons"),
                                        ("0 a 0.5 0.2 0.2", "non-numeric"), ("1.5 0.5 0.5 0.2 0.2", "integer"),
                                        ("7 0.5 0.5 0.2 0.2", "class 7"), ("0 0.5 0.5 0 0.2", "positive w h"),
                                        ("0 2.0 2.0 0.2 0.2", "outside")])
def test_yolo_bad_lines_name_file_and_line(yolo_set, line, match):
    (yolo_set / "labels" / "b.txt").write_text("0 0.5 0.5 0.2 0.2\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"b.txt:2: .*{match}"):
        yolo_to_coco(yolo_set, yolo_set / "c.json", class_names=["tree", "bush"])


def test_yolo_orphan_labels_warn(yolo_set):
    (yolo_set / "labels" / "zzz.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.warns(UserWarning, match="1 label file.*zzz.txt"):
        yolo_to_coco(yolo_set, yolo_set / "c.json")


def test_yolo_missing_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder"):
        yolo_to_coco(tmp_path / "nope", tmp_path / "c.json")
    write_png(tmp_path / "imgs" / "a.png")
    with pytest.raises(FileNotFoundError, match="no YOLO labels"):
        yolo_to_coco(tmp_path / "imgs", tmp_path / "c.json")


@pytest.mark.parametrize("text,want", [("names: [tree, 'bush']\n", ["tree", "bush"]),
                                       ("names:\n  - tree\n  - bush\nnc: 2\n", ["tree", "bush"]),
                                       ("names:\n  0: tree\n  1: \"bush\"\n", {"0": "tree", "1": "bush"}),
                                       ("nc: 2\n", None)])
def test_minimal_yaml_names_parser(text, want):
    assert _parse_names_block(text) == want
