"""Small timing helpers shared by the benchmarks: median wall time and a ratio table."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


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


WORDS = ("the river bank was quiet when the old man walked past the closed market and "
         "remembered a story his mother told about winter nights in the mountains").split()


def sample_texts(n: int) -> list[str]:
    """``n`` seeded texts of 6-39 words (varied lengths, so batches are padded)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(6, 40, (n,), generator=g).tolist()
    return [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(length))
            for i, length in enumerate(lengths)]
