"""The `detrcore` command line: info and bench on tiny sizes (the real sizes run in benchmarks/)."""
import functools
import json
import sys

import pytest
from click.testing import CliRunner

from detrcore.bench import _common, assignment, box_ops, conv, msda
from detrcore.cli import main


@pytest.fixture
def tiny_benchmarks(monkeypatch):
    fast = functools.partial(_common.time_call, min_time=0.001)
    for mod in (box_ops, assignment, msda):
        monkeypatch.setattr(mod, "time_call", fast)
    monkeypatch.setattr(msda, "time_interleaved", functools.partial(_common.time_interleaved, min_time=0.001))
    monkeypatch.setattr(box_ops, "SHAPES", [(1, 9, 4), (2, 9, 4)])
    monkeypatch.setattr(box_ops, "LOSS_SIZES", [5])
    monkeypatch.setattr(assignment, "QUERIES", [12])
    monkeypatch.setattr(assignment, "TARGETS", [1, 4])
    monkeypatch.setattr(assignment, "BATCH", (3, 12, 4))
    monkeypatch.setattr(msda, "CPU_LEVELS", [(6, 5), (3, 3)])
    monkeypatch.setattr(conv, "time_interleaved", functools.partial(_common.time_interleaved, min_time=0.001))
    # 128 2x2 tiles: F(2x2); 50 4x4 tiles: F(4x4); 8 channels: torch
    monkeypatch.setattr(conv, "SHAPES", [(2, 128, 16, 16), (2, 128, 20, 20), (1, 8, 5, 7)])
    # a forward alone: 160 4x4 tiles of 64 channels: F(4x4); 8 channels: torch; ResNet-50 on one 64 x 64 image
    monkeypatch.setattr(conv, "FORWARD_SHAPES", [(2, 64, 32, 40), (1, 8, 5, 7)])
    monkeypatch.setattr(conv, "BACKBONE_INPUTS", [(1, 3, 64, 64)])


def test_interleaved_timing_goes_round_robin():
    order = []
    samples = _common.time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                       repeats=3, min_time=0)
    assert [len(v) for v in samples.values()] == [3, 3]
    assert order[-6:] == ["a", "b"] * 3  # after one warm-up call each
    assert _common.ratio([2.0, 4.0, 9.0], [1.0, 1.0, 1.0]) == 4.0


def test_info_reports_the_build():
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert set(record["build"]) >= {"version", "cuda", "cuda_archs", "cuda_version"}
    assert isinstance(record["cuda_available"], bool)


def test_bench_all_writes_records(tmp_path, tiny_benchmarks):
    result = CliRunner().invoke(main, ["bench", "all", "--out", str(tmp_path), "--repeats", "3"])
    assert result.exit_code == 0, result.output
    boxes = json.loads((tmp_path / "box_ops_cpu.json").read_text())
    assert boxes["benchmark"] == "box_ops" and boxes["machine"]["torch"]
    if sys.platform.startswith("linux"):  # the CPU the figures come from, and the ISA its kernels ran on
        cpu = boxes["machine"]
        assert cpu["cpu_model"] and len(cpu["cpu_family_model"]) == 2 and isinstance(cpu["cpu_isa"], list)
        assert set(cpu["cpu_isa"]) <= {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"}
    ops_seen = {r["op"] for r in boxes["results"]}
    assert {"generalized_box_iou fwd+bwd", "giou_loss (paired) fwd+bwd", "inverse_sigmoid fwd+bwd"} <= ops_seen
    assert all(r["ours_us"] > 0 and r["baseline_us"] > 0 for r in boxes["results"])
    lsa = json.loads((tmp_path / "assignment_cpu.json").read_text())
    assert [(r["queries"], r["targets"]) for r in lsa["per_matrix"]] == [(12, 1), (12, 4)]
    assert lsa["batch"]["batch"] == 3 and lsa["batch"]["ours_batched_us"] > 0
    assert "generalized_box_iou" in result.output and "wrote" in result.output
    attn = json.loads((tmp_path / "msda_cpu.json").read_text())
    modes = {(r["shape"], r["mode"]) for r in attn["results"]}
    assert modes == {(s, m) for s in ("encoder", "decoder") for m in ("fwd", "fwd+bwd")}
    assert all(r["speedup_vs_reference"] > 0 for r in attn["results"])
    convs = json.loads((tmp_path / "conv_cpu.json").read_text())
    assert [r["path"] for r in convs["results"]] == ["winograd F(2x2)", "winograd F(4x4)", "torch"]
    assert all(r["torch_ms"] > 0 and r["detrcore_ms"] > 0 for r in convs["results"])
    forward = convs["forward"]["results"]
    assert [(r["input"], r["path"]) for r in forward] == [
        ("2x64x32x40", "winograd F(4x4)"), ("1x8x5x7", "torch"), ("resnet50 1x3x64x64", "winograd forward")]
    assert all(r["torch_ms"] > 0 and r["detrcore_ms"] > 0 for r in forward)


def test_bench_rejects_a_missing_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = CliRunner().invoke(main, ["bench", "boxes", "--device", "cuda"])
    assert result.exit_code != 0 and "no CUDA device" in result.output


def test_detr_like_costs_are_valid_matcher_costs():
    import numpy as np

    c = assignment.detr_costs(np.random.default_rng(0), 30, 5)
    assert c.shape == (30, 5) and c.dtype == np.float32 and np.isfinite(c).all()
