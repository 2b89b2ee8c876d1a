"""One evaluation's outcome: the metric, the settings that produced it, and per-item records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..common.jsonable import JsonDataclass


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
        return pd.DataFrame(self.records)

    def __str__(self) -> str:
        n = f", n={len(self.records)}" if self.records else ""
        return f"{self.task} {self.metric} = {self.value:.4f}{n}"
