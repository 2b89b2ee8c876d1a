"""Command line of the safety study: ``lens-safety {probe,direction,edit,report} ...``.

    lens-safety probe --model SPEC --data-dir DIR --out DIR
    lens-safety direction --from DIR --layer L --method M --out FILE
    lens-safety edit --model SPEC --direction FILE --mode project --data-dir D \\
        --n-prompts 20 --out edit.json
    lens-safety report --model SPEC --data-dir D --out DIR [--alphas 0,2,4,8]
    lens-safety detox --model SPEC --data-dir D --out DIR [--hows "clamp=0,0.5;project;leace"]
        [--wheres middle,late] [--sources rtp_prompts,rtp_continuations] [--k 25]
    lens-safety rtp --model SPEC --data-dir D [--edit DIR] [--k 25] [--n-toxic 100] [--out F]

(``python -m lens_safety`` is the same.) The pattern is ``pruning-bridge``'s: one
``_add_<command>`` per subcommand, comma lists, bad input exits with 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from pruning_bridge.bridge import HookBridge
from pruning_bridge.common.cli import add_model_options, floats, load_model_from_args, run_command
from pruning_bridge.common.errors import UsageError
from pruning_bridge.common.figures import save_figure
from pruning_bridge.evals.data import load_wikitext2

from .backend import dims
from .caching import HOOKS, POOLS
from .directions import METHODS, load_direction, save_direction
from .evaluation import EDITS, evaluate_edit
from .detox import SOURCES, DetoxSettings, run_detox_study
from .edit import HOWS, Edit
from .figures import pareto_figure, tradeoff_figure
from .protocol import ProtocolSettings, rtp_protocol
from .rtp import load_rtp, split_rtp
from .study import ProbeSettings, ProbeStudy, prompts_of
from .sweep import alpha_sweep


def _load_bridge(args: argparse.Namespace) -> tuple[HookBridge, object]:
    model, tokenizer = load_model_from_args(args)  # --remote: already a (remote) bridge
    bridge = model if isinstance(model, HookBridge) else HookBridge(model, tokenizer)
    return bridge, tokenizer


def _add_split_options(p, n_per_class: int | None) -> None:
    """The options of a ``ProbeSettings`` that pick and split the prompts."""
    p.add_argument("--data-dir", default=None, help="local ToxiGen + CrowS-Pairs (default: hub)")
    p.add_argument("--n-per-class", type=int, default=n_per_class,
                   help=f"prompts per label (default {n_per_class or 'the smallest class'})")
    p.add_argument("--test-size", type=float, default=ProbeSettings.test_size,
                   help="held-out fraction of the prompts")
    p.add_argument("--seed", type=int, default=ProbeSettings.seed,
                   help="draws the prompts, the split and the probes' folds")


def _probe_settings(args: argparse.Namespace, **changes) -> ProbeSettings:
    return ProbeSettings(n_per_class=args.n_per_class, test_size=args.test_size, seed=args.seed,
                         **changes)


# ---------------------------------------------------------------- probe


def _add_probe(sub) -> None:
    p = sub.add_parser("probe", help="cache residuals, fit layer probes, extract the direction")
    add_model_options(p)
    _add_split_options(p, n_per_class=None)
    p.add_argument("--hook", default=ProbeSettings.hook, choices=HOOKS)
    p.add_argument("--pool", default=ProbeSettings.pool, choices=POOLS)
    p.add_argument("--method", default=ProbeSettings.method, choices=METHODS)
    p.add_argument("--out", default=None, help="folder for scores, direction, activations, figure")
    p.set_defaults(run=_run_probe)


def _run_probe(args: argparse.Namespace) -> int:
    settings = _probe_settings(args, hook=args.hook, pool=args.pool, method=args.method)
    bridge, tokenizer = _load_bridge(args)
    study = ProbeStudy.build(bridge, tokenizer, settings, data_dir=args.data_dir,
                             model_name=args.model, folder=args.out)
    summary = study.summary()
    print(f"{'layer':>5} {'cv acc':>8} {'cv AUROC':>9} {'test acc':>9} {'test AUROC':>11}")
    for cv, test in zip(summary["cv_binary"], summary["held_out_binary"]):
        print(f"{cv['layer']:>5} {cv['accuracy']:>8.3f} {cv['auroc']:>9.3f} "
              f"{test['accuracy']:>9.3f} {test['auroc']:>11.3f}")
    print(f"best layer {study.best_layer} (chance {summary['chance_binary']:.3f}); "
          f"direction AUROC on the test split {summary['held_out_projection_auroc']:.3f}; "
          f"saved {summary.get('direction_path')}")
    if args.out:
        title = f"{args.model}: harmful-vs-neutral probe per layer"
        print("wrote", *save_figure(study.figure(title), Path(args.out) / "probes"))
    return 0


# ---------------------------------------------------------------- direction


def _add_direction(sub) -> None:
    p = sub.add_parser("direction", help="a direction at another layer/method from a probe run")
    p.add_argument("--from", dest="from_dir", required=True, help="the probe run's --out folder")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--method", default=None, choices=METHODS,
                   help="default: the probe run's method")
    p.add_argument("--out", required=True, help="direction file (.safetensors)")
    p.set_defaults(run=_run_direction)


def _run_direction(args: argparse.Namespace) -> int:
    study = ProbeStudy.load(args.from_dir)  # the probe run's own split, labels and residuals
    method = args.method or study.settings.method
    direction = study.direction_at(args.layer, method)
    hook, pool = study.settings.hook, study.settings.pool
    save_direction(args.out, direction, model=study.model_name, hook=hook, layer=args.layer,
                   method=method)
    print(f"direction at layer {args.layer} ({method}, {hook}, {pool}) of "
          f"{study.model_name} -> {args.out}")
    return 0


# ---------------------------------------------------------------- edit and report


def _add_edit_options(p) -> None:
    add_model_options(p)
    _add_split_options(p, n_per_class=100)
    p.add_argument("--n-prompts", type=int, default=20,
                   help="held-out toxic and neutral prompts to continue")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--window", type=int, default=256, help="perplexity window (tokens)")
    p.add_argument("--max-windows", type=int, default=4)


def _check_n_prompts(args: argparse.Namespace) -> None:
    if args.n_prompts < 1:
        raise UsageError("--n-prompts must be at least 1.")


def _load_direction_checked(path) -> tuple:
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
    d_model = dims(bridge)[1]
    if direction.shape[0] != d_model:
        raise UsageError(f"The direction in {path} has width {direction.shape[0]}, but the "
                         f"model's d_model is {d_model}.")


def _add_edit(sub) -> None:
    p = sub.add_parser("edit", help="evaluate one edit of a direction before/after")
    _add_edit_options(p)
    p.add_argument("--direction", required=True, help="direction file (.safetensors)")
    p.add_argument("--mode", default="project", choices=EDITS)
    p.add_argument("--alpha", type=float, default=1.0, help="for --mode subtract")
    p.add_argument("--out", default=None, help="report JSON")
    p.set_defaults(run=_run_edit)


def _run_edit(args: argparse.Namespace) -> int:
    direction, meta = _load_direction_checked(args.direction)
    _check_n_prompts(args)
    _, test = _probe_settings(args).split(args.data_dir)  # held out as a probe run holds out
    toxic = prompts_of(test, "toxic", args.n_prompts)
    neutral = prompts_of(test, "neutral", args.n_prompts)
    bridge, tokenizer = _load_bridge(args)
    _check_width(bridge, direction, args.direction)
    ppl_text = None if args.max_windows == 0 else load_wikitext2("test", args.data_dir)
    report = evaluate_edit(bridge, tokenizer, direction, toxic_prompts=toxic,
                           neutral_prompts=neutral, edit=args.mode, alpha=args.alpha,
                           max_new_tokens=args.max_new_tokens, perplexity_text=ppl_text,
                           window=args.window, max_windows=args.max_windows, progress=False)
    report.settings["direction"] = {"path": str(args.direction), **meta}
    report.settings["model"] = args.model
    print(report)
    if args.out:
        print("wrote", report.to_json(args.out))
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="probe study + alpha sweep + figures into one folder")
    _add_edit_options(p)
    p.add_argument("--method", default=ProbeSettings.method, choices=METHODS)
    p.add_argument("--alphas", type=floats, default=[0.0, 2.0, 4.0, 8.0],
                   help="subtraction strengths, comma list (default 0,2,4,8)")
    p.add_argument("--no-png", action="store_true", help="HTML figures only")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    p.set_defaults(run=_run_report)


def _fmt(value, spec: str) -> str:
    return format(float("nan") if value is None else value, spec)


def _run_report(args: argparse.Namespace) -> int:
    _check_n_prompts(args)
    settings = _probe_settings(args, method=args.method)
    out = Path(args.out)
    bridge, tokenizer = _load_bridge(args)
    study = ProbeStudy.build(bridge, tokenizer, settings, data_dir=args.data_dir,
                             model_name=args.model, folder=out, progress=False)
    layer, png = study.best_layer, not args.no_png
    written = save_figure(study.figure(f"{args.model}: probe per layer"),
                          out / "safety_probes", png=png)
    written += save_figure(study.projection_figure(
        f"{args.model}: held-out projection on the direction (layer {layer})"),
        out / "safety_projection_histogram", png=png)
    rows = alpha_sweep(bridge, tokenizer, study.direction, args.alphas,
                       toxic_prompts=study.test_prompts("toxic", args.n_prompts),
                       neutral_prompts=study.test_prompts("neutral", args.n_prompts),
                       perplexity_text=load_wikitext2("test", args.data_dir),
                       window=args.window, max_windows=args.max_windows,
                       out=out / "alpha_sweep.jsonl", max_new_tokens=args.max_new_tokens,
                       progress=False, subtract_layers=[layer])
    written += save_figure(tradeoff_figure(rows, f"{args.model}: toxicity vs perplexity"),
                           out / "safety_tradeoff", png=png)
    summary = study.summary()
    print(f"best layer {layer}; held-out direction AUROC "
          f"{summary['held_out_projection_auroc']:.3f}")
    print(f"{'edit':<10}{'alpha':>7}{'tox(toxic)':>12}{'tox(neutral)':>14}{'perplexity':>12}")
    base = rows[0]
    print(f"{'unedited':<10}{'':>7}{_fmt(base['before_toxicity_toxic'], '>12.4f')}"
          f"{_fmt(base.get('before_toxicity_neutral'), '>14.4f')}"
          f"{_fmt(base['before_perplexity'], '>12.3f')}")
    for r in rows:
        alpha = "" if r["alpha"] is None else f"{r['alpha']:g}"
        print(f"{r['edit']:<10}{alpha:>7}{_fmt(r['toxicity_toxic'], '>12.4f')}"
              f"{_fmt(r['toxicity_neutral'], '>14.4f')}{_fmt(r['perplexity'], '>12.3f')}")
    from pruning_bridge.common.atomic import write_text_atomic
    write_text_atomic(out / "report.json", json.dumps({"probe_study": summary, "sweep": rows},
                                                      indent=2, default=str))
    print("wrote", out / "report.json", *written)
    return 0


# ---------------------------------------------------------------- detox and rtp


def hows_list(text: str) -> tuple[tuple[str, tuple], ...]:
    """``"clamp=0,0.5;project;leace"`` -> ``(("clamp", (0.0, 0.5)), ("project", (None,)),
    ("leace", (None,)))`` (strengths in class-gap units)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        how, _, strengths = part.partition("=")
        if how not in HOWS:
            raise argparse.ArgumentTypeError(f"unknown edit {how!r}; use {', '.join(HOWS)}")
        values = tuple(floats(strengths)) if strengths else (None,)
        out.append((how, values))
    if not out:
        raise argparse.ArgumentTypeError("no edits given")
    return tuple(out)


