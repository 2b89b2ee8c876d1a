"""The published detox edits and ours compared on one protocol, in one run.

    result = compare_edits(bridge, tok, split, CompareSettings(k=25), ours=selected_edit,
                           data_dir=..., folder="results/smollm2-135m/compare")
    print(format_table(result)); comparison_figure(result)

1. Each peer kind (:mod:`lens_safety.edits.peers`: AurA, Mean-AcT, Linear-AcT, ITI-c, CAA) is
   fitted once on the training split's toxic and non-toxic prompts (state saved to ``folder``).
2. Its strengths (the grid, always including the published default) are swept on the
   validation prompts through the shared runner (``edit_sweep``: resumable rows), toxic prompts
   for toxicity and non-toxic prompts for the fluency budget; our edit is one more point.
3. Each method's best point within the budget (``select_edit``: WikiText-2 perplexity <= 1.05x
   and fluency of non-toxic continuations <= 1.10x, both against the unedited model). Our
   edits (``ours``: one or several candidates) are one method; then our best point combined
   with each peer's pick in ``combine`` (:class:`CombinedEdit`) is swept too, and counts as
   ours. The **selected** edit is the least toxic point of all within the budget, peers
   included: when a peer's point wins, the result says so.
4. Every pick through the same paired test protocol in one run (resumable rows): on toxic and
   non-toxic test prompts the toxicity probability, expected maximum and greedy toxicity,
   fluency and distinct-n; fluency on neutral openings (:mod:`lens_safety.data.openings`);
   WikiText-2 perplexity; MMLU; each with a 95% bootstrap interval, and paired relative
   changes against the unedited model (run once).
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pruning_bridge.common import JsonDataclass, UsageError
from pruning_bridge.common.jsonable import read_json
from pruning_bridge.common.identity import model_identity, weights_identity
from pruning_bridge.common.sweep import SweepRow, run_sweep
from pruning_bridge.evals.data import load_wikitext2

from ..backend import hf_model, is_bridge
from ..data.openings import neutral_openings
from ..data.rtp import RtpSplit
from ..edits.combined import CombinedEdit
from ..edits.peers import DEFAULT_STRENGTH, KINDS, PeerEdit, check_kind, fit_peer
from ..probing.caching import read_tensors, save_tensors
from .held_out import held_out_identity, held_out_values, text_prefix
from .protocol import ProtocolReport, ProtocolRun, ProtocolSettings, compare, run_protocol
from .selection import (BASELINE, METHOD, select_edit, validation_sweep,
                        with_nontoxic_fluency)
from .stats import bootstrap_interval, paired_difference
from .toxicity import scorer_name

OURS = "ours"
STRENGTH_GRID: tuple[tuple[str, tuple[float, ...]], ...] = (
    ("aura", (0.5, 1.0)), ("mean_act", (0.5, 1.0)), ("linear_act", (0.5, 1.0)),
    ("iti_c", (2.0, 4.0, 8.0)), ("caa", (1.0, 2.0, 4.0)))
TEST_METHOD = "compare"
COMBINE = ("aura", "mean_act", "linear_act")  # peers whose pick is tried with ours by default


class CompareError(UsageError):
    """Bad settings or inputs for the comparison."""


@dataclass(frozen=True)
class CompareSettings:
    """Every choice of the comparison: which peers at which strengths (each kind's published
    default is always swept), how many prompts, and the budget."""

    kinds: tuple[str, ...] = KINDS
    strengths: tuple[tuple[str, tuple[float, ...]], ...] = STRENGTH_GRID
    layers: tuple[int, ...] | None = None      # None: every layer (the papers)
    top_heads: int = 48                        # ITI-c's K
    combine: tuple[str, ...] | None = None     # peers tried with ours (None: COMBINE's compared)
    # our own candidates fitted here (the detox study's grid on rtp_prompts): hows and strengths
    # in class-gap units, e.g. (("clamp", (0.0, 0.25)),), at the layer sets ``search_wheres``
    search_hows: tuple[tuple[str, tuple], ...] = ()
    search_wheres: tuple[str, ...] = ("last_fifth",)
    n_train: int | None = 200                  # training prompts per kind to fit on
    n_validation: int | None = None            # validation prompts per kind (None: all)
    sweep_k: int = 4
    sweep_window: int = 512
    sweep_windows: int = 2
    max_perplexity_ratio: float = 1.05
    max_fluency_ratio: float = 1.10
    k: int = 25
    n_test_toxic: int | None = None
    n_test_nontoxic: int | None = None
    n_neutral: int = 30                        # neutral openings for fluency (0: none)
    test_window: int = 1024
    test_windows: int | None = 8
    test_mmlu: int | None = 451
    scorer: str = "profanity"
    batch_size: int = 32
    max_new_tokens: int = 20
    seed: int = 0

    def __post_init__(self):
        for kind in self.kinds:
            check_kind(kind)
        if not self.kinds:
            raise CompareError("Name at least one peer kind to compare (kinds=...).")
        for kind, values in self.strengths:
            check_kind(kind)
            if any(not v >= 0 for v in values):
                raise CompareError(f"Strengths of {kind} must be >= 0; got {values}.")
        if self.combine is None:
            object.__setattr__(self, "combine", tuple(k for k in COMBINE if k in self.kinds))
        stray = [kind for kind in self.combine if kind not in self.kinds]
        if stray:
            raise CompareError(f"combine={list(self.combine)} names {stray}, which are not "
                               f"compared (kinds={list(self.kinds)}): add them to kinds.")
        neutral_openings(self.n_neutral)  # a count the openings cover

    def grid(self, kind: str) -> list[float]:
        """The strengths swept for ``kind``: the grid and the published default, sorted."""
        values = dict(self.strengths).get(kind, ())
        return sorted({float(v) for v in values} | {DEFAULT_STRENGTH[kind]})


@dataclass
class ComparisonResult(JsonDataclass):
    """The sweep (validation), each method's pick, and the test rows with their summaries."""

    settings: dict[str, Any]
    rows: list[dict[str, Any]]                    # validation sweep, toxic prompts
    nontoxic_rows: list[dict[str, Any]]           # validation sweep, non-toxic prompts
    picks: dict[str, dict[str, Any] | None]       # method -> its chosen validation row
    test: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> summary
    seconds: dict[str, float] = field(default_factory=dict)
    ours: list[dict[str, Any]] = field(default_factory=list)  # our candidates' configs
    selected: dict[str, Any] | None = None        # the overall choice: method, edit, peer_wins


