"""Small timing helpers shared by the benchmarks: median wall time and a ratio table."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_table(title: str, rows: list[tuple[str, float]], baseline: str) -> None:
    """Print each row's time and its ratio to the row named ``baseline``."""
    base = dict(rows)[baseline]
    print(f"\n{title}")
    print(f"{'variant':<48}{'ms':>10}{'ratio':>9}")
    for name, seconds in rows:
        print(f"{name:<48}{seconds * 1e3:>10.1f}{seconds / base:>9.3f}")
