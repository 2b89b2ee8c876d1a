"""Layer indices as every function of the toolkit reads them."""

from __future__ import annotations

from typing import Iterable

from .errors import OutOfRangeError, UsageError


def check_layers(layers: Iterable[int] | None, n_layers: int, *,
                 allow_all: bool = True) -> list[int]:
    """Sorted, de-duplicated block indices; ``None`` means every layer.

    Negative indices count from the end, as in Python (``-1`` is the last block). An index
    outside ``-n_layers..n_layers - 1`` is an ``OutOfRangeError``; with ``allow_all=False``
    (removing layers) listing every layer is a ``UsageError``.
    """
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int):
        layers = [layers]
    layers = [int(i) for i in layers]
    bad = [i for i in layers if not -n_layers <= i < n_layers]
    if bad:
        raise OutOfRangeError(f"Layer indices {bad} are out of range for a model with {n_layers} "
                              f"layers (valid: 0..{n_layers - 1}, or negative from the end).")
    layers = sorted({i % n_layers for i in layers})
    if not layers:
        raise UsageError("No layers given: pass at least one layer index (or None for all).")
    if not allow_all and len(layers) == n_layers:
        raise UsageError(f"Removing all {n_layers} layers leaves no model; keep at least one.")
    return layers
