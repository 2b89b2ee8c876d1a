"""Evaluate fewer attention heads two ways, at the same active fractions: routed per token by a
trained router (dynamic), and the least important heads physically removed (static).

The configurations are rows of the sweep runner (``pruning_bridge.common.sweep``), evaluated
on one ``EvalSettings``; rows go to a ``ResultsLog`` as they finish (resumable): method
``full`` (all heads), ``routed`` (a router trained at that fraction's ``top_k``) and
``removed`` (``heads_to_remove`` on an importance matrix, applied to a copy of the model), with
``config["active_fraction"]`` the fraction of heads that really run.

Removal uses the balanced selection (``heads_to_remove``'s default: every layer keeps a uniform
kv layout, so every pruned layer really shrinks); the achieved ``active_fraction`` is then the
nearest such layouts allow, which on grouped-query models can differ slightly from the target.

Each fraction needs its own router: MoH gates are ``k`` times the renormalised top-k
probabilities, so a router trained at one ``k`` and run at a larger one amplifies its favourite
heads (on SmolLM2, a top-4 router run at top-7 took perplexity from 31 to over 10,000).
"""

from __future__ import annotations

import copy
import hashlib
from contextlib import contextmanager, nullcontext
from typing import Iterator, Mapping

import torch

from ..bridge import HookBridge
from ..common.errors import UsageError
from ..common.sweep import SweepRow, run_sweep
from ..evals.tasks import EvalSettings, TaskEvaluator
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


@contextmanager
def _heads_removed(model, removal: dict[int, list[int]]) -> Iterator:
    """A copy of ``model`` with ``removal``'s heads physically removed (dropped on exit)."""
    yield remove_heads(copy.deepcopy(model), removal)


def head_sweep(model, tokenizer, routers: Mapping[float, RoutedHeads], importance,
               settings: EvalSettings, out=None) -> list[dict]:
    """Evaluate the full model, then routed and removed heads at each active fraction.

    ``routers`` maps each target fraction (0, 1] to the router trained for it (see
    ``top_k_for``). ``importance`` (``[n_layers, n_heads]``, e.g. a router's mean gates) ranks
    heads for removal. The tasks, limits (one number or a dict per task), window and data are
    those of ``settings``. Removed heads are chosen by the balanced selection (see
    ``heads_to_remove``). ``out`` (a ``.jsonl`` path or a ``ResultsLog``) receives each row as
    it finishes; the rows returned are exactly this sweep's. The model is never changed:
    removal happens on a copy, routing through hooks.
    """
    bad = [f for f in routers if not 0 < f <= 1]
    if bad:
        raise UsageError(f"Active head fractions must be in (0, 1], got {bad}.")
    n_heads_total = len(importance) * len(importance[0])
    bridge = HookBridge(model, tokenizer)
    rows = [SweepRow("full", {"active_fraction": 1.0}, lambda: nullcontext(model))]
    for fraction, router in sorted(routers.items(), reverse=True):
        rows.append(SweepRow("routed", {"target": fraction, "router": fingerprint(router),
                                        **router.settings(),
                                        "active_fraction": router.active_fraction},
                             lambda router=router: router.routing(bridge)))
        removal = heads_to_remove(importance, 1 - fraction, model)
        removed = sum(len(h) for h in removal.values())
        rows.append(SweepRow("removed", {"target": fraction, "ranking": fingerprint(importance),
                                         "selection": "balanced",
                                         "active_fraction": 1 - removed / n_heads_total},
                             lambda removal=removal: _heads_removed(model, removal)))
    return run_sweep(rows, TaskEvaluator(model, tokenizer, settings), out)
