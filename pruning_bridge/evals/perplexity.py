"""Perplexity over non-overlapping windows of a long text (the Wanda / SparseGPT protocol).

The whole text is tokenized once with the tokenizer's defaults, cut into windows of ``window``
tokens (the last partial window is dropped), and perplexity is exp of the mean negative
log-likelihood over every predicted token (``window - 1`` per window). ``perplexity`` returns an
``EvalResult`` (value, settings, one record per window), like MMLU and GSM8K.
"""

from __future__ import annotations

import hashlib
import math
import sys

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..bridge import HookBridge
from ..bridge.remote import send_by_value
from ..common.errors import UsageError
from .lm import context_length, forward_logits
from .result import EvalResult


def default_window(model, cap: int = 2048) -> int:
    """min(model context, ``cap``)."""
    return min(context_length(model) or cap, cap)


def check_window(model, window: int, option: str = "window") -> None:
    """A ``UsageError`` when ``window`` tokens do not fit ``model``'s positions (its context,
    when its config says); ``option`` is what the message calls the window (``--window``)."""
    limit = context_length(model)
    if limit is not None and window > limit:
        raise UsageError(f"{option} {window} is longer than the model's context of {limit} "
                         f"positions; pass at most {limit}.")


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


def window_nlls(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood summed per window, ``[n_windows]`` in float64."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                          windows[:, 1:].flatten().to(logits.device), reduction="none")
    return nll.double().view(len(windows), -1).sum(-1)


def nll_sum(logits: torch.Tensor, windows: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood of ``windows`` under ``logits`` (float64)."""
    return window_nlls(logits, windows).sum().item()


def perplexity(model, tokenizer: PreTrainedTokenizerBase, text: str, window: int | None = None,
               max_windows: int | None = None, batch_size: int = 1, progress: bool = True,
               text_name: str | None = None) -> EvalResult:
    """exp(mean NLL) of ``model`` over non-overlapping ``window``-token windows of ``text``.

    Returns an ``EvalResult`` like the other evaluations: ``value`` is the perplexity,
    ``settings`` the window, the window limit and the text (``text_name``, or the text's length
    and hash), and ``records`` one entry per window with its summed NLL and predicted tokens.
    """
    window = window or default_window(model)
    check_window(model, window)
    windows = token_windows(tokenizer, text, window, max_windows)
    nlls = []
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity",
                      disable=not progress):
        batch = windows[start:start + batch_size]
        if isinstance(model, HookBridge):  # NLLs in the trace: a server sends back only those
            own = batch.clone()  # a view would carry the whole text's tokens along
            nll, _ = model.forward(own, logits=lambda logits, own=own: window_nlls(logits, own))
            nlls.append(nll.cpu())
        else:
            nlls.append(window_nlls(forward_logits(model, batch), batch).cpu())
    nll = torch.cat(nlls)
    tokens = windows.shape[1] - 1
    if text_name is None:
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
        text_name = f"{len(text)} characters, sha256 {digest}"
    return EvalResult(
        task="perplexity", metric="perplexity",
        value=math.exp(nll.sum().item() / (len(windows) * tokens)),
        settings={"window": window, "limit": max_windows, "text": text_name,
                  "n": len(windows)},
        records=[{"window": i, "nll": float(v), "tokens": tokens} for i, v in enumerate(nll)])


send_by_value(sys.modules[__name__])  # window_nlls runs inside remote traces
