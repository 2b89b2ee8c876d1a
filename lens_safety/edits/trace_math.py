"""The arithmetic that runs inside traces (activation edits, pooling), on tensors only.

These run inside the bridge's traces, which for a remote bridge means on an NDIF server: nnsight
sends them there as source, and a server lets a trace use torch and a few other modules only.
So this module uses torch alone, and is registered to be sent by value.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from pruning_bridge.bridge.remote import send_by_value


def project_out(x: Tensor, d: Tensor, axis: int = -1) -> Tensor:
    """``x`` minus its component along unit ``d`` on ``axis`` (computed in float32, cast back)."""
    d = d.to(device=x.device, dtype=torch.float32)
    x32 = x.float().movedim(axis, -1)
    out = x32 - (x32 @ d)[..., None] * d
    return out.movedim(-1, axis).to(x.dtype)


def clamp_along(x: Tensor, d: Tensor, threshold: float) -> Tensor:
    """``x - max(x.d - t, 0) d`` along unit ``d``: only the part of the projection above
    ``threshold`` is removed; rows at or below it are returned bit for bit unchanged."""
    d = d.to(device=x.device, dtype=torch.float32)
    x32 = x.float()
    excess = (x32 @ d - threshold).clamp(min=0)
    out = (x32 - excess[..., None] * d).to(x.dtype)
    return torch.where((excess > 0)[..., None], out, x)


def subtract_along(x: Tensor, d: Tensor, alpha: float) -> Tensor:
    """``x - alpha d`` (float32 math, ``x``'s dtype out)."""
    return (x.float() - alpha * d.to(x.device)).to(x.dtype)


def leace_erase(x: Tensor, mean: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """LEACE's oblique projection: ``x - ((x - mean) right^T) left^T`` in float32."""
    h = x.to(torch.float32)
    mean, left, right = (t.to(device=x.device, dtype=torch.float32) for t in (mean, left, right))
    out = h - ((h - mean) @ right.T) @ left.T
    return out.to(x.dtype)


def keep_first_tokens(x: Tensor, edited: Tensor, mask: Tensor | None) -> Tensor:
    """``edited``, but ``x`` at each row's first real token and the padding before it (left
    padding, ``mask`` 1 = real token); ``edited`` as is in a decoding step (one new position).
    ``x`` is ``[batch, pos, ...]`` (``[.., d_model]``, or per head ``[.., n_heads, d_head]``)."""
    if mask is None or x.shape[1] != mask.shape[1]:
        return edited
    first = mask.to(x.device).cumsum(-1) <= 1
    return torch.where(first.view(*first.shape, *[1] * (x.dim() - 2)), x, edited)


def pool_batch(acts: Tensor, attention_mask: Tensor, pool: str) -> Tensor:
    """``[batch, pos, d]`` -> ``[batch, d]`` (float32) over real tokens (mask 1), either padding."""
    acts = acts.float()
    real = attention_mask.bool()
    if pool == "last":  # the last real position of each row
        positions = torch.arange(real.shape[1], device=real.device)
        last = torch.where(real, positions, -1).amax(dim=1)
        return acts[torch.arange(acts.shape[0], device=acts.device), last]
    if pool == "mean_after_first":  # a one-token row keeps its only token
        after = real & (real.cumsum(dim=1) > 1)
        real = torch.where(after.any(dim=1, keepdim=True), after, real)
    # where() rather than a multiplication: padded positions may hold NaN (fully masked rows)
    total = torch.where(real[..., None], acts, 0.0).sum(dim=1)
    return total / real.sum(dim=1, keepdim=True).clamp(min=1)


send_by_value(sys.modules[__name__])
