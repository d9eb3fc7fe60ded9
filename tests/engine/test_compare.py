"""`detrcore compare` on tiny data: tables, plot, and a finished variant is not trained again."""
import json

from click.testing import CliRunner

from detrcore.cli import main
from tests.engine.tiny_data import TINY_MODEL, write_tiny_dataset


def test_compare_two_variants_and_resume(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    sets = sum((["--set", s] for s in TINY_MODEL), [])
    args = ["compare", "--data", str(data), "--epochs", "1", "--models", "detr,deformable", "--out",
            str(tmp_path / "cmp"), "--set", "batch_size=2", *sets]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "cmp"
    table = (out / "compare.md").read_text()
    assert "| detr |" in table and "| deformable |" in table and "AP50" in table and "box" in table
    rows = (out / "compare.csv").read_text().splitlines()
    assert rows[0].startswith("variant,AP,AP50") and "AP_box" in rows[0] and len(rows) == 3
    assert (out / "compare.png").stat().st_size > 0
    first = json.loads((out / "detr" / "result.json").read_text())
    assert first["parameters"] > first["trainable_parameters"] > 0 and first["images_per_second"] > 0
    again = CliRunner().invoke(main, args)  # finished variants are not trained again
    assert again.exit_code == 0 and "already trained" in again.output
    assert json.loads((out / "detr" / "result.json").read_text()) == first
    bad = CliRunner().invoke(main, ["compare", "--models", "yolo"])
    assert bad.exit_code != 0 and "unknown variant" in bad.output
