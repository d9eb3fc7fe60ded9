"""A real full disk, not a simulated one: each case runs in a child process inside a private mount namespace
(`unshare`; a user namespace when not root) whose output folder is a small tmpfs, so writes fail with the
kernel's own ENOSPC. The tmpfs disappears with the namespace, so the child reports what it saw as JSON.
Where no private tmpfs can be mounted the tests skip, saying why; DETRCORE_REQUIRE_TMPFS=1 (CI sets it) makes that
a failure."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.engine.tiny_data import TINY_MODEL, write_tiny_dataset

_MOUNT = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'
_PROBE = 'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d" && umount "$d" && rmdir "$d"'


def _namespace_command() -> tuple[list[str] | None, str]:
    """(the unshare command that lets a child mount a tmpfs, or None; why not)."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return None, "needs Linux and unshare(1)"
    why = []
    for cmd in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        probe = subprocess.run([*cmd, "sh", "-c", _PROBE], capture_output=True, text=True)
        if probe.returncode == 0:
            return cmd, ""
        why.append(f"`{' '.join(cmd)}`: {probe.stderr.strip() or f'exit {probe.returncode}'}")
    return None, "; ".join(why)


NAMESPACE, WHY_NOT = _namespace_command()


@pytest.fixture(autouse=True)
def _private_tmpfs():
    """Skips where no private tmpfs can be mounted, unless DETRCORE_REQUIRE_TMPFS=1 (CI) makes that a failure."""
    if NAMESPACE is None:
        message = f"cannot mount a private tmpfs here: {WHY_NOT}"
        if os.environ.get("DETRCORE_REQUIRE_TMPFS") == "1":
            pytest.fail(message + " (DETRCORE_REQUIRE_TMPFS=1)")
        pytest.skip(message)


