"""detrcore._io: whole-file replacement that reaches the disk before the rename, whole-line appends."""
import os

import pytest

from detrcore import _io


def test_atomic_write_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    target = tmp_path / "out" / "summary.json"
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(_io.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                     real_fsync(fd)))
    monkeypatch.setattr(_io.os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    _io.write_text_atomic(target, "{}\n")
    assert target.read_text() == "{}\n" and oct(target.stat().st_mode & 0o777) == "0o644"
    assert [e[0] for e in events] == ["fsync", "replace"] and events[0][1] == events[1][1]  # the same temp file
    assert os.listdir(target.parent) == ["summary.json"]


def test_failed_body_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="boom"):
        with _io.atomic_path(target) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["metrics.csv"]


def test_append_text_adds_whole_lines(tmp_path):
    log = tmp_path / "log.jsonl"
    _io.append_text(log, "a\n")
    _io.append_text(log, "b\n")
    assert log.read_text() == "a\nb\n"
