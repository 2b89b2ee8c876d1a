"""Attention scores, patterns and rotated queries/keys as hook points.

Hugging Face models compute attention inside a function, not a module, so these values have no
module output to intercept. When a trace asks for ``attn.hook_attn_scores``, ``attn.hook_pattern``,
``attn.hook_rot_q`` or ``attn.hook_rot_k``, the bridge runs the model with ``hooked_attention``
for that trace only (registered in transformers' attention interface with sdpa's boolean masks),
and only in the layers the trace touches: the other layers run sdpa, and every other trace keeps
the model's own kernel (sdpa, flash). ``hooked_attention`` computes
attention as TransformerLens does: scores in fp32, masked positions ``-inf``, softmax, fully
masked rows (left padding) 0, and the pattern times the values in the model's dtype. When no hook
changed any of these values (they are only cached), the layer's output is sdpa's, so a trace that
caches patterns gives exactly the logits and activations of the model without it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "hookbridge"
ROTARY_NAMES = ("attn.hook_rot_q", "attn.hook_rot_k")
PATTERN_NAMES = ("attn.hook_attn_scores", "attn.hook_pattern")
Visit = Callable[[str, Tensor, bool], Tensor | None]
# per trace running with hooked_attention: its visit function and the layers it touches
_active: list[tuple[Visit, frozenset[int]]] = []


def _visit(name: str, value: Tensor) -> Tensor | None:
    """The hooks' replacement of ``value``, or None; an in-place edit counts as a replacement
    (computed=True: compared with a copy when a hook runs), since the output depends on it."""
    return _active[-1][0](name, value, True)


def _keep(attention_mask: Tensor | None, q_len: int, k_len: int, device) -> Tensor:
    """Where a query may look: the model's (eager, additive or boolean) mask, else causal."""
    if attention_mask is None:
        return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
    mask = attention_mask[..., :k_len]
    return mask if mask.dtype == torch.bool else mask == 0


def hooked_attention(module, query: Tensor, key: Tensor, value: Tensor,
                     attention_mask: Tensor | None, scaling: float | None = None,
                     dropout: float = 0.0, **kwargs) -> tuple[Tensor, Tensor]:
    """Eager attention that visits the rotated q/k, the scores and the pattern of its layer.

    ``query`` is ``[batch, heads, q_pos, d_head]``, ``key``/``value`` ``[batch, kv_heads,
    k_pos, d_head]`` (cached positions included); hook values have TransformerLens's shapes.
    """
    if module.layer_idx not in _active[-1][1]:  # a layer no hook reads: the fast kernel
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    prefix = f"blocks.{module.layer_idx}.attn."
    q_len = query.shape[2]
    inputs, edited = (query, key, value), False  # edited: a hook changed a value below
    new = _visit(prefix + "hook_rot_q", query.transpose(1, 2))
    if new is not None:
        query, edited = new.transpose(1, 2).to(query.dtype), True
    new = _visit(prefix + "hook_rot_k", key[:, :, -q_len:].transpose(1, 2))
    if new is not None:
        key = torch.cat([key[:, :, :-q_len], new.transpose(1, 2).to(key.dtype)], dim=2)
        edited = True
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: shared kv heads
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    keep = _keep(attention_mask, q_len, key.shape[2], scores.device)
    scores = scores.masked_fill(~keep, float("-inf"))
    new = _visit(prefix + "hook_attn_scores", scores)
    if new is not None:
        scores, edited = new.float(), True
    pattern = torch.softmax(scores, dim=-1)
    pattern = torch.where(torch.isnan(pattern), 0.0, pattern)  # rows with nothing to attend to
    new = _visit(prefix + "hook_pattern", pattern)
    if new is not None:
        pattern, edited = new.float(), True
    if not edited:  # only read: the output is the model's own kernel's, as without the trace
        out, _ = sdpa_attention_forward(module, *inputs, attention_mask, dropout=dropout,
                                        scaling=scaling, **kwargs)
        return out, pattern
    out = torch.matmul(pattern.to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), pattern


AttentionInterface.register(NAME, hooked_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def exposed(model, visit: Visit, layers: Iterable[int]) -> Iterator[None]:
    """Inside the block ``model`` runs ``hooked_attention``, which calls ``visit`` in ``layers``."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = NAME
    _active.append((visit, frozenset(layers)))
    try:
        yield
    finally:
        _active.pop()
        config._attn_implementation = previous
