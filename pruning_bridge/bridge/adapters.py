"""Where each TransformerLens hook point lives in a Hugging Face model, built from the table.

An adapter lists, for one decoder layer, the module inputs/outputs ("points") that the bridge
touches, in the order the model executes them, and how each raw value maps to the hook names it
provides (``split``) and back (``merge``). It is derived from the family's entry in
``architectures.ARCHITECTURES``: a new family needs no code here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .architectures import (Architecture, UnsupportedArchitectureError, architecture_of,
                            model_dims)

Views = dict[str, Tensor]


@dataclass(frozen=True)
class Point:
    """One module input or output and the hook names (``"hook_z"``, ...) read from it.

    ``split(raw, ctx)`` returns a tensor per name; ``merge(raw, views, ctx)`` rebuilds the raw
    value from (edited) views (None: nothing to write at this point). ``ctx`` holds the raw
    values read earlier in the same layer (the bridge reads ``needs`` first), e.g. the residual
    stream needed to express ``hook_resid_mid``, and the layer's module as ``ctx["block"]``.
    """

    module: str  # path relative to the layer ("self_attn.o_proj"), or to the model for globals
    io: str  # "input", "output", or "norm" (a norm module: its input in, its output out)
    names: tuple[str, ...]
    split: Callable[[object, dict], Views] | None = None
    merge: Callable[[object, Views, dict], object] | None = None
    needs: tuple[str, ...] = ()  # names of earlier points (by ``key``) this one uses
    key: str = ""
    computed: bool = False  # the views are computed, not the model's own tensors: an in-place
    # edit of them must be detected and written back
    rebuild: Callable[[object, dict], object] | None = None  # a new raw value from edits of
    # earlier points (per-head q/k/v inputs), or None; written back when not None
    also: tuple[str, ...] = ()  # other names that make this point visited (for ``rebuild``)


def _first(raw):
    return raw[0] if isinstance(raw, tuple) else raw


def _replace_first(raw, value):
    return (value, *raw[1:]) if isinstance(raw, tuple) else value


def _heads(d_head: int):
    """Point functions for a flat ``[b, p, heads * d_head]`` tensor seen as per-head.

    The head count comes from the tensor, so models with heads removed (fewer in some layers
    than the config says) work too.
    """
    def split(raw, ctx):
        x = _first(raw)
        return {"": x.view(*x.shape[:-1], -1, d_head)}

    def merge(raw, views, ctx):
        x = _first(raw)
        return _replace_first(raw, views[""].reshape(x.shape).to(x.dtype))

    return split, merge


def _plain(raw, ctx):
    return {"": _first(raw)}


def _plain_merge(raw, views, ctx):
    return _replace_first(raw, views[""].to(_first(raw).dtype))


def _named(point_name: str, split, merge):
    """Rename the single view ``""`` of a split/merge pair to ``point_name``."""
    return (lambda raw, ctx: {point_name: split(raw, ctx)[""]},
            lambda raw, views, ctx: merge(raw, {"": views[point_name]}, ctx))


def _resid_mid():
    """``hook_resid_mid`` = resid_pre + attention output, read at the attention output.

    HF computes resid_mid as a local variable, so a write to it goes through the attention
    output: attn_out' = resid_mid' - resid_pre. This point comes right after the attention
    output's own point, so it sees an edited ``hook_attn_out``.
    """
    def split(raw, ctx):
        return {"hook_resid_mid": ctx["resid_pre"] + _first(raw)}

    def merge(raw, views, ctx):
        out = _first(raw)
        return _replace_first(raw, (views["hook_resid_mid"] - ctx["resid_pre"]).to(out.dtype))

    return split, merge


def _fused_qkv(layout: str, d_head: int):
    """Point functions for one projection holding q, k and v: ``"stacked"`` as
    ``[q | k | v]`` (GPT-2), ``"per_head"`` as ``[head, (q, k, v), d_head]`` (GPT-NeoX)."""
    names = ("attn.hook_q", "attn.hook_k", "attn.hook_v")

    def parts(x: Tensor) -> list[Tensor]:
        if layout == "stacked":
            return [p.reshape(*x.shape[:-1], -1, d_head) for p in x.chunk(3, dim=-1)]
        return list(x.view(*x.shape[:-1], -1, 3 * d_head).chunk(3, dim=-1))

    def split(raw, ctx):
        return dict(zip(names, parts(_first(raw))))

    def merge(raw, views, ctx):
        x = _first(raw)
        new = [views.get(name, old) for name, old in zip(names, parts(x))]
        if layout == "stacked":
            flat = torch.cat([p.reshape(*x.shape[:-1], -1) for p in new], -1)
        else:
            flat = torch.cat(new, -1).reshape(x.shape)
        return _replace_first(raw, flat.to(x.dtype))

    return split, merge


@dataclass(frozen=True)
class Adapter:
    """The hook points of one model: its family's table entry and one layer's points."""

    arch: Architecture
    n_layers: int
    layer_points: tuple[Point, ...]
    parallel: bool  # attention and MLP read the same input: no hook_resid_mid


def norm_parts(x: Tensor, kind: str, eps: float) -> tuple[Tensor, Tensor]:
    """A norm's input as TransformerLens splits it: ``(centred, scale)``, both fp32.

    LayerNorm (``kind="layer"``): ``x - mean`` and ``sqrt(var + eps)``; RMSNorm: ``x`` and
    ``sqrt(mean(x^2) + eps)``. ``centred / scale`` is ``hook_normalized``; ``scale``
    (``[..., 1]``) is ``hook_scale``.
    """
    h = x.to(torch.float32)
    if kind == "layer":
        h = h - h.mean(-1, keepdim=True)
    return h, (h.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def denormalize(norm: torch.nn.Module, normalized: Tensor, dtype: torch.dtype) -> Tensor:
    """A norm's output for its normalised input: the learned scale (and bias, if any)."""
    out = norm.weight * normalized.to(dtype)
    return out + norm.bias if getattr(norm, "bias", None) is not None else out


