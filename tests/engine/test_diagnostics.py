"""Training diagnostics (histogram PNGs, per-step gradient norms) and attention pictures on tiny data."""
import json

import pytest
from click.testing import CliRunner
from PIL import Image

from detrcore.cli import main
from detrcore.engine.config import make_config
from detrcore.engine.diagnostics import group_of
from detrcore.engine.train import fit
from tests.engine.tiny_data import TINY_MODEL, write_tiny_dataset


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    data = write_tiny_dataset(root / "data")
    cfg = make_config(None, [*TINY_MODEL, "diagnostics=true"], data=str(data), out=str(root / "run"), epochs=2,
                      batch_size=2)
    fit(cfg, log=lambda *a: None)
    return data, root / "run"


def test_diagnostics_files(run):
    _, out = run
    d = out / "diagnostics"
    for name in ("weights.png", "gradients.png", "histograms.json", "steps.jsonl"):
        assert (d / name).stat().st_size > 0, name
    steps = [json.loads(x) for x in (d / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 7)) and all(s["grad_norm"] > 0 for s in steps)
    hist = json.loads((d / "histograms.json").read_text())
    assert [r["epoch"] for r in hist["weights"]] == [1, 2]
    groups = set(hist["gradients"][0]["groups"])
    assert {"backbone", "encoder attention", "decoder attention", "heads"} <= groups
    with Image.open(d / "weights.png") as im:
        assert im.size[0] > 300


def test_layer_groups():
    assert group_of("backbone.body.layer2.0.conv1.weight") == "backbone"
    assert group_of("transformer.encoder.layers.0.self_attn.value_proj.weight") == "encoder attention"
    assert group_of("transformer.decoder.layers.1.linear2.bias") == "decoder ffn"
    assert group_of("bbox_embed.0.layers.2.weight") == "heads" and group_of("query_embed.weight") == "other"


def test_attention_picture(run, tmp_path):
    data, out = run
    target = tmp_path / "attn.png"
    r = CliRunner().invoke(main, ["visualize", "attention", "--checkpoint", str(out / "last.pt"), "--image",
                                  str(data / "valid" / "img0.png"), "--queries", "3", "--out", str(target)])
    assert r.exit_code == 0, r.output
    assert "3 levels" in r.output or "levels" in r.output
    with Image.open(target) as im:
        assert im.size[0] > 600
    r = CliRunner().invoke(main, ["visualize", "attention", "--checkpoint", str(out / "last.pt"), "--image",
                                  str(tmp_path / "none.png")])
    assert r.exit_code != 0 and "image not found" in r.output
