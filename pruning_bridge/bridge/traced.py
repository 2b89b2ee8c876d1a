"""The code that runs inside an nnsight trace: visiting hook points, caching and editing them.

Everything here runs where the model runs, which for a remote bridge is an NDIF server. nnsight
ships a trace's code there as source, with only the objects it names, and the server lets a trace
import nothing but a few modules (torch, math, numpy, collections, ...). So this module uses torch
and builtins only, and its data are plain tuples, dicts and strings (no dataclasses, no regular
expressions). The local bridge runs the same functions, so local and remote agree by
construction. ``remote.py`` registers this module and ``adapters`` to be sent by value.

A *plan* (``make_plan``) is one model's hook-point layout as plain data:
``{"embed", "pos_embed", "blocks", "final_norm", "unembed", "norm": "rms"|"layer",
"eps": {path: eps}, "points": (point, ...)}``, where a point is ``(module, io, names, split,
merge, needs, key, computed, rebuild, also)``, as ``adapters.Point``.
"""

from __future__ import annotations

import torch

from .adapters import denormalize, norm_parts


def make_plan(adapter, model) -> dict:
    """``adapter``'s layout as plain data, with every norm's epsilon read from ``model``."""
    arch = adapter.arch
    eps = {}
    for name, module in model.named_modules():
        value = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None)
        if isinstance(value, float):
            eps[name] = value
    points = tuple((p.module, p.io, tuple(p.names), p.split, p.merge, tuple(p.needs), p.key,
                    p.computed, p.rebuild, tuple(p.also)) for p in adapter.layer_points)
    return {"embed": arch.embed, "pos_embed": arch.pos_embed, "blocks": arch.blocks,
            "final_norm": arch.final_norm, "unembed": arch.unembed, "norm": arch.norm,
            "eps": eps, "points": points}


class HookName(str):
    """A hook point's name, passed to every hook: a ``str`` (hooks ``fn(act, name)``) that is
    also TransformerLens's ``hook`` argument (hooks ``fn(act, hook)`` read ``hook.name``)."""

    __slots__ = ()

    @property
    def name(self) -> str:
        return str(self)

    def layer(self) -> int:
        """The block index, as TransformerLens's ``HookPoint.layer()``."""
        return int(self.split(".")[1])


class InputBox:
    """The running call's attention mask (1 = real token), for hooks that need positions; it
    travels with the hooks that hold it, so it is the call's mask on a server as well."""

    def __init__(self):
        self.mask = None


def layer_of(name: str) -> int | None:
    """The layer of ``blocks.N.…``; None for a global hook point."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" and len(parts) > 2 else None


def envoy_at(lm, path: str):
    """The nnsight envoy at a dotted module path (``model.layers.3.mlp``)."""
    envoy = lm
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def make_visitor(hooks: dict, cached, cache: dict, reduce=None):
    """The function that runs a hook point's hooks and caches it.

    ``visit(name, value, computed=False)`` runs the hooks of ``name`` and returns the edited
    value, or None if nothing changed it. A hook returns a replacement or edits in place. The
    model's own tensors carry an in-place edit by themselves; a ``computed`` value (resid_mid,
    a norm's parts) is compared with a copy, so that an in-place edit of it is written back too.
    ``reduce(value)`` is cached instead of the value when given.
    """

    def visit(name, value, computed=False):
        edited, hook = None, HookName(name)
        for fn in hooks.get(name, ()):
            before = value.detach().clone() if computed else None
            out = fn(value, hook)
            if out is not None:  # keep the model's dtype (an fp32 edit on a bf16 model)
                value = edited = out.to(value.dtype)
            elif computed and not torch.equal(value, before):
                edited = value
        if name in cached:
            cache[name] = value.detach().clone() if reduce is None else reduce(value.detach())
        return edited

    return visit


def interleave(lm, plan: dict, wanted, visit) -> None:
    """Visit the needed hook points of one forward pass in execution order (inside a trace)."""
    for name, path in (("hook_embed", plan["embed"]), ("hook_pos_embed", plan["pos_embed"])):
        if name in wanted:
            envoy = envoy_at(lm, path)
            new = visit(name, envoy.output)
            if new is not None:
                envoy.output = new.to(envoy.output.dtype)
    layers = sorted({layer for name in wanted if (layer := layer_of(name)) is not None})
    for layer in layers:
        interleave_layer(lm, plan, layer, wanted, visit)
    if "ln_final.hook_scale" in wanted or "ln_final.hook_normalized" in wanted:
        visit_norm(lm, plan, plan["final_norm"], "ln_final.", visit)
    if "unembed.hook_in" in wanted or "unembed.hook_out" in wanted:
        envoy = envoy_at(lm, plan["unembed"])
        for name, io in (("unembed.hook_in", "input"), ("unembed.hook_out", "output")):
            if name in wanted:
                value = envoy.input if io == "input" else envoy.output
                new = visit(name, value)
                if new is not None and io == "input":
                    envoy.input = new.to(value.dtype)
                elif new is not None:
                    envoy.output = new.to(value.dtype)


def visit_norm(lm, plan: dict, path: str, prefix: str, visit) -> None:
    """A norm as TransformerLens sees it: ``hook_scale``, then ``hook_normalized`` (computed
    from the possibly edited scale), then the learned scale and bias; the output is replaced
    only when a hook changed something."""
    envoy = envoy_at(lm, path)
    module = envoy._module
    x = envoy.input
    centred, scale = norm_parts(x, plan["norm"], plan["eps"].get(path, 1e-6))
    new_scale = visit(prefix + "hook_scale", scale, True)
    if new_scale is not None:
        scale = new_scale
    normalized = (centred / scale).to(x.dtype)
    new = visit(prefix + "hook_normalized", normalized, True)
    if new_scale is not None or new is not None:
        envoy.output = denormalize(module, normalized if new is None else new,
                                   envoy.output.dtype)


def interleave_layer(lm, plan: dict, layer: int, wanted, visit) -> None:
    """One decoder layer's hook points, read (and written back when edited) in order."""
    prefix = f"blocks.{layer}."
    points = plan["points"]
    active = [any(prefix + n in wanted for n in point[2] + point[9]) for point in points]
    needed_keys = {k for point, is_active in zip(points, active) if is_active for k in point[5]}
    layer_path = f"{plan['blocks']}.{layer}"
    ctx = {"block": envoy_at(lm, layer_path)._module}
    for (module, io, names, split, merge, _, key, computed, rebuild, _), is_active in zip(
            points, active):
        if not is_active and key not in needed_keys:
            continue
        path = layer_path + ("." + module if module else "")
        if io == "norm":
            visit_norm(lm, plan, path, prefix + names[0].split(".")[0] + ".", visit)
            continue
        envoy = envoy_at(lm, path)
        raw = envoy.input if io == "input" else envoy.output
        if key:
            ctx[key] = raw[0] if isinstance(raw, tuple) else raw
        if not is_active:
            continue
        changed = rebuild(raw, ctx) if rebuild is not None else None
        if changed is not None:
            raw = changed
        edited = {}
        for short, value in split(raw, ctx).items():
            new = visit(prefix + short, value, computed)
            if new is not None:
                edited[short] = new
        if edited:
            merged = merge(raw, edited, ctx)
            if merged is not None:
                raw = changed = merged
        if changed is not None:
            if io == "input":
                envoy.input = raw
            else:
                envoy.output = raw
            if key:
                ctx[key] = raw[0] if isinstance(raw, tuple) else raw
