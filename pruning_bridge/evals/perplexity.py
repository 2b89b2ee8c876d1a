"""Perplexity over non-overlapping windows of a long text (the Wanda / SparseGPT protocol).

The whole text is tokenized once with the tokenizer's defaults, cut into windows of ``window``
tokens (the last partial window is dropped), and perplexity is exp of the mean negative
log-likelihood over every predicted token (``window - 1`` per window).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..common.errors import UsageError
from .lm import forward_logits


def default_window(model, cap: int = 2048) -> int:
    """min(model context, ``cap``)."""
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions",
                                                                          None)
    return min(context or cap, cap)


def token_windows(tokenizer: PreTrainedTokenizerBase, text: str, window: int,
                  max_windows: int | None = None) -> torch.Tensor:
    """``[n_windows, window]`` token ids: the whole text tokenized once, cut without overlap."""
    if window < 2:
        raise UsageError(f"window must be at least 2 tokens, got {window}.")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    n_windows = len(ids) // window
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise UsageError(f"The text has {len(ids)} tokens, fewer than one window of {window}; "
                         f"pass a smaller window or a longer text.")
    return ids[: n_windows * window].view(n_windows, window)


def nll_sum(logits: torch.Tensor, windows: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood of ``windows`` under ``logits`` (float64)."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                          windows[:, 1:].flatten().to(logits.device), reduction="none")
    return nll.double().sum().item()


def perplexity(model, tokenizer: PreTrainedTokenizerBase, text: str, window: int | None = None,
               max_windows: int | None = None, batch_size: int = 1,
               progress: bool = True) -> float:
    """exp(mean NLL) of ``model`` over non-overlapping ``window``-token windows of ``text``."""
    windows = token_windows(tokenizer, text, window or default_window(model), max_windows)
    total_nll = 0.0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity",
                      disable=not progress):
        batch = windows[start:start + batch_size]
        total_nll += nll_sum(forward_logits(model, batch), batch)
    return math.exp(total_nll / windows[:, 1:].numel())
