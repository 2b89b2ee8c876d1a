"""Activations at hook points of a HookBridge for a list of texts, pooled as detox methods fit.

    acts = collect_activations(bridge, texts, ["blocks.3.mlp.hook_post"], pool="max")
    acts["blocks.3.mlp.hook_post"]            # [n_texts, d_mlp]: one row per text

``pool="tokens"`` keeps every real token but the first ([n_tokens, ...]; the first real token of
a text carries massive activations that dominate any pooled statistic); ``"mean"``, ``"max"``
and ``"last"`` give one row per text ([n_texts, ...]), over the real tokens with the first one
left out unless ``skip_first=False`` (AurA's max pooling and AcT's mean pooling in their
reference code pool every real token). Work is batched and streamed: only the pooled rows stay
in memory, and ``max_tokens`` caps what ``"tokens"`` keeps with a seeded uniform subsample
(the same tokens for every hook name). Activations come back as float32 on the CPU.
"""

from __future__ import annotations

import sys
from typing import Literal, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pruning_bridge.bridge.remote import send_by_value
from pruning_bridge.common.errors import UsageError

Pool = Literal["tokens", "mean", "max", "last"]
POOLS: tuple[str, ...] = ("tokens", "mean", "max", "last")


class ActivationStatsError(UsageError):
    """Bad arguments for collecting activations (pooling, names, texts, caps)."""


def real_token_mask(attention_mask: Tensor, skip_first: bool = True) -> Tensor:
    """``[batch, pos]`` bool: the real tokens (mask 1), without each row's first one when
    ``skip_first`` (left or right padding alike)."""
    real = attention_mask.bool()
    if not skip_first:
        return real
    first = real.int().argmax(dim=1)  # the first 1 of each row
    keep = real.clone()
    has = real.any(dim=1)
    rows = torch.arange(real.shape[0], device=real.device)[has]
    keep[rows, first[has]] = False
    return keep


def keep_first_token(x: Tensor, edited: Tensor, attention_mask: Tensor | None) -> Tensor:
    """``edited``, but ``x`` at each row's first real token and any padding before it
    (``attention_mask`` ``[batch, pos]``, 1 = real token; ``x`` is ``[batch, pos, ...]``). No
    mask, or a decoding step whose positions differ from the mask's: ``edited`` everywhere (the
    first token was in the prompt). Torch only: it runs inside traces."""
    if attention_mask is None or x.shape[1] != attention_mask.shape[1]:
        return edited
    first = attention_mask.to(x.device).cumsum(-1) <= 1
    first = first.reshape(first.shape + (1,) * (x.ndim - 2))
    return torch.where(first, x, edited)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """``[batch]``: the position of each row's last real token (left or right padding)."""
    real = attention_mask.bool()
    positions = torch.arange(real.shape[1], device=real.device).expand_as(real)
    return torch.where(real, positions, -1).amax(dim=1)


def pool_activations(activation: Tensor, attention_mask: Tensor, pool: Pool,
                     skip_first: bool = True) -> Tensor:
    """Pool one batch's ``[batch, pos, ...]`` activation over its real tokens.

    ``"tokens"``: ``[n_kept, ...]`` in row-major order; ``"mean"`` / ``"max"``: ``[batch, ...]``
    over the kept tokens; ``"last"``: the last real token (never the skipped first one unless a
    text has only one token, which ``skip_first`` then rejects)."""
    if pool not in POOLS:
        raise ActivationStatsError(f"Unknown pooling {pool!r}: use one of {', '.join(POOLS)}.")
    keep = real_token_mask(attention_mask, skip_first).to(activation.device)
    empty = ~keep.any(dim=1)
    if pool != "tokens" and bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ActivationStatsError(
            f"Text(s) at batch row(s) {rows} have no token to pool"
            + (" once the first real token is left out (a one-token text): drop such texts or "
               "pass skip_first=False." if skip_first else " (an empty text): drop them."))
    if pool == "tokens":
        return activation[keep]
    if pool == "last":
        index = last_token_index(attention_mask).to(activation.device)
        return activation[torch.arange(activation.shape[0], device=activation.device), index]
    shape = keep.shape + (1,) * (activation.ndim - 2)
    weights = keep.reshape(shape)
    if pool == "mean":
        total = torch.where(weights, activation, 0).sum(dim=1)
        return total / weights.sum(dim=1).to(activation.dtype)
    low = torch.finfo(activation.dtype).min
    return torch.where(weights, activation, low).amax(dim=1)


