"""The evaluation tasks a sweep runs, by name, with the settings that identify a result."""

from __future__ import annotations

from typing import Any

from ..common.errors import UsageError
from .data import load_wikitext2
from .gsm8k import gsm8k_accuracy
from .mmlu import mmlu_accuracy
from .perplexity import default_window, perplexity

TASKS = ("mmlu", "gsm8k", "perplexity")
METRICS = {"mmlu": "accuracy", "gsm8k": "accuracy", "perplexity": "perplexity"}


def parse_tasks(tasks) -> list[str]:
    """``"mmlu,perplexity"`` or a list, checked against the known task names."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UsageError(f"Unknown or no tasks {unknown or tasks}; choose from {', '.join(TASKS)}.")
    return list(dict.fromkeys(tasks))


def task_settings(task: str, model, *, limit: int | None = None, window: int | None = None,
                  shots: int | None = None, seed: int = 0,
                  max_new_tokens: int = 256) -> dict[str, Any]:
    """The settings that define a task's number (part of every result row's identity)."""
    if task == "mmlu":
        return {"shots": shots or 0, "limit": limit or 451, "seed": seed}
    if task == "gsm8k":
        return {"shots": 8 if shots is None else shots, "limit": limit or 131, "seed": seed,
                "max_new_tokens": max_new_tokens}
    return {"window": window or default_window(model), "limit": limit}


def perplexity_batch(batch_size: int) -> int:
    """Windows per perplexity batch: a quarter of ``batch_size`` (windows are long)."""
    return max(1, batch_size // 4)


def evaluate(model, tokenizer, task: str, settings: dict[str, Any], data_dir=None,
             batch_size: int = 8, progress: bool = True) -> float:
    """The task's metric for ``model`` (an HF model or a ``HookBridge`` with active hooks)."""
    if task == "mmlu":
        return mmlu_accuracy(model, tokenizer, shots=settings["shots"], limit=settings["limit"],
                             seed=settings["seed"], data_dir=data_dir, batch_size=batch_size,
                             progress=progress).value
    if task == "gsm8k":
        return gsm8k_accuracy(model, tokenizer, shots=settings["shots"], limit=settings["limit"],
                              seed=settings["seed"], data_dir=data_dir,
                              max_new_tokens=settings["max_new_tokens"], batch_size=batch_size,
                              progress=progress).value
    return perplexity(model, tokenizer, load_wikitext2("test", data_dir),
                      window=settings["window"], max_windows=settings["limit"],
                      batch_size=perplexity_batch(batch_size), progress=progress)
