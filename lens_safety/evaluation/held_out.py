"""What an edit costs outside toxicity: WikiText-2 perplexity and MMLU correctness per question,
measured one way for the detox study's test and for the comparison's, so that one can reuse
the other's values when they were measured on the same model with the same settings.

    values = held_out_values(bridge, tok, edit, text, window=1024, windows=8, mmlu=451,
                             batch_size=32, data_dir=d)    # {"perplexity", "mmlu_correct"}
    key = held_out_identity(bridge, 1024, 8, 451, 32, d)   # saved with the values

``text_prefix`` cuts WikiText-2 to the start its perplexity windows read (tokenizing all of it
costs about a second per row).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from pruning_bridge.common.identity import weights_identity
from pruning_bridge.evals import mmlu_accuracy, perplexity

from ..backend import as_lm


def text_prefix(tokenizer, text: str, window: int, max_windows: int | None,
                margin: int = 64) -> str:
    """The start of ``text`` that holds the first ``window * max_windows`` tokens and ``margin``
    more: the perplexity windows cut from it are those of the whole text (tokenizing all of
    WikiText-2 for every row would cost seconds each). The whole text when not limited."""
    if max_windows is None:
        return text
    need = window * max_windows + margin
    end = 0
    for step in (4, 16, 64):  # characters per token, generously: grow until enough tokens
        end = min(len(text), need * step)
        if end == len(text) or len(tokenizer(text[:end])["input_ids"]) > need:
            break
    return text[:end] if len(tokenizer(text[:end])["input_ids"]) > need else text


def mmlu_batch(batch_size: int) -> int:
    """MMLU's batch: a quarter of the generation batch (its prompts are long), at least 1."""
    return max(1, batch_size // 4)


def held_out_identity(model, window: int, windows: int | None, mmlu: int | None,
                      batch_size: int, data_dir) -> dict[str, Any]:
    """What ``held_out_values`` of ``model`` depend on besides the edit: values saved with the
    same identity can stand in for measuring them again."""
    return {"window": window, "windows": windows, "mmlu": mmlu or None,
            "mmlu_batch_size": mmlu_batch(batch_size), "data": str(data_dir),
            "model": weights_identity(model)}


def held_out_values(model, tokenizer, edit, text: str, *, window: int, windows: int | None,
                    mmlu: int | None, batch_size: int, data_dir,
                    progress: bool = False) -> dict[str, Any]:
    """``{"perplexity": float, "mmlu_correct": [0/1 per question]}`` under ``edit`` (None: the
    model as it is); no MMLU key when ``mmlu`` is 0 or None."""
    values: dict[str, Any] = {}
    with edit.apply(model) if edit is not None else nullcontext():
        lm = as_lm(model)
        values["perplexity"] = perplexity(lm, tokenizer, text, window=window,
                                          max_windows=windows, batch_size=1,
                                          progress=progress).value
        if mmlu:
            result = mmlu_accuracy(lm, tokenizer, limit=mmlu, data_dir=data_dir,
                                   batch_size=mmlu_batch(batch_size), progress=progress)
            values["mmlu_correct"] = [float(r["correct"]) for r in result.records]
    return values
