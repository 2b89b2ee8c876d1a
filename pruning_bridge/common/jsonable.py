"""Dataclasses that save to and load from JSON (results, reports, training logs)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any


class JsonDataclass:
    """``to_dict`` / ``to_json`` / ``from_json`` for a dataclass of JSON-friendly fields."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)

    def to_json(self, path: str | Path) -> Path:
        """Write as JSON (atomically: a crash never leaves half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def from_json(cls, path: str | Path):
        """Read an instance written by ``to_json``."""
        return cls(**json.loads(Path(path).read_text()))
