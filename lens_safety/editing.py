"""Edit a direction out of the residual stream: with hooks, or baked into the weights.

    with ablate(model, d):                      # x <- x - (x.d) d at every resid_pre/mid/post
        text = model.generate(...)              # hooks act at every decoding step (KV cache on)
    with ablate(model, d, mode="subtract", alpha=4.0):  # x <- x - alpha d
        ...
    with orthogonalize(model, d):               # W <- W - d d^T W for every residual writer
        ...                                     # same logits as hook ablation, no runtime cost

``model`` is a ``pruning_bridge.HookBridge`` or a TransformerLens ``HookedTransformer``
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
from pruning_bridge.common.errors import UsageError

from .caching import HOOKS, hook_name, is_bridge, model_dims

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


def project_out(x: Tensor, d: Tensor, axis: int = -1) -> Tensor:
    """``x`` minus its component along unit ``d`` on ``axis`` (computed in float32, cast back)."""
    d = d.to(device=x.device, dtype=torch.float32)
    x32 = x.float().movedim(axis, -1)
    out = x32 - (x32 @ d)[..., None] * d
    return out.movedim(-1, axis).to(x.dtype)


# ---------------------------------------------------------------- hook ablation


@contextmanager
def ablate(model, direction, layers: Sequence[int] | None = None,
           hooks: Sequence[str] = HOOKS, mode: str = "project", alpha: float = 1.0) -> Iterator:
    """Remove (``project``: ``x - (x.d) d``) or subtract (``x - alpha d``) the unit-normalised
    ``direction`` at ``blocks.L.hook_{h}`` for each layer L (default: all) and hook h."""
    if mode not in MODES:
        raise UsageError(f"Unknown mode {mode!r}; use one of {', '.join(MODES)}.")
    n_layers, d_model = model_dims(model)
    d = unit_direction(direction, d_model)
    names = [hook_name(layer, hook) for layer in check_layers(layers, n_layers) for hook in hooks]

    def edit(x: Tensor) -> Tensor:
        if mode == "project":
            return project_out(x, d)
        return (x.float() - alpha * d.to(x.device)).to(x.dtype)

    if is_bridge(model):
        with model.hooks([(name, lambda x, name: edit(x)) for name in names]):
            yield model
    else:
        with model.hooks(fwd_hooks=[(name, lambda x, hook: edit(x)) for name in names]):
            yield model


# ---------------------------------------------------------------- weight orthogonalisation


def _is_hooked_transformer(model) -> bool:
    return hasattr(model, "cfg") and hasattr(model, "blocks") and hasattr(model, "embed")


def _hf_model(model) -> nn.Module:
    return model.model if is_bridge(model) else model


def residual_writers(model) -> list[tuple[nn.Parameter, int]]:
    """Every parameter that writes to the residual stream, with its d_model axis.

    HookedTransformer: W_E, W_pos (standard positions), W_O, b_O, W_out, b_out. Hugging Face
    Llama / Qwen2 / Qwen3: embed_tokens, o_proj, down_proj (and their biases); GPT-2: wte, wpe,
    attn.c_proj, mlp.c_proj (``Conv1D``: ``[in, out]``) and their biases.
    """
    writers: list[tuple[nn.Parameter, int]] = []
    if _is_hooked_transformer(model):
        writers.append((model.embed.W_E, -1))
        if model.cfg.positional_embedding_type == "standard":
            writers.append((model.pos_embed.W_pos, -1))
        for block in model.blocks:
            for module, names in ((block.attn, ("W_O", "b_O")),
                                  (getattr(block, "mlp", None), ("W_out", "b_out"))):
                for name in names:
                    if module is not None and getattr(module, name, None) is not None:
                        writers.append((getattr(module, name), -1))
        return writers
    hf = _hf_model(model)
    kind = getattr(hf.config, "model_type", None)
    writers.append((hf.get_input_embeddings().weight, -1))
    if kind == "gpt2":
        writers.append((hf.transformer.wpe.weight, -1))
        for block in hf.transformer.h:
            for conv in (block.attn.c_proj, block.mlp.c_proj):  # Conv1D weight: [in, d_model]
                writers += [(conv.weight, -1), (conv.bias, -1)]
        return writers
    layers = getattr(getattr(hf, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") and hasattr(layer.self_attn, "o_proj")
                                 and hasattr(getattr(layer, "mlp", None), "down_proj")
                                 for layer in layers):
        raise UsageError(f"orthogonalize supports HookedTransformer and HF GPT-2 / Llama / Qwen2 / "
                         f"Qwen3 models (o_proj and mlp.down_proj per layer); got {kind!r}.")
    for layer in layers:
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):  # Linear weight: [d_model, in]
            writers.append((linear.weight, 0))
            if linear.bias is not None:
                writers.append((linear.bias, -1))
    return writers


def _tied_head(model) -> nn.Module | None:
    """The HF output head when it shares its weight with the input embedding, else None."""
    if _is_hooked_transformer(model):
        return None
    hf = _hf_model(model)
    head = hf.get_output_embeddings()
    if head is not None and head.weight is hf.get_input_embeddings().weight:
        return head
    return None


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
    d = unit_direction(direction, model_dims_any(model)[1])
    writers = _unique(residual_writers(model))
    saved = [param.detach().clone() for param, _ in writers]
    head = _tied_head(model)
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
    d = unit_direction(direction, model_dims_any(model)[1])
    writers = _unique(residual_writers(model))
    head = _tied_head(model)
    if head is not None:
        head.weight = nn.Parameter(head.weight.detach().clone(),
                                   requires_grad=head.weight.requires_grad)
        _hf_model(model).config.tie_word_embeddings = False  # save/load keeps them separate
    _orthogonalize_weights(writers, d)
    return model


def _unique(writers: list[tuple[nn.Parameter, int]]) -> list[tuple[nn.Parameter, int]]:
    seen: set[int] = set()
    return [(p, a) for p, a in writers if not (id(p) in seen or seen.add(id(p)))]


def model_dims_any(model) -> tuple[int, int]:
    """``(n_layers, d_model)`` of a HookBridge, HookedTransformer or HF causal LM."""
    if is_bridge(model) or _is_hooked_transformer(model):
        return model_dims(model)
    config = model.config
    return config.num_hidden_layers, config.hidden_size
