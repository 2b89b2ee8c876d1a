"""Prune weights at increasing sparsity and evaluate: the report's Figure 2.

Each (method, sparsity) configuration is a row of the sweep runner
(``pruning_bridge.common.sweep``): applied reversibly (the model is restored bit for bit after
each one), evaluated on each task of one ``EvalSettings``, and appended to a JSONL file as soon
as it finishes, so an interrupted sweep resumes. The dense model is a row too (method
``dense``, sparsity 0). Each row also records the sparsity the pruning achieved.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from ..common.errors import UsageError
from ..common.sweep import Prepared, SweepRow, run_sweep
from ..evals.data import DataNotFoundError, load_hub_dataset
from ..evals.tasks import EvalSettings, TaskEvaluator
from .weights import check_sparsity, input_norms, magnitude_prune, wanda_prune

REPORT_SPARSITIES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
METHODS = ("magnitude", "wanda")
SCOPES = ("per_matrix", "global")


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


@contextmanager
def _pruned(model, method: str, config: dict, norms) -> Iterator[Prepared]:
    """The model pruned as ``config`` says (restored on exit), with its achieved sparsity."""
    if method == "dense":
        yield Prepared(model, {"achieved_sparsity": 0.0})
        return
    if method == "magnitude":
        context = magnitude_prune(model, config["sparsity"], scope=config["scope"])
    else:
        context = wanda_prune(model, norms(), config["sparsity"])
    with context as report:
        yield Prepared(model, {"achieved_sparsity": report.sparsity})


def weight_sweep(model, tokenizer, settings: EvalSettings,
                 sparsities: Sequence[float] = REPORT_SPARSITIES,
                 methods: Sequence[str] = ("magnitude",), out=None, *, scope: str = "per_matrix",
                 calibration: Sequence[str] | None = None) -> list[dict]:
    """Evaluate the dense model and each (method, sparsity) on ``settings``; return the rows.

    ``methods``: ``"magnitude"`` (``scope`` per_matrix or global) and/or ``"wanda"`` (per output
    row, input norms from ``calibration`` texts, default 64 WikiText-2 validation paragraphs of
    ``settings.data_dir``, measured once on the dense model). ``out`` (a ``.jsonl`` path or a
    ``ResultsLog``) receives each row as it finishes and is read first, so a rerun recomputes
    nothing; the rows returned are exactly this sweep's, in order (dense first).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"Unknown pruning methods {unknown}; choose from {', '.join(METHODS)}.")
    if scope not in SCOPES:
        raise UsageError(f"Unknown scope {scope!r}; choose from {', '.join(SCOPES)}.")
    for sparsity in sparsities:  # all checked before the dense row is evaluated
        check_sparsity(sparsity)
    norms_cache = []

    def norms():  # measured once, on the dense model, when the first Wanda row needs them
        if not norms_cache:
            texts = (list(calibration) if calibration is not None
                     else calibration_texts(settings.data_dir))
            norms_cache.append(input_norms(model, tokenizer, texts))
        return norms_cache[0]

    configs = [("dense", {"sparsity": 0.0})] + [
        (method, {"sparsity": float(s), "scope": scope if method == "magnitude" else "per_row"})
        for method in methods for s in sparsities]
    rows = [SweepRow(method, config,
                     lambda method=method, config=config: _pruned(model, method, config, norms))
            for method, config in configs]
    return run_sweep(rows, TaskEvaluator(model, tokenizer, settings), out)
