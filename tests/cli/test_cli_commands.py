"""Every `detrcore` command on tiny data, and its errors for missing files and bad config."""
import json

import pytest
from click.testing import CliRunner
from PIL import Image

from detrcore.cli import main
from tests.engine.tiny_data import TINY_MODEL, write_tiny_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = write_tiny_dataset(root / "data")
    out = root / "run"
    sets = sum((["--set", s] for s in TINY_MODEL), [])
    result = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(out), "--epochs", "1",
                                       "--batch-size", "2", "--model", "deformable", *sets])
    assert result.exit_code == 0, result.output
    return data, out, result.output


def test_train_reports_and_writes(trained):
    _, out, output = trained
    assert "epoch 1:" in output and "AP50" in output
    assert (out / "best.pt").is_file() and (out / "metrics.csv").is_file()


def test_eval(trained, tmp_path):
    data, out, _ = trained
    result = CliRunner().invoke(main, ["eval", "--checkpoint", str(out / "best.pt"), "--data", str(data),
                                       "--out", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "e.json").read_text())
    assert {"AP", "AP50", "per_class"} <= set(summary) and len(summary["per_class"]) == 2


def test_predict(trained, tmp_path):
    data, out, _ = trained
    images = [str(data / "valid" / "img0.png"), str(data / "valid" / "img1.png")]
    result = CliRunner().invoke(main, ["predict", "--checkpoint", str(out / "best.pt"), *images,
                                       "--out", str(tmp_path / "p"), "--threshold", "0.0"])
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "p" / "detections.json").read_text())
    assert [r["image"] for r in records] == images and records[0]["detections"]
    assert records[0]["detections"][0]["label"] in ("box", "hole")
    with Image.open(tmp_path / "p" / "img0.png") as im:
        assert im.size == (96, 96)


def test_data_convert_voc_and_yolo(tmp_path):
    img = tmp_path / "imgs"
    img.mkdir()
    Image.new("RGB", (40, 30)).save(img / "a.png")
    (img / "a.xml").write_text("<annotation><filename>a.png</filename><size><width>40</width><height>30</height>"
                               "</size><object><name>tree</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>20</xmax>"
                               "<ymax>25</ymax></bndbox></object></annotation>")
    result = CliRunner().invoke(main, ["data", "convert", "--from", "voc", "--images", str(img),
                                       "--out", str(tmp_path / "voc.json")])
    assert result.exit_code == 0, result.output
    coco = json.loads((tmp_path / "voc.json").read_text())
    assert coco["annotations"][0]["bbox"] == [2, 3, 18, 22]
    (img / "a.txt").write_text("0 0.5 0.5 0.25 0.2\n")
    result = CliRunner().invoke(main, ["data", "convert", "--from", "yolo", "--images", str(img), "--labels",
                                       str(img), "--classes", "tree", "--out", str(tmp_path / "yolo.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "yolo.json").read_text())["annotations"][0]["bbox"] == pytest.approx([15, 12, 10, 6])


def test_clear_errors(trained, tmp_path):
    data, out, _ = trained
    r = CliRunner().invoke(main, ["train", "--data", str(data), "--set", "model.hiddn=3"])
    assert r.exit_code != 0 and "unknown config key: model.hiddn" in r.output
    r = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "nowhere")])
    assert r.exit_code != 0 and "nowhere" in r.output
    r = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "fresh"), "--resume"])
    assert r.exit_code != 0 and "no checkpoint" in r.output
    r = CliRunner().invoke(main, ["eval", "--checkpoint", str(tmp_path / "missing.pt")])
    assert r.exit_code != 0 and "checkpoint not found" in r.output
    r = CliRunner().invoke(main, ["predict", "--checkpoint", str(out / "best.pt"), str(tmp_path / "no.png")])
    assert r.exit_code != 0 and "image not found" in r.output
    r = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "missing.json")])
    assert r.exit_code != 0 and "config file not found" in r.output
