"""The detoxification study end to end: fit candidate edits on RTP's training prompts, choose
one on validation prompts under a budget, and test only that one with the full RTP protocol.

    result = run_detox_study(bridge, tok, DetoxSettings(k=25), data_dir=..., folder=out,
                             model_name="smollm2-135m", probe_study=study)
    print(result.report); result.selected_edit; result.rows   # sweep rows (validation)

Steps (each result is written to ``folder`` atomically as it finishes and reused by a rerun;
a damaged one is reported in one warning and recomputed):

1. RealToxicityPrompts split by prompt into train / validation / test (``fractions``, seed).
2. The scorer's agreement with the Perspective scores stored with the RTP texts.
3. Residuals of the training prompts per direction source: ``rtp_prompts`` (toxic vs nontoxic
   prompts, last token) and ``rtp_continuations`` (prompt + original continuation, mean over
   tokens after the first, labelled by the continuation's Perspective toxicity >= 0.5).
4. Candidate edits (source x layer set x how x strength, :func:`edit_grid`), swept on the
   validation toxic prompts in a fast setting (greedy toxicity; ``sweep_k`` samples per prompt
   for fluency and the expected maximum; WikiText-2 perplexity), and on the validation
   non-toxic prompts for the fluency budget (``budget_fluency="nontoxic"``, the default: on
   toxic prompts a less toxic continuation reads as less fluent to the unedited model).
5. :func:`select_edit` under ``max_perplexity_ratio`` / ``max_fluency_ratio`` /
   ``max_mmlu_drop``; the chosen edit is saved to ``folder/selected_edit``.
6. The test prompts (toxic and nontoxic) through :func:`rtp_protocol` with ``k`` samples, and
   perplexity, MMLU and the probe's harmful score before / after.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pruning_bridge.common import JsonDataclass, UsageError
from pruning_bridge.common.atomic import write_json_atomic
from pruning_bridge.common.identity import weights_identity
from pruning_bridge.common.jsonable import read_json
from pruning_bridge.evals.data import load_wikitext2

from .backend import dims
from .data.rtp import RtpSplit, load_rtp, split_rtp
from .edits.edit import Edit
from .evaluation.held_out import held_out_identity, held_out_values, text_prefix
from .evaluation.protocol import ProtocolReport, ProtocolSettings, rtp_protocol
from .evaluation.selection import (edit_for, edit_grid, edit_sweep, select_edit,
                                   validation_sweep, with_nontoxic_fluency)
from .evaluation.stats import bootstrap_interval, paired_difference
from .evaluation.toxicity import scorer_agreement
from .probing.caching import cache_residuals
from .probing.probes import harmful_probability

SOURCES = ("rtp_prompts", "rtp_continuations")


def layer_sets(n_layers: int, names: Sequence[str]) -> dict[str, list[int]]:
    """Named places to edit, by depth: ``middle`` (one layer at n/2), ``late`` (3n/4),
    ``window`` (n/3 .. 2n/3), ``late_window`` (2n/3 .. n-1), ``last_fifth`` (4n/5 .. n-1),
    ``all``; or explicit layers,
    ``L12`` or ``L20-24`` (inclusive)."""
    n = n_layers
    known = {"middle": [n // 2], "late": [3 * n // 4],
             "window": list(range(n // 3, 2 * n // 3 + 1)),
             "late_window": list(range(2 * n // 3, n)),
             "last_fifth": list(range(4 * n // 5, n)), "all": list(range(n))}
    out = {}
    for name in names:
        match = re.fullmatch(r"L(\d+)(?:-(\d+))?", name)
        if name in known:
            out[name] = known[name]
        elif match:
            first, last = int(match[1]), int(match[2] or match[1])
            if not first <= last < n:
                raise UsageError(f"Layer set {name!r} is outside this model's {n} layers "
                                 f"(0..{n - 1}).")
            out[name] = list(range(first, last + 1))
        else:
            raise UsageError(f"Unknown layer set {name!r}; use {', '.join(known)}, or L12 / "
                             f"L20-24.")
    return out


@dataclass(frozen=True)
class DetoxSettings:
    """Every choice of the study. ``hows``: ``(how, strengths)`` pairs (strengths in class-gap
    units, None for project / leace); ``wheres``: layer-set names (see ``layer_sets``)."""

    fractions: tuple[float, float, float] = (0.5, 0.25, 0.25)
    seed: int = 0
    sources: tuple[str, ...] = SOURCES
    wheres: tuple[str, ...] = ("middle", "late", "window")
    hows: tuple[tuple[str, tuple], ...] = (("subtract", (0.5, 1.0)), ("clamp", (0.0, 0.5)),
                                           ("project", (None,)), ("leace", (None,)))
    n_train: int | None = None           # training prompts per kind to fit on (None: all)
    n_validation: int | None = None      # validation toxic prompts for the sweep (None: all)
    sweep_k: int = 4                     # samples per validation prompt (fluency); 0: greedy only
    sweep_window: int = 512
    sweep_windows: int = 2
    max_perplexity_ratio: float = 1.05
    max_fluency_ratio: float = 1.10
    max_mmlu_drop: float | None = None   # needs sweep_mmlu
    budget_fluency: str = "nontoxic"     # whose fluency the budget reads: nontoxic or toxic
    sweep_mmlu: int | None = None        # MMLU questions per sweep row (None: none)
    k: int = 25
    n_test_toxic: int | None = None      # None: every test prompt
    n_test_nontoxic: int | None = None
    test_window: int = 1024
    test_windows: int | None = 8
    test_mmlu: int | None = 451
    scorer: str = "profanity"
    batch_size: int = 32
    max_new_tokens: int = 20

    def __post_init__(self):
        if self.budget_fluency not in ("nontoxic", "toxic"):
            raise UsageError(f"budget_fluency={self.budget_fluency!r}: the budget reads the "
                             f"fluency of 'nontoxic' (the default) or 'toxic' prompts.")


@dataclass
class DetoxResult(JsonDataclass):
    """What the study found: the scorer's agreement, the sweep, the choice and its test."""

    settings: dict[str, Any]
    agreement: dict[str, Any]
    rows: list[dict[str, Any]]
    selected: dict[str, Any] | None
    test: dict[str, Any] = field(default_factory=dict)  # metric -> before/after/difference
    examples: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] | None = None  # the ProtocolReport's summary
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each phase

    @property
    def selected_edit(self) -> str | None:
        return None if self.selected is None else self.selected["edit"]


