"""Bootstrap confidence intervals for claims about models ("the edit lowers toxicity by ...").

    bootstrap_interval(scores)                    # mean score, 95% percentile bootstrap
    paired_difference(before, after)              # mean(after - before), items resampled jointly
    relative_change(before, after)                # mean(after) / mean(before) - 1, jointly
    str(interval)                                 # "0.123 [0.101, 0.145]"

Items (prompts, questions) are the unit of resampling: each bootstrap replicate draws ``n``
items with replacement from the ``n`` rows of the data, all replicates at once from one index
matrix. When the same items are scored before and after an edit, resample them *jointly*
(``paired_difference``): the item-to-item variation then cancels and the interval is much
narrower than two independent intervals would suggest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from pruning_bridge.common import JsonDataclass, UsageError

Statistic = Callable[..., np.ndarray]  # statistic(array, axis=k) reduces the item axis k

_MAX_ELEMENTS = 2**23  # resampled values held at once (64 MiB of float64)


@dataclass(frozen=True)
class Interval(JsonDataclass):
    """A point estimate with its confidence interval ``[low, high]`` at ``level``, from ``n``
    items."""

    estimate: float
    low: float
    high: float
    level: float = 0.95
    n: int | None = None

    def __post_init__(self):
        for name in ("estimate", "low", "high", "level"):  # plain floats: JSON-friendly
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.n is not None:
            object.__setattr__(self, "n", int(self.n))

    @property
    def excludes_zero(self) -> bool:
        """Whether zero lies outside the interval (the effect is significant at ``level``)."""
        return self.low > 0 or self.high < 0

    @property
    def width(self) -> float:
        return self.high - self.low

    def __str__(self) -> str:
        return format_interval(self)


def format_interval(interval: Interval | dict | None, percent: bool = False) -> str:
    """``"0.251 [0.190, 0.310]"`` (or ``"-58.8% [-73.3%, -41.8%]"``); ``"-"`` for none. Takes
    an ``Interval`` or its dict (as saved in JSON)."""
    if not interval:
        return "-"
    if isinstance(interval, Interval):
        interval = interval.to_dict()
    f = (lambda v: f"{100 * v:+.1f}%") if percent else (lambda v: f"{v:.3f}")
    return f"{f(interval['estimate'])} [{f(interval['low'])}, {f(interval['high'])}]"


# ---------------------------------------------------------------- checks


def _as_items(values, name: str = "values") -> np.ndarray:
    """Values as a float array with items along axis 0; empty or NaN input is an error."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise UsageError(f"{name} must be numbers (one row per item): {error}") from error
    if array.ndim == 0:
        raise UsageError(f"{name} must be a sequence of items, got a single number {values!r}.")
    if array.shape[0] < 2:
        raise UsageError(f"{name} holds {array.shape[0]} item(s); a bootstrap interval needs "
                         f"at least 2.")
    missing = int(np.isnan(array).sum())
    if missing:
        raise UsageError(f"{name} contains {missing} NaN value(s); drop or impute them first "
                         f"(e.g. values[~np.isnan(values)]).")
    return array


