"""The evaluation tasks by name, and ``EvalSettings``: everything that defines an evaluation.

    settings = EvalSettings(tasks="mmlu,perplexity", limit={"mmlu": 57, "perplexity": 4},
                            window=512, data_dir="../shared/data")
    result = evaluate(model, tok, "perplexity", settings)      # an EvalResult
    settings.task_settings("perplexity", model)                # what identifies the number

A result row's identity is (method, config, task, ``task_settings``): the settings that change
the number, the data source included, so rows computed on other data or with another window are
never reused. ``batch_size`` and ``progress`` change how fast a number comes, not the number,
and are not part of it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..common.errors import UsageError
from ..common.identity import model_identity
from .data import load_wikitext2
from .gsm8k import gsm8k_accuracy
from .mmlu import mmlu_accuracy
from .perplexity import default_window, perplexity
from .result import EvalResult

TASKS = ("mmlu", "gsm8k", "perplexity")
METRICS = {"mmlu": "accuracy", "gsm8k": "accuracy", "perplexity": "perplexity"}
DEFAULT_LIMITS = {"mmlu": 451, "gsm8k": 131, "perplexity": None}  # the report's subsets
WIKITEXT_TEST = "wikitext-2-raw-v1 test"


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"mmlu,perplexity"`` or a list, checked against the known task names."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UsageError(f"Unknown or no tasks {unknown or list(tasks)}; choose from "
                         f"{', '.join(TASKS)}.")
    return list(dict.fromkeys(tasks))


def _check_count(name: str, value, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < minimum):
        raise UsageError(f"{name} must be an integer >= {minimum} (or None), got {value!r}.")


def data_source(data_dir: str | Path | None) -> str:
    """Where evaluation data come from, as recorded in a row: the resolved folder, or "hub"."""
    return "hub" if data_dir is None else str(Path(data_dir).expanduser().resolve())


@dataclass(frozen=True)
class EvalSettings:
    """Everything that defines an evaluation, for every task of a sweep.

    ``limit`` is one number for every task or a dict per task (``{"mmlu": 57, "perplexity":
    4}``): MMLU questions (None: 451), GSM8K problems (None: 131), perplexity windows (None:
    all). ``window``: perplexity window (None: min(context, 2048)). ``shots``: None means 0 for
    MMLU and 8 for GSM8K. ``data_dir``: a local folder laid out like the originals, or None for
    the Hugging Face hub. ``batch_size`` and ``progress`` do not change any number.
    """

    tasks: tuple[str, ...] = ("mmlu", "perplexity")
    limit: int | Mapping[str, int | None] | None = field(default=None, hash=False)
    window: int | None = None
    shots: int | None = None
    seed: int = 0
    max_new_tokens: int = 256
    batch_size: int = 8
    data_dir: str | Path | None = None
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(parse_tasks(self.tasks)))
        if isinstance(self.limit, Mapping):
            unknown = [t for t in self.limit if t not in TASKS]
            if unknown:
                raise UsageError(f"Limits for unknown tasks {unknown}; tasks are "
                                 f"{', '.join(TASKS)}.")
            for task, value in self.limit.items():
                _check_count(f"limit for {task}", value, 1)
            object.__setattr__(self, "limit", dict(self.limit))
        else:
            _check_count("limit", self.limit, 1)
        _check_count("window", self.window, 2)
        _check_count("shots", self.shots, 0)
        _check_count("max_new_tokens", self.max_new_tokens, 1)
        _check_count("batch_size", self.batch_size, 1)

    def replace(self, **changes) -> EvalSettings:
        """A copy with some fields changed (e.g. ``settings.replace(tasks=["mmlu"])``)."""
        return dataclasses.replace(self, **changes)

    def limit_for(self, task: str) -> int | None:
        """The limit given for ``task`` (None when not given)."""
        return self.limit.get(task) if isinstance(self.limit, Mapping) else self.limit

    def task_settings(self, task: str, model=None) -> dict[str, Any]:
        """The settings that define ``task``'s number: part of every result row's identity.

        Defaults are filled in (MMLU 451 questions 0-shot, GSM8K 131 problems 8-shot, the
        perplexity window from ``model``'s context), so that a default and the same value
        given explicitly are one identity. ``data`` names the data source.
        """
        if task not in TASKS:
            raise UsageError(f"Unknown task {task!r}; choose from {', '.join(TASKS)}.")
        limit = self.limit_for(task)
        data = data_source(self.data_dir)
        if task == "mmlu":
            return {"shots": self.shots or 0, "limit": limit or DEFAULT_LIMITS["mmlu"],
                    "seed": self.seed, "data": data}
        if task == "gsm8k":
            return {"shots": 8 if self.shots is None else self.shots,
                    "limit": limit or DEFAULT_LIMITS["gsm8k"], "seed": self.seed,
                    "max_new_tokens": self.max_new_tokens, "data": data}
        return {"window": self.window or default_window(model), "limit": limit, "data": data}


def perplexity_batch(batch_size: int) -> int:
    """Windows per perplexity batch: a quarter of ``batch_size`` (windows are long)."""
    return max(1, batch_size // 4)


def evaluate(model, tokenizer, task: str, settings: EvalSettings) -> EvalResult:
    """``task``'s ``EvalResult`` for ``model`` (an HF model, or a ``HookBridge`` with hooks on).

    The settings are read through ``settings.task_settings(task, model)``, so the number is
    the one its row identity describes.
    """
    s = settings.task_settings(task, model)
    common = dict(data_dir=settings.data_dir, batch_size=settings.batch_size,
                  progress=settings.progress)
    if task == "mmlu":
        return mmlu_accuracy(model, tokenizer, shots=s["shots"], limit=s["limit"],
                             seed=s["seed"], **common)
    if task == "gsm8k":
        return gsm8k_accuracy(model, tokenizer, shots=s["shots"], limit=s["limit"],
                              seed=s["seed"], max_new_tokens=s["max_new_tokens"], **common)
    return perplexity(model, tokenizer, load_wikitext2("test", settings.data_dir),
                      window=s["window"], max_windows=s["limit"],
                      batch_size=perplexity_batch(settings.batch_size),
                      progress=settings.progress, text_name=WIKITEXT_TEST)


class TaskEvaluator:
    """The sweep runner's evaluator for the named tasks of one ``EvalSettings``.

    ``identity`` is fixed by the unpruned ``model`` (its context sets the default window), so
    every configuration of a sweep is evaluated, and keyed, with the same settings;
    ``model_identity`` (weights fingerprint, dtype, device) keeps its rows apart from other
    models' in a shared results file.
    """

    def __init__(self, model, tokenizer, settings: EvalSettings):
        self.tokenizer = tokenizer
        self.model_identity = model_identity(model)
        self.settings = settings.replace(window=settings.window or default_window(model))
        self.tasks = self.settings.tasks
        self._identity = {t: self.settings.task_settings(t, model) for t in self.tasks}

    def identity(self, task: str) -> dict[str, Any]:
        """The settings that define ``task``'s number (see ``EvalSettings.task_settings``)."""
        return self._identity[task]

    def __call__(self, model, task: str) -> dict[str, Any]:
        """The row fields of ``model`` on ``task``: ``metric`` and ``value``."""
        result = evaluate(model, self.tokenizer, task, self.settings)
        return {"metric": result.metric, "value": result.value}
