"""Where each TransformerLens hook point lives in a Hugging Face model, per architecture.

An adapter lists, for one decoder layer, the module inputs/outputs ("points") that the bridge
touches, in the order the model executes them, and how each raw value maps to the hook names it
provides (``split``) and back (``merge``). Adding an architecture means writing one such list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..common.errors import UsageError

Views = dict[str, Tensor]


@dataclass(frozen=True)
class Point:
    """One module input or output and the hook names (``"hook_z"``, ...) read from it.

    ``split(raw, ctx)`` returns a tensor per name; ``merge(raw, views, ctx)`` rebuilds the raw
    value from (edited) views. ``ctx`` holds the raw values read earlier in the same layer (the
    bridge reads ``needs`` first), e.g. the residual stream needed to express ``hook_resid_mid``.
    """

    module: str  # path relative to the layer ("self_attn.o_proj"), or to the model for globals
    io: str  # "input" or "output"
    names: tuple[str, ...]
    split: Callable[[object, dict], Views]
    merge: Callable[[object, Views, dict], object]
    needs: tuple[str, ...] = ()  # names of earlier points (by ``key``) this one uses
    key: str = ""


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


@dataclass(frozen=True)
class Adapter:
    """The hook-point layout of one architecture family."""

    family: str
    layers: str  # path of the decoder ModuleList
    embed: str  # token embedding module
    final_norm: str  # final norm module
    n_layers: int
    layer_points: tuple[Point, ...]
    norm_kind: str  # "rms" or "layer"

    def normalized(self, norm: torch.nn.Module, x: Tensor) -> Tensor:
        """The final norm's input, normalised but before its learned scale (TransformerLens)."""
        if self.norm_kind == "rms":
            eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
            return h.to(x.dtype)
        h = x - x.mean(-1, keepdim=True)
        return h / (h.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()

    def denormalize(self, norm: torch.nn.Module, h: Tensor, dtype: torch.dtype) -> Tensor:
        """The final norm's output for a normalised value ``h`` (its scale, and bias if any)."""
        out = norm.weight * h.to(dtype)
        return out + norm.bias if getattr(norm, "bias", None) is not None else out


def _llama_like(model, family: str) -> Adapter:
    cfg = model.config
    n_heads = cfg.num_attention_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    q, qm = _heads(d_head)  # query, key and value heads alike (GQA has fewer kv heads)
    points = (
        Point("", "input", ("hook_resid_pre",), *_named("hook_resid_pre", _plain, _plain_merge),
              key="resid_pre"),
        Point("self_attn.q_proj", "output", ("attn.hook_q",), *_named("attn.hook_q", q, qm)),
        Point("self_attn.k_proj", "output", ("attn.hook_k",), *_named("attn.hook_k", q, qm)),
        Point("self_attn.v_proj", "output", ("attn.hook_v",), *_named("attn.hook_v", q, qm)),
        Point("self_attn.o_proj", "input", ("attn.hook_z",), *_named("attn.hook_z", q, qm)),
        Point("self_attn", "output", ("hook_attn_out",),
              *_named("hook_attn_out", _plain, _plain_merge)),
        Point("self_attn", "output", ("hook_resid_mid",), *_resid_mid(), needs=("resid_pre",)),
        Point("mlp", "output", ("hook_mlp_out",), *_named("hook_mlp_out", _plain, _plain_merge)),
        Point("", "output", ("hook_resid_post",),
              *_named("hook_resid_post", _plain, _plain_merge)),
    )
    return Adapter(family, "model.layers", "model.embed_tokens", "model.norm",
                   cfg.num_hidden_layers, points, "rms")


def _gpt2(model) -> Adapter:
    cfg = model.config
    n_heads, d_model = cfg.n_head, cfg.n_embd
    d_head = d_model // n_heads
    z, zm = _heads(d_head)

    def qkv_split(raw, ctx):  # c_attn's output is [q | k | v], each heads * d_head wide
        x = _first(raw)
        q, k, v = x.chunk(3, dim=-1)
        shape = (*x.shape[:-1], -1, d_head)
        return {"attn.hook_q": q.reshape(shape), "attn.hook_k": k.reshape(shape),
                "attn.hook_v": v.reshape(shape)}

    def qkv_merge(raw, views, ctx):
        x = _first(raw)
        parts = dict(zip(("attn.hook_q", "attn.hook_k", "attn.hook_v"), x.chunk(3, -1)))
        for name, value in views.items():
            parts[name] = value.reshape(*x.shape[:-1], -1)
        return _replace_first(raw, torch.cat(list(parts.values()), -1).to(x.dtype))

    points = (
        Point("", "input", ("hook_resid_pre",), *_named("hook_resid_pre", _plain, _plain_merge),
              key="resid_pre"),
        Point("attn.c_attn", "output", ("attn.hook_q", "attn.hook_k", "attn.hook_v"),
              qkv_split, qkv_merge),
        Point("attn.c_proj", "input", ("attn.hook_z",), *_named("attn.hook_z", z, zm)),
        Point("attn", "output", ("hook_attn_out",),
              *_named("hook_attn_out", _plain, _plain_merge)),
        Point("attn", "output", ("hook_resid_mid",), *_resid_mid(), needs=("resid_pre",)),
        Point("mlp", "output", ("hook_mlp_out",), *_named("hook_mlp_out", _plain, _plain_merge)),
        Point("", "output", ("hook_resid_post",),
              *_named("hook_resid_post", _plain, _plain_merge)),
    )
    return Adapter("gpt2", "transformer.h", "transformer.wte", "transformer.ln_f",
                   cfg.n_layer, points, "layer")


ADAPTERS: dict[str, Callable] = {
    "llama": lambda m: _llama_like(m, "llama"),
    "qwen2": lambda m: _llama_like(m, "qwen2"),
    "qwen3": lambda m: _llama_like(m, "qwen3"),
    "gpt2": _gpt2,
}


class UnsupportedArchitectureError(UsageError):
    """The model's architecture has no adapter."""


def adapter_for(model) -> Adapter:
    """The adapter for ``model``'s architecture (its ``config.model_type``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"HookBridge has no adapter for model_type {model_type!r}. Supported: "
            f"{', '.join(sorted(ADAPTERS))}. To add one, write a function returning an Adapter "
            f"(the decoder layers' module paths in execution order; see "
            f"pruning_bridge/adapters.py) and register it in pruning_bridge.bridge.adapters.ADAPTERS.")
    return ADAPTERS[model_type](model)
