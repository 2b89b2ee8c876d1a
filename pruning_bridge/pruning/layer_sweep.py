"""Remove each layer in turn and evaluate: the report's Figure 1.

Single-forward tasks (MMLU, perplexity) reuse the unchanged prefix: one full forward per batch
records every layer's input, and the model without layer i restarts from layer i's input. That
gives the same numbers as evaluating N pruned models, at about half the cost. Generation
(GSM8K) cannot reuse it and runs each pruned model through ``skip_layers``. Rows are appended to
a JSONL file as they finish (``ResultsLog``), so an interrupted sweep resumes.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..bridge import HookBridge
from ..common.layers import check_layers
from ..common.results import ResultsLog
from ..common.tokens import encode_batch
from ..evals.data import load_wikitext2
from ..evals.lm import batches_by_length
from ..evals.mmlu import context_length, letter_token_ids, mmlu_prompts, mmlu_result
from ..evals.perplexity import nll_sum, token_windows
from ..evals.tasks import METRICS, evaluate, parse_tasks, perplexity_batch, task_settings
from .layers import decoder_layers, prefix_reused_logits, skip_layers

METHOD = "layer_removal"


def _reused_mmlu(model, tokenizer, settings, layers, data_dir, batch_size, progress):
    questions, prompts = mmlu_prompts(tokenizer, shots=settings["shots"],
                                      limit=settings["limit"], seed=settings["seed"],
                                      data_dir=data_dir, max_length=context_length(model))
    letters = letter_token_ids(tokenizer)
    scores = {key: torch.empty(len(questions), 4) for key in [None, *layers]}
    groups = batches_by_length([len(p) for p in prompts], batch_size)
    device = next(model.parameters()).device
    for group in tqdm(groups, desc=f"MMLU, layers {layers[0]}-{layers[-1]} removed",
                      disable=not progress):
        enc = encode_batch(tokenizer, [prompts[i] for i in group])
        for key, logits in prefix_reused_logits(model, enc["input_ids"].to(device),
                                                enc["attention_mask"].to(device), layers,
                                                logits_to_keep=1):
            scores[key][group] = logits[:, -1, letters].float().cpu()
    return {key: mmlu_result(questions, s, settings).value for key, s in scores.items()}


def _reused_perplexity(model, tokenizer, settings, layers, data_dir, batch_size, progress):
    windows = token_windows(tokenizer, load_wikitext2("test", data_dir), settings["window"],
                            settings["limit"])
    nll = {key: 0.0 for key in [None, *layers]}
    step = perplexity_batch(batch_size)
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(windows), step),
                      desc=f"perplexity, layers {layers[0]}-{layers[-1]} removed",
                      disable=not progress):
        batch = windows[start:start + step].to(device)
        for key, logits in prefix_reused_logits(model, batch, torch.ones_like(batch), layers):
            nll[key] += nll_sum(logits, batch)
    return {key: math.exp(v / windows[:, 1:].numel()) for key, v in nll.items()}


_REUSED = {"mmlu": _reused_mmlu, "perplexity": _reused_perplexity}


def _row(task: str, removed: list[int], value: float, settings: dict, seconds: float) -> dict:
    return {"method": METHOD, "config": {"removed": removed}, "task": task,
            "metric": METRICS[task], "value": value, "settings": settings,
            "seconds": round(seconds, 3)}


def layer_sweep(model, tokenizer, tasks=("mmlu", "perplexity"), layers: Sequence[int] | None = None,
                out=None, *, data_dir=None, limit: int | None = None, window: int | None = None,
                shots: int | None = None, seed: int = 0, max_new_tokens: int = 256,
                batch_size: int = 8, reuse_prefix: bool = True, chunk: int = 8,
                progress: bool = True) -> list[dict]:
    """Evaluate the unpruned model and each model with one layer removed; return the rows.

    ``layers`` defaults to all. ``out`` (a ``.jsonl`` path) receives each row when it finishes
    and is read first, so rows already there are not recomputed. ``chunk`` layers share one
    prefix-reusing pass (smaller chunks save more often; larger ones repeat fewer full forwards).
    """
    tasks = parse_tasks(tasks)
    n_layers = len(decoder_layers(model))
    layers = check_layers(layers, n_layers)
    log = ResultsLog(out)
    bridge = None
    for task in tasks:
        settings = task_settings(task, model, limit=limit, window=window, shots=shots,
                                 seed=seed, max_new_tokens=max_new_tokens)
        todo = [i for i in [None, *layers]
                if not log.has(METHOD, {"removed": [] if i is None else [i]}, task, settings)]
        if not todo:
            continue
        kwargs = dict(data_dir=data_dir, batch_size=batch_size, progress=progress)
        if reuse_prefix and task in _REUSED:
            pending = [i for i in todo if i is not None]
            need_baseline = None in todo
            for part in [pending[j:j + chunk] for j in range(0, len(pending), chunk)]:
                start = time.perf_counter()
                values = _REUSED[task](model, tokenizer, settings, part, **kwargs)
                seconds = (time.perf_counter() - start) / len(values)
                if need_baseline:  # every pass computes the full model; record it once
                    log.append(_row(task, [], values[None], settings, seconds))
                    need_baseline = False
                for key in part:
                    log.append(_row(task, [key], values[key], settings, seconds))
            todo = [None] if need_baseline else []
        for key in todo:
            start = time.perf_counter()
            if key is None:
                value = evaluate(model, tokenizer, task, settings, **kwargs)
            else:
                if bridge is None:
                    bridge = HookBridge(model, tokenizer)
                with skip_layers(bridge, [key]):
                    value = evaluate(bridge, tokenizer, task, settings, **kwargs)
            log.append(_row(task, [] if key is None else [key], value, settings,
                            time.perf_counter() - start))
    return [r for r in log.rows if r["method"] == METHOD and r["task"] in tasks]


def rank_correlation(influence: Sequence[float], rows: Sequence[dict], task: str) -> float:
    """Spearman correlation between Block Influence and the damage of removing each layer.

    Damage is the perplexity (higher = worse) or minus the accuracy; a good ranking without
    evaluation gives a correlation near +1.
    """
    from scipy.stats import spearmanr

    per_layer = {r["config"]["removed"][0]: r["value"] for r in rows
                 if r["task"] == task and len(r["config"]["removed"]) == 1}
    layers = sorted(per_layer)
    damage = [per_layer[i] if task == "perplexity" else -per_layer[i] for i in layers]
    return float(spearmanr([influence[i] for i in layers], damage).statistic)
