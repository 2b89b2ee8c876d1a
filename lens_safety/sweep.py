"""Alpha sweep of ``subtract`` (plus one ``project`` row): the toxicity/perplexity trade-off.

    rows = alpha_sweep(bridge, tok, direction, [0, 2, 4, 8], toxic_prompts=..., neutral_prompts=...,
                       perplexity_text=text, window=128, max_windows=4, out="sweep.jsonl")

Each row: ``edit``, ``alpha``, the after metrics (``toxicity_toxic``, ``toxicity_neutral``,
``perplexity``, ...) and the unedited values as ``before_<metric>``. The sweep runs on the
toolkit's sweep runner (:mod:`pruning_bridge.common.sweep`, method ``"edit"``, task
``"safety"``, evaluated by :class:`EditEvaluator`): with ``out`` (JSONL), each row is appended as
it finishes, rows already in the file are not recomputed, and the sweep returns exactly its own
rows.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from typing import Sequence

import torch

from pruning_bridge.common.errors import UsageError
from pruning_bridge.common.identity import model_identity
from pruning_bridge.common.sweep import SweepRow, run_sweep

from .evaluation import evaluate_edit

METHOD, TASK = "edit", "safety"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def _settings(direction, toxic, neutral, perplexity_text, window, max_windows,
              kwargs) -> dict:
    """The identity of the sweep's rows: which direction, prompts and text, and how measured."""
    keep = {k: v for k, v in kwargs.items()
            if k in ("max_new_tokens", "scorer", "layers", "hooks", "probe_layer", "mmlu",
                     "subtract_layers", "subtract_hooks")
            and (isinstance(v, (str, int, float, list, tuple, dict)) or v is None)}
    vector = torch.as_tensor(direction).detach().float().cpu().contiguous()
    return {"direction": _digest(vector.numpy().tobytes()),
            "prompts": _digest(json.dumps([toxic, neutral]).encode()),
            "perplexity_text": (None if perplexity_text is None
                                else _digest(perplexity_text.encode())),
            "n_toxic": len(toxic), "n_neutral": len(neutral), "window": window,
            "max_windows": max_windows, **{k: list(v) if isinstance(v, tuple) else v
                                           for k, v in keep.items()}}


class EditEvaluator:
    """The sweep runner's evaluator for edits of one direction: one task, ``"safety"``.

    A row's context yields the edit's config (``{"edit", "alpha"}``); ``evaluate_edit``
    measures the model before and under that edit, and the row records the after metrics
    (``toxicity_toxic`` is the row's ``value``) and the unedited ones as ``before_<metric>``.
    """

    tasks = (TASK,)

    def __init__(self, model, tokenizer, direction, settings: dict, *,
                 subtract_layers: Sequence[int] | None, subtract_hooks: Sequence[str],
                 evaluate_edit_kwargs: dict):
        self.model, self.tokenizer, self.direction = model, tokenizer, direction
        self.model_identity = model_identity(model)
        self.settings = settings
        self.subtract_where = dict(layers=subtract_layers, hooks=tuple(subtract_hooks))
        self.kwargs = evaluate_edit_kwargs

    def identity(self, task: str) -> dict:
        """The settings of every row (prompt counts, perplexity windows, edit placement)."""
        return self.settings

    def __call__(self, config: dict, task: str) -> dict:
        """Row fields of the edit ``config``: the after metrics, and the before ones."""
        edit, alpha = config["edit"], config["alpha"]
        where = self.subtract_where if edit == "subtract" else {}
        report = evaluate_edit(self.model, self.tokenizer, self.direction, edit=edit,
                               alpha=1.0 if alpha is None else alpha, **where, **self.kwargs)
        fields = {"metric": "toxicity_toxic", "value": report.after.get("toxicity_toxic"),
                  "edit": edit, "alpha": alpha, "toxicity_toxic": None,
                  "toxicity_neutral": None, "perplexity": None}
        fields.update(report.after)
        fields.update({f"before_{k}": v for k, v in report.before.items()})
        return fields


def alpha_sweep(model, tokenizer, direction, alphas: Sequence[float], *,
                toxic_prompts: Sequence[str], neutral_prompts: Sequence[str] = (),
                perplexity_text: str | None = None, window: int = 256,
                max_windows: int | None = 4, out=None, include_project: bool = True,
                subtract_layers: Sequence[int] | None = None,
                subtract_hooks: Sequence[str] = ("resid_post",),
                **evaluate_edit_kwargs) -> list[dict]:
    """One row per setting: ``subtract`` at each alpha, then ``project``; see the module doc.

    ``subtract`` acts at ``subtract_layers`` (pass the direction's layer) and ``subtract_hooks``
    only: subtracting at every hook of every layer would accumulate ``3 * n_layers * alpha``
    along the stream. ``project`` uses ``evaluate_edit``'s defaults (every layer and hook; a
    projection applied twice changes nothing).
    """
    toxic_prompts, neutral_prompts = list(toxic_prompts), list(neutral_prompts)
    configs = [{"edit": "subtract", "alpha": float(a)} for a in alphas]
    if include_project:
        configs.append({"edit": "project", "alpha": None})
    if not configs:
        raise UsageError("Nothing to sweep: pass some alphas or include_project=True.")
    subtract_layers = None if subtract_layers is None else [int(i) for i in subtract_layers]
    settings = _settings(direction, toxic_prompts, neutral_prompts, perplexity_text, window,
                         max_windows,
                         dict(evaluate_edit_kwargs, subtract_hooks=list(subtract_hooks),
                              subtract_layers=subtract_layers))
    evaluator = EditEvaluator(
        model, tokenizer, direction, settings, subtract_layers=subtract_layers,
        subtract_hooks=subtract_hooks,
        evaluate_edit_kwargs=dict(evaluate_edit_kwargs, toxic_prompts=toxic_prompts,
                                  neutral_prompts=neutral_prompts,
                                  perplexity_text=perplexity_text, window=window,
                                  max_windows=max_windows))
    rows = [SweepRow(METHOD, config, lambda config=config: nullcontext(config))
            for config in configs]
    return run_sweep(rows, evaluator, out)
