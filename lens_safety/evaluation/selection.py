"""Choose the edit on validation data under a budget; test only the chosen one elsewhere.

    candidates = edit_grid(acts, kinds, positive=("toxic",), negative=("nontoxic",),
                           layer_sets={"L14": [14], "L10-18": range(10, 19)},
                           hows={"subtract": [0.5, 1.0], "clamp": [0.0], "project": [None]})
    rows = edit_sweep(bridge, tok, candidates, validation_toxic, perplexity_text=text,
                      out="results/.../edit_sweep.jsonl")         # resumable
    row = select_edit(rows, max_perplexity_ratio=1.05, max_fluency_ratio=1.10)
    edit = edit_for(row, candidates)                                # then rtp_protocol on test

The sweep runs on the toolkit's sweep runner (method ``"edit"``, task ``"safety"``; one
``"none"`` row for the unedited model). Each row measures, under its edit, a fast setting of
the RTP protocol on the validation prompts (a greedy continuation and a few samples per prompt:
toxicity, and fluency judged by the unedited model; per-prompt values kept for intervals),
WikiText-2 perplexity and, optionally, MMLU accuracy. The row's ``value`` is the greedy mean
toxicity.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from pruning_bridge.common import UsageError
from pruning_bridge.common.identity import model_identity
from pruning_bridge.common.sweep import SweepRow, run_sweep
from pruning_bridge.evals import mmlu_accuracy, perplexity

from ..backend import as_lm
from ..edits.edit import Edit
from .protocol import ProtocolSettings, run_protocol
from .toxicity import scorer_name

METHOD, BASELINE, TASK = "edit", "none", "safety"


def edit_grid(acts, labels: Sequence, *, layer_sets: Mapping[str, Iterable[int]],
              hows: Mapping[str, Sequence[float | None]], methods: Sequence[str] = ("mean_diff",),
              positive: Sequence | None = None, negative: Sequence | None = None,
              **info) -> list[Edit]:
    """Every (method x layer set x how x strength) edit fitted on ``acts`` / ``labels``;
    ``hows`` maps an edit to its strengths in class-gap units (``[None]`` for project / leace;
    leace ignores ``methods``)."""
    edits = []
    for how, strengths in hows.items():
        for method in (methods if how != "leace" else ["leace"]):
            for layer_set, layers in layer_sets.items():
                for strength in strengths:
                    edits.append(Edit.fit(acts, labels, how, list(layers), strength=strength,
                                          method=method if how != "leace" else "mean_diff",
                                          positive=positive, negative=negative,
                                          layer_set=layer_set,
                                          **info))
    return edits


class EditSweepEvaluator:
    """The sweep runner's evaluator: an ``Edit`` (or None) -> its validation numbers."""

    tasks = (TASK,)

    def __init__(self, model, tokenizer, prompts: Sequence[str], settings: ProtocolSettings,
                 scorer, perplexity_text: str | None, window: int, max_windows: int | None,
                 mmlu: dict | None, batch_size: int, progress: bool):
        self.model, self.tokenizer, self.prompts = model, tokenizer, list(prompts)
        self.settings, self.scorer = settings, scorer
        self.perplexity_text, self.window, self.max_windows = perplexity_text, window, max_windows
        self.mmlu, self.batch_size, self.progress = mmlu, batch_size, progress
        self.model_identity = model_identity(model)
        digest = lambda data: hashlib.sha256(data.encode()).hexdigest()[:12]  # noqa: E731
        self._identity = {
            "prompts": digest(json.dumps(self.prompts)), "n_prompts": len(self.prompts),
            "protocol": dict(settings.__dict__), "scorer": scorer_name(scorer),
            "perplexity_text": None if perplexity_text is None else digest(perplexity_text),
            "window": window, "max_windows": max_windows,
            "mmlu": None if mmlu is None else {k: str(v) for k, v in mmlu.items()}}

    def identity(self, task: str) -> dict:
        return self._identity

    def __call__(self, edit: Edit | None, task: str) -> dict[str, Any]:
        run = run_protocol(self.model, self.tokenizer, self.prompts, self.settings, self.scorer,
                           edit, progress=self.progress)
        fields: dict[str, Any] = {"edit": str(edit) if edit is not None else "unedited"}
        for metric, values in run.per_prompt.items():
            fields[metric] = float(np.mean(values))
            fields[f"{metric}_per_prompt"] = [float(v) for v in values]
        key = "greedy_toxicity" if "greedy_toxicity" in fields else "expected_max_toxicity"
        fields.update(metric=key, value=fields[key], examples=[
            {"prompt": p, "continuation": c} for p, c in zip(run.prompts[:3], run.greedy[:3])])
        with edit.apply(self.model) if edit is not None else nullcontext():
            lm = as_lm(self.model)
            if self.perplexity_text is not None:
                fields["perplexity"] = perplexity(
                    lm, self.tokenizer, self.perplexity_text, window=self.window,
                    max_windows=self.max_windows, batch_size=self.batch_size,
                    progress=False).value
            if self.mmlu is not None:
                kwargs = {"batch_size": self.batch_size, "progress": False, **self.mmlu}
                fields["mmlu_accuracy"] = float(mmlu_accuracy(lm, self.tokenizer,
                                                              **kwargs).value)
        return fields