def source_data(split: RtpSplit, source: str,
                n: int | None = None) -> tuple[list[str], list[str], str]:
    """``(texts, labels, pool)`` of the training split (the first ``n`` prompts of each kind)
    for a direction ``source``."""
    train = [p for kind in ("toxic", "nontoxic")
             for p in [p for p in split.train if p.kind == kind][:n]]
    if source == "rtp_prompts":
        return ([p.text for p in train], [p.kind for p in train], "last")
    if source == "rtp_continuations":
        rows = [p for p in train if not np.isnan(p.continuation_toxicity)]
        return ([p.text + p.continuation for p in rows],
                ["toxic" if p.continuation_toxicity >= 0.5 else "nontoxic" for p in rows],
                "mean_after_first")
    raise UsageError(f"Unknown direction source {source!r}; use one of {', '.join(SOURCES)}.")


def candidate_edits(model, tokenizer, split: RtpSplit, settings: DetoxSettings,
                    folder: Path | None, model_name: str, progress: bool) -> list[Edit]:
    """Every candidate of the grid, fitted on the training split's residuals (resid_post)."""
    n_layers, _ = dims(model)
    where = layer_sets(n_layers, settings.wheres)
    candidates = []
    for source in settings.sources:
        texts, labels, pool = source_data(split, source, settings.n_train)
        store = None if folder is None else folder / f"acts_{source}.safetensors"
        acts = cache_residuals(model, tokenizer, texts, hook="resid_post", pool=pool,
                               batch_size=settings.batch_size, progress=progress, store=store)
        candidates += edit_grid(acts, labels, layer_sets=where,
                                hows={how: list(s) for how, s in settings.hows},
                                positive=("toxic",), negative=("nontoxic",), source=source,
                                model=model_name, pool=pool)
    return candidates


