"""Evaluate fewer attention heads two ways, at the same active fractions: routed per token by a
trained router (dynamic), and the least important heads physically removed (static).

Rows go to a ``ResultsLog`` as they finish (resumable): method ``full`` (all heads), ``routed``
(a router trained at that fraction's ``top_k``) and ``removed`` (``heads_to_remove`` on an
importance matrix, applied to a copy of the model), with ``config["active_fraction"]`` the
fraction of heads that really run.

Each fraction needs its own router: MoH gates are ``k`` times the renormalised top-k
probabilities, so a router trained at one ``k`` and run at a larger one amplifies its favourite
heads (on SmolLM2, a top-4 router run at top-7 took perplexity from 31 to over 10,000).
"""

from __future__ import annotations

import copy
import hashlib
import time
from typing import Mapping

import torch

from ..bridge import HookBridge
from ..common.errors import UsageError
from ..common.results import ResultsLog, row_key
from ..evals.tasks import METRICS, evaluate, parse_tasks, task_settings
from .removal import heads_to_remove, remove_heads
from .routing import RoutedHeads

REPORT_FRACTIONS = (0.9, 0.75, 0.5)  # active heads


def fingerprint(tensor_or_module) -> str:
    """A short hash of weights, so results of a different router or ranking are not reused."""
    tensors = (tensor_or_module.state_dict().values() if isinstance(tensor_or_module,
                                                                    torch.nn.Module)
               else [torch.as_tensor(tensor_or_module)])
    digest = hashlib.sha1()
    for t in tensors:
        digest.update(t.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:10]


def head_sweep(model, tokenizer, routers: Mapping[float, RoutedHeads], importance,
               tasks=("mmlu", "perplexity"), out=None, *, data_dir=None,
               limit: int | dict[str, int | None] | None = None, window: int | None = None,
               shots: int | None = None, seed: int = 0, max_new_tokens: int = 256,
               batch_size: int = 8, progress: bool = True) -> list[dict]:
    """Evaluate the full model, then routed and removed heads at each active fraction.

    ``routers`` maps each target fraction (0, 1] to the router trained for it (see
    ``top_k_for``). ``importance`` (``[n_layers, n_heads]``, e.g. a router's mean
    gates) ranks heads for removal. ``limit`` is one number for every task or a dict per task
    (``{"mmlu": 57, "perplexity": 4}``). The model is never changed: removal happens on a copy,
    routing through hooks.
    """
    tasks = parse_tasks(tasks)
    bad = [f for f in routers if not 0 < f <= 1]
    if bad:
        raise UsageError(f"Active head fractions must be in (0, 1], got {bad}.")
    log = ResultsLog(out)
    limits = limit if isinstance(limit, dict) else dict.fromkeys(tasks, limit)
    settings = {task: task_settings(task, model, limit=limits.get(task), window=window,
                                    shots=shots, seed=seed, max_new_tokens=max_new_tokens)
                for task in tasks}
    n_heads_total = len(importance) * len(importance[0])
    configs = [("full", {"active_fraction": 1.0}, None)]
    for fraction, router in sorted(routers.items(), reverse=True):
        configs.append(("routed", {"target": fraction, "router": fingerprint(router),
                                   **router.settings(),
                                   "active_fraction": router.active_fraction}, router))
        removal = heads_to_remove(importance, 1 - fraction)
        removed = sum(len(h) for h in removal.values())
        configs.append(("removed", {"target": fraction, "ranking": fingerprint(importance),
                                    "active_fraction": 1 - removed / n_heads_total}, removal))
    bridge = HookBridge(model, tokenizer)
    for method, config, arg in configs:
        todo = [t for t in tasks if not log.has(method, config, t, settings[t])]
        if not todo:
            continue
        pruned = remove_heads(copy.deepcopy(model), arg) if method == "removed" else None
        for task in todo:
            start = time.perf_counter()
            if method == "routed":
                with arg.routing(bridge):
                    value = evaluate(bridge, tokenizer, task, settings[task], data_dir=data_dir,
                                     batch_size=batch_size, progress=progress)
            else:
                value = evaluate(pruned if pruned is not None else model, tokenizer, task,
                                 settings[task], data_dir=data_dir, batch_size=batch_size,
                                 progress=progress)
            log.append({"method": method, "config": config, "task": task,
                        "metric": METRICS[task], "value": value, "settings": settings[task],
                        "seconds": round(time.perf_counter() - start, 3)})
        del pruned
    wanted = {row_key(method, config, task, settings[task])
              for method, config, _ in configs for task in tasks}
    return [r for r in log.rows
            if row_key(r["method"], r["config"], r["task"], r["settings"]) in wanted]