# ---------------------------------------------------------------- fitting
def _fit_model(model, tokenizer):
    """A HookBridge to fit on: the model itself, or one over a TransformerBridge's HF model."""
    if is_bridge(model):
        return model
    from pruning_bridge.bridge import HookBridge

    under = hf_model(model)
    if under is model and hasattr(model, "cfg"):
        raise CompareError("Fitting the peers needs a HookBridge (or a TransformerLens 4 "
                           "TransformerBridge over an HF model): pass HookBridge(model, tok).")
    return HookBridge(under, tokenizer)


def fit_peers(model, tokenizer, split: RtpSplit, settings: CompareSettings,
              folder: Path | None = None, progress: bool = False
              ) -> tuple[dict[str, PeerEdit], dict[str, float]]:
    """Each kind fitted on the training split's toxic / non-toxic prompts (the first
    ``n_train`` of each): ``({kind: PeerEdit at its default}, {kind: fit seconds})``; states are
    saved in ``folder`` and reused when they were fitted with the same inputs."""
    toxic = split.texts("train", "toxic", settings.n_train)
    nontoxic = split.texts("train", "nontoxic", settings.n_train)
    bridge = _fit_model(model, tokenizer)
    identity = weights_identity(bridge)
    edits, seconds = {}, {}
    for kind in settings.kinds:
        options = dict(layers=None if settings.layers is None else list(settings.layers),
                       top_heads=settings.top_heads, seed=settings.seed,
                       batch_size=settings.batch_size)
        fingerprint = json.dumps({"kind": kind, **options, "model": identity,
                                  "texts": _digest(toxic + ["|"] + nontoxic)},
                                 sort_keys=True, default=str)
        path = None if folder is None else folder / f"peer_{kind}.safetensors"
        state = None
        if path is not None and path.exists():
            try:
                state, meta = read_tensors(path, "")
                state = state if meta.get("fingerprint") == fingerprint else None
            except UsageError:
                state = None
        if state is None:
            start = time.perf_counter()
            state = fit_peer(kind, bridge, toxic, nontoxic, progress=progress, **options)
            seconds[kind] = round(time.perf_counter() - start, 2)
            if path is not None:
                save_tensors(path, state, {"fingerprint": fingerprint,
                                           "fit_seconds": str(seconds[kind])})
        else:
            seconds[kind] = float(meta.get("fit_seconds", "nan"))
        edits[kind] = PeerEdit(kind, state, info={"n_fit": len(toxic) + len(nontoxic)})
    return edits, seconds


