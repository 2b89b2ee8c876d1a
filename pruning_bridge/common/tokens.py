"""Token plumbing every part of the toolkit shares: devices, left padding, position ids.

Left padding (pad tokens first) lets a batch read each prompt's last position at ``[:, -1]``
and generate; position ids that count only real tokens keep a padded prompt's positions equal
to those of the same prompt run alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU if it has none, or if its weights are on
    the meta device: a remote bridge's inputs are made here)."""
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if params else None
    if first is None or first.device.type == "meta":
        return torch.device("cpu")
    return first.device


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that count only real tokens, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@contextmanager
def left_padding(tokenizer) -> Iterator:
    """Temporarily pad on the left (needed to read the last position and to generate)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = side


def encode_batch(tokenizer, prompts: Sequence[str]) -> dict:
    """Tokenize prompts as one left-padded batch of tensors."""
    with left_padding(tokenizer):
        return tokenizer(list(prompts), return_tensors="pt", padding=True)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token-id lists as one left-padded ``[batch, width]`` tensor and its attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask
