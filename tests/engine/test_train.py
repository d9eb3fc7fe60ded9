"""The training loop on tiny data: outputs, checkpoint round trip, exact resume, a killed run, DDP with gloo."""
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from detrcore.engine import train as train_module
from detrcore.engine.checkpoint import atomic_save, load_checkpoint
from detrcore.engine.config import make_config
from detrcore.engine.train import fit, lr_factor, param_groups
from detrcore.models import ModelConfig, build_model
from tests.engine.tiny_data import TINY_MODEL, write_tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def config(tiny, out, epochs=2, extra=()):
    return make_config(None, [*TINY_MODEL, *extra], data=str(tiny), out=str(out), epochs=epochs, batch_size=2)


def test_fit_writes_everything(tiny, tmp_path):
    summary = fit(config(tiny, tmp_path / "run"), log=lambda *a: None)
    run = tmp_path / "run"
    for name in ("last.pt", "best.pt", "metrics.csv", "metrics.jsonl", "eval.json", "curves.png", "predictions.png",
                 "config.json"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert 0.0 <= summary["AP50"] <= 1.0 and len(summary["per_class"]) == 2
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and lines[-1]["steps"] == 6
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["state"]["epoch"] == 2 and ckpt["state"]["step"] == 6
    assert ckpt["classes"] == ["box", "hole"] and ckpt["label_to_category_id"] == [3, 7]
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


class Crash(Exception):
    pass


def crash_after_epoch_1(msg):
    if str(msg).startswith("epoch 1:"):
        raise Crash


def test_resume_reproduces_an_uninterrupted_run(tiny, tmp_path):
    fit(config(tiny, tmp_path / "full", epochs=3), log=lambda *a: None)
    with pytest.raises(Crash):  # the process dies after epoch 1's checkpoint
        fit(config(tiny, tmp_path / "split", epochs=3), log=crash_after_epoch_1)
    fit(config(tiny, tmp_path / "split", epochs=3), resume=True, log=lambda *a: None)
    full, split = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    assert full["state"]["step"] == split["state"]["step"] == 9
    for k, v in full["model"].items():
        torch.testing.assert_close(split["model"][k], v, rtol=0, atol=0, msg=k)


def test_killed_run_resumes_to_the_same_step_count(tiny, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "detrcore.cli", "train", "--data", str(tiny), "--out", str(out), "--epochs", "4",
            "--batch-size", "1", *sum((["--set", s] for s in TINY_MODEL), [])]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = load_checkpoint(out / "last.pt")["state"]["epoch"]
    assert 1 <= done < 4
    assert subprocess.run(args + ["--resume"], capture_output=True).returncode == 0
    final = load_checkpoint(out / "last.pt")["state"]
    assert final["epoch"] == 4 and final["step"] == 4 * 6  # 6 images, batch 1


def test_atomic_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"v": torch.ones(3)}, path)

    def broken(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="nothing was overwritten"):
        atomic_save({"v": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["v"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_crafted_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(ValueError, match="not a loadable"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_param_groups_and_schedules():
    cfg = make_config(None, [*TINY_MODEL, "model.arch=\"deformable_detr\""], epochs=10)
    model = build_model(ModelConfig.from_dict({**cfg.model.to_dict(), "num_classes": 2}))
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert groups["backbone"]["lr"] == pytest.approx(cfg.lr * 0.1)
    assert groups["linear_proj"]["lr"] == pytest.approx(cfg.lr * 0.1) and groups["rest"]["lr"] == cfg.lr
    assert lr_factor(cfg, 7 * 10, 10) == 1.0 and lr_factor(cfg, 8 * 10, 10) == pytest.approx(0.1)
    cos = make_config(None, ["schedule=\"cosine\"", "warmup_epochs=5", "lr=3e-4", "warmup_lr=3e-6"], epochs=50)
    assert lr_factor(cos, 0, 10) == pytest.approx(0.01)
    assert lr_factor(cos, 50, 10) == pytest.approx(1.0)
    assert lr_factor(cos, 500, 10) == pytest.approx(0.0, abs=1e-9)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown config key: model.hidden"):
        make_config(None, ["model.hidden=3"])
    with pytest.raises(ValueError, match="schedule"):
        make_config(None, ["schedule=\"linear\""])
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"epochz": 3}))
    with pytest.raises(ValueError, match="epochz"):
        make_config(str(bad))


def test_ddp_two_processes_gloo(tiny, tmp_path):
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "detrcore.cli", "train", "--data", str(tiny), "--out", str(out), "--epochs", "1", "--batch-size", "1",
            "--device", "cpu", *sum((["--set", s] for s in TINY_MODEL), [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["state"]["step"] == 3  # 6 images over 2 ranks, batch 1 each
    assert (out / "eval.json").is_file()


def test_bf16_autocast_on_cpu(tiny, tmp_path):
    """Trains under bf16 autocast; on a CPU without bf16 arithmetic it says so (a RuntimeWarning naming amp='none')."""
    cfg = config(tiny, tmp_path / "bf16", epochs=1, extra=["amp=\"bf16\"", "ema=true"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = fit(cfg, log=lambda *a: None)
    assert "AP50" in summary
    assert load_checkpoint(tmp_path / "bf16" / "last.pt")["ema"]["updates"] == 3
    slow = [w for w in caught if issubclass(w.category, RuntimeWarning) and "without bf16 arithmetic" in str(w.message)]
    assert len(slow) == (0 if train_module.cpu_has_bf16() else 1)
    assert not slow or "amp='none' trains faster here" in str(slow[0].message)


@pytest.mark.parametrize("avx512_bf16, amx", [(False, False), (True, False), (False, True)])
def test_cpu_bf16_probe(avx512_bf16, amx, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert train_module.cpu_has_bf16() == (avx512_bf16 or amx)


def test_progress_bar_shows_rate_and_eta(capsys, monkeypatch):
    from detrcore.engine import distributed

    monkeypatch.setattr(distributed.sys.stderr, "isatty", lambda: True, raising=False)
    bar = distributed.progress(total=4, desc="epoch 1/1", min_interval=0.0)
    for _ in range(4):
        bar.update(1, loss=1.5)
    bar.close()
    err = capsys.readouterr().err
    assert "4/4" in err and "it/s" in err and "ETA" in err and "loss 1.5" in err


def test_non_finite_loss_stops_or_skips(tiny, tmp_path, monkeypatch):
    import detrcore.engine.train as train_mod

    real = train_mod.SetCriterion

    class NaNOnSecondCall(real):
        calls = 0

        def forward(self, outputs, targets):
            losses = super().forward(outputs, targets)
            type(self).calls += 1
            if type(self).calls == 2:
                losses["loss_giou"] = losses["loss_giou"] * float("nan")
                losses["loss"] = losses["loss"] * float("nan")
            return losses

    monkeypatch.setattr(train_mod, "SetCriterion", NaNOnSecondCall)
    with pytest.raises(train_mod.NonFiniteLoss, match=r"step 1, batch 1: loss_giou"):
        fit(config(tiny, tmp_path / "stop", epochs=1), log=lambda *a: None)
    NaNOnSecondCall.calls = 0
    messages = []
    fit(config(tiny, tmp_path / "skip", epochs=1, extra=["nonfinite=\"skip\""]), log=messages.append)
    ckpt = load_checkpoint(tmp_path / "skip" / "last.pt")
    assert ckpt["state"]["step"] == 2 and ckpt["state"]["history"][0]["skipped_steps"] == 1
    assert any("step skipped" in str(m) for m in messages)
