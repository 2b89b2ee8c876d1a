"""Physical attention-head removal: fewer query heads, smaller projections, less compute.

- ``remove_heads``: delete query heads in place by shrinking the q/k/v and output projections
  (fused ones too: GPT-2's c_attn, GPT-NeoX's query_key_value; see the architecture table).
  Exact: the pruned model computes what the full model computes with those heads' outputs
  zeroed at the output projection's input. Grouped-query attention is respected: a kv head
  whose query heads are all gone is removed too, and when the kept query heads spread unevenly
  over the kept kv heads (say 1 and 2), kv heads are replicated so that every kv head serves
  the same number of query heads, as HF's attention (``num_key_value_groups``) requires
  (a later removal counts such replicas as one kv head again).
- A saved model whose per-layer layout the standard config cannot express (layers that
  differ, or a GPT-2 / GPT-NeoX with fewer heads: their head size is always
  ``hidden_size / num_attention_heads``) carries ``config.head_layout = [[n_query, n_kv], ...]``
  and reloads with ``pruning_bridge.models.load_head_pruned`` (or ``load_model``). Other pruned
  models reload with plain ``from_pretrained``.
- ``heads_to_remove``: the globally least important heads (or whole kv groups) for a fraction.
- ``head_counts``: ``(query, kv)`` heads per layer.

Head indices always refer to the model's current heads, in the order ``head_counts`` counts.
"""

from __future__ import annotations

import copy
import math
from typing import Mapping, Sequence

import torch
from huggingface_hub.errors import StrictDataclassError

from ..bridge import head_counts, model_dims, select_heads
from ..bridge.architectures import kv_copies
from ..common.errors import OutOfRangeError, UsageError
from ..models import load_head_pruned

__all__ = ["head_counts", "heads_to_remove", "load_head_pruned", "remove_heads"]


