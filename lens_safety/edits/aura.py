"""AurA (Suau et al., ICML 2024): dampen each unit in proportion to how well it detects toxicity.

    auroc = auroc_per_unit(torch.cat([toxic, nontoxic]), labels)   # sentences max-pooled
    factors = dampening_factors(auroc)                             # 1 - 2 (AUROC - 0.5), or 1
    x = apply_dampening(x, factors, attention_mask)                # in the trace: x * factors

Each unit's AUROC at telling toxic (positive) from non-toxic sentences, from its max-pooled
activation, is computed exactly from ranks (ties as average ranks, as scikit-learn) for all units
at once. A unit with AUROC > 0.5 is scaled by ``1 - 2 (AUROC - 0.5)`` at every position (a
perfect detector is silenced, a chance one left alone); the others are left alone. The paper has
no strength parameter; ``strength`` (default 1 = the paper) interpolates the factor towards 1.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from pruning_bridge.bridge.remote import send_by_value
from pruning_bridge.common.errors import UsageError

from .activation_stats import keep_first_token


class AuraError(UsageError):
    """Bad input for AurA's statistics (labels, shapes, non-finite activations)."""


def _positive_rank_sums(x: Tensor, positive: Tensor) -> Tensor:
    """For ``x`` ``[units, n]``: per unit, the sum over positive samples of their 1-based ranks
    among the n values, tied values sharing their average rank (float64)."""
    n = x.shape[1]
    values, order = torch.sort(x, dim=1)  # along the contiguous axis: fast
    positions = torch.arange(n, device=x.device).expand_as(values)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, positions, 0).cummax(dim=1).values
    last = torch.where(ends, positions, n).flip(1).cummin(dim=1).values.flip(1)
    average = (first + last).to(torch.float64) / 2 + 1
    return torch.where(positive[order], average, 0.0).sum(dim=1)


def auroc_per_unit(scores: Tensor, labels: Tensor, chunk_elements: int = 1 << 22) -> Tensor:
    """Each unit's AUROC (float64, shape ``scores.shape[1:]``) of ``scores`` ``[n, ...]`` for
    ``labels`` ``[n]`` (True / 1 = positive): the Mann-Whitney statistic from average ranks,
    equal to ``sklearn.metrics.roc_auc_score`` per unit. Units are processed in chunks of about
    ``chunk_elements`` values."""
    scores = torch.as_tensor(scores)
    labels = torch.as_tensor(labels)
    if scores.ndim < 2 or labels.ndim != 1 or labels.shape[0] != scores.shape[0]:
        raise AuraError(f"Give scores [n, units...] and labels [n]; got scores "
                        f"{tuple(scores.shape)} and labels {tuple(labels.shape)}.")
    if labels.dtype != torch.bool and not bool(((labels == 0) | (labels == 1)).all()):
        raise AuraError("Labels must be 0/1 or booleans (1 = positive, e.g. toxic).")
    positive = labels.bool().to(scores.device)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise AuraError(f"AUROC needs both classes; got {n_pos} positive and {n_neg} negative "
                        "samples.")
    flat = scores.reshape(scores.shape[0], -1)
    if not bool(torch.isfinite(flat).all()):
        raise AuraError("Activations hold NaN or inf: check the pooling and the model's dtype.")
    step = max(1, chunk_elements // flat.shape[0])
    out = []
    for start in range(0, flat.shape[1], step):  # ranks are exact in the input's dtype
        rank_sum = _positive_rank_sums(flat[:, start:start + step].T.contiguous(), positive)
        out.append((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return torch.cat(out).reshape(scores.shape[1:])


def dampening_factors(auroc: Tensor, strength: float = 1.0) -> Tensor:
    """AurA's per-unit factors (float32): ``1 - 2 (AUROC - 0.5)`` where AUROC > 0.5, else 1;
    with ``strength`` s, ``1 - s (1 - factor)`` (s = 1: the paper; s = 0: all ones)."""
    auroc = torch.as_tensor(auroc, dtype=torch.float64)
    if not 0.0 <= strength:
        raise AuraError(f"strength must be >= 0 (1 = the paper), got {strength}.")
    factor = torch.where(auroc > 0.5, 1 - 2 * (auroc - 0.5), torch.ones_like(auroc))
    return (1 - strength * (1 - factor)).to(torch.float32)


def fit_aura(positive: Tensor, negative: Tensor, strength: float = 1.0) -> dict[str, Tensor]:
    """``{"auroc", "factors"}`` from pooled activations of positive (toxic) ``[n_pos, ...]`` and
    negative ``[n_neg, ...]`` sentences at one hook point."""
    positive, negative = torch.as_tensor(positive), torch.as_tensor(negative)
    if positive.shape[1:] != negative.shape[1:]:
        raise AuraError(f"Positive and negative activations differ in shape: "
                        f"{tuple(positive.shape)} vs {tuple(negative.shape)}.")
    labels = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))]).bool()
    auroc = auroc_per_unit(torch.cat([positive, negative]), labels)
    return {"auroc": auroc, "factors": dampening_factors(auroc, strength)}


def apply_dampening(x: Tensor, factors: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """``x * factors`` (``factors`` over ``x``'s trailing unit axes, e.g. ``[d_mlp]`` or
    ``[n_heads, d_head]``), in ``x``'s dtype; the first real token of each row left as it is
    when ``attention_mask`` is given. Torch only: it runs inside traces."""
    edited = (x.float() * factors.to(device=x.device, dtype=torch.float32)).to(x.dtype)
    return keep_first_token(x, edited, attention_mask)


# the apply functions run inside traces: a remote (NDIF) bridge sends them as source
send_by_value(sys.modules[__name__])