def _layer_points(arch: Architecture, d_head: int, parallel: bool) -> tuple[Point, ...]:
    """One layer's points in execution order, from the family's table entry."""
    from . import extra_hooks  # (it imports this module's helpers)

    heads, heads_merge = _heads(d_head)  # query, key and value heads alike (GQA: fewer kv)
    inputs = extra_hooks.attention_inputs(arch, d_head)
    input_names = ("hook_attn_in", *(name for _, name in extra_hooks.QKV_INPUTS))
    split_inputs = (  # per-head copies of resid_pre: an edit rebuilds the q/k/v projections
        Point("", "input", ("hook_attn_in",), *inputs["attn_in"], needs=("resid_pre",),
              computed=True),
        Point("", "input", input_names[1:], *inputs["qkv_in"], needs=("resid_pre",),
              computed=True))
    if arch.qkv_layout == "separate":
        qkv = tuple(Point(path, "output", (name,), *_named(name, heads, heads_merge),
                          rebuild=inputs["rebuild_separate"](i), also=input_names)
                    for i, (path, name) in enumerate(zip(arch.qkv, ("attn.hook_q", "attn.hook_k",
                                                                    "attn.hook_v"))))
    else:
        split, merge = _fused_qkv(arch.qkv_layout, d_head)
        qkv = (Point(arch.qkv[0], "output", ("attn.hook_q", "attn.hook_k", "attn.hook_v"),
                     split, merge, rebuild=inputs["rebuild_fused"](merge), also=input_names),)
    resid_mid = () if parallel else (
        Point(arch.attention, "output", ("hook_resid_mid",), *_resid_mid(),
              needs=("resid_pre",), computed=True),)
    mlp_in = (Point(arch.mlp_in, "output", ("mlp.hook_pre",),
                    *_named("mlp.hook_pre", _plain, _plain_merge)),)
    if arch.mlp_in_linear:
        mlp_in += (Point(arch.mlp_in_linear, "output", ("mlp.hook_pre_linear",),
                         *_named("mlp.hook_pre_linear", _plain, _plain_merge)),)
    return (
        Point("", "input", ("hook_resid_pre",), *_named("hook_resid_pre", _plain, _plain_merge),
              key="resid_pre"),
        *split_inputs,
        Point(arch.ln1, "norm", ("ln1.hook_scale", "ln1.hook_normalized"), computed=True),
        *qkv,
        Point(arch.attn_out, "input", ("attn.hook_z",), *_named("attn.hook_z", heads,
                                                                  heads_merge), key="z"),
        Point(arch.attn_out, "output", ("attn.hook_result",),
              *extra_hooks.head_results(arch, d_head), needs=("z",), computed=True),
        Point(arch.attention, "output", ("hook_attn_out",),
              *_named("hook_attn_out", _plain, _plain_merge)),
        *resid_mid,
        Point(arch.ln2, "input", ("hook_mlp_in",), *extra_hooks.mlp_in(), computed=True),
        Point(arch.ln2, "norm", ("ln2.hook_scale", "ln2.hook_normalized"), computed=True),
        *mlp_in,
        Point(arch.mlp_out, "input", ("mlp.hook_post",),
              *_named("mlp.hook_post", _plain, _plain_merge)),
        Point(arch.mlp, "output", ("hook_mlp_out",),
              *_named("hook_mlp_out", _plain, _plain_merge)),
        Point("", "output", ("hook_resid_post",),
              *_named("hook_resid_post", _plain, _plain_merge)),
    )


def adapter_for(model) -> Adapter:
    """The adapter for ``model``'s family (its entry in the architecture table)."""
    arch = architecture_of(model)
    dims = model_dims(model)
    parallel = arch.parallel(model.config)
    return Adapter(arch, dims.n_layers, _layer_points(arch, dims.d_head, parallel), parallel)


__all__ = ["Adapter", "Point", "UnsupportedArchitectureError", "adapter_for", "denormalize",
           "norm_parts"]
