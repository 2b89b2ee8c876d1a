"""The "harmful direction": one unit vector in the residual stream of one layer.

    d = harmful_direction(acts, prompts.labels, layer=6, method="mean_diff")
    save_direction("harm.safetensors", d, model="gpt2-large", hook="resid_post", layer=6,
                   method="mean_diff")
    d, meta = load_direction("harm.safetensors")

The classes compared are harmful (biased + toxic) vs neutral by default; ``positive`` /
``negative`` choose others, e.g. ``positive=("toxic",), negative=("neutral",)`` leaves the biased
class (and CrowS-Pairs' writing style) out, and ``("toxic",)`` vs ``("nontoxic",)`` fits
RealToxicityPrompts' prompts.

Three estimators, all unit-normalised with the sign fixed so that harmful examples project
higher on average than neutral ones:

- ``mean_diff``: mean(harmful) - mean(neutral), accumulated in float64.
- ``probe``: the weight of a standardised logistic-regression probe, mapped back to the raw
  activation space (``coef / scale``), so ``x . d`` ranks examples like the probe does.
- ``pca``: the first principal direction of paired differences harmful_i - neutral_i. Each
  class is shuffled with a seeded generator, then the i-th harmful example is paired with the
  i-th neutral one (the larger class is truncated). The PCA is *uncentred* (top right singular
  vector of the difference matrix): centring would subtract exactly the consistent shift between
  the classes that we are looking for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from pruning_bridge.common import UsageError

from .caching import read_tensors, save_tensors
from .probes import as_array, binary_labels, check_data, probe_pipeline

METHODS = ("mean_diff", "probe", "pca")


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v)
    if not np.isfinite(norm) or norm == 0:
        raise UsageError("The direction is zero (identical class statistics): no direction to "
                         "extract at this layer.")
    return v / norm


def class_labels(labels: Sequence, positive: Sequence | None = None,
                 negative: Sequence | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, y)``: the rows whose label is in ``positive`` (y = 1) or ``negative`` (y = 0).

    With neither given: every row, harmful (biased / toxic, or label != 0) vs neutral.
    """
    if positive is None and negative is None:
        y = binary_labels(labels)
        return np.arange(len(y)), y
    if positive is None or negative is None:
        raise UsageError("Pass both positive and negative classes (e.g. positive=('toxic',), "
                         "negative=('neutral',)), or neither for harmful vs neutral.")
    labels = np.asarray(labels)
    positive, negative = list(positive), list(negative)
    if set(map(str, positive)) & set(map(str, negative)):
        raise UsageError(f"A class cannot be both positive and negative: {positive} vs "
                         f"{negative}.")
    is_pos, is_neg = np.isin(labels, positive), np.isin(labels, negative)
    for name, chosen, mask in (("positive", positive, is_pos), ("negative", negative, is_neg)):
        if not mask.any():
            raise UsageError(f"No example has a {name} label {chosen}; the labels are "
                             f"{sorted(set(labels.tolist()))}.")
    rows = np.flatnonzero(is_pos | is_neg)
    return rows, is_pos[rows].astype(np.int64)


def harmful_direction(acts, labels: Sequence, layer: int, method: str = "mean_diff",
                      seed: int = 0, C: float = 1.0, positive: Sequence | None = None,
                      negative: Sequence | None = None) -> Tensor:
    """A unit float32 ``[d_model]`` direction at ``layer`` of ``acts`` ``[n_layers, n, d_model]``
    along which harmful (biased/toxic, or label != 0; or the ``positive`` classes) examples
    project higher than neutral (or the ``negative``) ones."""
    if method not in METHODS:
        raise UsageError(f"Unknown method {method!r}; use one of {', '.join(METHODS)}.")
    X = as_array(acts)
    check_data(X, np.asarray(labels))  # shapes first, then the chosen classes
    rows, y = class_labels(labels, positive, negative)
    X = X[:, rows]
    check_data(X, y)
    if not 0 <= layer < len(X):
        raise UsageError(f"Layer {layer} out of range: the activations have {len(X)} layers "
                         f"(valid 0..{len(X) - 1}).")
    x = X[layer].astype(np.float64)
    harmful, neutral = x[y == 1], x[y == 0]
    if method == "mean_diff":
        d = harmful.mean(axis=0) - neutral.mean(axis=0)
    elif method == "probe":
        pipe = probe_pipeline(C).fit(X[layer], y)
        scaler, logistic = pipe[0], pipe[-1]
        d = logistic.coef_[0].astype(np.float64) / scaler.scale_
    else:
        rng = np.random.default_rng(seed)
        m = min(len(harmful), len(neutral))
        pairs_h = rng.permutation(len(harmful))[:m]
        pairs_n = rng.permutation(len(neutral))[:m]
        diffs = harmful[pairs_h] - neutral[pairs_n]
        d = np.linalg.svd(diffs, full_matrices=False)[2][0]
    d = _unit(d)
    if (harmful @ d).mean() < (neutral @ d).mean():
        d = -d
    return torch.from_numpy(d).float()


def save_direction(path: str | Path, direction: Tensor, **metadata) -> None:
    """Save a direction with JSON-encoded metadata (e.g. model, hook, layer, method), atomically."""
    direction = torch.as_tensor(direction).detach().float().cpu().contiguous()
    if direction.ndim != 1:
        raise UsageError(f"A direction is one vector [d_model]; got shape "
                         f"{tuple(direction.shape)}.")
    save_tensors(path, {"direction": direction},
                 metadata={key: json.dumps(value) for key, value in metadata.items()})


def load_direction(path: str | Path) -> tuple[Tensor, dict]:
    """``(direction, metadata)`` as saved by :func:`save_direction`; a file that is missing,
    damaged or not a saved direction is a ``UsageError`` naming it."""
    fix = "Save it again with save_direction (or rerun the command that wrote it)."
    tensors, raw = read_tensors(path, fix)
    if "direction" not in tensors:
        raise UsageError(f"{path} is not a saved direction (no 'direction' tensor; it holds "
                         f"{sorted(tensors)}). {fix}")
    try:
        metadata = {key: json.loads(value) for key, value in raw.items()}
    except json.JSONDecodeError:
        raise UsageError(f"{path} has damaged metadata (not JSON). {fix}") from None
    return tensors["direction"], metadata
