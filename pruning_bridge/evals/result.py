"""One evaluation's outcome: the metric, the settings that produced it, and per-item records."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
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


@dataclass
class EvalResult(JsonDataclass):
    """``value`` of ``metric`` on ``task``; ``records`` hold one dict per question or problem."""

    task: str
    metric: str
    value: float
    settings: dict[str, Any] = field(default_factory=dict)
    per_subject: dict[str, float] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    def to_pandas(self):
        """The per-item records as a DataFrame (one row per question or problem)."""
        import pandas as pd

        return pd.DataFrame(self.records)

    def __str__(self) -> str:
        n = f", n={len(self.records)}" if self.records else ""
        return f"{self.task} {self.metric} = {self.value:.4f}{n}"
