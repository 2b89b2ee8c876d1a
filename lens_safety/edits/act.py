"""Activation transport (Rodriguez et al., ICLR 2025) and additive steering, as tensors.

Fitted from a source (toxic) and a target (non-toxic) sample of activations ``[n, ...]`` at one
hook point, applied per dimension of ``z`` ``[batch, pos, ...]`` with strength ``lam``:

- Mean-AcT: ``z + lam (m_target - m_source)``.
- Linear-AcT: per dimension the affine 1-D optimal-transport map ``T(z) = w z + b``, fitted by
  least squares on the pairs of the monotone (optimal) coupling of the sorted samples
  (``w = cov(a, b) / var(a)`` over the coupling, ``b = m_b - w m_a``, as apple/ml-act, which
  pairs equal-sized sorted samples; unequal sizes use the exact 1-D OT plan of the two
  empirical measures), applied as ``lam T(z) + (1 - lam) z`` only where ``z`` lies strictly
  inside the source's support (its min and max, or chosen quantiles), elsewhere left alone.
- ITI-c / CAA: ``z + lam v`` with ``v`` a linear probe's unit normal (per attention head at
  ``attn.hook_z`` ``[.., n_heads, d_head]``) or the difference of means.

``fit_causal`` fits hook points in order, each on activations collected with the earlier
points' maps already applied (the paper's causal estimation), through any backend;
``fit_causal_in_one_pass`` does the same on a local HookBridge in one forward pass. The
``apply_*`` functions use torch only, so they can run inside traces; given the call's
``attention_mask`` they leave each row's first real token alone. ``lam = 0`` returns ``z``.
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pruning_bridge.bridge.remote import send_by_value
from pruning_bridge.common.errors import UsageError

from .activation_stats import TokenReservoir, keep_first_token, pool_activations, tokenize_padded

State = dict[str, Tensor]


class ActError(UsageError):
    """Bad input for fitting or applying a transport / steering map."""


def _pair(source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    source, target = torch.as_tensor(source), torch.as_tensor(target)
    if source.ndim < 2 or source.shape[1:] != target.shape[1:]:
        raise ActError(f"Give source and target activations as [n, ...] with the same trailing "
                       f"shape; got {tuple(source.shape)} and {tuple(target.shape)}.")
    if len(source) < 2 or len(target) < 2:
        raise ActError(f"Fitting needs at least 2 samples per class; got {len(source)} source "
                       f"and {len(target)} target.")
    for what, x in (("source", source), ("target", target)):
        if not bool(torch.isfinite(x).all()):
            raise ActError(f"The {what} activations hold NaN or inf.")
    return source, target


# ---------------------------------------------------------------------------- Mean-AcT
def fit_mean_act(source: Tensor, target: Tensor, std_eps: float = 1e-4) -> State:
    """``{"shift": m_target - m_source}`` (float32, the trailing shape), 0 where either class's
    standard deviation is at most ``std_eps`` (a dead dimension is left alone, as ml-act)."""
    source, target = _pair(source, target)
    a, b = source.to(torch.float64), target.to(torch.float64)
    shift = b.mean(0) - a.mean(0)
    live = (a.std(0) > std_eps) & (b.std(0) > std_eps)
    return {"shift": torch.where(live, shift, 0).to(torch.float32)}


def apply_mean_act(z: Tensor, shift: Tensor, lam: float = 1.0,
                   attention_mask: Tensor | None = None) -> Tensor:
    """``z + lam shift`` over ``z``'s trailing axes, in ``z``'s dtype (first real token kept)."""
    if lam == 0:
        return z
    edited = (z.float() + lam * shift.to(device=z.device, dtype=torch.float32)).to(z.dtype)
    return keep_first_token(z, edited, attention_mask)


# ---------------------------------------------------------------------------- Linear-AcT
def ot_coupling(n: int, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """The optimal coupling of two sorted 1-D samples of sizes ``n`` and ``m`` with uniform
    weights (the same for every cost convex in the difference): ``(i, j, mass)``, sample ``i``
    of the first sent to ``j`` of the second with ``mass`` (summing to 1), at most ``n + m - 1``
    pairs. Built exactly on the grid of multiples of ``1 / (n m)``."""
    if n < 1 or m < 1:
        raise ActError(f"Both samples need at least one point; got {n} and {m}.")
    cuts = torch.unique(torch.cat([torch.arange(n + 1) * m, torch.arange(m + 1) * n]))
    left, right = cuts[:-1], cuts[1:]
    return left // m, left // n, (right - left).to(torch.float64) / (n * m)


def _sorted_quantile(sorted_x: Tensor, q: float) -> Tensor:
    """``torch.quantile(x, q, dim=0)`` (linear interpolation) from ``x`` sorted along dim 0."""
    pos = q * (sorted_x.shape[0] - 1)
    lo, hi = int(pos // 1), min(int(pos // 1) + 1, sorted_x.shape[0] - 1)
    return sorted_x[lo] + (pos - lo) * (sorted_x[hi] - sorted_x[lo])


def fit_linear_act(source: Tensor, target: Tensor,
                   support: tuple[float, float] | None = (0.0, 1.0), std_eps: float = 1e-4,
                   chunk_elements: int = 1 << 22) -> State:
    """Linear-AcT's per-dimension affine OT map from ``source`` to ``target`` (``[n, ...]`` and
    ``[m, ...]``): ``{"w", "b", "low", "high"}`` in float32 with the trailing shape.

    ``w``, ``b``: least squares of target on source over the optimal coupling of the sorted
    samples (``ot_coupling``; with n = m the sorted pairs). ``low`` / ``high``: the source's
    quantiles ``support`` (default its min and max; None: everywhere, +-inf); the map acts
    where ``low < z < high``. Dimensions whose source standard deviation is at most
    ``std_eps`` get the identity (w = 1, b = 0)."""
    source, target = _pair(source, target)
    if support is not None and not 0.0 <= support[0] < support[1] <= 1.0:
        raise ActError(f"support is a pair of quantiles 0 <= low < high <= 1 (or None); got "
                       f"{support}.")
    shape = source.shape[1:]
    a_all, b_all = source.reshape(len(source), -1), target.reshape(len(target), -1)
    i, j, mass = ot_coupling(len(source), len(target))
    step = max(1, chunk_elements // max(len(i), len(source), len(target)))
    parts: dict[str, list[Tensor]] = {"w": [], "b": [], "low": [], "high": []}
    for start in range(0, a_all.shape[1], step):
        # [dims, samples], sorted along the contiguous axis (the order is the same in float64)
        a = torch.sort(a_all[:, start:start + step].T.contiguous(), dim=1).values.double()
        b = torch.sort(b_all[:, start:start + step].T.contiguous(), dim=1).values.double()
        ma, mb = a.mean(1), b.mean(1)  # the coupling's marginals are uniform
        ac, bc = a - ma[:, None], b - mb[:, None]
        var = (ac * ac).mean(1)
        cov = (ac.index_select(1, i) * bc.index_select(1, j)) @ mass
        live = var.sqrt() > std_eps
        w = torch.where(live, cov / torch.where(live, var, 1.0), 1.0)
        parts["w"].append(w)
        parts["b"].append(torch.where(live, mb - w * ma, 0.0))
        if support is None:
            parts["low"].append(torch.full_like(w, -torch.inf))
            parts["high"].append(torch.full_like(w, torch.inf))
        else:
            parts["low"].append(_sorted_quantile(a.T, support[0]))
            parts["high"].append(_sorted_quantile(a.T, support[1]))
    return {key: torch.cat(value).reshape(shape).to(torch.float32)
            for key, value in parts.items()}


def apply_linear_act(z: Tensor, w: Tensor, b: Tensor, low: Tensor, high: Tensor,
                     lam: float = 1.0, attention_mask: Tensor | None = None) -> Tensor:
    """``lam (w z + b) + (1 - lam) z`` where ``low < z < high``, ``z`` elsewhere (per
    dimension over ``z``'s trailing axes, float32 math, ``z``'s dtype; first real token kept)."""
    if lam == 0:
        return z
    dev = dict(device=z.device, dtype=torch.float32)
    w, b, low, high = (t.to(**dev) for t in (w, b, low, high))
    z32 = z.float()
    moved = (lam * (w * z32 + b) + (1 - lam) * z32).to(z.dtype)
    edited = torch.where((low < z32) & (z32 < high), moved, z)
    return keep_first_token(z, edited, attention_mask)


# ---------------------------------------------------------------------------- ITI-c / CAA
def fit_steering(source: Tensor, target: Tensor,
                 how: Literal["mean_diff", "probe"] = "mean_diff", per_head: bool = False,
                 seed: int = 0, held_out: float = 0.2) -> State:
    """``{"v": ...}`` (float32, the trailing shape) pointing from source to target.

    ``"mean_diff"`` (CAA): ``m_target - m_source``. ``"probe"`` (ITI-c): the unit normal of a
    logistic-regression probe telling target from source (fitted on standardized features,
    oriented towards the target), and ``"accuracy"``: the probe's accuracy on a seeded
    ``held_out`` share of the samples (ITI ranks heads by it: ``keep_top_heads``). With
    ``per_head`` (activations ``[n, n_heads, d_head]``, as ``attn.hook_z``) one probe per head,
    each normal of unit length (``accuracy`` ``[n_heads]``)."""
    source, target = _pair(source, target)
    if how == "mean_diff":
        v = target.to(torch.float64).mean(0) - source.to(torch.float64).mean(0)
        return {"v": v.to(torch.float32)}
    if how != "probe":
        raise ActError(f"Unknown steering vector {how!r}: use 'mean_diff' (CAA) or 'probe' "
                       "(ITI-c).")
    if per_head and source.ndim != 3:
        raise ActError(f"per_head needs activations [n, n_heads, d_head]; got "
                       f"{tuple(source.shape)}.")
    if not 0.0 < held_out < 1.0:
        raise ActError(f"held_out is the share of samples kept to score the probe, in (0, 1); "
                       f"got {held_out}.")
    from sklearn.linear_model import LogisticRegression

    x = torch.cat([source, target]).to(torch.float64)
    y = torch.cat([torch.zeros(len(source)), torch.ones(len(target))]).numpy()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).numpy()
    n_test = min(len(x) - 2, max(1, round(held_out * len(x))))
    test, train = order[:n_test], order[n_test:]
    if len(set(y[train])) < 2:
        raise ActError("Too few samples of one class to fit a probe: give more activations.")
    groups = [x[:, h] for h in range(x.shape[1])] if per_head else [x.reshape(len(x), -1)]
    normals, accuracy = [], []
    for features in groups:
        scale = features[train].std(0).clamp(min=1e-12)
        scaled = (features / scale).numpy()
        probe = LogisticRegression(max_iter=2000, random_state=seed).fit(scaled[train], y[train])
        accuracy.append(float(probe.score(scaled[test], y[test])))
        normal = torch.from_numpy(probe.coef_[0]) / scale  # the normal in raw coordinates
        normals.append(normal / normal.norm().clamp(min=1e-30))
    v = torch.stack(normals) if per_head else normals[0].reshape(source.shape[1:])
    return {"v": v.to(torch.float32),
            "accuracy": torch.tensor(accuracy if per_head else accuracy[0], dtype=torch.float32)}


def keep_top_heads(v: Tensor, accuracy: Tensor, k: int) -> Tensor:
    """``v`` ``[n_heads, d_head]`` with only the ``k`` heads of highest probe accuracy kept
    (the others zero), as ITI steers its top-K heads."""
    if v.ndim != 2 or accuracy.shape != v.shape[:1]:
        raise ActError(f"Give per-head vectors [n_heads, d_head] and accuracies [n_heads]; got "
                       f"{tuple(v.shape)} and {tuple(accuracy.shape)}.")
    if not 0 <= k <= len(v):
        raise ActError(f"k must be between 0 and {len(v)} heads; got {k}.")
    keep = torch.zeros(len(v), dtype=torch.bool)
    keep[torch.topk(accuracy, k).indices] = True
    return torch.where(keep[:, None].to(v.device), v, torch.zeros_like(v))


def apply_steering(z: Tensor, v: Tensor, lam: float = 1.0,
                   attention_mask: Tensor | None = None) -> Tensor:
    """``z + lam v`` (``v`` over ``z``'s trailing axes, e.g. ``[n_heads, d_head]`` at
    ``attn.hook_z``), in ``z``'s dtype; first real token kept."""
    if lam == 0:
        return z
    edited = (z.float() + lam * v.to(device=z.device, dtype=torch.float32)).to(z.dtype)
    return keep_first_token(z, edited, attention_mask)


