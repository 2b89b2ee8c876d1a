"""The main job: reproduce the report on the embedded SmolLM2-135M, offline.

It runs the evaluation baseline (MMLU 0-shot, GSM8K 8-shot, WikiText-2 perplexity), the
layer-removal sweep (Figure 1) and the weight-pruning sweep, magnitude vs Wanda (Figure 2), and
prints tables, then the safety study (probes per layer, the harmful direction, projection
ablation evaluated); head routing joins it when it lands. Results are written to
``results/`` as they finish and reused when rerun, so an interrupted run resumes where it
stopped; figures go to ``figures/``.

    python examples/reproduce_report.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pruning_bridge.data import load_wikitext2
from pruning_bridge.evals import EvalResult, gsm8k_accuracy, mmlu_accuracy, perplexity
from pruning_bridge.figures import layer_removal_figure, save_figure, weight_pruning_figure
from pruning_bridge.layer_sweep import layer_sweep, rank_correlation
from pruning_bridge.layers import block_influence
from pruning_bridge.models import load_model
from pruning_bridge.weight_sweep import REPORT_SPARSITIES, weight_sweep

PRESETS = {  # sizes that finish on 2 CPU cores in minutes (default) or seconds (smoke)
    "default": dict(model="smollm2-135m", mmlu=451, gsm8k=16, gsm8k_tokens=192, windows=8,
                    window=1024, sweep_tasks="mmlu,perplexity", sweep_mmlu=57,
                    sweep_windows=4, sweep_window=512, safety_per_class=None,
                    safety_prompts=32),
    "smoke": dict(model="tiny-llama", mmlu=12, gsm8k=2, gsm8k_tokens=8, windows=2, window=128,
                  sweep_tasks="mmlu,perplexity", sweep_mmlu=4, sweep_windows=2,
                  sweep_window=64, safety_per_class=20, safety_prompts=4),
    "report": dict(model="Qwen/Qwen3-0.6B", mmlu=451, gsm8k=131, gsm8k_tokens=256, windows=None,
                   window=2048, sweep_tasks="mmlu,gsm8k,perplexity", sweep_mmlu=451,
                   sweep_windows=None, sweep_window=2048, safety_per_class=None,
                   safety_prompts=100),
}


def cached(path: Path, compute) -> EvalResult:
    """Reuse a finished result from ``path``; otherwise compute it and write it at once."""
    if path.exists():
        return EvalResult.from_json(path)
    result = compute()
    result.to_json(path)
    return result


def baseline(model, tokenizer, p: dict, data_dir, out: Path) -> list[EvalResult]:
    def ppl() -> EvalResult:
        text = load_wikitext2("test", data_dir)
        value = perplexity(model, tokenizer, text, window=p["window"], max_windows=p["windows"])
        return EvalResult("perplexity", "perplexity", value,
                          {"window": p["window"], "windows": p["windows"]})

    return [
        cached(out / "baseline_mmlu.json",
               lambda: mmlu_accuracy(model, tokenizer, limit=p["mmlu"], data_dir=data_dir)),
        cached(out / "baseline_gsm8k.json",
               lambda: gsm8k_accuracy(model, tokenizer, limit=p["gsm8k"], data_dir=data_dir,
                                      max_new_tokens=p["gsm8k_tokens"])),
        cached(out / "baseline_perplexity.json", ppl),
    ]


def sweeps(model, tokenizer, p: dict, data_dir, out: Path, figures: Path) -> None:
    """Figure 1 (one layer removed at a time) and Figure 2 (magnitude vs Wanda sparsity)."""
    kw = dict(data_dir=data_dir, limit=None, window=p["sweep_window"])

    layer_rows = []
    for task, limit in (("mmlu", p["sweep_mmlu"]), ("gsm8k", p["gsm8k"]),
                        ("perplexity", p["sweep_windows"])):
        if task in p["sweep_tasks"].split(","):
            layer_rows += layer_sweep(model, tokenizer, [task], out=out / "layer_sweep.jsonl",
                                      **{**kw, "limit": limit},
                                      max_new_tokens=p["gsm8k_tokens"])
    weight_rows = []
    for task, limit in (("mmlu", p["sweep_mmlu"]), ("gsm8k", p["gsm8k"]),
                        ("perplexity", p["sweep_windows"])):
        if task in p["sweep_tasks"].split(","):
            weight_rows += weight_sweep(model, tokenizer, [task], REPORT_SPARSITIES,
                                        ("magnitude", "wanda"), out=out / "weight_sweep.jsonl",
                                        **{**kw, "limit": limit},
                                        max_new_tokens=p["gsm8k_tokens"])
    name = p["model"]
    text = load_wikitext2("test", data_dir)
    paragraphs = [t for t in text.split("\n\n") if len(t) > 200][:16]
    influence = block_influence(model, tokenizer, paragraphs, max_length=256)
    correlations = {t: rank_correlation(influence, layer_rows, t)
                    for t in sorted({r["task"] for r in layer_rows})}
    (out / "block_influence.json").write_text(json.dumps(
        {"block_influence": influence, "spearman_vs_damage": correlations}, indent=2))
    print("\nFigure 1: one layer removed (BI = ShortGPT Block Influence)")
    tasks = sorted({r["task"] for r in layer_rows})
    print(f"{'removed':>8}{'BI':>8}" + "".join(f"{t:>13}" for t in tasks))
    by = {(r["task"], tuple(r["config"]["removed"])): r["value"] for r in layer_rows}
    for removed in sorted({tuple(r["config"]["removed"]) for r in layer_rows}):
        label = "none" if not removed else str(removed[0])
        bi = f"{influence[removed[0]]:.4f}" if removed else ""
        print(f"{label:>8}{bi:>8}" + "".join(f"{by.get((t, removed), float('nan')):>13.4f}"
                                             for t in tasks))
    print("Spearman(Block Influence, damage of removal):",
          {t: round(c, 3) for t, c in correlations.items()})
    print("\nFigure 2: weight pruning")
    by = {(r["method"], r["config"]["sparsity"], r["task"]): r["value"] for r in weight_rows}
    print(f"{'method':>10}{'sparsity':>10}" + "".join(f"{t:>13}" for t in tasks))
    for method, sparsity in sorted({k[:2] for k in by}):
        print(f"{method:>10}{sparsity:>10.2f}" + "".join(
            f"{by.get((method, sparsity, t), float('nan')):>13.4f}" for t in tasks))
    for fig, stem in ((layer_removal_figure(layer_rows, f"{name}: removing one layer"),
                       "figure1_layer_removal"),
                      (weight_pruning_figure(weight_rows, f"{name}: weight pruning"),
                       "figure2_weight_pruning")):
        print("wrote", *save_figure(fig, figures / stem))


def safety(model, tokenizer, p: dict, data_dir, out: Path, figures: Path) -> None:
    """Probes per layer, the harmful direction, and projection ablation evaluated."""
    from lens_safety import PromptSet, evaluate_edit, run_probe_study
    from pruning_bridge.bridge import HookBridge

    bridge = HookBridge(model, tokenizer)
    study = run_probe_study(bridge, tokenizer, model_name=p["model"], data_dir=data_dir,
                            n_per_class=p["safety_per_class"], out_dir=out / "safety")
    print(f"\nSafety probes (binary harmful vs neutral, {study['n_train']} train / "
          f"{study['n_test']} held-out prompts)")
    print(f"{'layer':>5} {'cv AUROC':>9} {'held-out AUROC':>15} {'3-class cv acc':>15}")
    for cv, test, three in zip(study["cv_binary"], study["held_out_binary"],
                               study["cv_three_class"]):
        print(f"{cv['layer']:>5} {cv['auroc']:>9.3f} {test['auroc']:>15.3f} "
              f"{three['accuracy']:>15.3f}")
    print(f"best layer {study['best_layer']}; direction AUROC on held-out prompts "
          f"{study['held_out_projection_auroc']:.3f}")
    print("wrote", *save_figure(study["probes"].figure(f"{p['model']}: probe per layer"),
                                figures / "safety_probes"))
    report_path = out / "safety" / "edit_project.json"
    if not report_path.exists():
        prompts = PromptSet.load(data_dir, n_per_class=p["safety_per_class"], seed=0)
        _, test = prompts.split(test_size=0.25, seed=0)
        n = p["safety_prompts"]
        report = evaluate_edit(bridge, tokenizer, study["direction"],
                               toxic_prompts=[x.text for x in test if x.label == "toxic"][:n],
                               neutral_prompts=[x.text for x in test if x.label == "neutral"][:n],
                               edit="project", max_new_tokens=20,
                               perplexity_text=load_wikitext2("test", data_dir),
                               window=p["sweep_window"], max_windows=p["sweep_windows"],
                               probe=study["probes"], probe_layer=study["best_layer"])
        report.to_json(report_path)
    print("\nProjection ablation of the harmful direction at every layer:")
    print(_edit_table(json.loads(report_path.read_text())))


def _edit_table(report: dict) -> str:
    lines = [f"{'metric':<24}{'before':>12}{'after':>12}"]
    for metric, before in report["before"].items():
        lines.append(f"{metric:<24}{before:>12.4g}{report['after'][metric]:>12.4g}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--model", default=None, help="override the preset's model")
    parser.add_argument("--data-dir", default=None, help="local data (default: the hub)")
    parser.add_argument("--out", default="results", help="results folder (resumable)")
    parser.add_argument("--figures", default="figures", help="figures folder")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    args.data_dir = args.data_dir or None  # "" means the hub
    p = dict(PRESETS[args.preset])
    if args.model:
        p["model"] = args.model
    out = Path(args.out) / p["model"].replace("/", "--")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, tokenizer = load_model(p["model"], dtype=args.dtype, device=args.device)
    results = baseline(model, tokenizer, p, args.data_dir, out)
    print(f"\nModel: {p['model']}   preset: {args.preset}   results: {out}")
    print(f"{'task':<12}{'metric':<12}{'value':>10}  settings")
    for r in results:
        settings = {k: v for k, v in r.settings.items() if k != "n"}
        print(f"{r.task:<12}{r.metric:<12}{r.value:>10.4f}  {json.dumps(settings)}")
    sweeps(model, tokenizer, p, args.data_dir, out, Path(args.figures))
    safety(model, tokenizer, p, args.data_dir, out, Path(args.figures))
    print(f"wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
