"""Edit a direction out of the residual stream: with hooks, or baked into the weights.

    with ablate(model, d):                      # x <- x - (x.d) d at every resid_pre/mid/post
        text = model.generate(...)              # hooks act at every decoding step (KV cache on)
    with ablate(model, d, mode="subtract", alpha=4.0):  # x <- x - alpha d
        ...
    with orthogonalize(model, d):               # W <- W - d d^T W for every residual writer
        ...                                     # same logits as hook ablation, no runtime cost

``model`` is a ``pruning_bridge.HookBridge`` or a TransformerLens model (``lens_safety.hooked``)
(``orthogonalize`` also takes a plain Hugging Face model). Every edit is a context manager that
leaves the model exactly as it was on exit (weights restored bit for bit), also on an exception.

Note that ``blocks.L.hook_resid_post`` and ``blocks.{L+1}.hook_resid_pre`` are the same stream:
projection is idempotent, but ``subtract`` at both subtracts ``alpha d`` twice.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from pruning_bridge.common import check_layers
from pruning_bridge.common import UsageError
from pruning_bridge.common.errors import require_local_weights

from .backend import dims, edited, hf_model, residual_hooks, residual_writers, tied_head
from .caching import hook_name
from .trace_math import clamp_along, project_out, subtract_along  # noqa: F401 (re-exported)

MODES = ("project", "subtract")


def unit_direction(direction, d_model: int) -> Tensor:
    """``direction`` as a unit float32 vector, checked to have the model's width."""
    d = torch.as_tensor(direction).detach().float()
    if d.shape != (d_model,):
        raise UsageError(f"The direction has shape {tuple(d.shape)} but this model's residual "
                         f"stream has width d_model={d_model}: use a direction [d_model] found "
                         f"on the same model.")
    norm = d.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise UsageError("The direction is zero or not finite.")
    return d / norm


# ---------------------------------------------------------------- hook ablation


@contextmanager
def ablate(model, direction, layers: Sequence[int] | None = None,
           hooks: Sequence[str] | None = None, mode: str = "project",
           alpha: float = 1.0) -> Iterator:
    """Remove (``project``: ``x - (x.d) d``) or subtract (``x - alpha d``) the unit-normalised
    ``direction`` at ``blocks.L.hook_{h}`` for each layer L (default: all) and hook h (default:
    every residual hook the model has, see ``backend.residual_hooks``)."""
    if mode not in MODES:
        raise UsageError(f"Unknown mode {mode!r}; use one of {', '.join(MODES)}.")
    n_layers, d_model = dims(model)
    d = unit_direction(direction, d_model)
    hooks = residual_hooks(model) if hooks is None else hooks
    names = [hook_name(layer, hook) for layer in check_layers(layers, n_layers) for hook in hooks]

    def edit(x: Tensor) -> Tensor:
        if mode == "project":
            return project_out(x, d)
        return subtract_along(x, d, alpha)

    with edited(model, names, edit):
        yield model


# ---------------------------------------------------------------- weight orthogonalisation


def _orthogonalize_weights(writers, d: Tensor) -> None:
    with torch.no_grad():
        for param, axis in writers:
            param.copy_(project_out(param.detach(), d, axis))


@contextmanager
def orthogonalize(model, direction) -> Iterator:
    """Bake the projection ``x - (x.d) d`` into every residual writer inside the ``with`` block.

    A tied output head (GPT-2, Qwen3, SmolLM2) gets its own copy of the embedding for the block,
    so the unembedding is unchanged; every weight and the tie are restored exactly on exit.
    """
    require_local_weights(model, "Orthogonalising weights")
    d = unit_direction(direction, dims(model)[1])
    writers = residual_writers(model)
    saved = [param.detach().clone() for param, _ in writers]
    head = tied_head(model)
    shared = head.weight if head is not None else None
    try:
        if head is not None:
            head.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
        _orthogonalize_weights(writers, d)
        yield model
    finally:
        with torch.no_grad():
            for (param, _), original in zip(writers, saved):
                param.copy_(original)
        if head is not None:
            head.weight = shared


def orthogonalize_permanently(model, direction):
    """:func:`orthogonalize` for good (a tied output head is untied first); returns ``model``."""
    require_local_weights(model, "Orthogonalising weights")
    d = unit_direction(direction, dims(model)[1])
    writers = residual_writers(model)
    head = tied_head(model)
    if head is not None:
        head.weight = nn.Parameter(head.weight.detach().clone(),
                                   requires_grad=head.weight.requires_grad)
        hf_model(model).config.tie_word_embeddings = False  # save/load keeps them separate
    _orthogonalize_weights(writers, d)
    return model
