"""File output shared by every writer of results. Whole files (JSON, CSV, Markdown, PNG) are written beside the
target, then moved over it in one os.replace, so a reader (or a crash) never sees a half-written file and an old
file survives a failure; logs grow by whole lines (`append_text`). A failed write (a full disk) raises an OSError
with the errno, naming the file and saying what was kept."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path beside `path`; once the body succeeds it is fsynced and replaces `path` in one
    `os.replace`.

    On failure the temporary file is removed and `path` is left as it was. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be read by others
        fd = os.open(tmp, os.O_RDONLY)
        try:  # the data reaches the disk before the rename does: a power cut leaves the old file or the new one
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and str(path) not in str(e):
            raise OSError(e.errno, f"could not write {path}: {e.strerror} (nothing was overwritten)") from e
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def append_text(path: str | os.PathLike, text: str) -> Path:
    """Appends `text` in one write. If the write fails (a full disk), the file is cut back to its previous length,
    so a log never ends in a torn line, and an OSError names the file."""
    path = Path(path)
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(data):  # a short write is continued; a failed one raises
                done += os.write(fd, data[done:])
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise OSError(e.errno, f"could not append to {path}: {e.strerror} (its earlier content is intact)") from e
    finally:
        os.close(fd)
    return path