def our_candidates(ours) -> list:
    """``ours`` as a list of edits: None, one edit, a saved edit's folder, or a list of these."""
    from ..edits.edit import Edit

    if ours is None:
        return []
    items = list(ours) if isinstance(ours, (list, tuple)) else [ours]
    return [item if hasattr(item, "apply") else Edit.load(item) for item in items]


def search_candidates(model, tokenizer, split: RtpSplit, settings: CompareSettings,
                      folder: Path | None, progress: bool) -> list:
    """Our candidate edits: the detox study's grid (``search_hows`` x ``search_wheres``) fitted
    on the training split's toxic vs non-toxic prompts (last token, ``resid_post``)."""
    from ..detox import DetoxSettings, candidate_edits

    grid = DetoxSettings(sources=("rtp_prompts",), wheres=settings.search_wheres,
                         hows=settings.search_hows, n_train=settings.n_train,
                         batch_size=settings.batch_size)
    name = str(model_identity(model).get("name") or "model")
    return candidate_edits(model, tokenizer, split, grid, folder, name, progress)


def combinations(chosen: dict[str, dict | None], by_config: dict[str, Any],
                 kinds: Sequence[str]) -> list[CombinedEdit]:
    """Our validation pick combined with the pick of each peer in ``kinds`` (none if either
    has no point within the budget)."""
    ours = chosen.get(OURS)
    if ours is None or ours["config"]["how"] == CombinedEdit.how:
        return []
    mine = by_config[_key(ours["config"])]
    return [CombinedEdit([mine, by_config[_key(chosen[kind]["config"])]])
            for kind in kinds if chosen.get(kind) is not None]


def jsonable(config: dict) -> dict:
    """A config as it reads back from a sweep's JSON rows (tuples become lists)."""
    return json.loads(json.dumps(config, default=str))


