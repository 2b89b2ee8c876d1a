"""Files written whole or not at all, and a lock for files that several runs share.

    with atomic_path("acts.safetensors") as tmp:    # any writer that takes a path
        save_file(tensors, tmp)
    write_text_atomic("summary.json", text)          # text, JSON
    with file_lock("results.jsonl"):                 # one process at a time
        ...

A crash (or Ctrl-C) while writing leaves the previous file, or no file, never half of one: the
content goes to a temporary file in the same folder, is flushed to disk, and replaces the target
with one ``os.replace`` (atomic on POSIX and Windows). The temporary file keeps the target's
suffix, so writers that choose a format by suffix (plotly's ``write_image``) still work.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: locking is a no-op there
    fcntl = None


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may not have synced
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, value: Any, **dumps_kwargs) -> Path:
    """Write ``value`` as JSON to ``path`` atomically; returns the path."""
    return write_text_atomic(path, json.dumps(value, **dumps_kwargs))


@contextmanager
def file_lock(path: str | os.PathLike,
              waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock tied to ``path`` (on ``<path>.lock``) for the ``with`` block.

    Runs that share a file (two sweeps appending to one results log) take turns. The lock is an
    OS advisory lock (``flock``), released by the OS if the process dies, so a killed run never
    leaves a stale lock behind. The ``.lock`` file itself is empty and may stay. ``waiting`` is
    called once, before blocking, when another process holds the lock.
    """
    path = Path(path)
    if fcntl is None:  # pragma: no cover
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting()
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