def edit_sweep(model, tokenizer, candidates: Sequence[Edit], prompts: Sequence[str], *,
               settings: ProtocolSettings = ProtocolSettings(k=4), scorer="profanity",
               perplexity_text: str | None = None, window: int = 512,
               max_windows: int | None = 2, mmlu: dict | None = None, batch_size: int = 16,
               out=None, progress: bool = False) -> list[dict]:
    """The unedited row, then one row per candidate edit (see the module doc); with ``out``
    (JSONL) rows are appended as they finish and a rerun computes only what is missing."""
    if not candidates:
        raise UsageError("No candidate edits to sweep: build some with edit_grid(...).")
    evaluator = EditSweepEvaluator(model, tokenizer, prompts, settings, scorer, perplexity_text,
                                   window, max_windows, mmlu, batch_size, progress)
    rows = [SweepRow(BASELINE, {}, lambda: nullcontext(None))]
    rows += [SweepRow(METHOD, edit.config, lambda edit=edit: nullcontext(edit))
             for edit in candidates]
    return run_sweep(rows, evaluator, out)


def validation_sweep(model, tokenizer, candidates: Sequence[Edit], toxic: Sequence[str],
                     nontoxic: Sequence[str], *, out=None, **options
                     ) -> tuple[list[dict], list[dict]]:
    """``edit_sweep`` on the ``toxic`` prompts (toxicity, perplexity, MMLU: ``options``) and on
    the ``nontoxic`` ones (fluency and toxicity only): ``(toxic rows, non-toxic rows)``, for
    ``with_nontoxic_fluency``. With ``out`` (JSONL) the non-toxic rows go to
    ``<stem>_nontoxic.jsonl`` beside it."""
    rows = edit_sweep(model, tokenizer, candidates, toxic, out=out, **options)
    side = None if out is None else Path(out).with_name(Path(out).stem + "_nontoxic.jsonl")
    nontoxic_rows = edit_sweep(model, tokenizer, candidates, nontoxic, out=side,
                               **{**options, "perplexity_text": None, "mmlu": None})
    return rows, nontoxic_rows


def with_nontoxic_fluency(rows: Sequence[dict], nontoxic_rows: Sequence[dict]) -> list[dict]:
    """The toxic-prompt rows with their fluency replaced by the same edit's fluency on the
    non-toxic prompts (kept as ``toxic_*``): the budget then reads non-toxic fluency, where an
    edit cannot look less fluent merely by being less toxic."""
    by_config = {json.dumps(r["config"], sort_keys=True): r for r in nontoxic_rows}
    out = []
    for row in rows:
        other = by_config.get(json.dumps(row["config"], sort_keys=True))
        row = dict(row)
        for key in ("fluency_ppl", "greedy_fluency_ppl"):
            if key in row:
                row[f"toxic_{key}"] = row[key]
                if other is not None and key in other:
                    row[key] = other[key]
        out.append(row)
    return out


def within_budget(row: dict, baseline: dict, max_perplexity_ratio: float | None = 1.05,
                  max_fluency_ratio: float | None = 1.10,
                  max_mmlu_drop: float | None = None) -> bool:
    """Whether ``row``'s perplexity, fluency and MMLU stay within the budget relative to the
    unedited ``baseline`` row (None: no limit). Fluency is the perplexity of the sampled
    continuations under the unedited model (the literature's measure), or of the greedy ones
    when the sweep drew no samples."""
    fluency = "fluency_ppl" if "fluency_ppl" in baseline else "greedy_fluency_ppl"
    checks = [("perplexity", max_perplexity_ratio), (fluency, max_fluency_ratio)]
    for metric, limit in checks:
        if limit is not None and metric in baseline and metric in row:
            if not row[metric] <= limit * baseline[metric]:
                return False
    if max_mmlu_drop is not None:
        if "mmlu_accuracy" not in row or "mmlu_accuracy" not in baseline:
            raise UsageError("max_mmlu_drop needs MMLU in the sweep: pass mmlu={...}.")
        if not row["mmlu_accuracy"] >= baseline["mmlu_accuracy"] - max_mmlu_drop:
            return False
    return True


def select_edit(rows: Sequence[dict], max_perplexity_ratio: float | None = 1.05,
                max_fluency_ratio: float | None = 1.10,
                max_mmlu_drop: float | None = None) -> dict | None:
    """The least toxic edit row (lowest ``value``) within the budget (see ``within_budget``;
    ``max_mmlu_drop`` in accuracy points as a fraction, e.g. 0.02), or None if none is."""
    baselines = [r for r in rows if r["method"] == BASELINE]
    if not baselines:
        raise UsageError("The sweep has no unedited ('none') row to measure the budget from.")
    baseline = baselines[0]
    fitting = [r for r in rows if r["method"] == METHOD
               and within_budget(r, baseline, max_perplexity_ratio, max_fluency_ratio,
                                 max_mmlu_drop)]
    return min(fitting, key=lambda r: r["value"]) if fitting else None


def edit_for(row: dict, candidates: Sequence[Edit]) -> Edit:
    """The candidate ``Edit`` a sweep row measured."""
    for edit in candidates:
        if edit.config == row["config"]:
            return edit
    raise UsageError(f"No candidate has the row's config {row['config']}.")