# ---------------------------------------------------------------------------- causal fitting
def fit_causal(steps: Sequence[str | Sequence[str]],
               collect: Callable[[list[str]], dict[str, tuple[Tensor, Tensor]]],
               fit: Callable[[Tensor, Tensor], State],
               applied: Callable[[dict[str, State]], AbstractContextManager] | None = None,
               progress: bool | None = None) -> dict[str, State]:
    """``{name: state}`` fitted step after step, in the order given.

    A step is a hook name, or several names collected in one pass and fitted together (faster,
    not causal among themselves). ``collect(names)`` returns ``{name: (source, target)}``
    activations from the model as it currently runs (e.g. two ``collect_activations`` calls);
    ``fit(source, target)`` returns a state (e.g. ``fit_linear_act``); ``applied(states)`` is a
    context manager inside which the model runs with those states' maps applied (any backend:
    see ``bridge_applier``). Each step is collected inside ``applied`` of the steps before it
    (causal estimation); ``applied=None`` fits every step on the unedited model."""
    groups = [[step] if isinstance(step, str) else list(step) for step in steps]
    names = [name for group in groups for name in group]
    if not names or any(not group for group in groups):
        raise ActError("Give at least one hook name per step.")
    if len(set(names)) != len(names):
        raise ActError(f"Hook names repeat in {names}: give each point once, in model order.")
    states: dict[str, State] = {}
    show = len(groups) > 2 if progress is None else progress
    for group in tqdm(groups, desc="fitting maps", disable=not show, leave=False):
        context = applied(dict(states)) if applied is not None and states else nullcontext()
        with context:
            collected = collect(group)
        missing = [name for name in group if name not in collected]
        if missing:
            raise ActError(f"collect({group}) returned no activations for {missing}.")
        for name in group:
            states[name] = fit(*collected[name])
    return states


