"""Physical attention-head removal: fewer query heads, smaller projections, less compute.

- ``remove_heads``: delete query heads in place by shrinking q/k/v/o (GPT-2: c_attn/c_proj).
  Exact: the pruned model computes what the full model computes with those heads' outputs
  zeroed at the output projection's input. Grouped-query attention is respected: a kv head
  whose query heads are all gone is removed too, and when the kept query heads spread unevenly
  over the kept kv heads (say 1 and 2), kv heads are replicated so that every kv head serves
  the same number of query heads, as HF's attention (``num_key_value_groups``) requires
  (a later removal counts such replicas as one kv head again).
- ``load_head_pruned``: reload a saved model whose per-layer layout the standard config cannot
  express (layers that differ, or a GPT-2 with fewer heads: its head size is always
  ``n_embd / n_head``);
  such configs carry ``head_layout = [[n_query, n_kv], ...]``. Other pruned models reload with
  plain ``from_pretrained``.
- ``heads_to_remove``: the globally least important heads (or whole kv groups) for a fraction.
- ``head_counts``: ``(query, kv)`` heads per layer.

Head indices always refer to the model's current heads, in the order ``head_counts`` counts.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Mapping, Sequence

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import Tensor, nn
from transformers import (CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM,
                          PretrainedConfig)

from ..common.errors import OutOfRangeError, UsageError
from ..pruning.layers import decoder_layers


def _attentions(model) -> list[nn.Module]:
    """Each decoder layer's self-attention module (GPT-2: ``attn``, others: ``self_attn``)."""
    name = "attn" if model.config.model_type == "gpt2" else "self_attn"
    return [getattr(block, name) for block in decoder_layers(model)]


def head_counts(model) -> list[tuple[int, int]]:
    """``(query heads, key/value heads)`` of every layer, read from the projection shapes."""
    if model.config.model_type == "gpt2":
        return [(a.num_heads, a.num_heads) for a in _attentions(model)]
    return [(a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim)
            for a in _attentions(model)]


def _head_index(heads: Tensor, head_dim: int) -> Tensor:
    """Positions of ``heads`` in a flat ``n_heads * head_dim`` dimension."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _replace(module: nn.Module, weight: Tensor, bias: Tensor | None = None) -> None:
    """Give a ``Linear`` or GPT-2 ``Conv1D`` a new weight (and bias, if given) in place."""
    module.weight = nn.Parameter(weight.contiguous(), module.weight.requires_grad)
    if bias is not None:
        module.bias = nn.Parameter(bias.contiguous(), module.bias.requires_grad)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    else:  # Conv1D stores its weight [in, out]
        module.nx, module.nf = weight.shape


def _select_llama(attn: nn.Module, q_heads: Tensor, kv_heads: Tensor) -> None:
    """Keep query heads ``q_heads`` and kv heads ``kv_heads`` (repeats allowed), in that order.

    Query head ``i`` of the result uses kv head ``i // (len(q_heads) // len(kv_heads))``;
    q_norm/k_norm act per head and are unchanged.
    """
    q, kv = _head_index(q_heads, attn.head_dim), _head_index(kv_heads, attn.head_dim)
    for proj, rows in ((attn.q_proj, q), (attn.k_proj, kv), (attn.v_proj, kv)):
        _replace(proj, proj.weight[rows], None if proj.bias is None else proj.bias[rows])
    _replace(attn.o_proj, attn.o_proj.weight[:, q])
    attn.num_key_value_groups = len(q_heads) // len(kv_heads)


def _select_gpt2(attn: nn.Module, heads: Tensor) -> None:
    """Keep ``heads`` of a GPT-2 attention: their q, k and v columns of c_attn, rows of c_proj."""
    cols = _head_index(heads, attn.head_dim)
    qkv = torch.cat([cols, cols + attn.split_size, cols + 2 * attn.split_size])
    _replace(attn.c_attn, attn.c_attn.weight[:, qkv], attn.c_attn.bias[qkv])
    _replace(attn.c_proj, attn.c_proj.weight[cols])
    attn.num_heads, attn.split_size = len(heads), len(heads) * attn.head_dim


def _kv_copies(attn: nn.Module) -> list[int]:
    """For each kv head, the first kv head with identical k/v weights (replicas count as one)."""
    n_kv = attn.k_proj.out_features // attn.head_dim
    params = [p for proj in (attn.k_proj, attn.v_proj) for p in (proj.weight, proj.bias)
              if p is not None]
    rows = torch.cat([p.reshape(n_kv, -1) for p in params], dim=1)
    return [next(i for i in range(j + 1) if torch.equal(rows[i], rows[j])) for j in range(n_kv)]


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
            raise OutOfRangeError(f"Head indices {bad} are out of range for layer {layer}, which has "
                             f"{n_q} query heads (valid: 0..{n_q - 1}).")
        if len(heads) == n_q:
            raise UsageError(f"Removing all {n_q} heads of layer {layer} leaves no attention; "
                             f"keep at least one head, or remove the whole layer with "
                             f"pruning_bridge.pruning.layers.drop_layers.")
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
    head_dim = _attentions(model)[0].head_dim
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
    attentions = _attentions(model)
    counts = head_counts(model)
    plan = _check_heads(heads_by_layer, counts)  # everything is checked before any change
    for layer, removed in plan.items():
        n_q, n_kv = counts[layer]
        kept = sorted(set(range(n_q)) - set(removed))
        if model.config.model_type == "gpt2":
            _select_gpt2(attentions[layer], torch.tensor(kept))
        else:
            attn = attentions[layer]
            q_heads, kv_heads = _gqa_plan(kept, n_q // n_kv, _kv_copies(attn))
            _select_llama(attn, torch.tensor(q_heads), torch.tensor(kv_heads))
    _record_layout(model)
    return model


def _apply_layout(model, layout: Sequence[Sequence[int]]) -> None:
    """Give each layer the shapes of ``layout``; only shapes matter, weights are loaded after."""
    for attn, (n_q, n_kv) in zip(_attentions(model), layout):
        if model.config.model_type == "gpt2":
            _select_gpt2(attn, torch.zeros(n_q, dtype=torch.long))
        else:
            _select_llama(attn, torch.zeros(n_q, dtype=torch.long),
                          torch.zeros(n_kv, dtype=torch.long))


def load_head_pruned(path: str | os.PathLike, **from_pretrained_kwargs):
    """``AutoModelForCausalLM.from_pretrained`` that also loads ``config.head_layout`` models.

    A drop-in replacement (same arguments, hub ids and GGUF included). With a ``head_layout``
    the usual model class is built, its attention shapes are set to the layout before the
    weights load (so ``from_pretrained``'s options, e.g. ``dtype``, work as usual), and the
    model is returned as an instance of that usual class.
    """
    config, _ = PretrainedConfig.get_config_dict(path, **from_pretrained_kwargs)
    if config.get("head_layout") is None:
        return AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    base = MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[config["model_type"]]]

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        _apply_layout(self, config.head_layout)

    model = type(base.__name__, (base,), {"__init__": __init__}).from_pretrained(
        path, **from_pretrained_kwargs)
    model.__class__ = base  # the subclass differs only in construction
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
