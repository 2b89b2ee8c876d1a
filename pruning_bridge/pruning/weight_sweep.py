"""Prune weights at increasing sparsity and evaluate: the report's Figure 2.

Each (method, sparsity) configuration is applied reversibly (the model is restored bit for bit
after each one), evaluated on each task, and appended to a JSONL file as soon as it finishes, so
an interrupted sweep resumes. The dense model is a row too (method ``dense``, sparsity 0).
"""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

from ..common.errors import UsageError
from ..common.results import ResultsLog
from ..evals.data import DataNotFoundError, load_hub_dataset
from ..evals.tasks import METRICS, evaluate, parse_tasks, task_settings
from .weights import input_norms, magnitude_prune, wanda_prune

REPORT_SPARSITIES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
METHODS = ("magnitude", "wanda")


def calibration_texts(data_dir=None, n: int = 64, seed: int = 0,
                      min_chars: int = 200) -> list[str]:
    """``n`` paragraphs of WikiText-2 *validation* text for Wanda (never the evaluation split).

    Offline: ``<data_dir>/wikitext2/tokenized/valid.txt``; otherwise the hub's raw validation
    split.
    """
    lines: list[str] = []
    if data_dir is not None:
        path = Path(data_dir) / "wikitext2" / "tokenized" / "valid.txt"
        if not path.exists():
            raise DataNotFoundError(f"Wanda calibration text not found: expected {path} "
                                    f"(WikiText-2 validation, one paragraph per line).")
        lines = path.read_text(encoding="utf-8").splitlines()
    else:
        lines = load_hub_dataset("WikiText-2 validation", "wikitext", "wikitext-2-raw-v1",
                                 split="validation")["text"]
    paragraphs = [line.strip() for line in lines if len(line.strip()) >= min_chars
                  and not line.strip().startswith("=")]
    return random.Random(seed).sample(paragraphs, min(n, len(paragraphs)))


def weight_sweep(model, tokenizer, tasks=("mmlu", "perplexity"),
                 sparsities: Sequence[float] = REPORT_SPARSITIES,
                 methods: Sequence[str] = ("magnitude",), out=None, *, scope: str = "per_matrix",
                 calibration: Sequence[str] | None = None, data_dir=None,
                 limit: int | None = None, window: int | None = None, shots: int | None = None,
                 seed: int = 0, max_new_tokens: int = 256, batch_size: int = 8,
                 progress: bool = True) -> list[dict]:
    """Evaluate the dense model and each (method, sparsity); return the rows.

    ``methods``: ``"magnitude"`` (``scope`` per_matrix or global) and/or ``"wanda"`` (per output
    row, input norms from ``calibration`` texts, default 64 WikiText-2 validation paragraphs,
    measured once on the dense model).
    """
    tasks = parse_tasks(tasks)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"Unknown pruning methods {unknown}; choose from {', '.join(METHODS)}.")
    log = ResultsLog(out)
    norms = None
    configs = [("dense", {"sparsity": 0.0})] + [
        (method, {"sparsity": float(s), "scope": scope if method == "magnitude" else "per_row"})
        for method in methods for s in sparsities]
    settings = {task: task_settings(task, model, limit=limit, window=window, shots=shots,
                                    seed=seed, max_new_tokens=max_new_tokens) for task in tasks}
    for method, config in configs:
        todo = [t for t in tasks if not log.has(method, config, t, settings[t])]
        if not todo:
            continue
        if method == "wanda" and norms is None:
            texts = list(calibration) if calibration is not None else calibration_texts(data_dir)
            norms = input_norms(model, tokenizer, texts)
        if method == "dense":
            context = nullcontext()  # the dense model: no pruning, no report
        elif method == "magnitude":
            context = magnitude_prune(model, config["sparsity"], scope=scope)
        else:
            context = wanda_prune(model, norms, config["sparsity"])
        with context as report:
            for task in todo:
                start = time.perf_counter()
                value = evaluate(model, tokenizer, task, settings[task], data_dir=data_dir,
                                 batch_size=batch_size, progress=progress)
                log.append({"method": method, "config": config, "task": task,
                            "metric": METRICS[task], "value": value, "settings": settings[task],
                            "achieved_sparsity": report.sparsity if report else 0.0,
                            "seconds": round(time.perf_counter() - start, 3)})
    return [r for r in log.rows if r["method"] in ("dense", *methods) and r["task"] in tasks]