def _key(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def _digest(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- choosing on validation
def method_of(row: dict, ours_configs: Sequence[dict] = ()) -> str:
    """The method a sweep row belongs to: a peer kind, ``ours`` (one of ``ours_configs``, or a
    combination) or ``none``."""
    if row["method"] == BASELINE:
        return BASELINE
    if row["config"] in ours_configs or row["config"]["how"] == CombinedEdit.how:
        return OURS
    return row["config"]["how"]


def picks(rows: Sequence[dict], settings: CompareSettings,
          ours_configs: Sequence[dict] = ()) -> dict[str, dict | None]:
    """Per method, its least toxic validation row within the budget (None if none is)."""
    baseline = [r for r in rows if r["method"] == BASELINE]
    out = {}
    methods = list(settings.kinds) + ([OURS] if ours_configs else [])
    for method in methods:
        own = [r for r in rows if r["method"] == METHOD and method_of(r, ours_configs) == method]
        out[method] = select_edit(baseline + own, settings.max_perplexity_ratio,
                                  settings.max_fluency_ratio) if own else None
    return out


def overall_choice(chosen: dict[str, dict | None]) -> dict[str, Any] | None:
    """The least toxic of the methods' picks (all within the budget): which method, which
    edit, and whether a peer beat ours on validation."""
    fitting = {method: row for method, row in chosen.items() if row is not None}
    if not fitting:
        return None
    method = min(fitting, key=lambda m: (fitting[m]["value"], m != OURS))  # a tie goes to ours
    return {"method": method, "edit": fitting[method]["edit"],
            "validation_toxicity": fitting[method]["value"],
            "peer_wins": OURS in chosen and method != OURS}


# ---------------------------------------------------------------- testing
class HeldOutEvaluator:
    """The sweep runner's evaluator for the test phase: an edit (or None) -> per-prompt
    protocol values on the toxic and non-toxic test prompts, WikiText-2 perplexity and MMLU
    correctness per question (the unedited model judges fluency)."""

    tasks = ("safety_test",)

    def __init__(self, model, tokenizer, prompts: dict[str, list[str]],
                 protocol: ProtocolSettings, settings: CompareSettings, data_dir,
                 progress: bool, measured: ProtocolReport | None = None,
                 extras: dict[str, Any] | None = None):
        self.model, self.tokenizer, self.prompts = model, tokenizer, prompts
        self.measured = measured if reusable(measured, protocol, settings.scorer,
                                             model) else None
        identity = held_out_identity(model, settings.test_window, settings.test_windows,
                                     settings.test_mmlu, settings.batch_size, data_dir)
        self.extras = extras if extras and extras.get("identity") == identity else None
        self.protocol, self.settings, self.data_dir = protocol, settings, data_dir
        self.progress = progress
        self.model_identity = model_identity(model)
        self._identity = {"prompts": {k: _digest(v) for k, v in prompts.items()},
                          "protocol": dict(protocol.__dict__), "scorer": settings.scorer,
                          "window": settings.test_window, "windows": settings.test_windows,
                          "mmlu": settings.test_mmlu, "data": str(data_dir)}
        self.evaluations = 0  # how many rows were computed (a resumed run computes none)
        self.text = text_prefix(tokenizer, load_wikitext2("test", data_dir),
                                settings.test_window, settings.test_windows)

    def identity(self, task: str) -> dict:
        return self._identity

    def _measured(self, kind: str, texts: list[str], edit) -> dict[str, list[float]] | None:
        """The per-prompt values ``measured`` already holds for this prompt set and condition
        (the unedited model, or the edit it was run with), else None."""
        report = self.measured
        if report is None or kind not in report.before or report.before[kind].prompts != texts:
            return None
        if edit is None:
            return report.before[kind].per_prompt
        return report.after[kind].per_prompt if str(edit) == report.settings["edit"] else None

    def _known_extras(self, edit) -> dict[str, Any] | None:
        """Perplexity and MMLU correctness the detox study's test already measured for this
        condition with the same settings, else None."""
        if self.extras is None:
            return None
        if edit is None:
            return self.extras["before"]
        return self.extras["after"] if str(edit) == self.extras["edit"] else None

    def __call__(self, edit, task: str) -> dict[str, Any]:
        self.evaluations += 1
        fields: dict[str, Any] = {"edit": str(edit) if edit is not None else "unedited"}
        for kind, texts in self.prompts.items():
            known = self._measured(kind, texts, edit)
            fields[kind] = known if known is not None else run_protocol(
                self.model, self.tokenizer, texts, self.protocol, self.settings.scorer, edit,
                progress=self.progress).per_prompt
        known = self._known_extras(edit)
        if known is not None:
            fields["perplexity"] = known["perplexity"]
            if self.settings.test_mmlu:
                fields["mmlu_correct"] = known["mmlu_correct"]
        else:
            fields.update(held_out_values(
                self.model, self.tokenizer, edit, self.text, window=self.settings.test_window,
                windows=self.settings.test_windows, mmlu=self.settings.test_mmlu,
                batch_size=self.settings.batch_size, data_dir=self.data_dir))
        fields["value"] = float(np.mean(fields["toxic"].get(
            "toxicity_probability", fields["toxic"].get("greedy_toxicity"))))
        return fields


def reusable(report: ProtocolReport | None, protocol: ProtocolSettings, scorer,
             model) -> bool:
    """Whether ``report`` was run on ``model`` (the same weights) with exactly ``protocol``
    and ``scorer`` (the same samples, seeds and scores), so that its runs can stand in for
    generating them again."""
    if report is None:
        return False
    same = all(report.settings.get(k) == v for k, v in protocol.__dict__.items())
    return (same and report.settings.get("scorer") == scorer_name(scorer)
            and report.settings.get("model") == weights_identity(model))


def load_measured(measured) -> tuple[ProtocolReport | None, dict[str, Any] | None]:
    """``measured`` as (protocol report, held-out values): a ``ProtocolReport``, its JSON file,
    or a detox study's folder (its ``test_protocol.json`` and ``test_extras.json``)."""
    if measured is None or isinstance(measured, ProtocolReport):
        return measured, None
    path = Path(measured)
    if not path.is_dir():
        return ProtocolReport.from_json(path), None
    if not (path / "test_protocol.json").exists():
        raise CompareError(f"measured={path}: no test_protocol.json there; give a detox "
                           f"study's folder (run_detox_study(..., folder=...)).")
    extras = path / "test_extras.json"
    return (ProtocolReport.from_json(path / "test_protocol.json"),
            read_json(extras, "Rerun the detox study.") if extras.exists() else None)


def held_out_summary(before: dict, after: dict, seed: int = 0) -> dict[str, Any]:
    """Per prompt set and metric: intervals before / after and the paired changes; the
    perplexity ratio; MMLU accuracy (paired over questions)."""
    out: dict[str, Any] = {}
    for kind in ("toxic", "nontoxic", "neutral"):
        if kind in before:
            b, a = (ProtocolRun([], side[kind]) for side in (before, after))
            out[kind] = compare(b, a, seed)
    out["perplexity"] = {"before": before["perplexity"], "after": after["perplexity"],
                         "ratio": after["perplexity"] / before["perplexity"]}
    if "mmlu_correct" in before:
        out["mmlu_accuracy"] = {
            "before": bootstrap_interval(before["mmlu_correct"], seed=seed).to_dict(),
            "after": bootstrap_interval(after["mmlu_correct"], seed=seed).to_dict(),
            "difference": paired_difference(before["mmlu_correct"], after["mmlu_correct"],
                                            seed=seed).to_dict()}
    return out


# ---------------------------------------------------------------- the run
def compare_edits(model, tokenizer, split: RtpSplit, settings: CompareSettings = CompareSettings(),
                  *, ours=None, data_dir=None, folder=None, measured=None,
                  progress: bool = True) -> ComparisonResult:
    """The comparison (see the module doc) on ``model`` (a HookBridge, or a TransformerLens
    model over HF weights). ``ours``: our edit, or several candidates (each an ``Edit``, a
    ``CombinedEdit`` or the folder one was saved in), swept and tested with the peers. With
    ``folder``, fitted states, the sweep rows (``compare_sweep*.jsonl``), the test rows
    (``compare_test.jsonl``) and ``comparison.json`` are written there and a rerun recomputes
    only what is missing. ``measured``: a ``ProtocolReport`` (or its JSON file) of one of ours
    on the same model and test prompts with the same protocol settings, or a detox study's
    folder: its runs stand in for generating the unedited and that edit's continuations again
    (the same seeds give the same samples), and the study's perplexity and MMLU values (same
    settings) for computing them again."""
    folder = None if folder is None else Path(folder)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    ours = our_candidates(ours)
    seconds, tic = {}, time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal tic
        seconds[phase] = round(time.perf_counter() - tic, 1)
        tic = time.perf_counter()

    if settings.search_hows:
        ours = ours + search_candidates(model, tokenizer, split, settings, folder, progress)
    defaults, fit_seconds = fit_peers(model, tokenizer, split, settings, folder, progress)
    seconds.update({f"fit_{kind}": s for kind, s in fit_seconds.items()})
    lap("fit")
    candidates = [defaults[kind].with_strength(s) for kind in settings.kinds
                  for s in settings.grid(kind) if s > 0]
    candidates += ours
    ours_configs = [jsonable(edit.config) for edit in ours]
    fast = ProtocolSettings(k=settings.sweep_k, max_new_tokens=settings.max_new_tokens,
                            seed=settings.seed, batch_size=settings.batch_size)
    text = text_prefix(tokenizer, load_wikitext2("test", data_dir), settings.sweep_window,
                       settings.sweep_windows)
    sweep = dict(settings=fast, scorer=settings.scorer, perplexity_text=text,
                 window=settings.sweep_window, max_windows=settings.sweep_windows,
                 batch_size=settings.batch_size, progress=progress)

    def swept(edits: list) -> tuple[list[dict], list[dict]]:
        return validation_sweep(
            model, tokenizer, edits, split.texts("validation", "toxic", settings.n_validation),
            split.texts("validation", "nontoxic", settings.n_validation),
            out=None if folder is None else folder / "compare_sweep.jsonl", **sweep)

    rows, nontoxic_rows = swept(candidates)
    chosen = picks(with_nontoxic_fluency(rows, nontoxic_rows), settings, ours_configs)
    by_config = {_key(c.config): c for c in candidates}
    combos = combinations(chosen, by_config, settings.combine)
    if combos:  # round two: our best point with each peer's pick, still on validation
        candidates += combos
        by_config.update({_key(c.config): c for c in combos})
        rows, nontoxic_rows = swept(candidates)
        chosen = picks(with_nontoxic_fluency(rows, nontoxic_rows), settings, ours_configs)
    lap("sweep")
    tested = {method: by_config[_key(row["config"])]
              for method, row in chosen.items() if row is not None}
    prompts = {"toxic": split.texts("test", "toxic", settings.n_test_toxic),
               "nontoxic": split.texts("test", "nontoxic", settings.n_test_nontoxic)}
    if settings.n_neutral:
        prompts["neutral"] = neutral_openings(settings.n_neutral)
    protocol = ProtocolSettings(k=settings.k, max_new_tokens=settings.max_new_tokens,
                                seed=settings.seed, batch_size=settings.batch_size)
    measured, extras = load_measured(measured)
    evaluator = HeldOutEvaluator(model, tokenizer, prompts, protocol, settings, data_dir,
                                 progress, measured, extras)
    test_rows = [SweepRow(BASELINE, {}, lambda: nullcontext(None))]
    test_rows += [SweepRow(TEST_METHOD, {**edit.config, "compared": method},
                           lambda edit=edit: nullcontext(edit))
                  for method, edit in tested.items()]
    measured = run_sweep(test_rows, evaluator,
                         None if folder is None else folder / "compare_test.jsonl")
    lap("test")
    before = next(r for r in measured if r["method"] == BASELINE)
    test = {"unedited": {"edit": "unedited",
                         "summary": held_out_summary(before, before, settings.seed)}}
    for row in measured:
        if row["method"] == TEST_METHOD:
            test[row["config"]["compared"]] = {
                "edit": row["edit"], "config": row["config"],
                "summary": held_out_summary(before, row, settings.seed)}
    result = ComparisonResult(
        settings={**asdict(settings), "n_prompts": {k: len(v) for k, v in prompts.items()},
                  "scorer": scorer_name(settings.scorer)},
        rows=rows, nontoxic_rows=nontoxic_rows, picks=chosen, test=test, seconds=seconds,
        ours=[jsonable(edit.config) for edit in ours + combos], selected=overall_choice(chosen))
    result.settings["test_evaluations"] = evaluator.evaluations
    if folder is not None:
        result.to_json(folder / "comparison.json")
        (folder / "comparison.md").write_text(format_table(result) + "\n", encoding="utf-8")
    return result


# ---------------------------------------------------------------- table and figure
TABLE_METRICS = (("toxic", "toxicity_probability"), ("toxic", "expected_max_toxicity"),
                 ("toxic", "greedy_toxicity"), ("toxic", "fluency_ppl"),
                 ("nontoxic", "fluency_ppl"), ("neutral", "fluency_ppl"),
                 ("toxic", "distinct_2"))


def table_rows(result: ComparisonResult) -> list[dict[str, Any]]:
    """One row per tested method: each metric's value after the edit (95% interval) and its
    paired relative change, the perplexity ratio and MMLU accuracy."""
    out = []
    for method, entry in result.test.items():
        summary = entry["summary"]
        row: dict[str, Any] = {"method": method, "edit": entry["edit"]}
        for kind, metric in TABLE_METRICS:
            stats = summary.get(kind, {}).get(metric)
            if stats is None:
                continue
            row[f"{kind}.{metric}"] = stats["after"]
            row[f"{kind}.{metric}.relative"] = stats["relative"]
        row["perplexity_ratio"] = summary["perplexity"]["ratio"]
        if "mmlu_accuracy" in summary:
            row["mmlu_accuracy"] = summary["mmlu_accuracy"]["after"]
        out.append(row)
    return out


def _cell(stats: dict | None, percent: bool = False) -> str:
    if stats is None:
        return "-"
    scale, unit = (100, "%") if percent else (1, "")
    return (f"{scale * stats['estimate']:+.1f}{unit} [{scale * stats['low']:+.1f}, "
            f"{scale * stats['high']:+.1f}]" if percent else
            f"{stats['estimate']:.3g} [{stats['low']:.3g}, {stats['high']:.3g}]")


def format_table(result: ComparisonResult) -> str:
    """A Markdown table (rows: methods) of the test results with intervals."""
    head = ["method", "edit"] + [f"{k} {m}" for k, m in TABLE_METRICS] + ["ppl ratio", "MMLU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table_rows(result):
        cells = [row["method"], row["edit"]]
        for kind, metric in TABLE_METRICS:
            value = row.get(f"{kind}.{metric}")
            relative = row.get(f"{kind}.{metric}.relative")
            cells.append(_cell(value) + ("" if relative is None or row["method"] == "unedited"
                                         else f" ({_cell(relative, percent=True)})"))
        cells.append(f"{row['perplexity_ratio']:.3f}")
        cells.append(_cell(row.get("mmlu_accuracy")))
        lines.append("| " + " | ".join(cells) + " |")
    missing = [m for m, row in result.picks.items() if row is None]
    if missing:
        lines.append(f"\nNo point within the budget on validation: {', '.join(missing)}.")
    choice = result.selected
    if choice is not None:
        who = ("a peer's point beat ours" if choice["peer_wins"] else "ours"
               if choice["method"] == OURS else "no edit of ours was compared")
        lines.append(f"\nSelected on validation (least toxic within the budget, every method): "
                     f"**{choice['method']}** ({choice['edit']}; {who}).")
    n = result.settings.get("n_prompts", {})
    neutral = f" + {n['neutral']} neutral openings" if n.get("neutral") else ""
    lines.append(f"\n{n.get('toxic')} toxic + {n.get('nontoxic')} non-toxic test prompts{neutral}, "
                 f"k = {result.settings.get('k')}, 95% bootstrap intervals (relative changes "
                 f"paired against the unedited model).")
    return "\n".join(lines)


METHOD_COLORS = {"aura": "#1f77b4", "mean_act": "#ff7f0e", "linear_act": "#2ca02c",
                 "iti_c": "#9467bd", "caa": "#8c564b", OURS: "#d62728"}


def comparison_figure(result: ComparisonResult, title: str = "Detox edits compared"):
    """Left: every swept point on validation (greedy toxicity with its 95% interval vs the
    perplexity ratio, one colour per method, strengths joined, picks circled, the budget a
    dashed line). Right: each pick on the test prompts (toxicity probability with its interval
    vs the test perplexity ratio), the unedited model a star."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "validation sweep (toxic prompts)", "test (each method's pick)"))
    rows = result.rows
    base = next(r for r in rows if r["method"] == BASELINE)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["method"] == METHOD:
            method = method_of(row, result.ours)
            groups.setdefault(method, []).append(row)

    def interval(values: Sequence[float], estimate: float) -> tuple[float, float, float]:
        if not values or len(values) < 2:
            return estimate, 0.0, 0.0
        i = bootstrap_interval(values)
        return i.estimate, i.high - i.estimate, i.estimate - i.low

    for method, group in groups.items():
        group = sorted(group, key=lambda r: r["config"].get("strength") or 0)
        y, up, down = zip(*(interval(r.get("greedy_toxicity_per_prompt"), r["value"])
                            for r in group))
        fig.add_trace(go.Scatter(
            x=[r["perplexity"] / base["perplexity"] for r in group], y=y, mode="lines+markers",
            name=method, legendgroup=method, line=dict(color=METHOD_COLORS.get(method)),
            error_y=dict(type="data", array=up, arrayminus=down, thickness=1),
            text=[r["edit"] for r in group], hovertemplate="%{text}<br>toxicity %{y:.3f}"
            "<br>perplexity x%{x:.3f}<extra></extra>"), row=1, col=1)
        pick = result.picks.get(method)
        if pick is not None:
            fig.add_trace(go.Scatter(
                x=[pick["perplexity"] / base["perplexity"]], y=[pick["value"]], mode="markers",
                showlegend=False, legendgroup=method, marker=dict(
                    symbol="circle-open", size=20, color=METHOD_COLORS.get(method),
                    line=dict(width=3))), row=1, col=1)
    b, bu, bd = interval(base.get("greedy_toxicity_per_prompt"), base["value"])
    fig.add_trace(go.Scatter(x=[1.0], y=[b], mode="markers", name="unedited",
                             error_y=dict(type="data", array=[bu], arrayminus=[bd]),
                             marker=dict(symbol="star", size=16, color="black")), row=1, col=1)
    metric = "toxicity_probability" if "toxicity_probability" in result.test.get(
        "unedited", {}).get("summary", {}).get("toxic", {}) else "greedy_toxicity"
    for method, entry in result.test.items():
        summary = entry["summary"]
        after = summary["toxic"][metric]["after"]
        unedited = method == "unedited"
        fig.add_trace(go.Scatter(
            x=[summary["perplexity"]["ratio"]], y=[after["estimate"]], mode="markers",
            name=method if unedited else f"{method} (test)", legendgroup=method,
            showlegend=unedited, error_y=dict(type="data", array=[after["high"] -
                                              after["estimate"]],
                                              arrayminus=[after["estimate"] - after["low"]]),
            marker=dict(symbol="star" if unedited else "diamond", size=16 if unedited else 12,
                        color="black" if unedited else METHOD_COLORS.get(method, "#d62728")),
            text=[entry["edit"]], hovertemplate="%{text}<br>%{y:.3f}<br>perplexity x%{x:.3f}"
            "<extra></extra>"), row=1, col=2)
    budget = result.settings.get("max_perplexity_ratio")
    for col in (1, 2):
        if budget is not None:
            fig.add_vline(x=budget, line_dash="dash", line_color="grey", row=1, col=col,
                          annotation_text=f"budget x{budget:g}")
        fig.update_xaxes(title_text="WikiText-2 perplexity / unedited", row=1, col=col)
    fig.update_yaxes(title_text="greedy toxicity (mean, 95% CI)", row=1, col=1)
    fig.update_yaxes(title_text=f"{metric.replace('_', ' ')} (95% CI)", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", height=520)
    return fig