def _check_settings(n_boot: int, level: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise UsageError(f"n_boot must be a positive integer, got {n_boot!r}.")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise UsageError(f"level must be strictly between 0 and 1 (e.g. 0.95), got {level!r}.")


def _paired(before, after) -> np.ndarray:
    """Before and after as one (n, 2) array of items; lengths must match."""
    before = np.asarray(before, dtype=np.float64)
    after = np.asarray(after, dtype=np.float64)
    if before.ndim != 1 or after.ndim != 1:
        raise UsageError(f"before and after must be 1-D (one value per item), got shapes "
                         f"{before.shape} and {after.shape}.")
    if len(before) != len(after):
        raise UsageError(f"before and after must score the same items in the same order, but "
                         f"have {len(before)} and {len(after)} values.")
    return _as_items(np.stack([before, after], axis=1), "before/after")


# ---------------------------------------------------------------- bootstrap


def _resamples(n: int, n_boot: int, seed: int, width: int = 1) -> Iterator[np.ndarray]:
    """Index matrices of ``n`` items drawn with replacement, ``n_boot`` rows in all, in chunks
    that hold at most ``_MAX_ELEMENTS`` resampled values of ``width`` columns."""
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _MAX_ELEMENTS // (n * width))
    for start in range(0, n_boot, per_chunk):
        yield rng.integers(0, n, size=(min(per_chunk, n_boot - start), n))


def _replicates(items: np.ndarray, statistic: Statistic, n_boot: int, seed: int) -> np.ndarray:
    """``statistic`` over ``n_boot`` resamples of the rows, vectorised over index matrices."""
    chunks = _resamples(items.shape[0], n_boot, seed, items[0].size)
    return np.concatenate([np.asarray(statistic(items[index], axis=1), dtype=np.float64)
                           for index in chunks])


def _percentile(estimate, stats: np.ndarray, level: float, n: int) -> Interval:
    """The percentile interval of the replicates ``stats`` around ``estimate``."""
    if not np.isfinite(stats).all() or not np.isfinite(estimate):
        raise UsageError("The statistic is not finite on the data or on some resamples; check "
                         "the values (e.g. a zero denominator).")
    tail = (1 - level) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return Interval(estimate, low, high, level, n)


def _interval(items, statistic: Statistic, n_boot: int, level: float, seed: int) -> Interval:
    estimate = np.asarray(statistic(items, axis=0), dtype=np.float64)
    if estimate.ndim != 0:
        raise UsageError(f"statistic must reduce the item axis to one number, but statistic(x, "
                         f"axis=0) on values of shape {items.shape} gave shape {estimate.shape};"
                         f" pass 1-D values or a statistic that returns a scalar.")
    stats = _replicates(items, statistic, n_boot, seed)
    if stats.shape != (n_boot,):
        raise UsageError(f"statistic(x, axis=1) on {n_boot} resamples gave shape {stats.shape}, "
                         f"not one number per resample.")
    return _percentile(float(estimate), stats, level, items.shape[0])


def bootstrap_interval(
    values,
    statistic: Statistic = np.mean,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``statistic`` over the items (rows) of ``values``.

    ``statistic(array, axis=k)`` must reduce the item axis ``k`` (numpy reductions such as
    ``np.mean`` or ``np.median`` do). Deterministic for a seed.
    """
    _check_settings(n_boot, level)
    return _interval(_as_items(values), statistic, n_boot, level, seed)


def paired_difference(
    before, after, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Interval of ``mean(after - before)`` over items scored twice, resampled jointly."""
    _check_settings(n_boot, level)
    items = _paired(before, after)
    return _interval(items[:, 1] - items[:, 0], np.mean, n_boot, level, seed)


def relative_change(
    before, after, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Interval of ``mean(after) / mean(before) - 1`` (e.g. -0.3: 30% lower), items resampled
    jointly. The mean before must not be 0 (in the data or in any resample)."""
    _check_settings(n_boot, level)
    items = _paired(before, after)
    if items[:, 0].mean() == 0:
        raise UsageError("The mean before is 0, so a relative change is undefined; use "
                         "paired_difference for an absolute change instead.")
    before, after = items.T  # means per resample, one column at a time (faster than both)
    means = np.concatenate([np.stack([before[index].mean(axis=1), after[index].mean(axis=1)], 1)
                            for index in _resamples(len(items), n_boot, seed, 2)])
    zero = int((means[:, 0] == 0).sum())
    if zero:
        raise UsageError(f"The mean before is 0 in {zero} of {n_boot} resamples (too few "
                         f"non-zero values), so the relative change is unbounded; use "
                         f"paired_difference for an absolute change instead.")
    estimate = items[:, 1].mean() / items[:, 0].mean() - 1
    return _percentile(estimate, means[:, 1] / means[:, 0] - 1, level, items.shape[0])
