"""Append-only JSON-lines results, so long sweeps resume and never lose a finished row.

Each row is one finished configuration: ``{"method", "config", "task", "metric", "value",
"settings", ...}``. A row's identity is its method, config, task and settings; rerunning a sweep
skips identities already in the file. Every row is flushed and fsynced as it is written; a line
cut short by a crash is dropped when the file is reopened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def row_key(method: str, config: dict, task: str, settings: dict) -> str:
    """A row's identity as canonical JSON (what a rerun checks before recomputing)."""
    return json.dumps([method, config, task, settings], sort_keys=True, default=str)


class ResultsLog:
    """Rows of a sweep in a JSONL file (or in memory when ``path`` is None)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self.rows: list[dict[str, Any]] = []
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        good_end = 0
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # a row cut short by a crash: drop it
            try:
                self.rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good_end += len(line)
        if good_end != len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)

    def keys(self) -> set[str]:
        """The identities of every finished row."""
        return {row_key(r["method"], r["config"], r["task"], r["settings"]) for r in self.rows}

    def has(self, method: str, config: dict, task: str, settings: dict) -> bool:
        """Whether this configuration's row is already finished."""
        return row_key(method, config, task, settings) in self.keys()

    def append(self, row: dict[str, Any]) -> dict[str, Any]:
        """Record a finished row (durably, before returning)."""
        self.rows.append(row)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return row

    def to_pandas(self):
        import pandas as pd

        return pd.json_normalize(self.rows)
