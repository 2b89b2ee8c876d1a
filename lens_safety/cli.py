"""Command line of the safety study.

    python -m lens_safety probe --model SPEC --data-dir DIR --out DIR
    python -m lens_safety direction --from DIR --layer L --method M --out FILE [--data-dir D]
    python -m lens_safety edit --model SPEC --direction FILE --mode project --data-dir D \
        --n-prompts 20 --out edit.json
    python -m lens_safety report --model SPEC --data-dir D --out DIR [--alphas 0 2 4 8]
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from pruning_bridge.common.errors import UsageError


def _run_probe(args: argparse.Namespace) -> int:
    from pruning_bridge.bridge import HookBridge
    from pruning_bridge.models import load_model

    from .study import run_probe_study

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    bridge = HookBridge(model, tokenizer)
    summary = run_probe_study(bridge, tokenizer, model_name=args.model, data_dir=args.data_dir,
                              n_per_class=args.n_per_class, hook=args.hook, pool=args.pool,
                              method=args.method, seed=args.seed, out_dir=args.out)
    print(f"{'layer':>5} {'cv acc':>8} {'cv AUROC':>9} {'test acc':>9} {'test AUROC':>11}")
    for cv, test in zip(summary["cv_binary"], summary["held_out_binary"]):
        print(f"{cv['layer']:>5} {cv['accuracy']:>8.3f} {cv['auroc']:>9.3f} "
              f"{test['accuracy']:>9.3f} {test['auroc']:>11.3f}")
    print(f"best layer {summary['best_layer']} (chance {summary['chance_binary']:.3f}); "
          f"direction AUROC on the test split {summary['held_out_projection_auroc']:.3f}; "
          f"saved {summary.get('direction_path')}")
    if args.out:
        from pruning_bridge.common import save_figure

        print("wrote", *save_figure(summary["probes"].figure(f"{args.model}: harmful-vs-neutral "
                                                              f"probe per layer"),
                                    f"{args.out}/probes"))
    return 0


def _load_direction_checked(path) -> tuple:
    from pathlib import Path

    from .directions import load_direction

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"Direction file {path} does not exist.")
    try:
        direction, meta = load_direction(path)
    except Exception as error:  # not a safetensors file, or no "direction" tensor
        raise UsageError(f"{path} is not a direction file saved by save_direction "
                         f"({type(error).__name__}: {error}).") from None
    if direction.ndim != 1 or direction.numel() == 0 or not bool(direction.isfinite().all()) \
            or float(direction.norm()) == 0.0:
        raise UsageError(f"{path} does not hold a finite non-zero [d_model] direction "
                         f"(shape {tuple(direction.shape)}).")
    return direction, meta


def _check_width(bridge, direction, path) -> None:
    from .caching import model_dims

    d_model = model_dims(bridge)[1]
    if direction.shape[0] != d_model:
        raise UsageError(f"The direction in {path} has width {direction.shape[0]}, but the "
                         f"model's d_model is {d_model}.")


def _test_prompts(data_dir, n_per_class, seed, n_prompts, test_size=0.25):
    from .prompts import PromptSet

    prompts = PromptSet.load(data_dir, n_per_class=n_per_class, seed=seed)
    _, test = prompts.split(test_size=test_size, seed=seed)
    toxic = [x.text for x in test if x.label == "toxic"][:n_prompts]
    neutral = [x.text for x in test if x.label == "neutral"][:n_prompts]
    if not toxic:
        raise UsageError("The held-out split has no toxic prompts.")
    return toxic, neutral


def _run_direction(args: argparse.Namespace) -> int:
    import hashlib
    import json
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    from .directions import harmful_direction, save_direction
    from .prompts import PromptSet

    folder = Path(args.from_dir)
    summary_path = folder / "probe_study.json"
    if not summary_path.is_file():
        raise UsageError(f"{summary_path} not found: run `python -m lens_safety probe --out "
                         f"{folder}` first.")
    summary = json.loads(summary_path.read_text())
    hook, pool, seed = summary["hook"], summary["pool"], summary["seed"]
    acts_path = folder / f"acts_train_{hook}_{pool}.safetensors"
    if not acts_path.is_file():
        raise UsageError(f"{acts_path} not found (the probe study stores its activations there).")
    with safe_open(str(acts_path), framework="pt") as f:
        meta = f.metadata() or {}
    acts = load_file(str(acts_path))["residuals"]
    # The labels are not stored: rebuild the same training split and check it is the same texts.
    n_per_class = min(summary["counts"].values())
    train, _ = PromptSet.load(args.data_dir, n_per_class=n_per_class, seed=seed).split(
        test_size=args.test_size, seed=seed)
    texts_hash = hashlib.sha256(json.dumps(list(train.texts)).encode()).hexdigest()
    if meta.get("texts_sha256") not in (None, texts_hash) or len(train) != acts.shape[1]:
        raise UsageError(f"The prompts rebuilt from --data-dir {args.data_dir} (n_per_class "
                         f"{n_per_class}, seed {seed}, test size {args.test_size}) are not the "
                         f"ones cached in {acts_path}; pass the probe run's --data-dir.")
    if not 0 <= args.layer < acts.shape[0]:
        raise UsageError(f"Layer {args.layer} out of range: the activations have "
                         f"{acts.shape[0]} layers (valid 0..{acts.shape[0] - 1}).")
    direction = harmful_direction(acts, train.labels, args.layer, method=args.method, seed=seed)
    save_direction(args.out, direction, model=summary["model"], hook=hook, layer=args.layer,
                   method=args.method)
    print(f"direction at layer {args.layer} ({args.method}, {hook}, {pool}) of "
          f"{summary['model']} -> {args.out}")
    return 0


def _load_bridge(args):
    from pruning_bridge.bridge import HookBridge
    from pruning_bridge.models import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    return HookBridge(model, tokenizer), tokenizer


def _run_edit(args: argparse.Namespace) -> int:
    from pruning_bridge.evals.data import load_wikitext2

    from .evaluation import evaluate_edit

    direction, meta = _load_direction_checked(args.direction)
    if args.n_prompts < 1:
        raise UsageError("--n-prompts must be at least 1.")
    bridge, tokenizer = _load_bridge(args)
    _check_width(bridge, direction, args.direction)
    toxic, neutral = _test_prompts(args.data_dir, args.n_per_class, args.seed, args.n_prompts)
    ppl_text = None if args.max_windows == 0 else load_wikitext2("test", args.data_dir)
    report = evaluate_edit(bridge, tokenizer, direction, toxic_prompts=toxic,
                           neutral_prompts=neutral, edit=args.mode, alpha=args.alpha,
                           max_new_tokens=args.max_new_tokens, perplexity_text=ppl_text,
                           window=args.window, max_windows=args.max_windows,
                           progress=False)
    report.settings["direction"] = {"path": str(args.direction), **meta}
    report.settings["model"] = args.model
    print(report)
    if args.out:
        print("wrote", report.to_json(args.out))
    return 0


def _run_report(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from pruning_bridge.common import save_figure
    from pruning_bridge.evals.data import load_wikitext2

    from .caching import cache_residuals
    from .figures import projection_histogram, tradeoff_figure
    from .prompts import PromptSet
    from .study import run_probe_study
    from .sweep import alpha_sweep

    if args.n_prompts < 1:
        raise UsageError("--n-prompts must be at least 1.")
    out = Path(args.out)
    bridge, tokenizer = _load_bridge(args)
    study = run_probe_study(bridge, tokenizer, model_name=args.model, data_dir=args.data_dir,
                            n_per_class=args.n_per_class, seed=args.seed, method=args.method,
                            out_dir=out, progress=False)
    layer = study["best_layer"]
    written = save_figure(study["probes"].figure(f"{args.model}: probe per layer"),
                          out / "safety_probes", png=not args.no_png)
    _, test = PromptSet.load(args.data_dir, n_per_class=args.n_per_class,
                             seed=args.seed).split(test_size=0.25, seed=args.seed)
    test_acts = cache_residuals(bridge, tokenizer, test.texts, hook=study["hook"],
                                pool=study["pool"], progress=False,
                                store=out / f"acts_test_{study['hook']}_{study['pool']}.safetensors")
    written += save_figure(projection_histogram(
        test_acts[layer], test.labels, study["direction"],
        title=f"{args.model}: held-out projection on the direction (layer {layer})"),
        out / "safety_projection_histogram", png=not args.no_png)
    toxic, neutral = _test_prompts(args.data_dir, args.n_per_class, args.seed, args.n_prompts)
    ppl_text = load_wikitext2("test", args.data_dir)
    rows = alpha_sweep(bridge, tokenizer, study["direction"], args.alphas, toxic_prompts=toxic,
                       neutral_prompts=neutral, perplexity_text=ppl_text, window=args.window,
                       max_windows=args.max_windows, out=out / "alpha_sweep.jsonl",
                       max_new_tokens=args.max_new_tokens, progress=False,
                       subtract_layers=[study["best_layer"]])
    written += save_figure(tradeoff_figure(rows, f"{args.model}: toxicity vs perplexity"),
                           out / "safety_tradeoff", png=not args.no_png)
    print(f"best layer {layer}; held-out direction AUROC "
          f"{study['held_out_projection_auroc']:.3f}")
    print(f"{'edit':<10}{'alpha':>7}{'tox(toxic)':>12}{'tox(neutral)':>14}{'perplexity':>12}")
    base = rows[0]
    print(f"{'unedited':<10}{'':>7}{base['before_toxicity_toxic']:>12.4f}"
          f"{base.get('before_toxicity_neutral', float('nan')):>14.4f}"
          f"{base['before_perplexity']:>12.3f}")
    for r in rows:
        alpha = "" if r["alpha"] is None else f"{r['alpha']:g}"
        print(f"{r['edit']:<10}{alpha:>7}{r['toxicity_toxic']:>12.4f}"
              f"{(r['toxicity_neutral'] if r['toxicity_neutral'] is not None else float('nan')):>14.4f}"
              f"{r['perplexity']:>12.3f}")
    summary = {k: v for k, v in study.items() if k not in ("direction", "probes")}
    (out / "report.json").write_text(json.dumps({"probe_study": summary, "sweep": rows},
                                                indent=2, default=str))
    print("wrote", out / "report.json", *written)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="python -m lens_safety", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="cache residuals, fit layer probes, extract the direction")
    p.add_argument("--model", required=True, help="hub id, local directory, smollm2-135m, tiny-*")
    p.add_argument("--data-dir", default=None, help="local ToxiGen + CrowS-Pairs (default: hub)")
    p.add_argument("--n-per-class", type=int, default=None, help="default: the smallest class")
    p.add_argument("--hook", default="resid_post", choices=["resid_pre", "resid_mid",
                                                             "resid_post"])
    p.add_argument("--pool", default="last", choices=["last", "mean"])
    p.add_argument("--method", default="mean_diff", choices=["mean_diff", "probe", "pca"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="folder for scores, direction, activations, figure")
    p.set_defaults(run=_run_probe)

    d = sub.add_parser("direction", help="a direction at another layer/method from a probe run")
    d.add_argument("--from", dest="from_dir", required=True, help="the probe run's --out folder")
    d.add_argument("--layer", type=int, required=True)
    d.add_argument("--method", default="mean_diff", choices=["mean_diff", "probe", "pca"])
    d.add_argument("--data-dir", default=None, help="the probe run's --data-dir (labels)")
    d.add_argument("--test-size", type=float, default=0.25)
    d.add_argument("--out", required=True, help="direction file (.safetensors)")
    d.set_defaults(run=_run_direction)

    def common(q):
        q.add_argument("--model", required=True, help="hub id, local directory, smollm2-135m, "
                                                      "tiny-*")
        q.add_argument("--data-dir", default=None, help="local data (default: hub)")
        q.add_argument("--n-per-class", type=int, default=100)
        q.add_argument("--n-prompts", type=int, default=20, help="held-out toxic and neutral "
                                                                 "prompts to continue")
        q.add_argument("--max-new-tokens", type=int, default=20)
        q.add_argument("--window", type=int, default=256, help="perplexity window (tokens)")
        q.add_argument("--max-windows", type=int, default=4)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--dtype", default=None)
        q.add_argument("--device", default=None)

    e = sub.add_parser("edit", help="evaluate one edit of a direction before/after")
    common(e)
    e.add_argument("--direction", required=True, help="direction file (.safetensors)")
    e.add_argument("--mode", default="project", choices=["project", "subtract", "orthogonalize"])
    e.add_argument("--alpha", type=float, default=1.0, help="for --mode subtract")
    e.add_argument("--out", default=None, help="report JSON")
    e.set_defaults(run=_run_edit)

    r = sub.add_parser("report", help="probe study + alpha sweep + figures into one folder")
    common(r)
    r.add_argument("--method", default="mean_diff", choices=["mean_diff", "probe", "pca"])
    r.add_argument("--alphas", type=float, nargs="+", default=[0.0, 2.0, 4.0, 8.0])
    r.add_argument("--no-png", action="store_true", help="HTML figures only")
    r.add_argument("--out", required=True, help="output folder (resumable)")
    r.set_defaults(run=_run_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from pruning_bridge.cli import run_command

    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
