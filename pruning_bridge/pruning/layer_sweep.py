"""Remove each layer in turn and evaluate: the report's Figure 1.

The sweep is rows of the sweep runner (``pruning_bridge.common.sweep``): the unpruned model,
then each layer removed through ``skip_layers``, evaluated on the tasks of one
``EvalSettings``. Single-forward tasks (MMLU, perplexity) take a fast path with the same rows:
one full forward per batch records every layer's input, and the model without layer i
restarts from layer i's input. That gives the same numbers as evaluating N pruned models, at
about half the cost. Generation (GSM8K) cannot reuse it and runs each pruned model. Rows are
appended to a JSONL file as they finish (``ResultsLog``), so an interrupted sweep resumes.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Sequence

import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from ..bridge import HookBridge
from ..common.errors import UsageError
from ..common.layers import check_layers
from ..common.results import ResultsLog
from ..common.sweep import SweepRow, as_log, pending_tasks, result_row, run_sweep
from ..common.tokens import encode_batch
from ..evals.data import load_wikitext2
from ..evals.lm import batches_by_length
from ..evals.lm import context_length
from ..evals.mmlu import letter_token_ids, mmlu_prompts, mmlu_result
from ..evals.perplexity import nll_sum, token_windows
from ..evals.tasks import METRICS, EvalSettings, TaskEvaluator, perplexity_batch
from .layers import prefix_reused_logits, skip_layers

METHOD = "layer_removal"


def _reused_mmlu(model, tokenizer, settings: EvalSettings, identity: dict,
                 layers: list[int]) -> dict[int | None, float]:
    questions, prompts = mmlu_prompts(tokenizer, shots=identity["shots"],
                                      limit=identity["limit"], seed=identity["seed"],
                                      data_dir=settings.data_dir,
                                      max_length=context_length(model))
    letters = letter_token_ids(tokenizer)
    scores = {key: torch.empty(len(questions), 4) for key in [None, *layers]}
    groups = batches_by_length([len(p) for p in prompts], settings.batch_size)
    device = next(model.parameters()).device
    for group in tqdm(groups, desc=f"MMLU, layers {layers[0]}-{layers[-1]} removed",
                      disable=not settings.progress):
        enc = encode_batch(tokenizer, [prompts[i] for i in group])
        for key, logits in prefix_reused_logits(model, enc["input_ids"].to(device),
                                                enc["attention_mask"].to(device), layers,
                                                logits_to_keep=1):
            scores[key][group] = logits[:, -1, letters].float().cpu()
    settings_of = {k: identity[k] for k in ("shots", "limit", "seed")}
    return {key: mmlu_result(questions, s, settings_of).value for key, s in scores.items()}


def _reused_perplexity(model, tokenizer, settings: EvalSettings, identity: dict,
                       layers: list[int]) -> dict[int | None, float]:
    windows = token_windows(tokenizer, load_wikitext2("test", settings.data_dir),
                            identity["window"], identity["limit"])
    nll = {key: 0.0 for key in [None, *layers]}
    step = perplexity_batch(settings.batch_size)
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(windows), step),
                      desc=f"perplexity, layers {layers[0]}-{layers[-1]} removed",
                      disable=not settings.progress):
        batch = windows[start:start + step].to(device)
        for key, logits in prefix_reused_logits(model, batch, torch.ones_like(batch), layers):
            nll[key] += nll_sum(logits, batch)
    return {key: math.exp(v / windows[:, 1:].numel()) for key, v in nll.items()}


# Tasks scored from one forward per item: the prefix-reusing pass computes them for many layers.
REUSABLE = {"mmlu": _reused_mmlu, "perplexity": _reused_perplexity}


def _removed(removed: list[int]) -> dict:
    return {"removed": removed}


def _fill_by_prefix_reuse(model, tokenizer, rows: list[SweepRow], evaluator: TaskEvaluator,
                          log: ResultsLog, chunk: int) -> None:
    """Append the pending rows of the single-forward tasks, ``chunk`` layers per pass.

    Each pass computes the full model too; its row is recorded by the first pass that needs
    it. The rows have the same keys and fields as the runner's, so ``run_sweep`` then finds
    them finished and computes only what is left (generation tasks).
    """
    for task in [t for t in evaluator.tasks if t in REUSABLE]:
        identity = evaluator.identity(task)
        todo = [row for row in rows if task in pending_tasks(row, evaluator, log)]
        pending = [row for row in todo if row.config["removed"]]
        for part in [pending[j:j + chunk] for j in range(0, len(pending), chunk)]:
            with log.claim():  # another run on this file may have done some meanwhile
                part = [row for row in part if task in pending_tasks(row, evaluator, log)]
                if not part:
                    continue
                baseline = SweepRow(METHOD, _removed([]), nullcontext)
                need_baseline = task in pending_tasks(baseline, evaluator, log)
                start = time.perf_counter()
                layers = [row.config["removed"][0] for row in part]
                values = REUSABLE[task](model, tokenizer, evaluator.settings, identity, layers)
                seconds = (time.perf_counter() - start) / len(values)
                if need_baseline:
                    log.append(result_row(METHOD, _removed([]), task, evaluator,
                                          _measured(task, values[None]), seconds))
                for layer in layers:
                    log.append(result_row(METHOD, _removed([layer]), task, evaluator,
                                          _measured(task, values[layer]), seconds))


def _measured(task: str, value: float) -> dict:
    return {"metric": METRICS[task], "value": value}


def layer_sweep(model, tokenizer, settings: EvalSettings, layers: Sequence[int] | None = None,
                out=None, *, reuse_prefix: bool = True, chunk: int = 8) -> list[dict]:
    """Evaluate the unpruned model and each model with one layer removed; return the rows.

    ``layers`` defaults to all. ``out`` (a ``.jsonl`` path or a ``ResultsLog``) receives each
    row when it finishes and is read first, so rows already there are not recomputed; the rows
    returned are exactly this sweep's (the unpruned model, then each layer, task by task).
    With ``reuse_prefix`` MMLU and perplexity are computed ``chunk`` layers per
    prefix-reusing pass (smaller chunks save more often; larger ones repeat fewer full
    forwards); the rows are the same as without it. ``model`` may be a ``HookBridge``, also
    a remote one (``HookBridge.remote``: no prefix reuse there).
    """
    if chunk < 1:
        raise UsageError(f"chunk must be >= 1, got {chunk}.")
    bridge = model if isinstance(model, HookBridge) else HookBridge(model, tokenizer)
    tokenizer = tokenizer or bridge.tokenizer
    layers = check_layers(layers, bridge.adapter.n_layers)
    log = as_log(out)
    evaluator = TaskEvaluator(model, tokenizer, settings)
    rows = [SweepRow(METHOD, _removed([]), lambda: nullcontext(model))]
    rows += [SweepRow(METHOD, _removed([i]), lambda i=i: skip_layers(bridge, [i]))
             for i in layers]
    # the prefix-reusing pass needs the weights here; a remote bridge runs the plain loop
    # (each evaluation batch one request, the skipped layer's hooks in it)
    if reuse_prefix and bridge.remote is None:
        _fill_by_prefix_reuse(bridge.model, tokenizer, rows, evaluator, log, chunk)
    return run_sweep(rows, evaluator, log)


def rank_correlation(influence: Sequence[float], rows: Sequence[dict], task: str) -> float:
    """Spearman correlation between Block Influence and the damage of removing each layer.

    Damage is the perplexity (higher = worse) or minus the accuracy; a good ranking without
    evaluation gives a correlation near +1.
    """
    per_layer = {r["config"]["removed"][0]: r["value"] for r in rows
                 if r["task"] == task and len(r["config"]["removed"]) == 1}
    layers = sorted(per_layer)
    damage = [per_layer[i] if task == "perplexity" else -per_layer[i] for i in layers]
    return float(spearmanr([influence[i] for i in layers], damage).statistic)
