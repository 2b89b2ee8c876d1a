"""Append-only JSON-lines results, so long sweeps resume and never lose a finished row.

Each row is one finished configuration: ``{"method", "config", "task", "settings", "metric",
"value", ...}``. A row's identity is its full key (method, config, task, settings; the sweep
runner puts the model's weights fingerprint, dtype and device into ``settings``): a rerun skips
keys already in the file, and a sweep selects exactly its own rows by key, never rows of the
same method computed with other settings or on another model.

Nothing in the file is ever deleted or rewritten. Every row is flushed and fsynced as it is
written. A line that is not a row (cut short by a crash, edited by hand, from another tool) is
skipped with a warning naming the file and line, and stays where it is; a torn last line is
closed with a newline before the next row is appended, so it never swallows that row.

Several runs may share one file: ``claim()`` holds a lock on it (``<file>.lock``) and first reads
the rows other runs appended meanwhile, so the sweep runner computes each row once.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd

from .atomic import file_lock

Key = tuple[str, dict, str, dict]  # (method, config, task, settings)
KEY_FIELDS = ("method", "config", "task", "settings")


class ResultsFileWarning(UserWarning):
    """A line of a results file that is not a row: skipped, and kept in the file."""


def row_key(method: str, config: dict, task: str, settings: dict) -> str:
    """A row's identity as canonical JSON (what a rerun checks before recomputing)."""
    return json.dumps([method, config, task, settings], sort_keys=True, default=str)


def _key_of(row: dict[str, Any]) -> str:
    return row_key(*(row[k] for k in KEY_FIELDS))


class ResultsLog:
    """Rows of a sweep in a JSONL file (or in memory when ``path`` is None).

    Rows are stored as JSON gives them back (tuples become lists, ...), so a row looks the same
    whether it was computed now or read from the file by a rerun.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self.rows: list[dict[str, Any]] = []
        self._by_key: dict[str, dict[str, Any]] = {}
        self._read_to = 0  # bytes of the file already read (whole lines only)
        self._lines_read = 0
        self._claims = 0
        self._said_waiting = False
        self.refresh()

    # ---------------------------------------------------------------- reading

    def refresh(self) -> None:
        """Read the rows appended to the file since it was last read (by any run)."""
        if self.path is None or not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self._read_to)
            new = f.read()
        lines = new.splitlines(keepends=True)
        if lines and not lines[-1].endswith(b"\n"):
            lines.pop()  # an unfinished last line: a row being written, or a torn one
        for line in lines:
            self._read_to += len(line)
            self._lines_read += 1
            self._read_line(line, self._lines_read)

    def _read_line(self, line: bytes, number: int) -> None:
        if not line.strip():
            return
        try:
            row = json.loads(line)
            problem = None if isinstance(row, dict) else "JSON but not an object"
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            row, problem = None, f"not JSON ({error.msg if hasattr(error, 'msg') else error})"
        if problem is None and not all(k in row for k in KEY_FIELDS):
            problem = f"a JSON object without {', '.join(k for k in KEY_FIELDS if k not in row)}"
        if problem is not None:
            preview = line[:60].decode("utf-8", "replace").strip()
            warnings.warn(f"{self.path}, line {number}: skipped, {problem} ({preview!r}); it is "
                          f"left in the file.", ResultsFileWarning, stacklevel=4)
            return
        self._remember(row)

    def _remember(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._by_key.setdefault(_key_of(row), row)  # the first row of a key wins

    # ---------------------------------------------------------------- sharing the file

    @contextmanager
    def claim(self) -> Iterator[ResultsLog]:
        """Hold the file's lock for the block, after reading what other runs appended.

        The sweep runner claims the log around each row's check-compute-append, so two runs
        writing one file take turns and never compute the same row twice. Re-entrant; a no-op
        for an in-memory log. A run that waits for another says so once on stderr.
        """
        if self.path is None or self._claims:
            self._claims += 1
            try:
                yield self
            finally:
                self._claims -= 1
            return
        with file_lock(self.path, waiting=self._say_waiting):
            self._claims += 1
            try:
                self.refresh()
                yield self
            finally:
                self._claims -= 1

    def _say_waiting(self) -> None:
        if not self._said_waiting:
            self._said_waiting = True
            print(f"{self.path}: another run is writing this results file; taking turns with it "
                  f"(each row is computed once).", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- queries

    def keys(self) -> set[str]:
        """The identities of every finished row."""
        return set(self._by_key)

    def has(self, method: str, config: dict, task: str, settings: dict) -> bool:
        """Whether this configuration's row is already finished."""
        return row_key(method, config, task, settings) in self._by_key

    def get(self, method: str, config: dict, task: str, settings: dict) -> dict[str, Any] | None:
        """The finished row with this full key, or None."""
        return self._by_key.get(row_key(method, config, task, settings))

    def select(self, keys: Iterable[Key]) -> list[dict[str, Any]]:
        """The finished rows of these full keys, in the order given (unfinished keys skipped).

        This is how a sweep returns exactly its own rows: rows of the same method and task
        computed with other settings (another window, limit, data or model) have other keys.
        """
        found = (self.get(*key) for key in keys)
        return [row for row in found if row is not None]

    # ---------------------------------------------------------------- writing

    def append(self, row: dict[str, Any]) -> dict[str, Any]:
        """Record a finished row (durably, before returning); returns it as stored."""
        missing = [k for k in KEY_FIELDS if k not in row]
        if missing:
            raise ValueError(f"A results row needs {', '.join(KEY_FIELDS)}; missing "
                             f"{', '.join(missing)}.")
        line = json.dumps(row, default=str)
        if self.path is None:
            self._remember(json.loads(line))
        else:
            with self.claim():
                self._write_line(line.encode("utf-8") + b"\n")
                self.refresh()  # reads the row back (and anything written before it)
        return json.loads(line)

    def _write_line(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab+") as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":  # a torn last line: close it (kept, and skipped)
                    data = b"\n" + data
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def to_pandas(self):
        """Every row as a flat DataFrame (nested config and settings become dotted columns)."""
        return pd.json_normalize(self.rows)
