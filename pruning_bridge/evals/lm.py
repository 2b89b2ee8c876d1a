"""The two things evaluation needs from a causal LM: logits for a padded batch, and greedy text.

Works for Hugging Face causal LMs and for anything with the same call signature (such as a
``HookBridge``). Left padding is handled with explicit position ids, so a padded batch gives the
same last-position logits as each prompt run alone.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from ..common.errors import UsageError
from ..common.tokens import encode_batch, model_device, position_ids


def context_length(model) -> int | None:
    """The model's maximum context in tokens, if its config says (``max_position_embeddings``,
    which GPT-2's ``n_positions`` is an alias of); None for a model without a config."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _accepts(model, argument: str) -> bool:
    try:
        return argument in inspect.signature(model.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return False


@torch.no_grad()
def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   last_only: bool = False) -> torch.Tensor:
    """Logits ``[batch, pos, vocab]`` of ``model`` on a (possibly left-padded) batch.

    ``last_only`` asks for the last position alone (``[batch, 1, vocab]``); HF models then skip
    the LM head everywhere else, which for short-answer scoring is most of the compute.
    """
    device = model_device(model)
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    kwargs = {"logits_to_keep": 1} if last_only and _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids(attention_mask), **kwargs)
    logits = out.logits if hasattr(out, "logits") else out
    return logits[:, -1:] if last_only else logits


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), to waste little padding."""
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}.")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def greedy_generate(model, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                    max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
    """Greedy continuations of ``prompts`` (one batch), cut at the first stop string."""
    enc = encode_batch(tokenizer, prompts)
    device = model_device(model)
    out = model.generate(
        input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        stop_strings=list(stop) or None, tokenizer=tokenizer if stop else None,
        temperature=None, top_p=None, top_k=None,
    )
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [cut_at_stop(text, stop) for text in texts]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string."""
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]