def on_tmpfs(mnt, size: str, script: str, *args: str, timeout: float = 300) -> dict:
    """Runs `script` with sys.argv[1] = a fresh tmpfs of `size` mounted at `mnt`; returns its last stdout line."""
    mnt.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([*NAMESPACE, "sh", "-c", _MOUNT, "sh", size, str(mnt), sys.executable, "-c",
                           textwrap.dedent(script), str(mnt), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_checkpoint_save_on_a_full_disk(tmp_path):
    seen = on_tmpfs(tmp_path / "mnt", "1m", """
        import json, os, sys, torch
        from detrcore.engine import atomic_save, load_checkpoint
        path = os.path.join(sys.argv[1], "ckpt.pt")
        atomic_save({"v": torch.arange(1000.0)}, path)  # 4 KB: fits
        before = open(path, "rb").read()
        try:
            atomic_save({"v": torch.zeros(1 << 20)}, path)  # 4 MB: does not
            err = None
        except OSError as e:
            err = {"errno": e.errno, "message": str(e)}
        print(json.dumps({"err": err, "unchanged": open(path, "rb").read() == before,
                          "sum": load_checkpoint(path)["v"].sum().item(), "files": sorted(os.listdir(sys.argv[1]))}))
    """)
    assert seen["err"] is not None, "the oversized checkpoint was written"
    assert seen["err"]["errno"] == 28
    assert "No space left on device" in seen["err"]["message"] and "ckpt.pt" in seen["err"]["message"]
    assert "nothing was overwritten" in seen["err"]["message"]
    assert seen["unchanged"] and seen["sum"] == sum(range(1000))
    assert seen["files"] == ["ckpt.pt"]  # no temp file left behind


def test_results_and_logs_on_a_full_disk(tmp_path):
    seen = on_tmpfs(tmp_path / "mnt", "1m", """
        import csv, json, os, sys
        from detrcore._io import append_text, atomic_path, write_text_atomic
        from detrcore.engine import plot_curves
        from detrcore.engine.evaluate import save_json
        d = sys.argv[1]
        p = {name: os.path.join(d, name) for name in ("eval.json", "summary.json", "table.csv", "metrics.jsonl",
                                                      "curves.png")}

        def write_csv(rows):  # atomic_path around a streaming writer, as the CSV/PNG/JSON producers use it
            with atomic_path(p["table.csv"]) as tmp, open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(rows)

        history = [{"epoch": i + 1, "train_loss": 5.0 - i, "AP": 0.1 * i} for i in range(3)]
        write_text_atomic(p["eval.json"], '{"AP": 0.5}')
        save_json({"AP": 0.5}, p["summary.json"])
        write_csv([["epoch", "AP"], [1, 0.5]])
        append_text(p["metrics.jsonl"], '{"epoch": 1}\\n')
        plot_curves(history, p["curves.png"])
        before = {name: open(path, "rb").read() for name, path in p.items()}
        free = os.statvfs(d).f_bavail * os.statvfs(d).f_frsize
        with open(os.path.join(d, "filler"), "wb") as f:  # leave 4 KB
            f.write(b"\\0" * (free - 4096))
        errors = {}
        for name, write in {
            "eval.json": lambda: write_text_atomic(p["eval.json"], "x" * 100_000),
            "summary.json": lambda: save_json({"x": "y" * 100_000}, p["summary.json"]),
            "table.csv": lambda: write_csv([[i, "z" * 50] for i in range(2000)]),
            "metrics.jsonl": lambda: append_text(p["metrics.jsonl"], "y" * 100_000 + "\\n"),
            "curves.png": lambda: plot_curves(history * 30, p["curves.png"]),
        }.items():
            try:
                write()
            except OSError as e:
                errors[name] = {"errno": e.errno, "message": str(e)}
        print(json.dumps({"errors": errors, "files": sorted(os.listdir(d)),
                          "unchanged": [name for name, path in p.items() if open(path, "rb").read() == before[name]],
                          "log": open(p["metrics.jsonl"]).read()}))
    """)
    for name in ("eval.json", "summary.json", "table.csv", "metrics.jsonl", "curves.png"):
        err = seen["errors"].get(name)
        assert err is not None, f"{name}: the write did not fail"
        assert err["errno"] == 28 and name in err["message"] and "No space left on device" in err["message"], err
        kept = "(its earlier content is intact)" if name == "metrics.jsonl" else "(nothing was overwritten)"
        assert err["message"].endswith(kept), err
    assert seen["unchanged"] == ["eval.json", "summary.json", "table.csv", "metrics.jsonl", "curves.png"]
    assert seen["log"] == '{"epoch": 1}\n'  # cut back to its last whole line
    assert seen["files"] == ["curves.png", "eval.json", "filler", "metrics.jsonl", "summary.json", "table.csv"]


def test_training_run_on_a_full_disk_stops_clearly_and_resumes(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    seen = on_tmpfs(tmp_path / "mnt", "700m", """
        import json, os, subprocess, sys
        import torch
        d, data, *model = sys.argv[1:]
        out = os.path.join(d, "run")
        sets = [a for s in model for a in ("--set", s)]

        def train(epochs, *extra):
            cmd = [sys.executable, "-m", "detrcore.cli", "train", "--data", data, "--out", out,
                   "--epochs", str(epochs), "--batch-size", "2", *sets, *extra]
            return subprocess.run(cmd, capture_output=True, text=True)

        first = train(1)
        assert first.returncode == 0, first.stderr
        last = os.path.join(out, "last.pt")
        before = open(last, "rb").read()
        st = os.statvfs(d)
        filler = os.path.join(d, "filler")
        with open(filler, "wb") as f:  # room for half a checkpoint
            f.write(b"\\0" * (st.f_bavail * st.f_frsize - len(before) // 2))
        best = open(os.path.join(out, "best.pt"), "rb").read()
        full = train(2, "--resume")
        intact = open(last, "rb").read() == before and open(os.path.join(out, "best.pt"), "rb").read() == best
        leftovers = [n for n in os.listdir(out) if n.endswith(".tmp")]
        os.unlink(filler)
        again = train(2, "--resume")
        state = torch.load(last, weights_only=True)["state"]
        print(json.dumps({"full_rc": full.returncode, "full_stderr": full.stderr, "intact": intact,
                          "leftovers": leftovers, "again_rc": again.returncode, "again_stderr": again.stderr[-2000:],
                          "again_stdout": again.stdout[:300], "epoch": state["epoch"], "out": out}))
    """, str(data), *TINY_MODEL, timeout=600)
    assert seen["full_rc"] == 1
    assert "Traceback" not in seen["full_stderr"], seen["full_stderr"]
    lines = [ln for ln in seen["full_stderr"].splitlines() if ln.strip()]
    assert lines and re.fullmatch(rf"Error: OSError: \[Errno 28\] could not write checkpoint {re.escape(seen['out'])}/"
                                  r"(last|best)\.pt: No space left on device \(nothing was overwritten\)",
                                  lines[-1]), seen["full_stderr"]
    assert seen["intact"] and seen["leftovers"] == []  # last.pt and best.pt byte-identical, no temp file
    assert seen["again_rc"] == 0, seen["again_stderr"]
    assert seen["again_stdout"].startswith(f"resumed {seen['out']}/last.pt: 1 epochs"), seen["again_stdout"]
    assert seen["epoch"] == 2