def _paired(before: Sequence[float], after: Sequence[float]) -> dict[str, Any]:
    return {"before": bootstrap_interval(before).to_dict(),
            "after": bootstrap_interval(after).to_dict(),
            "difference": paired_difference(before, after).to_dict()}


def _extras(model, tokenizer, edit: Edit, report: ProtocolReport, settings: DetoxSettings,
            data_dir, probe_study, progress: bool
            ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Perplexity, MMLU and the probe's harmful score, before and under ``edit``: their
    summary, and the values per side (``perplexity``, ``mmlu_correct`` per question, ``probe``
    per prompt)."""
    out: dict[str, Any] = {}
    text = text_prefix(tokenizer, load_wikitext2("test", data_dir), settings.test_window,
                       settings.test_windows)
    values = {}
    for side in ("before", "after"):
        values[side] = held_out_values(model, tokenizer, edit if side == "after" else None,
                                       text, window=settings.test_window,
                                       windows=settings.test_windows, mmlu=settings.test_mmlu,
                                       batch_size=settings.batch_size, data_dir=data_dir,
                                       progress=progress)
        if probe_study is None:
            continue
        run, layer = getattr(report, side)["toxic"], probe_study.best_layer
        with edit.apply(model) if side == "after" else nullcontext():
            acts = cache_residuals(model, tokenizer,
                                   [p + c for p, c in zip(run.prompts, run.greedy)],
                                   hook=probe_study.settings.hook, pool=probe_study.settings.pool,
                                   layers=[layer], batch_size=settings.batch_size,
                                   progress=False)[0]
        values[side]["probe"] = harmful_probability(probe_study.binary, acts, layer).tolist()
    out["perplexity"] = {"before": values["before"]["perplexity"],
                         "after": values["after"]["perplexity"],
                         "ratio": values["after"]["perplexity"] / values["before"]["perplexity"]}
    if "mmlu_correct" in values["before"]:
        out["mmlu_accuracy"] = _paired(values["before"]["mmlu_correct"],
                                       values["after"]["mmlu_correct"])
    if "probe" in values["before"]:
        out["probe_harmful_toxic"] = _paired(values["before"]["probe"], values["after"]["probe"])
    return out, values


def examples(report: ProtocolReport, n: int = 5) -> list[dict[str, Any]]:
    """The ``n`` toxic test prompts whose greedy continuation changed toxicity most."""
    before, after = report.before["toxic"], report.after["toxic"]
    order = np.argsort(np.asarray(after.greedy_scores) - np.asarray(before.greedy_scores))
    return [{"prompt": before.prompts[i], "before": before.greedy[i], "after": after.greedy[i],
             "toxicity_before": before.greedy_scores[i],
             "toxicity_after": after.greedy_scores[i]} for i in order[:n]]


def _saved_result(path: Path, settings: dict[str, Any]) -> DetoxResult | None:
    """The result saved at ``path`` if it was computed with ``settings``; None otherwise (a
    damaged file is reported in one warning)."""
    rerun = "Rerunning the study and overwriting it."
    try:
        saved = read_json(path, rerun)
        if saved["settings"] != settings:
            return None
        return DetoxResult(**saved)
    except UsageError as error:
        warnings.warn(str(error), stacklevel=3)
    except (KeyError, TypeError) as error:
        problem = f"no key {error}" if isinstance(error, KeyError) else str(error)
        warnings.warn(f"{path} is not a saved detox study ({problem}). {rerun}", stacklevel=3)
    return None


def run_detox_study(model, tokenizer, settings: DetoxSettings = DetoxSettings(), *,
                    data_dir=None, folder=None, model_name: str = "model", probe_study=None,
                    progress: bool = True) -> DetoxResult:
    """The study (see the module doc) on ``model`` (a HookBridge or a TransformerLens model)."""
    folder = None if folder is None else Path(folder)
    result_path = None if folder is None else folder / "detox_study.json"
    identity = weights_identity(model)
    fingerprint = {**asdict(settings), "model": model_name, "model_identity": identity,
                   "data": str(data_dir) if data_dir else "hub"}
    if result_path is not None and result_path.exists():
        saved = _saved_result(result_path, json.loads(json.dumps(fingerprint)))
        if saved is not None:
            return saved
    seconds, tic = {}, time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal tic
        seconds[phase] = round(time.perf_counter() - tic, 1)
        tic = time.perf_counter()

    split = split_rtp(load_rtp(data_dir), settings.fractions, settings.seed)
    agreement = scorer_agreement(settings.scorer, data_dir)
    lap("data_and_agreement")
    candidates = candidate_edits(model, tokenizer, split, settings, folder, model_name,
                                 progress)
    lap("fit")
    fast = ProtocolSettings(k=settings.sweep_k, max_new_tokens=settings.max_new_tokens,
                            seed=settings.seed, batch_size=settings.batch_size)
    mmlu = ({"limit": settings.sweep_mmlu, "data_dir": data_dir} if settings.sweep_mmlu
            else None)
    sweep = dict(settings=fast, scorer=settings.scorer,
                 perplexity_text=text_prefix(tokenizer, load_wikitext2("test", data_dir),
                                             settings.sweep_window, settings.sweep_windows),
                 window=settings.sweep_window, max_windows=settings.sweep_windows, mmlu=mmlu,
                 batch_size=settings.batch_size, progress=progress,
                 out=None if folder is None else folder / "edit_sweep.jsonl")
    toxic = split.texts("validation", "toxic", settings.n_validation)
    if settings.budget_fluency == "nontoxic":  # fluency where being less toxic costs nothing
        rows = with_nontoxic_fluency(*validation_sweep(
            model, tokenizer, candidates, toxic,
            split.texts("validation", "nontoxic", settings.n_validation), **sweep))
    else:
        rows = edit_sweep(model, tokenizer, candidates, toxic, **sweep)
    lap("sweep")
    row = select_edit(rows, settings.max_perplexity_ratio, settings.max_fluency_ratio,
                      settings.max_mmlu_drop)
    result = DetoxResult(json.loads(json.dumps(fingerprint)), agreement.to_dict(), rows, row,
                         seconds=seconds)
    if row is not None:
        edit = edit_for(row, candidates)
        if folder is not None:
            edit.save(folder / "selected_edit")
        test = {"toxic": split.texts("test", "toxic", settings.n_test_toxic),
                "nontoxic": split.texts("test", "nontoxic", settings.n_test_nontoxic)}
        protocol = ProtocolSettings(k=settings.k, max_new_tokens=settings.max_new_tokens,
                                    seed=settings.seed, batch_size=settings.batch_size)
        report = rtp_protocol(model, tokenizer, test, protocol, settings.scorer, edit,
                              progress=progress)
        lap("test_protocol")
        if folder is not None:
            report.to_json(folder / "test_protocol.json")
        result.report = report.summary
        result.test, values = _extras(model, tokenizer, edit, report, settings, data_dir,
                                      probe_study, progress)
        if folder is not None:  # for compare_edits(measured=folder): not computed again
            identity = held_out_identity(model, settings.test_window, settings.test_windows,
                                         settings.test_mmlu, settings.batch_size, data_dir)
            write_json_atomic(folder / "test_extras.json",
                              {"edit": str(edit), "identity": identity, **values})
        result.examples = examples(report)
        lap("test_extras")
    if result_path is not None:
        result.to_json(result_path)
    return result
