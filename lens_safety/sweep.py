"""Alpha sweep of ``subtract`` (plus one ``project`` row): the toxicity/perplexity trade-off.

    rows = alpha_sweep(bridge, tok, direction, [0, 2, 4, 8], toxic_prompts=..., neutral_prompts=...,
                       perplexity_text=text, window=128, max_windows=4, out="sweep.jsonl")

Each row: ``edit``, ``alpha``, the after metrics (``toxicity_toxic``, ``toxicity_neutral``,
``perplexity``, ...) and the unedited values as ``before_<metric>``. With ``out`` (JSONL through
:class:`pruning_bridge.common.results.ResultsLog`, method ``"edit"``, task ``"safety"``), each row is
appended as it finishes and settings already in the file are not recomputed.
"""

from __future__ import annotations

from typing import Sequence

from pruning_bridge.common.errors import UsageError
from pruning_bridge.common.results import ResultsLog

from .evaluation import evaluate_edit


def _settings(toxic, neutral, window, max_windows, kwargs) -> dict:
    keep = {k: v for k, v in kwargs.items()
            if k in ("max_new_tokens", "scorer", "layers", "hooks", "probe_layer", "mmlu",
                     "subtract_layers", "subtract_hooks")
            and (isinstance(v, (str, int, float, list, tuple, dict)) or v is None)}
    return {"n_toxic": len(toxic), "n_neutral": len(neutral), "window": window,
            "max_windows": max_windows, **{k: list(v) if isinstance(v, tuple) else v
                                           for k, v in keep.items()}}


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
    settings_list = [("subtract", float(a)) for a in alphas]
    if include_project:
        settings_list.append(("project", None))
    if not settings_list:
        raise UsageError("Nothing to sweep: pass some alphas or include_project=True.")
    log = ResultsLog(out)
    settings = _settings(toxic_prompts, neutral_prompts, window, max_windows,
                         dict(evaluate_edit_kwargs, subtract_hooks=list(subtract_hooks),
                              subtract_layers=None if subtract_layers is None
                              else [int(i) for i in subtract_layers]))
    done = {}
    for row in log.rows:
        if row.get("method") == "edit" and row.get("task") == "safety" \
                and row.get("settings") == settings:
            done[(row["config"]["edit"], row["config"]["alpha"])] = row
    rows = []
    for edit, alpha in settings_list:
        config = {"edit": edit, "alpha": alpha}
        if (edit, alpha) in done:
            rows.append(done[(edit, alpha)])
            continue
        where = (dict(layers=subtract_layers, hooks=tuple(subtract_hooks))
                 if edit == "subtract" else {})
        report = evaluate_edit(model, tokenizer, direction, toxic_prompts=toxic_prompts,
                               neutral_prompts=neutral_prompts, edit=edit,
                               alpha=1.0 if alpha is None else alpha,
                               perplexity_text=perplexity_text, window=window,
                               max_windows=max_windows, **where, **evaluate_edit_kwargs)
        row = {"method": "edit", "config": config, "task": "safety", "settings": settings,
               "metric": "toxicity_toxic", "value": report.after.get("toxicity_toxic"),
               "edit": edit, "alpha": alpha, "toxicity_toxic": None, "toxicity_neutral": None,
               "perplexity": None}
        row.update(report.after)
        row.update({f"before_{k}": v for k, v in report.before.items()})
        log.append(row)
        rows.append(row)
    return rows
