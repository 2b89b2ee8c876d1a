"""The two backends the safety study runs on, and every difference between them, in one place.

A model is a ``pruning_bridge.HookBridge`` (any supported Hugging Face family) or a
TransformerLens model (``HookedTransformer`` on TransformerLens 3.x, ``TransformerBridge`` on
4.x: see :mod:`lens_safety.backend.transformer_lens`, which holds every difference between
those two and the exact path for each); both speak TransformerLens hook names. The rest of
``lens_safety`` asks this module for sizes, caching, hook names and edits, an LM for the
evaluations, and the parameters that write to the residual stream, and never checks which
backend it holds. (A plain Hugging Face model is accepted where noted and treated as the bridge
would see it.)
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from pruning_bridge.bridge import HookBridge, architecture_of, model_dims
from pruning_bridge.bridge import residual_writers as hf_residual_writers
from pruning_bridge.common import UsageError

from ..edits.trace_math import keep_first_tokens
from . import transformer_lens as hooked

EditFn = Callable[[Tensor], Tensor]


def is_bridge(model) -> bool:
    """True for a ``HookBridge``."""
    return isinstance(model, HookBridge)


def is_hooked(model) -> bool:
    """True for a TransformerLens model: ``HookedTransformer``, ``TransformerBridge`` (or
    anything shaped like one that is not a HookBridge)."""
    return (not is_bridge(model) and hasattr(model, "cfg") and hasattr(model, "blocks")
            and hasattr(model, "embed"))


def hf_model(model) -> nn.Module:
    """The Hugging Face model under a HookBridge or a TransformerBridge (a plain HF model is
    itself)."""
    if is_bridge(model):
        return model.model
    under = hooked.hf_model_under(model)
    return model if under is None else under


def dims(model) -> tuple[int, int]:
    """``(n_layers, d_model)`` of a HookBridge, TransformerLens model or Hugging Face causal LM."""
    if is_hooked(model):
        return model.cfg.n_layers, model.cfg.d_model
    sizes = model_dims(hf_model(model).config)
    return sizes.n_layers, sizes.d_model


def residual_hooks(model) -> tuple[str, ...]:
    """The residual-stream hooks each block has, block-relative (an ``Edit``'s ``where``):
    ``hook_resid_pre``, ``hook_resid_mid`` (unless attention and MLP run in parallel, as in
    GPT-NeoX / Pythia) and ``hook_resid_post``."""
    if is_hooked(model):
        parallel = bool(getattr(model.cfg, "parallel_attn_mlp", False))
    else:
        hf = hf_model(model)
        parallel = architecture_of(hf).parallel(hf.config)
    return (("hook_resid_pre", "hook_resid_post") if parallel
            else ("hook_resid_pre", "hook_resid_mid", "hook_resid_post"))


def block_hooks(model) -> list[str]:
    """Every hook name inside a block, block-relative (``hook_resid_post``,
    ``ln2.hook_normalized``, ``attn.hook_z``...), as the model names them."""
    names = model.hook_names if is_bridge(model) else list(model.hook_dict)
    return [name[len("blocks.0."):] for name in names if name.startswith("blocks.0.")]


def check_block_hooks(model, where: Sequence[str]) -> None:
    """A ``UsageError`` naming the closest valid names unless every block-relative name of
    ``where`` is a hook of ``model``'s blocks."""
    valid = block_hooks(model)
    for name in where:
        if name in valid:
            continue
        if is_bridge(model):  # names TransformerLens computes only behind a flag count too
            try:
                model.resolve([f"blocks.0.{name}"])
                continue
            except UsageError:
                pass
        close = difflib.get_close_matches(name, valid, n=4, cutoff=0.5)
        why = (" Attention and MLP run in parallel here (both read hook_resid_pre), so there "
               "is no hook_resid_mid." if name == "hook_resid_mid" and "hook_resid_pre" in valid
               else "")
        raise UsageError(f"where={name!r} is not a hook of this model's blocks.{why}"
                         + (f" Closest valid names: {', '.join(close)}." if close else
                            f" Valid names include {', '.join(valid[:6])}.")
                         + " backend.block_hooks(model) lists them all.")


def embedding_weight(model) -> Tensor:
    """The token embedding matrix ``[vocab, d_model]`` (identifies a model's weights)."""
    return model.W_E if is_hooked(model) else hf_model(model).get_input_embeddings().weight


def run_with_cache(model, ids: Tensor, attention_mask: Tensor, names: list[str],
                   reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """The activations at ``names`` for padded ``ids`` (no gradients, nothing else cached, no
    logits), each passed through ``reduce`` if given (in the trace: on a server, only the
    reduced values come back)."""
    if is_bridge(model):
        _, cache = model.run_with_cache(ids, names, attention_mask=attention_mask,
                                        reduce=reduce, logits=False)
        return dict(cache)
    last = max(int(name.split(".")[1]) for name in names)
    with torch.no_grad():  # stop after the last block needed: no unembedding, no later blocks
        _, cache = model.run_with_cache(ids, names_filter=names, attention_mask=attention_mask,
                                        stop_at_layer=last + 1, return_cache_object=False)
    return {name: cache[name] if reduce is None else reduce(cache[name]) for name in names}


def first_tokens(model, x: Tensor) -> Tensor | None:
    """``[batch, pos]`` True at each row's first real token and the padding before it, for an
    activation ``x`` ``[batch, pos, ...]`` of the running call; None in a decoding step (one new
    position, never the first). A HookBridge knows the call's mask (left padding); a
    TransformerLens model's inputs here are unpadded or right-padded, so position 0."""
    if is_bridge(model):
        mask = model.input_mask
        if mask is None or x.shape[1] != mask.shape[1]:
            return None
        return mask.to(x.device).cumsum(-1) <= 1
    if x.shape[1] == 1:
        return None
    first = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
    first[:, 0] = True
    return first


def _keeping_first(model, edit: EditFn) -> EditFn:
    if is_bridge(model):  # reads the running call's mask from the bridge's box (sendable)
        box = model.input_box

        def keep_first_in_call(x: Tensor) -> Tensor:
            return keep_first_tokens(x, edit(x), box.mask)
        return keep_first_in_call

    def keep_first(x: Tensor) -> Tensor:
        out = edit(x)
        first = first_tokens(model, x)
        if first is None:
            return out
        return torch.where(first.view(*first.shape, *[1] * (x.dim() - 2)), x, out)
    return keep_first


@contextmanager
def edited_each(model, edits: dict[str, EditFn], skip_first: bool = False) -> Iterator:
    """Inside the block ``edits[name](x)`` replaces the activation at each hook name (forward
    and generation); with ``skip_first`` each row's first real token is left as it was (in
    Llama-family models it carries massive activations, an attention sink)."""
    if skip_first:
        edits = {name: _keeping_first(model, edit) for name, edit in edits.items()}
    if is_bridge(model):
        with model.hooks([(name, lambda x, name, f=f: f(x)) for name, f in edits.items()]):
            yield model
    else:
        with model.hooks(fwd_hooks=hooked.edit_hooks(model, edits)):
            yield model


class _HookedLM(nn.Module):
    """A TransformerLens model seen as an HF-style LM for ``pruning_bridge.evals``: takes
    ``input_ids`` / ``attention_mask`` and returns logits; padded rows are run one by one on
    their real tokens only (so positions and attention never see padding)."""

    def __init__(self, hooked):
        super().__init__()
        self.hooked = hooked
        self.config = None

    def parameters(self, recurse: bool = True):
        return self.hooked.parameters(recurse)

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        if attention_mask is None or bool(attention_mask.all()):
            return self.hooked(input_ids, return_type="logits")
        out = None
        for row in range(input_ids.shape[0]):
            real = attention_mask[row].bool()
            logits = self.hooked(input_ids[row][real][None], return_type="logits")[0]
            if out is None:
                out = logits.new_zeros(*input_ids.shape, logits.shape[-1])
            out[row, real] = logits
        return out


def as_lm(model):
    """What ``pruning_bridge.evals`` calls: the bridge / HF model itself, or an adapter that
    gives a TransformerLens model the HF call signature."""
    return _HookedLM(model) if is_hooked(model) else model


def residual_writers(model) -> list[tuple[nn.Parameter, int]]:
    """Every parameter that writes to the residual stream, with its d_model axis.

    TransformerLens models: see ``transformer_lens.residual_writers``. Hugging Face models (bare
    or under a HookBridge): the family's writers in the architecture table.
    """
    if is_hooked(model):
        return hooked.residual_writers(model)
    return hf_residual_writers(hf_model(model))


def tied_head(model) -> nn.Module | None:
    """The Hugging Face output head when it shares its weight with the input embedding
    (a HookedTransformer has its own untied unembedding)."""
    hf = hf_model(model)
    if not hasattr(hf, "get_output_embeddings"):
        return None
    head = hf.get_output_embeddings()
    if head is not None and head.weight is hf.get_input_embeddings().weight:
        return head
    return None
