"""One sweep runner: rows of (method, config, context) evaluated on the tasks of one evaluator.

    rows = [SweepRow("dense", {"sparsity": 0.0}, lambda: nullcontext(model)),
            SweepRow("magnitude", {"sparsity": 0.5}, lambda: pruned(model, 0.5))]
    results = run_sweep(rows, TaskEvaluator(model, tok, settings), "sweep.jsonl")

A row's ``context`` is a zero-argument callable returning a context manager; the context
yields what the evaluator evaluates (usually the model, pruned or hooked for that
configuration), or ``Prepared(subject, fields)`` when the configuration has fields of its own
to record (e.g. the sparsity it achieved). For each row the runner skips the tasks whose full
key (method, config, task, settings) is already in the results log, enters the context once for
all pending tasks, appends each finished row (the log fsyncs it), and returns exactly the
sweep's own rows, in sweep order: rows computed with other settings are never returned.

The evaluator (see ``Evaluator``) says which tasks there are, the settings that identify each
task's number, which model it measures (``model_identity``: rows of another model, dtype or
device are never reused), and how to measure one subject on one task. ``pruning_bridge.evals.tasks.
TaskEvaluator`` evaluates MMLU / GSM8K / perplexity; the safety alpha sweep brings its own.
"""

from __future__ import annotations

import os
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from .results import Key, ResultsLog


class Evaluator(Protocol):
    """What the runner needs to evaluate rows: tasks, their identities, the model, and a
    measurement."""

    tasks: Sequence[str]
    model_identity: dict[str, str]  # ``identity.model_identity`` of the unedited model

    def identity(self, task: str) -> dict[str, Any]:
        """The settings that define ``task``'s number (the ``settings`` of its rows)."""

    def __call__(self, subject: Any, task: str) -> dict[str, Any]:
        """Row fields for ``subject`` on ``task``: at least ``metric`` and ``value``."""


@dataclass(frozen=True)
class SweepRow:
    """One configuration: ``context()`` returns a context manager yielding what to evaluate."""

    method: str
    config: dict[str, Any]
    context: Callable[[], AbstractContextManager]


@dataclass
class Prepared:
    """What a row's context yields when the configuration records fields of its own."""

    subject: Any
    fields: dict[str, Any] = field(default_factory=dict)


def as_log(log: ResultsLog | str | os.PathLike | None) -> ResultsLog:
    """A ``ResultsLog`` as given, or opened on a ``.jsonl`` path (in memory for None)."""
    return log if isinstance(log, ResultsLog) else ResultsLog(log)


def row_settings(evaluator: Evaluator, task: str) -> dict[str, Any]:
    """The ``settings`` of ``task``'s rows: the evaluator's identity of the task plus the model
    (weights fingerprint, dtype, device class; its name is recorded but is not identity)."""
    model = {k: v for k, v in evaluator.model_identity.items() if k != "name"}
    return {**evaluator.identity(task), "model": model}


def result_row(method: str, config: dict, task: str, evaluator: Evaluator, measured: dict,
               seconds: float, fields: dict | None = None) -> dict[str, Any]:
    """A results row: the full key, the model's name, the measurement (``metric``, ``value``,
    ...), the configuration's own fields and the seconds it took."""
    return {"method": method, "config": config, "task": task,
            "settings": row_settings(evaluator, task),
            "model_name": evaluator.model_identity.get("name"), **measured, **(fields or {}),
            "seconds": round(seconds, 3)}


def sweep_keys(rows: Sequence[SweepRow], evaluator: Evaluator) -> list[Key]:
    """The full keys of a sweep, row by row and task by task (the order rows are returned in)."""
    return [(row.method, row.config, task, row_settings(evaluator, task))
            for row in rows for task in evaluator.tasks]


def pending_tasks(row: SweepRow, evaluator: Evaluator, log: ResultsLog) -> list[str]:
    """The tasks of ``row`` not yet in ``log`` for the evaluator's settings and model."""
    return [task for task in evaluator.tasks
            if not log.has(row.method, row.config, task, row_settings(evaluator, task))]


def run_sweep(rows: Sequence[SweepRow], evaluator: Evaluator,
              log: ResultsLog | str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Evaluate every row on every task not yet in ``log``; return the sweep's rows.

    ``log`` is a ``ResultsLog`` or a ``.jsonl`` path (appended to, and read first so that
    finished rows are not recomputed); None keeps the rows in memory. Runs that share one file
    take turns row by row (``ResultsLog.claim``), so each row is computed once.
    """
    log = as_log(log)
    for row in rows:
        with log.claim():  # rows another run finished meanwhile are read first
            todo = pending_tasks(row, evaluator, log)
            if not todo:
                continue
            with row.context() as prepared:
                if isinstance(prepared, Prepared):
                    subject, fields = prepared.subject, prepared.fields
                else:
                    subject, fields = prepared, {}
                for task in todo:
                    start = time.perf_counter()
                    measured = evaluator(subject, task)
                    log.append(result_row(row.method, row.config, task, evaluator, measured,
                                          time.perf_counter() - start, fields))
            del prepared, subject  # a pruned copy is freed before the next row builds its own
    with log.claim():
        return log.select(sweep_keys(rows, evaluator))
