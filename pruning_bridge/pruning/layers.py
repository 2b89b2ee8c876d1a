"""Structured layer removal: a removed layer passes its input through as its output.

- ``skip_layers``: reversible, through the bridge's hook points (works with generation).
- ``drop_layers``: physical removal that really saves compute and survives save/reload.
- ``block_influence``: ShortGPT's ranking, BI_i = 1 - E[cos(x_i, x_{i+1})], without evaluation.
- ``prefix_reused_logits``: logits of every one-layer-removed model on a batch, reusing the
  unchanged prefix (with layer i removed, layers 0..i-1 compute what the full model computes).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..bridge import HookBridge, architecture_of, blocks_of
from ..common.errors import UsageError, require_local_weights
from ..common.layers import check_layers
from ..common.tokens import position_ids


def decoder_layers(model) -> nn.ModuleList:
    """The model's ``ModuleList`` of decoder blocks."""
    return blocks_of(model)


@contextmanager
def skip_layers(model_or_bridge, layers: Sequence[int], tokenizer=None) -> Iterator[HookBridge]:
    """Inside the block each listed layer outputs its input (``hook_resid_post := resid_pre``).

    Takes an HF model or a ``HookBridge`` and yields the bridge to run (its forward, generate and
    the evaluation functions see the skipped layers). Reversible: nothing is left on exit.
    """
    bridge = (model_or_bridge if isinstance(model_or_bridge, HookBridge)
              else HookBridge(model_or_bridge, tokenizer))
    layers = check_layers(layers, bridge.adapter.n_layers, allow_all=False)
    saved: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def fn(x, name):
            saved[layer] = x
        return fn

    def restore(layer: int):
        def fn(x, name):
            return saved.pop(layer)
        return fn

    hooks = []
    for layer in layers:
        hooks += [(f"blocks.{layer}.hook_resid_pre", keep(layer)),
                  (f"blocks.{layer}.hook_resid_post", restore(layer))]
    with bridge.hooks(hooks):
        yield bridge


def drop_layers(model, layers: Sequence[int]):
    """Delete ``layers`` from ``model`` in place (and return it): fewer layers, less compute.

    Attention ``layer_idx`` values, ``config.num_hidden_layers`` and ``config.layer_types`` are
    re-indexed, so generation with a KV cache, ``save_pretrained`` and ``from_pretrained`` work.
    """
    require_local_weights(model, "Dropping layers")
    blocks = decoder_layers(model)
    n = len(blocks)
    drop = set(check_layers(layers, n, allow_all=False))
    kept = [block for i, block in enumerate(blocks) if i not in drop]
    blocks_path = architecture_of(model).blocks
    parent_path, _, attr = blocks_path.rpartition(".")
    model.get_submodule(parent_path).__setattr__(attr, nn.ModuleList(kept))
    for new_idx, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    config = model.config
    keep_idx = [i for i in range(n) if i not in drop]
    if hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(kept)  # GPT-2's n_layer is an alias of this
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep_idx]
    return model


class _Passthrough(nn.Module):
    """A decoder layer that returns its input (used only inside ``prefix_reused_logits``)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def _start_at(model, hidden: torch.Tensor, first: int) -> Iterator[None]:
    """Run ``model`` from ``hidden`` as layer ``first``'s input: earlier layers are bypassed."""
    blocks = decoder_layers(model)
    originals = [blocks[i] for i in range(first)]
    entry = model.get_submodule(architecture_of(model).layer_input)  # its output enters block 0
    handle = entry.register_forward_hook(lambda module, args, output: hidden)
    try:
        for i in range(first):
            blocks[i] = _Passthrough()
        yield
    finally:
        handle.remove()
        for i, block in enumerate(originals):
            blocks[i] = block


@torch.no_grad()
def prefix_reused_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         layers: Sequence[int], logits_to_keep: int = 0
                         ) -> Iterator[tuple[int | None, torch.Tensor]]:
    """Yield ``(None, full-model logits)`` then ``(i, logits with layer i removed)`` per layer.

    The full forward records every layer's input; the model without layer i then starts from
    layer i's input and runs only layers i+1.., so the sweep costs about half of N full passes.
    """
    kwargs = dict(attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                  use_cache=False)
    if logits_to_keep:
        kwargs["logits_to_keep"] = logits_to_keep
    out = model(input_ids=input_ids, output_hidden_states=True, **kwargs)
    yield None, out.logits
    hidden = out.hidden_states  # hidden[i] = input of layer i (i < n)
    del out
    for i in layers:
        with _start_at(model, hidden[i], i + 1):
            yield i, model(input_ids=input_ids, **kwargs).logits


@torch.no_grad()
def block_influence(model, tokenizer, texts: Sequence[str], batch_size: int = 8,
                    max_length: int = 512, progress: bool = True) -> list[float]:
    """ShortGPT's Block Influence per layer: 1 - mean over real tokens of cos(x_i, x_{i+1}).

    Higher means the layer changes the residual stream more; the lowest are the usual
    candidates for removal.
    """
    if not texts:
        raise UsageError("block_influence needs at least one text.")
    bridge = model if isinstance(model, HookBridge) else HookBridge(model, tokenizer)
    n = bridge.adapter.n_layers
    names = [f"blocks.{i}.hook_resid_{k}" for i in range(n) for k in ("pre", "post")]
    total = torch.zeros(n, dtype=torch.float64)
    count = 0
    for start in tqdm(range(0, len(texts), batch_size), desc="block influence",
                      disable=not progress):
        batch = list(texts[start:start + batch_size])
        enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        _, cache = bridge.run_with_cache(enc["input_ids"], names,
                                         attention_mask=enc["attention_mask"])
        real = cache.attention_mask.bool()
        for i in range(n):
            x, y = cache[f"blocks.{i}.hook_resid_pre"], cache[f"blocks.{i}.hook_resid_post"]
            cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
            total[i] += cos[real].sum().item()
        count += int(real.sum())
    return (1 - total / count).tolist()
