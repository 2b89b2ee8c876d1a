"""Physical attention-head removal: fewer query heads, smaller projections, less compute.

- ``remove_heads``: delete query heads in place by shrinking the q/k/v and output projections
  (fused ones too: GPT-2's c_attn, GPT-NeoX's query_key_value; see the architecture table).
  Exact: the pruned model computes what the full model computes with those heads' outputs
  zeroed at the output projection's input. Grouped-query attention is respected: a kv head
  whose query heads are all gone is removed too, and when the kept query heads spread unevenly
  over the kept kv heads (say 1 and 2), kv heads are replicated so that every kv head serves
  the same number of query heads, as HF's attention (``num_key_value_groups``) requires
  (a later removal counts such replicas as one kv head again). Replication can make a layer
  *larger* (SmolLM2, 9 query over 3 kv heads: one head less takes a layer from 3 to 8 kv
  heads); ``remove_heads`` then warns with the numbers (``LayerGrowthWarning``).
- ``heads_to_remove``: which heads to remove for a fraction, by importance. By default
  *balanced*: every layer keeps a uniform layout (each kept kv head serves the same number of
  query heads, no replication), so every layer shrinks; ``mode="uneven"`` (any heads, exact
  by replication) and ``mode="groups"`` (whole kv groups) are the alternatives.
- A saved model whose per-layer layout the standard config cannot express (layers that
  differ, or a GPT-2 / GPT-NeoX with fewer heads: their head size is always
  ``hidden_size / num_attention_heads``) carries ``config.head_layout = [[n_query, n_kv], ...]``
  and reloads with ``load_head_pruned`` (or ``pruning_bridge.models.load_model``). Other
  pruned models reload with plain ``from_pretrained``.
- ``select_heads`` / ``kv_copies``: the primitives, one layer's attention projections cut to
  given query and kv heads (where they are comes from the architecture table,
  ``pruning_bridge.bridge.architectures``), and which kv heads are replicas.
- ``head_counts``: ``(query, kv)`` heads per layer.

Head indices always refer to the model's current heads, in the order ``head_counts`` counts.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Mapping, Sequence, Union

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import Tensor, nn
from transformers import (CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM,
                          PretrainedConfig)

from ..bridge import HookBridge, architecture_of, blocks_of, head_counts, model_dims
from ..common.errors import OutOfRangeError, UsageError, require_local_weights

__all__ = ["HEAD_SELECTIONS", "LayerGrowthWarning", "head_counts", "heads_to_remove",
           "kv_copies", "load_head_pruned", "remove_heads", "select_heads"]

HEAD_SELECTIONS = ("balanced", "uneven", "groups")

# The kv layout ``heads_to_remove`` needs: a model (or HookBridge), or ``(n_query, n_kv)`` heads
# per layer as ``head_counts`` gives them.
Layout = Union[torch.nn.Module, HookBridge, Sequence[Sequence[int]]]


class LayerGrowthWarning(UserWarning):
    """A head removal made a layer larger: the kept query heads spread unevenly over the kv
    heads, and the kv heads were replicated to make the layout exact."""


# ---------------------------------------------------------------- reshaping one layer


def head_index(heads: Tensor, d_head: int) -> Tensor:
    """Positions of ``heads`` in a flat ``n_heads * d_head`` dimension."""
    return (heads[:, None] * d_head + torch.arange(d_head)).flatten()


def _shrink(module: nn.Module, weight: Tensor, bias: Tensor | None = None) -> None:
    """Give a ``Linear`` or GPT-2 ``Conv1D`` a new weight (and bias, if given) in place."""
    module.weight = nn.Parameter(weight.contiguous(), module.weight.requires_grad)
    if bias is not None:
        module.bias = nn.Parameter(bias.contiguous(), module.bias.requires_grad)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    else:  # Conv1D stores its weight [in, out]
        module.nx, module.nf = weight.shape


def _keep_rows(module: nn.Module, rows: Tensor, weights_in_out: bool) -> None:
    """Keep output features ``rows`` of a projection (its weight and bias)."""
    weight = module.weight[:, rows] if weights_in_out else module.weight[rows]
    bias = None if module.bias is None else module.bias[rows]
    _shrink(module, weight, bias)


def _keep_inputs(module: nn.Module, cols: Tensor, weights_in_out: bool) -> None:
    """Keep input features ``cols`` of a projection (its bias is unchanged)."""
    _shrink(module, module.weight[cols] if weights_in_out else module.weight[:, cols])


def select_heads(model, layer: int, q_heads: Sequence[int], kv_heads: Sequence[int]) -> None:
    """Keep query heads ``q_heads`` and kv heads ``kv_heads`` (repeats allowed) of ``layer``.

    Query head ``i`` of the result uses kv head ``i // (len(q_heads) // len(kv_heads))``. Fused
    layouts have one kv head per query head, so ``kv_heads`` must equal ``q_heads`` there.
    Per-head norms (Qwen3's q_norm / k_norm) act per head and are unchanged. Where the
    projections are is read from the architecture table.
    """
    arch, d_head = architecture_of(model), model_dims(model).d_head
    block = blocks_of(model)[layer]
    attn = block.get_submodule(arch.attention)
    if arch.qkv_layout != "separate" and list(q_heads) != list(kv_heads):
        raise UsageError(f"{arch.family} has one key/value head per query head.")
    q_heads, kv_heads = torch.as_tensor(q_heads), torch.as_tensor(kv_heads)
    q = head_index(q_heads, d_head)
    if arch.qkv_layout == "separate":
        kv = head_index(kv_heads, d_head)
        for path, rows in zip(arch.qkv, (q, kv, kv)):
            _keep_rows(block.get_submodule(path), rows, arch.weights_in_out)
        attn.num_key_value_groups = len(q_heads) // len(kv_heads)
    else:
        fused = block.get_submodule(arch.qkv[0])
        width = fused.weight.shape[1 if arch.weights_in_out else 0] // 3  # output features / 3
        if arch.qkv_layout == "stacked":  # [q | k | v]
            rows = torch.cat([q, q + width, q + 2 * width])
        else:  # per head: [q_h k_h v_h] blocks of 3 * d_head
            rows = head_index(q_heads, 3 * d_head)
        _keep_rows(fused, rows, arch.weights_in_out)
    _keep_inputs(block.get_submodule(arch.attn_out), q, arch.weights_in_out)
    for name in ("num_heads", "split_size"):  # GPT-2's attention reads these in forward
        if hasattr(attn, name):
            setattr(attn, name, len(q_heads) * (d_head if name == "split_size" else 1))


def kv_copies(model, layer: int) -> list[int]:
    """For each kv head of ``layer``, the first kv head with identical k/v weights (replicas
    left by an uneven head removal count as one). Fused layouts: every head is its own."""
    arch = architecture_of(model)
    n_kv = head_counts(model)[layer][1]
    if arch.qkv_layout != "separate":
        return list(range(n_kv))
    block = blocks_of(model)[layer]
    params = [p for path in arch.qkv[1:] for p in (block.get_submodule(path).weight,
                                                   block.get_submodule(path).bias)
              if p is not None]
    rows = torch.cat([p.reshape(n_kv, -1) for p in params], dim=1)
    return [next(i for i in range(j + 1) if torch.equal(rows[i], rows[j])) for j in range(n_kv)]


# ---------------------------------------------------------------- removing heads


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


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def remove_heads(model, heads_by_layer: Mapping[int, Sequence[int]]):
    """Delete the listed query heads of each layer from ``model`` in place (and return it).

    ``heads_by_layer`` maps a layer index to query-head indices. At least one head per layer
    must stay (to remove a whole layer use ``drop_layers``). Kept heads keep their order, except
    that heads sharing a kv head are made adjacent. The config is updated so that
    ``save_pretrained`` + ``from_pretrained`` reloads the model, or, when the layout needs
    ``config.head_layout`` (see the module docstring), ``load_head_pruned`` does. A layer that
    ends up with more parameters than before (kv heads replicated for an uneven split) is
    reported by a ``LayerGrowthWarning``; ``heads_to_remove``'s balanced selection never
    causes one.
    """
    require_local_weights(model, "Removing heads")
    counts = head_counts(model)
    plan = _check_heads(heads_by_layer, counts)  # everything is checked before any change
    blocks = blocks_of(model)
    grown = []
    for layer, removed in plan.items():
        n_q, n_kv = counts[layer]
        before = _n_params(blocks[layer])
        kept = sorted(set(range(n_q)) - set(removed))
        q_heads, kv_heads = _gqa_plan(kept, n_q // n_kv, kv_copies(model, layer))
        select_heads(model, layer, q_heads, kv_heads)
        after = _n_params(blocks[layer])
        if after > before:
            grown.append(f"layer {layer}: {before:,} -> {after:,} parameters (query heads "
                         f"{n_q} -> {len(q_heads)}, kv heads {n_kv} -> {len(kv_heads)}, "
                         f"{len(kv_heads) - len(set(kv_heads))} of them replicas)")
    _record_layout(model)
    if grown:
        warnings.warn(
            f"remove_heads made {len(grown)} layer(s) larger, because the kept query heads "
            f"spread unevenly over the kv heads and kv heads were replicated so that each "
            f"serves the same number of query heads: {'; '.join(grown)}. To shrink every "
            f"layer, remove the same number of query heads from every kv group of a layer: "
            f"heads_to_remove(importance, fraction, model) does (its default, balanced "
            f"selection).", LayerGrowthWarning, stacklevel=2)
    return model


# ---------------------------------------------------------------- which heads to remove

Groups = list[list[int]]  # one layer's kv groups: the query heads sharing each kv head


def _groups_of_model(model) -> list[Groups]:
    """Per layer, the query heads of each distinct kv head (replicas of one kv head merged)."""
    groups = []
    for layer, (n_q, n_kv) in enumerate(head_counts(model)):
        copies = kv_copies(model, layer)
        by_kv: dict[int, list[int]] = {}
        for h in range(n_q):
            by_kv.setdefault(copies[h // (n_q // n_kv)], []).append(h)
        groups.append(list(by_kv.values()))
    return groups


def _groups_of_counts(counts: Sequence[Sequence[int]]) -> list[Groups]:
    """Per layer, ``n_kv`` groups of ``n_q / n_kv`` consecutive query heads."""
    groups = []
    for layer, pair in enumerate(counts):
        try:
            n_q, n_kv = (int(n) for n in pair)
        except (TypeError, ValueError):
            raise UsageError(f"layout must be a model or (n_query, n_kv) heads per layer, as "
                             f"head_counts(model) gives them; layer {layer} has {pair!r}.") \
                from None
        if not (n_q > 0 and n_kv > 0 and n_q % n_kv == 0):
            raise UsageError(f"Layer {layer} of the layout has {n_q} query heads over {n_kv} kv "
                             f"heads; the kv heads must be at least one and divide the query "
                             f"heads.")
        size = n_q // n_kv
        groups.append([list(range(j * size, (j + 1) * size)) for j in range(n_kv)])
    return groups


def _layout_groups(layout: Layout | None, kv_groups: int | None, n_layers: int,
                   n_heads: int) -> list[Groups] | None:
    """The kv groups of every layer, from ``layout`` or ``kv_groups``; checked against the
    ``[n_layers, n_heads]`` importance."""
    if layout is not None and kv_groups is not None:
        raise UsageError("Give the kv layout once: layout (a model or head_counts(model)) or "
                         "kv_groups (query heads per kv head), not both.")
    if kv_groups is not None:
        if not (isinstance(kv_groups, int) and kv_groups > 0 and n_heads % kv_groups == 0):
            raise UsageError(f"kv_groups={kv_groups} does not divide the {n_heads} heads per "
                             f"layer; it is the number of query heads per kv head.")
        return _groups_of_counts([(n_heads, n_heads // kv_groups)] * n_layers)
    if layout is None:
        return None
    if isinstance(layout, HookBridge):
        layout = layout.model
    groups = (_groups_of_model(layout) if isinstance(layout, torch.nn.Module)
              else _groups_of_counts(layout))
    if len(groups) != n_layers:
        raise UsageError(f"The layout has {len(groups)} layers but the importance has "
                         f"{n_layers}; rank the heads of the model you prune.")
    for layer, layer_groups in enumerate(groups):
        n_q = sum(map(len, layer_groups))
        if n_q != n_heads:
            raise UsageError(f"Layer {layer} has {n_q} query heads but the importance has "
                             f"{n_heads} per layer; rank the heads of the model you prune.")
    return groups


def _uniform_removals(scores: list[float], groups: Groups) -> dict[int, tuple[float, list[int]]]:
    """Every number of heads one layer can lose and keep a uniform layout, with the least
    important such removal: ``{n_removed: (summed importance, heads removed)}``.

    A uniform layout keeps ``c`` query heads in each of ``m`` kv groups. For a given ``c`` the
    best choice keeps each group's ``c`` most important heads and the ``m`` groups whose kept
    heads sum highest. ``m = all groups`` is the same number of heads removed from every
    group; smaller ``m`` also drops whole groups (needed beyond ``1 - 1/group size`` of a
    layer, and the only way to remove heads without GQA, where every head is a group).
    """
    n = len(scores)
    # ties: lower heads and groups go first, as in the uneven selection
    rank = {h: r for r, h in enumerate(sorted(range(n), key=lambda h: (-scores[h], -h)))}
    options: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for c in range(1, max(map(len, groups)) + 1):
        tops = [sorted(g, key=rank.__getitem__)[:c] for g in groups if len(g) >= c]
        tops.sort(key=lambda heads: (-math.fsum(scores[h] for h in heads), -min(heads)))
        for m in range(1, len(tops) + 1):
            kept = {h for heads in tops[:m] for h in heads}
            removed = [h for h in range(n) if h not in kept]
            cost = math.fsum(scores[h] for h in removed)
            if len(removed) not in options or cost < options[len(removed)][0]:
                options[len(removed)] = (cost, removed)
    return options


def _balanced(scores: torch.Tensor, groups: list[Groups], k: int) -> dict[int, list[int]]:
    """Uniform removals per layer whose total is as close to ``k`` as possible (fewer on a
    tie) and, for that total, of least summed importance (a small knapsack over layers)."""
    options = [_uniform_removals(scores[layer].tolist(), layer_groups)
               for layer, layer_groups in enumerate(groups)]
    most = sum(max(o) for o in options)
    if k > most:
        raise UsageError(f"Removing {k} of {scores.numel()} heads would empty a layer; at most "
                         f"{most} can go (one per layer stays).")
    best: dict[int, float] = {0: 0.0}  # heads removed so far -> least summed importance
    steps: list[dict[int, tuple[int, int]]] = []  # per layer: total -> (previous total, removed)
    for layer_options in options:
        new: dict[int, float] = {}
        step: dict[int, tuple[int, int]] = {}
        for total, cost in best.items():
            for r, (c, _) in sorted(layer_options.items()):
                if total + r not in new or cost + c < new[total + r]:
                    new[total + r], step[total + r] = cost + c, (total, r)
        best = new
        steps.append(step)
    total = min(best, key=lambda t: (abs(t - k), t))
    chosen: dict[int, list[int]] = {}
    for layer in reversed(range(len(options))):
        total, r = steps[layer][total]
        if r:
            chosen[layer] = options[layer][r][1]
    return dict(sorted(chosen.items()))


def _least_important_units(scores: torch.Tensor, groups: list[Groups], fraction: float,
                           unit: str) -> dict[int, list[int]]:
    """The globally least important units (groups of heads), ``fraction`` of all of them,
    never the most important unit of a layer (ties: lower layer, then lower unit)."""
    units = [[(math.fsum(scores[layer, h].item() for h in g), g) for g in layer_groups]
             for layer, layer_groups in enumerate(groups)]
    n_units = sum(map(len, units))
    k = math.floor(fraction * n_units + 0.5)
    candidates = []
    for layer, layer_units in enumerate(units):
        protected = max(range(len(layer_units)), key=lambda i: (layer_units[i][0], -i))
        candidates += [(score, layer, i) for i, (score, _) in enumerate(layer_units)
                       if i != protected]
    candidates.sort()
    if k > len(candidates):
        raise UsageError(f"Removing {k} of {n_units} {unit} would empty a layer; at most "
                         f"{len(candidates)} can go (one per layer stays).")
    chosen: dict[int, list[int]] = {}
    for _, layer, i in candidates[:k]:
        chosen.setdefault(layer, []).extend(units[layer][i][1])
    return {layer: sorted(heads) for layer, heads in sorted(chosen.items())}


def heads_to_remove(importance, fraction: float, layout: Layout | None = None, *,
                    mode: str | None = None,
                    kv_groups: int | None = None) -> dict[int, list[int]]:
    """The least important heads, about ``fraction`` of all of them, for ``remove_heads``.

    ``importance`` is ``[n_layers, n_heads]`` (tensor or array; higher = more important);
    ``layout`` the kv layout of the model to prune: the model itself (or its ``HookBridge``)
    or ``(n_query, n_kv)`` heads per layer (``head_counts(model)``). ``mode``:

    - ``"balanced"`` (the default): per layer, the same number of query heads from every kv
      group (each group's least important), or also whole groups, so that every kept kv head
      serves the same number of query heads: no kv head is replicated and every layer that
      loses heads shrinks. Per-layer counts are chosen together: the total is the one nearest
      ``round(fraction * n_heads_total)`` that such layouts allow (the fewer on a tie), and of
      those removals the one of least summed importance. Without GQA (as many kv heads as
      query heads, e.g. GPT-2) every head is its own group and any count is balanced.
    - ``"uneven"``: exactly that many heads, the globally least important (ties: lower layer,
      then lower head), never the most important of a layer; ``layout`` is not needed. Exact,
      but an uneven split over kv groups replicates kv heads and can make a layer larger.
    - ``"groups"``: whole kv groups, scored by their summed importance, never a layer's best;
      ``fraction`` counts groups. ``kv_groups`` (query heads per kv head) is the older
      spelling of this mode for a uniform layout, in place of ``layout``.

    Every layer keeps at least one head.
    """
    scores = torch.as_tensor(importance).detach().to("cpu", torch.float64)
    if scores.ndim != 2:
        raise UsageError(f"importance must be [n_layers, n_heads]; got {tuple(scores.shape)}.")
    if not 0 <= fraction <= 1:
        raise UsageError(f"fraction must be in [0, 1]; got {fraction}.")
    mode = mode if mode is not None else "groups" if kv_groups is not None else "balanced"
    if mode not in HEAD_SELECTIONS:
        raise UsageError(f"mode must be one of {', '.join(map(repr, HEAD_SELECTIONS))}; got "
                         f"{mode!r}.")
    if kv_groups is not None and mode != "groups":
        raise UsageError(f"kv_groups selects whole kv groups (mode='groups'); with "
                         f"mode={mode!r} pass the layout instead.")
    n_layers, n_heads = scores.shape
    groups = _layout_groups(layout, kv_groups, n_layers, n_heads)
    if mode == "uneven":
        return _least_important_units(scores, [[[h] for h in range(n_heads)]] * n_layers,
                                      fraction, "heads")
    if groups is None:
        raise UsageError(f"The {mode} selection needs the model's kv layout: pass the model "
                         f"(or head_counts(model)) as layout, e.g. heads_to_remove(importance, "
                         f"{fraction}, model); or mode='uneven' for single heads regardless of "
                         f"kv groups.")
    if mode == "groups":
        return _least_important_units(scores, groups, fraction, "groups")
    return _balanced(scores, groups, math.floor(fraction * scores.numel() + 0.5))


# ---------------------------------------------------------------- reloading a pruned model


def _apply_layout(model, layout: Sequence[Sequence[int]]) -> None:
    """Give each layer the shapes of ``layout``; only shapes matter, weights are loaded after."""
    for layer, (n_q, n_kv) in enumerate(layout):
        select_heads(model, layer, [0] * n_q, [0] * n_kv)


def load_head_pruned(path: str | os.PathLike, **from_pretrained_kwargs):
    """``AutoModelForCausalLM.from_pretrained`` that also loads models with heads removed.

    A drop-in replacement (same arguments, hub ids and GGUF included). A model saved after
    ``remove_heads`` with a per-layer layout carries ``config.head_layout = [[n_query, n_kv],
    ...]``; then the usual model class is built, its attention shapes are set to the layout
    before the weights load (so ``from_pretrained``'s options, e.g. ``dtype``, work as usual),
    and the model is returned as an instance of that usual class.
    """
    config, _ = PretrainedConfig.get_config_dict(path, **from_pretrained_kwargs)
    if config.get("head_layout") is None:
        return AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    base = MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[config["model_type"]]]

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        _apply_layout(self, config.head_layout)

    # the same module as the base class, so transformers treats it as its own (checkpoint key
    # renames, e.g. GPT-NeoX's embed_out -> lm_head, apply only to library classes)
    built = type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})
    model = built.from_pretrained(path, **from_pretrained_kwargs)
    model.__class__ = base  # the subclass differs only in construction
    return model