@torch.no_grad()
def fit_causal_in_one_pass(bridge, source: Sequence[str], target: Sequence[str],
                           names: Sequence[str], fit: Callable[[Tensor, Tensor], State],
                           apply: Callable[..., Tensor], *, pool: str = "tokens",
                           skip_first: bool = True, max_length: int | None = 128,
                           max_tokens: int | None = None, seed: int = 0,
                           **apply_kwargs) -> dict[str, State]:
    """``fit_causal`` of ``names`` step after step, in one forward pass instead of one per step.

    ``source`` and ``target`` texts run through the local ``bridge`` as one batch. At each hook
    point, as the forward reaches it (model order), each class's activations are pooled as
    ``collect_activations`` pools them (the same tokens kept under ``max_tokens``), ``fit``
    gives the state, and ``apply(z, **state, **apply_kwargs)`` edits the batch before the
    forward moves on: every point is fitted with the earlier points' maps in place. Equal to
    the step-by-step fit up to float rounding from the batch's shape (which Linear-AcT's
    discontinuous support can amplify, as any change of batch size does)."""
    names = list(dict.fromkeys(names))
    if getattr(bridge, "remote", None) is not None:
        raise ActError("Fitting in one pass runs the fit inside the forward: use a local "
                       "bridge, or fit_causal step after step on a remote one.")
    if not names:
        raise ActError("Give at least one hook name to fit.")
    source, target = list(source), list(target)
    bridge.resolve(names)
    ids, mask = tokenize_padded(bridge.tokenizer, source + target, "right", max_length)
    split = len(source)
    states: dict[str, State] = {}

    def hook_for(name: str):
        def hook(z: Tensor, hook=None) -> Tensor:
            classes = []
            for rows in (slice(0, split), slice(split, None)):
                pooled = pool_activations(z[rows], mask[rows], pool, skip_first).float().cpu()
                if max_tokens is not None:
                    pooled = TokenReservoir(max_tokens, seed).add({name: pooled})[name]
                classes.append(pooled)
            states[name] = fit(*classes)
            return apply(z, **states[name], **apply_kwargs, attention_mask=mask)
        return hook

    with bridge.hooks([(name, hook_for(name)) for name in names]):
        bridge.forward(ids, attention_mask=mask, logits=False)
    missing = [name for name in names if name not in states]
    if missing:
        raise ActError(f"The forward pass never reached {missing}.")
    return {name: states[name] for name in names}


def bridge_applier(bridge, apply: Callable[..., Tensor], **kwargs
                   ) -> Callable[[dict[str, State]], AbstractContextManager]:
    """``applied`` for ``fit_causal`` on a HookBridge: ``apply(z, **state, **kwargs,
    attention_mask=<the call's mask>)`` at each state's hook point (e.g.
    ``bridge_applier(bridge, apply_linear_act, lam=1.0)``)."""
    def hook_for(state: State):
        return lambda z, hook: apply(z, **state, **kwargs, attention_mask=bridge.input_mask)

    def applied(states: dict[str, State]) -> AbstractContextManager:
        return bridge.hooks([(name, hook_for(state)) for name, state in states.items()])

    return applied


# the apply functions run inside traces: a remote (NDIF) bridge sends them as source
send_by_value(sys.modules[__name__])
