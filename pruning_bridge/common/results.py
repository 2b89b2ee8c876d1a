"""Append-only JSON-lines results, so long sweeps resume and never lose a finished row.

Each row is one finished configuration: ``{"method", "config", "task", "settings", "metric",
"value", ...}``. A row's identity is its full key (method, config, task, settings): a rerun
skips keys already in the file, and a sweep selects exactly its own rows by key, never rows of
the same method computed with other settings. Every row is flushed and fsynced as it is
written; a line cut short by a crash is dropped when the file is reopened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

Key = tuple[str, dict, str, dict]  # (method, config, task, settings)


def row_key(method: str, config: dict, task: str, settings: dict) -> str:
    """A row's identity as canonical JSON (what a rerun checks before recomputing)."""
    return json.dumps([method, config, task, settings], sort_keys=True, default=str)


def _key_of(row: dict[str, Any]) -> str:
    return row_key(row["method"], row["config"], row["task"], row["settings"])


class ResultsLog:
    """Rows of a sweep in a JSONL file (or in memory when ``path`` is None).

    Rows are stored as JSON gives them back (tuples become lists, ...), so a row looks the same
    whether it was computed now or read from the file by a rerun.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self.rows: list[dict[str, Any]] = []
        self._by_key: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        good_end = 0
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # a row cut short by a crash: drop it
            try:
                self._remember(json.loads(line))
            except json.JSONDecodeError:
                break
            good_end += len(line)
        if good_end != len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)

    def _remember(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if all(k in row for k in ("method", "config", "task", "settings")):
            self._by_key.setdefault(_key_of(row), row)  # the first row of a key wins

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
        computed with other settings (another window, limit or data) have other keys.
        """
        found = (self.get(*key) for key in keys)
        return [row for row in found if row is not None]

    def append(self, row: dict[str, Any]) -> dict[str, Any]:
        """Record a finished row (durably, before returning); returns it as stored."""
        line = json.dumps(row, default=str)
        row = json.loads(line)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        self._remember(row)
        return row

    def to_pandas(self):
        """Every row as a flat DataFrame (nested config and settings become dotted columns)."""
        return pd.json_normalize(self.rows)
