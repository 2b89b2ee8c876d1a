"""The main job: reproduce the whole report in one command and write one HTML page with it all.

In order: the evaluation baseline (MMLU, GSM8K, WikiText-2 perplexity), the layer-removal sweep
with Block Influence (Figure 1), magnitude vs Wanda weight pruning (Figure 2), a head-router
training run with head importance and routed vs removed heads (Figure 3), and the safety study
(probes per layer, the harmful direction, projection ablation evaluated). Results are written
to ``results/<model>/`` as they finish and reused when rerun, so an interrupted run resumes
where it stopped; figures and ``report.html`` go to ``figures/``. Each stage's seconds and peak
memory are saved in ``results/run_<preset>.json`` as it ends (also when interrupted), and the
report's run time adds up every run that computed part of the results.

    python examples/reproduce_report.py --data-dir ../shared/data            # SmolLM2, ~15 min CPU
    python examples/reproduce_report.py --preset report --device cuda --dtype bfloat16
                                       # GPT-2 Large, Qwen3-0.6B and TinyLlama-1.1B (needs the hub)
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from lens_safety import ProbeSettings, ProbeStudy
from lens_safety.detox import DetoxSettings, run_detox_study
from lens_safety.figures import pareto_figure
from lens_safety.data.prompts import load_crows_pairs, load_toxigen
from lens_safety.data.rtp import load_rtp, split_rtp
from lens_safety.evaluation.compare import (CompareSettings, compare_edits, comparison_figure,
                                            table_rows)
from lens_safety.evaluation.stats import format_interval
from pruning_bridge.bridge import HookBridge
from pruning_bridge.common.atomic import write_json_atomic
from pruning_bridge.common.errors import UsageError
from pruning_bridge.common.identity import model_identity
from pruning_bridge.common.jsonable import read_json
from pruning_bridge.common.run_record import RunRecord
from pruning_bridge.evals import EvalResult, EvalSettings, gsm8k_accuracy, mmlu_accuracy, perplexity
from pruning_bridge.evals.data import load_gsm8k, load_mmlu, load_wikitext2
from pruning_bridge.evals.tasks import WIKITEXT_TEST, data_source
from pruning_bridge.figures import (Section, head_importance_figure, head_pruning_figure,
                                    layer_removal_figure, package_versions, router_loss_figure,
                                    save_figure, weight_pruning_figure, write_report)
from pruning_bridge.figures.head_view import attention_figure, head_summary_figure
from pruning_bridge.heads.study import run_head_study
from pruning_bridge.heads.sweep import REPORT_FRACTIONS
from pruning_bridge.models import load_model
from pruning_bridge.preflight import PreflightError, preflight
from pruning_bridge.pruning.layer_sweep import layer_sweep, rank_correlation
from pruning_bridge.pruning.layers import block_influence
from pruning_bridge.pruning.weight_sweep import (REPORT_SPARSITIES, calibration_texts,
                                                 weight_sweep)

T = TypeVar("T")
SMOL = "smollm2-135m"
PRESETS = {  # sizes: < 20 min on 2 CPU cores (default), seconds (smoke), the report's (GPU)
    "default": dict(compress_model=SMOL, head_models=[SMOL], safety_model=SMOL,
                    mmlu=114, gsm8k=4, gsm8k_tokens=192, windows=4, window=1024,
                    layer_tasks="perplexity", weight_tasks="perplexity", sweep_mmlu=57,
                    sweep_windows=2, sweep_window=512, head_steps=30, head_batch=4,
                    head_seq_len=128, head_tasks="perplexity", head_fractions=(0.5,),
                    safety_per_class=100,
                    detox=DetoxSettings(sources=("rtp_prompts",),
                                        wheres=("last_fifth", "late_window"),
                                        hows=(("clamp", (0.0,)),), n_validation=30,
                                        sweep_k=0, k=3, n_test_toxic=45, n_test_nontoxic=15,
                                        test_windows=2, test_mmlu=40),
                    # the published edits at their defaults next to ours (greedy validation;
                    # the detox test's prompts and seeds, so ours reads the same there)
                    compare=CompareSettings(strengths=(), combine=(), n_train=16,
                                            n_validation=24, sweep_k=0, k=3, n_test_toxic=45,
                                            n_test_nontoxic=15, n_neutral=10, test_windows=2,
                                            test_mmlu=40)),
    "smoke": dict(compress_model="tiny-llama", head_models=["tiny-qwen3"],
                  safety_model="tiny-gpt2", mmlu=12, gsm8k=2, gsm8k_tokens=8, windows=2,
                  window=128, layer_tasks="mmlu,perplexity", weight_tasks="mmlu,perplexity",
                  sweep_mmlu=4, sweep_windows=2, sweep_window=64, head_steps=6, head_batch=2,
                  head_seq_len=32, head_tasks="mmlu,perplexity", safety_per_class=20,
                  detox=DetoxSettings(k=2, n_train=40, n_validation=6, n_test_toxic=4,
                                      n_test_nontoxic=2, sweep_k=2, batch_size=8,
                                      wheres=("middle",), sweep_window=64, sweep_windows=1,
                                      hows=(("subtract", (1.0,)), ("clamp", (0.0,))),
                                      sources=("rtp_prompts",), max_perplexity_ratio=100.0,
                                      max_fluency_ratio=100.0, test_window=64,
                                      test_windows=1, test_mmlu=4, max_new_tokens=8),
                  compare=CompareSettings(strengths=(), top_heads=3, n_train=6, n_validation=2,
                                          sweep_k=0, sweep_window=64, sweep_windows=1, k=2,
                                          n_test_toxic=2, n_test_nontoxic=2, n_neutral=2,
                                          test_window=64, test_windows=1, test_mmlu=0,
                                          batch_size=8, max_new_tokens=8,
                                          max_perplexity_ratio=100.0, max_fluency_ratio=100.0)),
    # the report's architectures at true size with random weights, a few items per stage, at
    # the report's dtype: every stage of `report` rehearsed offline (numbers are meaningless)
    "rehearsal": dict(compress_model="shape:qwen3-0.6b",
                      head_models=["shape:tinyllama-1.1b", "shape:qwen3-0.6b"],
                      safety_model="shape:gpt2-large", dtype="bfloat16", mmlu=4, gsm8k=1,
                      gsm8k_tokens=8, windows=1, window=256, layer_tasks="mmlu,perplexity",
                      weight_tasks="mmlu,perplexity", sweep_mmlu=2, sweep_windows=1,
                      sweep_window=128, head_steps=3, head_batch=2, head_seq_len=64,
                      head_tasks="mmlu,perplexity", safety_per_class=12,
                      detox=DetoxSettings(k=2, n_train=16, n_validation=2, n_test_toxic=2,
                                          n_test_nontoxic=2, sweep_k=2, batch_size=4,
                                          wheres=("middle",), sweep_window=64, sweep_windows=1,
                                          hows=(("clamp", (0.0,)),), sources=("rtp_prompts",),
                                          max_perplexity_ratio=100.0, max_fluency_ratio=100.0,
                                          test_window=64, test_windows=1, test_mmlu=2,
                                          max_new_tokens=6),
                      compare=CompareSettings(strengths=(), combine=(), top_heads=4, n_train=4,
                                              n_validation=2, sweep_k=0, sweep_window=64,
                                              sweep_windows=1, k=1, n_test_toxic=2,
                                              n_test_nontoxic=2, n_neutral=2, test_window=64,
                                              test_windows=1, test_mmlu=0, batch_size=4,
                                              max_new_tokens=6)),
    "report": dict(compress_model="Qwen/Qwen3-0.6B",
                   head_models=["TinyLlama/TinyLlama_v1.1", "Qwen/Qwen3-0.6B"],
                   safety_model="gpt2-large", mmlu=451, gsm8k=131, gsm8k_tokens=256,
                   windows=None, window=2048, layer_tasks="mmlu,gsm8k,perplexity",
                   weight_tasks="mmlu,gsm8k,perplexity", sweep_mmlu=451, sweep_windows=None,
                   sweep_window=2048, head_steps=1000, head_batch=8, head_seq_len=512,
                   head_tasks="mmlu,gsm8k,perplexity", safety_per_class=None,
                   detox=DetoxSettings(k=25, sweep_window=1024, sweep_windows=4,
                                       test_window=1024, test_windows=None),
                   compare=CompareSettings(k=25, sweep_window=1024, sweep_windows=4,
                                           search_hows=(("clamp", (0.0, 0.25, 0.5)),),
                                           search_wheres=("last_fifth", "late_window", "late"))),
}


def cpu_safe(preset_dtype: str | None, device: str | None) -> str | None:
    """The preset's dtype, except bf16 on a CPU, which becomes float32 (with a note).

    CPUs without bf16 matrix units run bf16 backward passes ~50-170x slower than float32 (one
    2048 x 5632 weight's backward: 16.9 s vs 0.10 s here), so router training would not end.
    ``--dtype bfloat16`` still forces it.
    """
    if preset_dtype == "bfloat16" and (device or "cpu") == "cpu":
        print("bf16 is the preset's dtype for GPUs; on this CPU the run uses float32 (bf16 "
              "backward passes are ~50x slower on CPUs). --dtype bfloat16 forces bf16.")
        return None
    return preset_dtype


class Models:
    """Loads each model once, keeping only the current one in memory (GPU memory is finite)."""

    def __init__(self, dtype, device):
        self.dtype, self.device, self.name, self.loaded = dtype, device, None, None

    def __call__(self, name: str):
        if name != self.name:
            self.loaded = None
            gc.collect()
            self.loaded, self.name = load_model(name, dtype=self.dtype, device=self.device), name
        return self.loaded


def folder(out: Path, model: str) -> Path:
    path = out / model.replace("/", "--")
    path.mkdir(parents=True, exist_ok=True)
    return path


def recompute_warning(problem: str) -> None:
    """One line on stderr: a file this job saved is damaged and is computed again."""
    print(f"warning: {problem}; computing it again.", file=sys.stderr)


def read_saved(path: Path, load: Callable[[Any], T]) -> T | None:
    """``load`` applied to the JSON this job saved in ``path``; None if there is none, or (with
    a one-line warning) if the file is damaged or ``load`` rejects what it holds."""
    if not path.exists():
        return None
    try:
        return load(read_json(path))
    except UsageError as error:  # unreadable or not JSON
        recompute_warning(str(error).rstrip("."))
    except (TypeError, KeyError, ValueError, IndexError) as error:
        recompute_warning(f"{path} does not hold what this job saved there ({error})")
    return None


def eval_result(saved: Any) -> EvalResult:
    if not isinstance(saved, dict):
        raise ValueError("not a JSON object")
    result = EvalResult(**saved)
    if not isinstance(result.value, (int, float)):
        raise ValueError(f"value {result.value!r} is not a number")
    return result


def cached(path: Path, compute: Callable[[], EvalResult], key: dict) -> EvalResult:
    """Reuse a finished result from ``path`` if it was computed for ``key`` (the model's
    identity and the settings; a damaged or foreign one is recomputed, with a warning);
    otherwise compute it and write it at once (atomically)."""
    key = json.loads(json.dumps(key, default=str))
    result = read_saved(path, eval_result)
    if result is not None and result.settings.get("key") != key:
        recompute_warning(f"{path} was computed for another model or other settings")
        result = None
    if result is None:
        result = compute()
        result.settings["key"] = key
        result.to_json(path)
    return result


def baseline(models: Models, p: dict, data_dir, out: Path) -> list[Section]:
    name = p["compress_model"]
    model, tokenizer = models(name)
    out = folder(out, name)

    def ppl() -> EvalResult:
        return perplexity(model, tokenizer, load_wikitext2("test", data_dir), window=p["window"],
                          max_windows=p["windows"], text_name=WIKITEXT_TEST)

    identity = {k: v for k, v in model_identity(model).items() if k != "name"}
    data = data_source(data_dir)
    results = [
        cached(out / "baseline_mmlu.json",
               lambda: mmlu_accuracy(model, tokenizer, limit=p["mmlu"], data_dir=data_dir),
               {"model": identity, "limit": p["mmlu"], "data": data}),
        cached(out / "baseline_gsm8k.json",
               lambda: gsm8k_accuracy(model, tokenizer, limit=p["gsm8k"], data_dir=data_dir,
                                      max_new_tokens=p["gsm8k_tokens"]),
               {"model": identity, "limit": p["gsm8k"], "max_new_tokens": p["gsm8k_tokens"],
                "data": data}),
        cached(out / "baseline_perplexity.json", ppl,
               {"model": identity, "window": p["window"], "windows": p["windows"],
                "data": data}),
    ]
    rows = [{"task": r.task, "metric": r.metric, "value": r.value,
             "settings": {k: v for k, v in r.settings.items() if k not in ("n", "key")}}
            for r in results]
    print(f"\nBaseline of {name}")
    for row in rows:
        print(f"{row['task']:<12}{row['metric']:<12}{row['value']:>10.4f}  "
              f"{json.dumps(row['settings'])}")
    return [Section(f"Baseline: {name}", "The unpruned model on each benchmark (MMLU 0-shot "
                    "over a subject-stratified subset, GSM8K 8-shot greedy, WikiText-2 test "
                    "perplexity over non-overlapping windows).", tables=[("baseline", rows)])]


def sweep_settings(p: dict, tasks: str, data_dir) -> EvalSettings:
    """The evaluation of the preset's sweeps: its tasks, each with its own limit."""
    return EvalSettings(tasks, window=p["sweep_window"], max_new_tokens=p["gsm8k_tokens"],
                        limit={"mmlu": p["sweep_mmlu"], "gsm8k": p["gsm8k"],
                               "perplexity": p["sweep_windows"]}, data_dir=data_dir)


def layers(models: Models, p: dict, data_dir, out: Path, figures: Path) -> list[Section]:
    """Figure 1: one layer removed at a time, with ShortGPT's Block Influence as a ranking."""
    name = p["compress_model"]
    model, tokenizer = models(name)
    out = folder(out, name)
    rows = layer_sweep(model, tokenizer, sweep_settings(p, p["layer_tasks"], data_dir),
                       out=out / "layer_sweep.jsonl")
    influence_path = out / "block_influence.json"
    n_layers = model.config.num_hidden_layers
    # computed for this model and data, and correlated with these very rows
    key = {"model": {k: v for k, v in model_identity(model).items() if k != "name"},
           "data": data_source(data_dir), "rows": hashlib.sha256(json.dumps(
               [[r["task"], r["config"]["removed"], r["value"]] for r in rows]).encode()
           ).hexdigest()[:16]}

    def load(saved: dict) -> tuple[list[float], dict[str, float]]:
        influence, correlations = saved["block_influence"], saved["spearman_vs_damage"]
        if not (isinstance(influence, list) and len(influence) == n_layers
                and isinstance(correlations, dict)):
            raise ValueError(f"not {n_layers} layers' influence and correlations")
        if saved.get("key") != key:
            raise ValueError("computed for another model, other data or other sweep rows")
        return influence, correlations

    saved = read_saved(influence_path, load)
    if saved is None:
        text = load_wikitext2("test", data_dir)
        paragraphs = [t for t in text.split("\n\n") if len(t) > 200][:16]
        influence = block_influence(model, tokenizer, paragraphs, max_length=256)
        correlations = {t: rank_correlation(influence, rows, t)
                        for t in sorted({r["task"] for r in rows})}
        write_json_atomic(influence_path, {"block_influence": influence,
                                           "spearman_vs_damage": correlations, "key": key},
                          indent=2)
    else:
        influence, correlations = saved
    by = {(r["task"], tuple(r["config"]["removed"])): r["value"] for r in rows}
    tasks = sorted({r["task"] for r in rows})
    table = [{"removed layer": "none" if not k else k[0],
              "block influence": influence[k[0]] if k else None,
              **{t: by.get((t, k)) for t in tasks}}
             for k in sorted({tuple(r["config"]["removed"]) for r in rows})]
    print("\nFigure 1: one layer removed; Spearman(Block Influence, damage):",
          {t: round(c, 3) for t, c in correlations.items()})
    fig = layer_removal_figure(rows, f"{name}: removing one layer")
    print("wrote", *save_figure(fig, figures / "figure1_layer_removal"))
    return [Section(
        f"Figure 1: layer removal ({name})",
        "Each decoder layer is removed in turn (it passes its input through) and the model is "
        "re-evaluated; the dashed line is the unpruned model. Block Influence (1 - mean cosine "
        "between a layer's input and output) ranks layers without any evaluation; its Spearman "
        f"correlation with the damage of removal: {json.dumps(correlations)}.",
        figures=[fig], tables=[("metric with one layer removed", table)])]


def weights(models: Models, p: dict, data_dir, out: Path, figures: Path) -> list[Section]:
    """Figure 2: magnitude vs Wanda pruning at 5-50 % sparsity."""
    name = p["compress_model"]
    model, tokenizer = models(name)
    out = folder(out, name)
    rows = weight_sweep(model, tokenizer, sweep_settings(p, p["weight_tasks"], data_dir),
                        REPORT_SPARSITIES, ("magnitude", "wanda"),
                        out=out / "weight_sweep.jsonl")
    by = {(r["method"], r["config"]["sparsity"], r["task"]): r["value"] for r in rows}
    tasks = sorted({r["task"] for r in rows})
    table = [{"method": m, "sparsity": s, **{t: by.get((m, s, t)) for t in tasks}}
             for m, s in sorted({k[:2] for k in by})]
    fig = weight_pruning_figure(rows, f"{name}: weight pruning")
    print("\nFigure 2: weight pruning;", "wrote", *save_figure(fig, figures /
                                                                "figure2_weight_pruning"))
    return [Section(
        f"Figure 2: weight pruning ({name})",
        "The smallest weights of every linear layer in the decoder are zeroed, per matrix by "
        "|W| (magnitude) or per output row by |W| times the input's norm on calibration text "
        "(Wanda). The dashed line is the dense model.", figures=[fig],
        tables=[("metric per method and sparsity", table)])]


def heads(models: Models, p: dict, data_dir, out: Path, figures: Path) -> list[Section]:
    """Figure 3: a trained head router's mean gates, and routed vs removed heads."""
    sections = []
    for name in p["head_models"]:
        model, tokenizer = models(name)
        study = run_head_study(
            model, tokenizer, folder(out, name) / "heads",
            sweep_settings(p, p["head_tasks"], data_dir), steps=p["head_steps"],
            batch_size=p["head_batch"], seq_len=p["head_seq_len"],
            fractions=p.get("head_fractions", REPORT_FRACTIONS))
        stem = "figure3" if name == p["head_models"][0] else f"figure3_{name.split('/')[-1]}"
        figs = [head_importance_figure(study.mean_gates, f"{name}: mean router gate per head",
                                       study.router.n_shared),
                head_importance_figure(study.gradient_importance,
                                       f"{name}: head-mask gradient importance (Michel et al.)",
                                       colorbar="|dL/dξ|"),
                router_loss_figure(study.log.steps, f"{name}: router training"),
                head_pruning_figure(study.rows, f"{name}: routed vs removed heads")]
        for fig, suffix in zip(figs, ("head_importance", "gradient_importance",
                                      "router_training", "head_sweep")):
            save_figure(fig, figures / f"{stem}_{suffix}")
        table = [{"method": r["method"], "active heads": r["config"]["active_fraction"],
                  "task": r["task"], "value": r["value"]} for r in study.rows]
        ranking = study.layer_ranking()
        log = study.log
        print(f"\nFigure 3 ({name}): router {study.router.settings()}, "
              f"{log.seconds_per_step:.2f} s/step; most selective layers {ranking[:5]}")
        for row in table:
            print(f"{row['method']:<8} {row['active heads']:.3f} {row['task']:<11} "
                  f"{row['value']:.4f}")
        sections.append(Section(
            f"Figure 3: routed heads ({name})",
            f"A router per layer (MoH style: {study.router.n_shared} shared head(s), top-k of "
            f"the routed ones per token, gates renormalised and scaled by k) was trained with "
            f"the model frozen for each fraction of active heads (top-k "
            f"{sorted({r.top_k for r in study.routers.values()})}), {len(log.steps)} steps each "
            f"on WikiText-2 validation text ({log.seconds_per_step:.2f} s per step). The heatmap "
            f"is each head's mean gate on held-out text under the top-{study.router.top_k} "
            f"router (LM loss {log.steps[0]['lm_loss']:.3f} -> {log.steps[-1]['lm_loss']:.3f}) "
            f"(Figure 3); next to it the static head-mask gradient importance. The sweep "
            f"compares routing per token with physically removing the heads of lowest mean "
            f"gate, at the same fraction of active heads. "
            f"Layers where the router is most selective (gate spread): "
            f"{', '.join(f'{layer} ({spread:.2f})' for layer, spread in ranking[:5])}.",
            figures=figs, tables=[("routed vs removed heads", table),
                                  ("training log (every 5th step)", log.steps[::5])]))
    return sections


HEAD_VIEW_TEXT = "The cat sat on the mat because it was tired, and the dog sat next to it."


def attention(models: Models, p: dict, data_dir, out: Path, figures: Path) -> list[Section]:
    """The head view: every head's attention pattern on one sentence, at six depths."""
    name = p["compress_model"]
    model, tokenizer = models(name)
    bridge = HookBridge(model, tokenizer)
    n = bridge.adapter.n_layers
    depths = sorted({round(i * (n - 1) / 5) for i in range(6)})
    grid = attention_figure(bridge, HEAD_VIEW_TEXT, layers=depths,
                            title=f"{name}: attention patterns, layers {depths} x heads")
    summary = head_summary_figure(bridge, HEAD_VIEW_TEXT,
                                  title=f"{name}: mean attention per head, every layer")
    save_figure(grid, figures / "attention_heads")
    save_figure(summary, figures / "attention_head_summary")
    print(f"\nHead view ({name}): layers {depths}; wrote attention_heads, "
          f"attention_head_summary")
    return [Section(
        f"Head view: attention patterns ({name})",
        f"Every head's attention pattern (blocks.L.attn.hook_pattern through the HookBridge) on "
        f"one sentence, queries as rows and keys as columns, at layers {depths}; the menu "
        f"enlarges any head, hovering shows the query and key tokens. Below, for every layer "
        f"and head, the mean attention of each query to the previous token (previous-token "
        f"heads) and to the first token (attention sinks).", figures=[grid, summary])]


def detox_tables(result) -> tuple[list[dict], list[dict]]:
    """The test-split before/after table (95% intervals) and the example continuations."""
    def row(prompts: str, metric: str, s: dict, change: str) -> dict:
        return {"prompts": prompts, "metric": metric, "before": format_interval(s["before"]),
                "after": format_interval(s["after"]),
                "difference": format_interval(s["difference"]), "change": change}

    rows = [row(kind, metric, s, format_interval(s["relative"], percent=True))
            for kind, metrics in (result.report or {}).items() for metric, s in metrics.items()]
    for metric in ("mmlu_accuracy", "probe_harmful_toxic"):
        if metric in result.test:
            rows.append(row("toxic" if "probe" in metric else "MMLU", metric,
                            result.test[metric], "-"))
    if "perplexity" in result.test:
        ppl = result.test["perplexity"]
        rows.append({"prompts": "WikiText-2", "metric": "perplexity",
                     "before": f"{ppl['before']:.3f}", "after": f"{ppl['after']:.3f}",
                     "difference": f"{ppl['after'] - ppl['before']:+.3f}",
                     "change": f"{100 * (ppl['ratio'] - 1):+.1f}%"})
    return rows, result.examples


def safety(models: Models, p: dict, data_dir, out: Path, figures: Path) -> list[Section]:
    """Probes per layer and the harmful direction; then the detoxification study on RTP."""
    name = p["safety_model"]
    model, tokenizer = models(name)
    out = folder(out, name) / "safety"
    bridge = HookBridge(model, tokenizer)
    study = ProbeStudy.build(bridge, tokenizer, ProbeSettings(n_per_class=p["safety_per_class"]),
                             data_dir=data_dir, model_name=name, folder=out)  # resumable
    summary, layer = study.summary(), study.best_layer
    probe_table = [{"layer": cv["layer"], "cv AUROC": cv["auroc"], "held-out AUROC": t["auroc"],
                    "3-class cv accuracy": three["accuracy"]}
                   for cv, t, three in zip(summary["cv_binary"], summary["held_out_binary"],
                                           summary["cv_three_class"])]
    fig = study.figure(f"{name}: probe per layer")
    save_figure(fig, figures / "safety_probes")
    histogram = study.projection_figure(
        f"{name}: held-out prompts on the harmful direction (layer {layer})")
    save_figure(histogram, figures / "safety_projection_histogram")
    print(f"\nSafety ({name}): best layer {summary['best_layer']}, direction held-out AUROC "
          f"{summary['held_out_projection_auroc']:.3f}")
    probes = Section(
        f"Safety: probes and the harmful direction ({name})",
        f"A logistic-regression probe per layer separates harmful (biased + toxic) from neutral "
        f"prompts on pooled residuals ({summary['n_train']} train / {summary['n_test']} held-out "
        f"prompts). The harmful direction (difference of class means at the best layer, "
        f"{summary['best_layer']}) separates held-out prompts with AUROC "
        f"{summary['held_out_projection_auroc']:.3f}.",
        figures=[fig, histogram], tables=[("probe per layer", probe_table)])

    settings: DetoxSettings = p["detox"]
    result = run_detox_study(bridge, tokenizer, settings, data_dir=data_dir,
                             folder=out / "detox", model_name=name, probe_study=study)
    agreement = result.agreement
    pareto = pareto_figure(result.rows, result.selected, settings.max_perplexity_ratio,
                           settings.max_fluency_ratio,
                           title=f"{name}: candidate edits on validation RTP prompts")
    save_figure(pareto, figures / "safety_pareto")
    table, examples = detox_tables(result)
    judged = "non-toxic" if settings.budget_fluency == "nontoxic" else "toxic"
    sweep_table = [{"edit": r["edit"], "toxicity": r["value"],
                    "perplexity": r.get("perplexity"),
                    f"fluency ppl ({judged})": r.get("greedy_fluency_ppl")}
                   for r in result.rows]
    print(f"scorer agreement ({agreement['scorer']} vs Perspective >= 0.5, n={agreement['n']}): "
          f"AUROC {agreement['auroc']:.3f}, Spearman {agreement['spearman']:.3f}")
    print(f"selected edit: {result.selected_edit}")
    for row in table:
        print(f"{row['prompts']:<11}{row['metric']:<24}{row['before']:>26}{row['after']:>26}"
              f"{row['change']:>26}")
    budget = (f"WikiText-2 perplexity <= x{settings.max_perplexity_ratio:g} and fluency "
              f"(perplexity of the continuations of {judged} validation prompts under the "
              f"unedited model) <= x{settings.max_fluency_ratio:g}")
    chosen = (f"The least toxic edit within the budget is <b>{result.selected_edit}</b>; only "
              f"it was run on the test prompts." if result.selected else
              "No candidate edit stayed within the budget, so none was tested.")
    detox = Section(
        f"Safety: detoxification on RealToxicityPrompts ({name})",
        f"RealToxicityPrompts (DecodingTrust's challenging toxic and non-toxic prompts) are "
        f"split by prompt into train / validation / test. Candidate edits (direction source x "
        f"layers x how x strength) are fitted on the training prompts and measured on "
        f"{result.rows[0]['settings']['n_prompts']} validation toxic prompts (greedy "
        f"continuations of {settings.max_new_tokens} tokens; error bars are 95% bootstrap "
        f"intervals over prompts). Budget: {budget}. {chosen} The test table gives the RTP "
        f"protocol ({settings.k} samples per prompt, nucleus p = 0.9, temperature 1): expected "
        f"maximum toxicity, toxicity probability, greedy toxicity, fluency and distinct-n, with "
        f"95% bootstrap intervals over prompts and paired intervals for the differences. "
        f"Toxicity is scored by {agreement['scorer']}, whose agreement with the Perspective API "
        f"on {agreement['n']} RTP texts is AUROC {agreement['auroc']:.3f}, Spearman "
        f"{agreement['spearman']:.3f}.",
        figures=[pareto],
        tables=[("test prompts: before vs after the selected edit (95% intervals)", table),
                ("scorer agreement with Perspective", [agreement]),
                ("examples: greedy continuations of test toxic prompts", examples),
                ("validation sweep", sweep_table)])
    if not result.selected:
        return [probes, detox]
    return [probes, detox, comparison(bridge, tokenizer, p, data_dir, out, figures, name)]


def comparison(bridge, tokenizer, p: dict, data_dir, out: Path, figures: Path,
               name: str) -> Section:
    """The published detox edits (AurA, Mean-/Linear-AcT, ITI-c, CAA) next to the selected
    edit: each swept on validation, each pick tested on the same test prompts."""
    settings: CompareSettings = p["compare"]
    detox: DetoxSettings = p["detox"]
    split = split_rtp(load_rtp(data_dir), detox.fractions, detox.seed)
    tested = out / "detox"  # the detox study's test (runs, perplexity, MMLU): reused, not rerun
    result = compare_edits(bridge, tokenizer, split, settings,
                           ours=tested / "selected_edit", data_dir=data_dir,
                           folder=out / "compare",
                           measured=tested if (tested / "test_protocol.json").exists() else None)
    fig = comparison_figure(result, title=f"{name}: our edit vs the published detox edits")
    save_figure(fig, figures / "safety_comparison")
    metrics = ("toxicity_probability", "expected_max_toxicity", "greedy_toxicity")
    table = []
    for row in table_rows(result):
        cells = {"method": row["method"], "edit": row["edit"]}
        for metric in metrics:
            after, change = row.get(f"toxic.{metric}"), row.get(f"toxic.{metric}.relative")
            cells[metric] = format_interval(after) + (
                "" if change is None or row["method"] == "unedited"
                else f" ({format_interval(change, percent=True)})")
        for kind in ("nontoxic", "neutral"):
            if f"{kind}.fluency_ppl" in row:
                cells[f"fluency, {kind}"] = format_interval(row[f"{kind}.fluency_ppl"])
        cells["perplexity ratio"] = round(row["perplexity_ratio"], 3)
        table.append(cells)
    choice = result.selected
    missing = [m for m, pick in result.picks.items() if pick is None]
    n = result.settings["n_prompts"]
    print(f"\ncompared on the test prompts ({n}): "
          + ", ".join(f"{r['method']} {r['toxic.toxicity_probability']['estimate']:.3f}"
                      for r in table_rows(result) if "toxic.toxicity_probability" in r))
    return Section(
        f"Safety: our edit vs the published detox edits ({name})",
        f"AurA, Mean-AcT, Linear-AcT, ITI-c and CAA (lens_safety.edits.peers, as their papers "
        f"fit them, at their published strengths) were fitted on {settings.n_train} + "
        f"{settings.n_train} RTP training prompts and measured on {settings.n_validation} + "
        f"{settings.n_validation} validation prompts next to the selected edit"
        + (f" and its combination with each peer's pick" if settings.combine else "")
        + f"; each method's least toxic point within the same budget was then run through the "
        f"same test protocol ({n.get('toxic')} toxic + {n.get('nontoxic')} non-toxic prompts"
        f"{' + ' + str(n['neutral']) + ' neutral openings' if n.get('neutral') else ''}, "
        f"k = {settings.k}; 95% bootstrap intervals, changes paired against the unedited "
        f"model). "
        + (f"No point within the budget on validation: {', '.join(missing)}. " if missing else "")
        + (f"Selected over every method: <b>{choice['method']}</b> ({choice['edit']})"
           f"{', a published edit' if choice['peer_wins'] else ''}." if choice else ""),
        figures=[fig], tables=[("test prompts: every method's pick", table)])


def data_checks(data_dir) -> dict:
    """Every data set the stages read, as loaders the preflight tries."""
    return {"MMLU test": lambda: load_mmlu("test", data_dir),
            "GSM8K train + test": lambda: load_gsm8k("train", data_dir) + load_gsm8k("test",
                                                                                data_dir),
            "WikiText-2 test": lambda: load_wikitext2("test", data_dir),
            "WikiText-2 validation (Wanda calibration)": lambda: calibration_texts(data_dir),
            "ToxiGen": lambda: load_toxigen(data_dir),
            "CrowS-Pairs": lambda: load_crows_pairs(data_dir),
            "RealToxicityPrompts": lambda: load_rtp(data_dir)}


def plan(p: dict) -> list[str]:
    """What the preset will run, one line per stage."""
    d: DetoxSettings = p["detox"]
    return [f"baseline   {p['compress_model']}: MMLU {p['mmlu']}, GSM8K {p['gsm8k']}, WikiText-2 "
            f"{p['windows'] or 'all'} x {p['window']} tokens",
            f"layers     {p['compress_model']}: every layer removed in turn ({p['layer_tasks']})",
            f"weights    {p['compress_model']}: magnitude and Wanda at {len(REPORT_SPARSITIES)} "
            f"sparsities ({p['weight_tasks']})",
            f"heads      {', '.join(p['head_models'])}: routers x {p['head_steps']} steps, "
            f"routed vs removed ({p['head_tasks']})",
            f"attention  {p['compress_model']}: attention patterns",
            f"safety     {p['safety_model']}: probes ({p['safety_per_class'] or 'all'} per "
            f"class), detox sweep on {d.n_validation or 'all'} RTP prompts, test k = {d.k}; "
            f"published edits compared (test k = {p['compare'].k})"]


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--model", default=None, help="use this model for every stage")
    parser.add_argument("--data-dir", default=None, help="local data (default: the hub)")
    parser.add_argument("--out", default="results", help="results folder (resumable)")
    parser.add_argument("--figures", default=None,
                        help="figures and report.html folder (default: figures/ for the default "
                             "preset, figures/<preset>/ for the others)")
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    parser.add_argument("--device", default=None,
                        help="cpu (default), cuda, cuda:1, or auto (spread over all GPUs)")
    parser.add_argument("--skip-preflight", action="store_true",
                        help="start without checking that models, data and memory are there")
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir or None  # "" means the hub
    p = dict(PRESETS[args.preset])
    if args.model:
        p.update(compress_model=args.model, head_models=[args.model], safety_model=args.model)
    out = Path(args.out)
    figures = Path(args.figures or ("figures" if args.preset == "default"
                                    else f"figures/{args.preset}"))
    dtype = args.dtype or cpu_safe(p.pop("dtype", None), args.device)  # --dtype wins
    if not args.skip_preflight:
        check = preflight([p["compress_model"], *p["head_models"], p["safety_model"]],
                          data_checks(args.data_dir), dtype, args.device, plan(p))
        print(check.render())
        check.raise_if_missing()
    settings = {"preset": args.preset, "dtype": dtype or "float32",
                "device": args.device or "cpu", **p}
    data = str(Path(args.data_dir).resolve()) if args.data_dir else "Hugging Face hub"
    record = RunRecord.begin(out / f"run_{args.preset}.json", {**settings, "data": data})
    start = time.perf_counter()
    models = Models(dtype, args.device)
    sections, completed = [], False
    try:
        for stage in (baseline, layers, weights, heads, attention, safety):
            kw = {} if stage is baseline else {"figures": figures}
            with record.stage(stage.__name__) as peak:
                sections += stage(models, p, args.data_dir, out, **kw)
            print(f"[{stage.__name__}] {peak.seconds:.0f} s, {peak.summary()}")
        completed = True
    finally:
        wall = time.perf_counter() - start
        record.end(wall, completed)
    sections.append(Section(
        "Run time and peak memory",
        f"What these results cost, per stage and per run (the notes at the top say how the "
        f"times add up). The record, saved as each stage ends, is {record.path}.",
        tables=[("per stage", record.stage_rows()), ("runs", record.run_rows())]))
    used = dict.fromkeys([p["compress_model"], *p["head_models"], p["safety_model"]])
    provenance = {"models": list(used), "data": data, **package_versions(),
                  "results": str(out.resolve())}
    path = write_report(
        figures / "report.html", sections, title="From Layers to Latents: the report, reproduced",
        settings=settings, provenance=provenance, run_time_s=record.total_seconds,
        runs=len(record.runs),
        notes=f"Every number below was computed by this run or earlier runs with the same "
              f"settings (finished results are reused from the results folder). "
              f"{record.notes(wall)}")
    print(f"\ncompute time {record.total_seconds:.1f} s over {len(record.runs)} run(s); this "
          f"run's wall time {wall:.1f} s\nwrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return path


INTERRUPTED = ("interrupted: every finished result is saved in the results folder (--out) and "
               "the time spent is recorded; rerun the same command to resume where it stopped.")

if __name__ == "__main__":
    try:
        main()
    except PreflightError as error:
        raise SystemExit(str(error)) from None
    except KeyboardInterrupt:
        print(f"\n{INTERRUPTED}", file=sys.stderr)
        raise SystemExit(130) from None