class TokenReservoir:
    """A seeded uniform subsample of at most ``cap`` tokens from a stream of batches: each token
    draws a random key and the ``cap`` smallest keys are kept (memory: cap + one batch)."""

    def __init__(self, cap: int, seed: int):
        self.cap = cap
        self.kept: dict[str, Tensor] = {}
        self.generator = torch.Generator().manual_seed(seed)
        self.keys: Tensor | None = None
        self.order: Tensor | None = None  # the running token index of each kept token
        self.seen = 0

    def add(self, rows: dict[str, Tensor]) -> dict[str, Tensor]:
        """Add one batch (same token count per name); returns what is kept so far."""
        n = next(iter(rows.values())).shape[0]
        keys = torch.rand(n, generator=self.generator)
        order = torch.arange(self.seen, self.seen + n)
        self.seen += n
        if self.keys is None:
            self.keys, self.order, kept = keys, order, rows
        else:
            self.keys = torch.cat([self.keys, keys])
            self.order = torch.cat([self.order, order])
            kept = {name: torch.cat([self.kept[name], rows[name]]) for name in rows}
        if self.keys.numel() > self.cap:
            chosen = torch.topk(self.keys, self.cap, largest=False).indices
            chosen = chosen[torch.argsort(self.order[chosen])]  # keep stream order
            self.keys, self.order = self.keys[chosen], self.order[chosen]
            kept = {name: value[chosen] for name, value in kept.items()}
        self.kept = kept
        return kept


def tokenize_padded(tokenizer, texts: list[str], padding_side: str, max_length: int | None
                    ) -> tuple[Tensor, Tensor]:
    """Ids and mask padded on ``padding_side``; the tokenizer is left as it was."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = padding_side
    if pad is None:  # GPT-2 style tokenizers: any id works under the mask
        tokenizer.pad_token = tokenizer.eos_token
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True,
                        truncation=max_length is not None, max_length=max_length)
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def collect_activations(bridge, texts: Sequence[str], names: Sequence[str] | str, *,
                        pool: Pool = "tokens", skip_first: bool = True, batch_size: int = 8,
                        max_length: int | None = 128, max_tokens: int | None = None,
                        seed: int = 0, padding_side: Literal["left", "right"] = "right",
                        progress: bool | None = None) -> dict[str, Tensor]:
    """``{name: activations}`` for ``texts`` at the hook points ``names`` of ``bridge`` (a
    :class:`~pruning_bridge.bridge.HookBridge`; its active hooks apply, so statistics can be
    collected with earlier edits in place).

    ``pool``: ``"tokens"`` -> ``[n_tokens, ...]``, ``"mean"`` / ``"max"`` / ``"last"`` ->
    ``[n_texts, ...]`` (see the module docstring); ``skip_first`` leaves each text's first real
    token out. ``max_tokens`` caps the tokens kept by ``"tokens"`` (a uniform subsample drawn
    with ``seed``). Texts are truncated to ``max_length`` tokens (None: no truncation).
    ``progress``: a tqdm bar (default: when there are more than 4 batches)."""
    if isinstance(names, str):
        names = [names]
    names = list(dict.fromkeys(names))
    texts = list(texts)
    if not names:
        raise ActivationStatsError("Name at least one hook point to collect.")
    if not texts:
        raise ActivationStatsError("No texts to collect activations from.")
    if pool not in POOLS:
        raise ActivationStatsError(f"Unknown pooling {pool!r}: use one of {', '.join(POOLS)}.")
    if batch_size < 1:
        raise ActivationStatsError(f"batch_size must be at least 1, got {batch_size}.")
    if max_tokens is not None and pool != "tokens":
        raise ActivationStatsError("max_tokens caps pool='tokens' only; sentence pooling keeps "
                                   "one row per text (pass fewer texts instead).")
    if max_tokens is not None and max_tokens < 1:
        raise ActivationStatsError(f"max_tokens must be at least 1 (or None), got {max_tokens}.")
    if padding_side not in ("left", "right"):
        raise ActivationStatsError(f"padding_side is 'left' or 'right', got {padding_side!r}.")
    tokenizer = getattr(bridge, "tokenizer", None)
    if tokenizer is None:
        raise ActivationStatsError("The bridge has no tokenizer: build it as "
                                   "HookBridge(model, tokenizer) to collect from texts.")
    bridge.resolve(names)  # unknown names fail here, with the bridge's suggestions

    starts = range(0, len(texts), batch_size)
    show = len(starts) > 4 if progress is None else progress
    reservoir = TokenReservoir(max_tokens, seed) if max_tokens is not None else None
    pooled: dict[str, list[Tensor]] = {name: [] for name in names}
    kept: dict[str, Tensor] = {}
    for start in tqdm(starts, desc=f"activations ({pool})", disable=not show, leave=False):
        ids, mask = tokenize_padded(tokenizer, texts[start:start + batch_size], padding_side,
                                    max_length)
        _, cache = bridge.forward(ids, attention_mask=mask, names=names, logits=False)
        rows = {name: pool_activations(cache[name], mask, pool, skip_first).float().cpu()
                for name in names}
        if reservoir is not None:
            kept = reservoir.add(rows)
        else:
            for name in names:
                pooled[name].append(rows[name])
    if reservoir is not None:
        return kept
    return {name: torch.cat(parts) for name, parts in pooled.items()}


# the apply functions run inside traces: a remote (NDIF) bridge sends them as source
send_by_value(sys.modules[__name__])