def _gqa_plan(kept: list[int], groups: int, copies: list[int]) -> tuple[list[int], list[int]]:
    """Query heads in their new order, and the kv head (repeats allowed) of each block.

    The kept query heads are ordered by kv head (``copies`` merges replicas). With ``count_j``
    of them on kv head ``j`` and ``g = gcd(counts)``, kv head ``j`` is listed ``count_j / g``
    times, so every run of ``g`` consecutive query heads shares one kv head.
    """
    by_kv: dict[int, list[int]] = {}
    for h in kept:
        by_kv.setdefault(copies[h // groups], []).append(h)
    g = math.gcd(*map(len, by_kv.values()))
    q_heads = [h for heads in by_kv.values() for h in heads]
    kv_heads = [j for j, heads in by_kv.items() for _ in range(len(heads) // g)]
    return q_heads, kv_heads


def _check_heads(heads_by_layer: Mapping[int, Sequence[int]],
                 counts: list[tuple[int, int]]) -> dict[int, list[int]]:
    n = len(counts)
    plan = {}
    for layer, heads in heads_by_layer.items():
        layer = int(layer)
        if not 0 <= layer < n:
            raise OutOfRangeError(f"Layer {layer} is out of range for a model with {n} layers "
                                  f"(valid: 0..{n - 1}).")
        heads = sorted({int(h) for h in heads})
        n_q = counts[layer][0]
        bad = [h for h in heads if not 0 <= h < n_q]
        if bad:
            raise OutOfRangeError(f"Head indices {bad} are out of range for layer {layer}, which "
                                  f"has {n_q} query heads (valid: 0..{n_q - 1}).")
        if len(heads) == n_q:
            raise UsageError(f"Removing all {n_q} heads of layer {layer} leaves no attention; "
                             f"keep at least one head, or remove the whole layer with "
                             f"pruning_bridge.pruning.drop_layers.")
        if heads:
            plan[layer] = heads
    return plan


def _standard_config(config, layout: list[list[int]], head_dim: int):
    """A copy of ``config`` whose standard fields build ``layout``, or None if none can.

    Only a uniform layout qualifies, and only if the config then still validates (Llama wants
    ``hidden_size % num_attention_heads == 0``) and gives the same head size (GPT-2's is
    always ``n_embd / n_head``, so it qualifies only with all its heads).
    """
    if len({tuple(c) for c in layout}) != 1:
        return None
    candidate = copy.deepcopy(config)
    candidate.num_attention_heads = layout[0][0]
    if hasattr(candidate, "num_key_value_heads"):
        candidate.num_key_value_heads = layout[0][1]
    try:
        candidate.validate()
    except StrictDataclassError:
        return None
    built = getattr(candidate, "head_dim", None) or candidate.hidden_size // layout[0][0]
    return candidate if built == head_dim else None


def _record_layout(model) -> None:
    """Make the config describe the model: standard fields if they can, else ``head_layout``."""
    config = model.config
    head_dim = model_dims(model).d_head
    if hasattr(config, "head_dim"):
        config.head_dim = head_dim  # never recomputed as hidden_size / num_attention_heads
    layout = [list(c) for c in head_counts(model)]
    standard = _standard_config(config, layout, head_dim)
    if standard is None:
        config.head_layout = layout
        return
    config.num_attention_heads = standard.num_attention_heads
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = standard.num_key_value_heads
    if hasattr(config, "head_layout"):
        del config.head_layout


@torch.no_grad()
def remove_heads(model, heads_by_layer: Mapping[int, Sequence[int]]):
    """Delete the listed query heads of each layer from ``model`` in place (and return it).

    ``heads_by_layer`` maps a layer index to query-head indices. At least one head per layer
    must stay (to remove a whole layer use ``drop_layers``). Kept heads keep their order, except
    that heads sharing a kv head are made adjacent. The config is updated so that
    ``save_pretrained`` + ``from_pretrained`` reloads the model, or, when the layout needs
    ``config.head_layout`` (see the module docstring), ``load_head_pruned`` does.
    """
    counts = head_counts(model)
    plan = _check_heads(heads_by_layer, counts)  # everything is checked before any change
    for layer, removed in plan.items():
        n_q, n_kv = counts[layer]
        kept = sorted(set(range(n_q)) - set(removed))
        q_heads, kv_heads = _gqa_plan(kept, n_q // n_kv, kv_copies(model, layer))
        select_heads(model, layer, q_heads, kv_heads)
    _record_layout(model)
    return model


def heads_to_remove(importance, fraction: float, *,
                    kv_groups: int | None = None) -> dict[int, list[int]]:
    """The globally least important heads, ``fraction`` of all of them, for ``remove_heads``.

    ``importance`` is ``[n_layers, n_heads]`` (tensor or array; higher = more important).
    ``round(fraction * n_heads_total)`` heads are chosen, lowest importance first (ties: lower
    layer, then lower head), never the most important head of a layer, so every layer keeps
    one. With ``kv_groups`` (query heads per kv head) the unit is a whole kv group of
    consecutive heads, scored by its summed importance: k/v shrink as much as q/o and no kv
    head needs replicating; ``fraction`` then counts groups.
    """
    scores = torch.as_tensor(importance).detach().to("cpu", torch.float64)
    if scores.ndim != 2:
        raise UsageError(f"importance must be [n_layers, n_heads]; got {tuple(scores.shape)}.")
    if not 0 <= fraction <= 1:
        raise UsageError(f"fraction must be in [0, 1]; got {fraction}.")
    n_layers, n_heads = scores.shape
    size = kv_groups or 1
    if n_heads % size:
        raise UsageError(f"kv_groups={kv_groups} does not divide the {n_heads} heads per layer.")
    units = scores.reshape(n_layers, n_heads // size, size).sum(-1)
    k = math.floor(fraction * units.numel() + 0.5)
    protected = units.argmax(dim=1).tolist()
    candidates = sorted((units[layer, unit].item(), layer, unit)
                        for layer in range(n_layers) for unit in range(units.shape[1])
                        if unit != protected[layer])
    if k > len(candidates):
        raise UsageError(f"Removing {k} of {units.numel()} {'groups' if kv_groups else 'heads'} "
                         f"would empty a layer; at most {len(candidates)} can go (one per "
                         f"layer stays).")
    chosen: dict[int, list[int]] = {}
    for _, layer, unit in candidates[:k]:
        chosen.setdefault(layer, []).extend(range(unit * size, (unit + 1) * size))
    return {layer: sorted(heads) for layer, heads in sorted(chosen.items())}