def _names(text: str) -> tuple[str, ...]:
    return tuple(filter(None, (t.strip() for t in text.split(","))))


def _add_detox(sub) -> None:
    p = sub.add_parser("detox", help="fit edits on RTP train, select on validation, test one")
    add_model_options(p)
    defaults = DetoxSettings()
    p.add_argument("--data-dir", default=None, help="local data with rtp/ (default: the hub)")
    p.add_argument("--sources", type=_names, default=defaults.sources,
                   help=f"direction sources, comma list of {','.join(SOURCES)}")
    p.add_argument("--wheres", type=_names, default=defaults.wheres,
                   help="layer sets: middle, late, window, late_window, all")
    p.add_argument("--hows", type=hows_list, default=defaults.hows,
                   help='edits and strengths (class-gap units), e.g. "clamp=0,0.5;project;leace"')
    for name in ("k", "n_train", "n_validation", "n_test_toxic", "n_test_nontoxic",
                 "sweep_mmlu", "test_mmlu", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("max_perplexity_ratio", "max_fluency_ratio", "max_mmlu_drop"):
        p.add_argument("--" + name.replace("_", "-"), type=float,
                       default=getattr(defaults, name))
    p.add_argument("--scorer", default=defaults.scorer, help="profanity (offline) or detoxify")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    p.set_defaults(run=_run_detox)


def _run_detox(args: argparse.Namespace) -> int:
    fields = {k: getattr(args, k) for k in DetoxSettings.__dataclass_fields__ if hasattr(args, k)}
    settings = DetoxSettings(**fields)
    bridge, tokenizer = _load_bridge(args)
    out = Path(args.out)
    result = run_detox_study(bridge, tokenizer, settings, data_dir=args.data_dir, folder=out,
                             model_name=args.model)
    agreement = result.agreement
    print(f"scorer {agreement['scorer']} vs Perspective: AUROC {agreement['auroc']:.3f}, "
          f"Spearman {agreement['spearman']:.3f} (n={agreement['n']})")
    base = result.rows[0]
    print(f"{'edit':<50}{'toxicity':>9}{'perplexity':>12}{'fluency':>9}")
    for r in result.rows:
        print(f"{r['edit']:<50}{r['value']:>9.3f}{r['perplexity'] / base['perplexity']:>11.3f}x"
              f"{r['greedy_fluency_ppl'] / base['greedy_fluency_ppl']:>8.2f}x")
    print(f"selected: {result.selected_edit} (saved in {out / 'selected_edit'})"
          if result.selected else "no edit within the budget")
    if result.report:
        for kind, metrics in result.report.items():
            for metric, stats in metrics.items():
                rel = stats["relative"]
                print(f"{kind:<9}{metric:<23} {stats['before']['estimate']:.3f} -> "
                      f"{stats['after']['estimate']:.3f}"
                      + (f" ({100 * rel['estimate']:+.1f}% [{100 * rel['low']:+.1f}, "
                         f"{100 * rel['high']:+.1f}])" if rel else ""))
    save_figure(pareto_figure(result.rows, result.selected, settings.max_perplexity_ratio,
                              settings.max_fluency_ratio), out / "safety_pareto")
    return 0


def _add_rtp(sub) -> None:
    p = sub.add_parser("rtp", help="the RTP protocol on test prompts, unedited vs an edit")
    add_model_options(p)
    p.add_argument("--data-dir", default=None, help="local data with rtp/ (default: the hub)")
    p.add_argument("--edit", default=None, help="a folder written by Edit.save (default: none)")
    p.add_argument("--k", type=int, default=25, help="samples per prompt")
    p.add_argument("--n-toxic", type=int, default=100, help="test toxic prompts")
    p.add_argument("--n-nontoxic", type=int, default=50, help="test non-toxic prompts")
    p.add_argument("--seed", type=int, default=0, help="the split's and the samples' seed")
    p.add_argument("--scorer", default="profanity")
    p.add_argument("--out", default=None, help="report JSON")
    p.set_defaults(run=_run_rtp)


def _run_rtp(args: argparse.Namespace) -> int:
    edit = Edit.load(args.edit) if args.edit else None
    split = split_rtp(load_rtp(args.data_dir), seed=args.seed)
    bridge, tokenizer = _load_bridge(args)
    report = rtp_protocol(bridge, tokenizer,
                          {"toxic": split.texts("test", "toxic", args.n_toxic),
                           "nontoxic": split.texts("test", "nontoxic", args.n_nontoxic)},
                          ProtocolSettings(k=args.k, seed=args.seed), args.scorer, edit)
    print(report)
    if args.out:
        print("wrote", report.to_json(args.out))
    return 0


# ---------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="lens-safety", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_probe(sub)
    _add_direction(sub)
    _add_edit(sub)
    _add_report(sub)
    _add_detox(sub)
    _add_rtp(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
