"""Command line of the safety study: ``lens-safety {probe,direction,detox,rtp,generate,compare}``.

    lens-safety probe --model SPEC --data-dir DIR --out DIR
    lens-safety direction --from DIR --layer L --method M --out FILE
    lens-safety detox --model SPEC --data-dir D --out DIR [--hows "clamp=0,0.5;project;leace"]
        [--wheres middle,late] [--sources rtp_prompts,rtp_continuations] [--k 25]
    lens-safety rtp --model SPEC --data-dir D [--edit DIR] [--k 25] [--n-toxic 100] [--out F]
    lens-safety generate --model SPEC --edit DIR [--prompt TEXT ...] [--prompts FILE]
        [--max-new-tokens 20]
    lens-safety compare --model SPEC --data-dir D --out DIR [--peers aura,linear_act,...]
        [--strengths "iti_c=2,4,8;caa=1,2"] [--ours DIR ...] [--combine aura,... | none]
        [--k 25] [--n-neutral 30]

(``python -m lens_safety`` is the same.) The pattern is ``pruning-bridge``'s: one
``_add_<command>`` per subcommand, comma lists, bad input exits with 2 and one line, and the
parser imports nothing heavy (each ``_run_<command>`` imports what it runs).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Sequence

from pruning_bridge.cli_options import add_model_options, load_model_from_args
from pruning_bridge.common.cli import (
    ArgumentParser,
    bounded,
    choice_list,
    count,
    count0,
    floats,
    input_folder,
    names,
    naming_option,
    output_file,
    output_folder,
    run_command,
)
from pruning_bridge.common.errors import UsageError

# Written here, not imported, so that parsing needs no torch; a test keeps them equal to the
# modules' own (caching.HOOKS, caching.POOLS, directions.METHODS, edit.HOWS,
# detox.SOURCES, toxicity.SCORERS, the names detox.layer_sets knows, ProbeSettings' defaults).
HOOKS = ("resid_pre", "resid_mid", "resid_post")
POOLS = ("last", "mean", "mean_after_first")
METHODS = ("mean_diff", "probe", "pca")
HOWS = ("project", "subtract", "clamp", "leace", "orthogonalize", "aura", "mean_act",
        "linear_act", "iti_c", "caa")
PEERS = HOWS[5:]  # the published detox edits (edits.peers.KINDS): fitted on texts, compared
SOURCES = ("rtp_prompts", "rtp_continuations")
SCORERS = ("profanity", "detoxify")
LAYER_SETS = ("middle", "late", "window", "late_window", "last_fifth", "all")
PROBE_DEFAULTS = {"test_size": 0.25, "seed": 0, "hook": "resid_post", "pool": "last",
                  "method": "mean_diff"}

# The detox options are left out of the namespace unless given, so that DetoxSettings fills in
# its own defaults.
UNSET = argparse.SUPPRESS


def _load_bridge(args: argparse.Namespace):
    from pruning_bridge.bridge import HookBridge

    model, tokenizer = load_model_from_args(args)  # --remote: already a (remote) bridge
    bridge = model if isinstance(model, HookBridge) else HookBridge(model, tokenizer)
    return bridge, tokenizer


def _add_split_options(p, n_per_class: int | None) -> None:
    """The options of a ``ProbeSettings`` that pick and split the prompts."""
    p.add_argument("--data-dir", type=input_folder, default=None,
                   help="local ToxiGen + CrowS-Pairs (default: hub)")
    p.add_argument("--n-per-class", type=bounded(int, 2), default=n_per_class,
                   help=f"prompts per label (default {n_per_class or 'the smallest class'})")
    p.add_argument("--test-size", type=bounded(float, above=0.0, below=1.0),
                   default=PROBE_DEFAULTS["test_size"],
                   help="held-out fraction of the prompts (default %(default)s)")
    p.add_argument("--seed", type=count0, default=PROBE_DEFAULTS["seed"],
                   help="draws the prompts, the split and the probes' folds (default %(default)s)")


def _add_method(p) -> None:
    p.add_argument("--method", default=PROBE_DEFAULTS["method"], choices=METHODS,
                   help="how the direction is estimated (default %(default)s)")


def _probe_settings(args: argparse.Namespace, **changes):
    from .probing.study import ProbeSettings

    return ProbeSettings(n_per_class=args.n_per_class, test_size=args.test_size, seed=args.seed,
                         **changes)


# ---------------------------------------------------------------- probe


def _add_probe(sub) -> None:
    p = sub.add_parser("probe", help="cache residuals, fit layer probes, extract the direction")
    add_model_options(p)
    _add_split_options(p, n_per_class=None)
    p.add_argument("--hook", default=PROBE_DEFAULTS["hook"], choices=HOOKS,
                   help="the residual read (default %(default)s)")
    p.add_argument("--pool", default=PROBE_DEFAULTS["pool"], choices=POOLS,
                   help="how positions are pooled (default %(default)s)")
    _add_method(p)
    p.add_argument("--out", type=output_folder, default=None,
                   help="folder for scores, direction, activations, figure (rerun to resume)")
    p.set_defaults(run=_run_probe, resumes="out")


def _run_probe(args: argparse.Namespace) -> int:
    from pruning_bridge.figures import save_figure

    from .probing.study import ProbeStudy

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
    p.add_argument("--from", dest="from_dir", type=input_folder, required=True,
                   help="the probe run's --out folder")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--method", default=None, choices=METHODS,
                   help="default: the probe run's method")
    p.add_argument("--out", type=output_file, required=True, help="direction file (.safetensors)")
    p.set_defaults(run=_run_direction)


def _run_direction(args: argparse.Namespace) -> int:
    from .probing.directions import save_direction
    from .probing.study import ProbeStudy

    with naming_option("--from", args.from_dir):
        study = ProbeStudy.load(args.from_dir)  # the probe run's own split, labels, residuals
    method = args.method or study.settings.method
    with naming_option("--layer", args.layer):
        direction = study.direction_at(args.layer, method)
    hook, pool = study.settings.hook, study.settings.pool
    save_direction(args.out, direction, model=study.model_name, hook=hook, layer=args.layer,
                   method=method)
    print(f"direction at layer {args.layer} ({method}, {hook}, {pool}) of "
          f"{study.model_name} -> {args.out}")
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
        if how in PEERS:
            raise argparse.ArgumentTypeError(f"{how} is fitted on texts, not on a direction: "
                                             f"compare it with `lens-safety compare --peers "
                                             f"{how}`")
        values = tuple(floats(strengths)) if strengths else (None,)
        out.append((how, values))
    if not out:
        raise argparse.ArgumentTypeError("no edits given")
    return tuple(out)


def layer_set_list(text: str) -> tuple[str, ...]:
    """``"middle,late,L12,L20-24"``: named layer sets or explicit layers (``detox.layer_sets``)."""
    values = tuple(dict.fromkeys(names(text)))
    unknown = [v for v in values if v not in LAYER_SETS and not re.fullmatch(r"L\d+(-\d+)?", v)]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown layer set {', '.join(map(repr, unknown))}; "
                                         f"use {', '.join(LAYER_SETS)}, or L12 / L20-24")
    return values


def source_list(text: str) -> tuple[str, ...]:
    """``"rtp_prompts,rtp_continuations"``: where the detox study takes its directions from."""
    return tuple(choice_list(SOURCES, "sources")(text))


def scorer_name(text: str) -> str:
    """A toxicity scorer: ``profanity``, ``detoxify`` or ``detoxify:<model>``."""
    if text not in SCORERS and not text.startswith("detoxify:"):
        raise argparse.ArgumentTypeError(f"unknown scorer {text!r}; use profanity (offline), "
                                         f"detoxify or detoxify:<model>")
    return text


def _add_detox(sub) -> None:
    p = sub.add_parser("detox", help="fit edits on RTP train, select on validation, test one")
    add_model_options(p)
    p.add_argument("--data-dir", type=input_folder, default=None,
                   help="local data with rtp/ (default: the hub)")
    p.add_argument("--sources", type=source_list, default=UNSET,
                   help=f"direction sources, comma list of {','.join(SOURCES)}")
    p.add_argument("--wheres", type=layer_set_list, default=UNSET,
                   help="layer sets: middle, late, window, late_window, last_fifth, all, L12 or "
                        "L20-24")
    p.add_argument("--hows", type=hows_list, default=UNSET,
                   help='edits and strengths (class-gap units), e.g. "clamp=0,0.5;project;leace"')
    for name, kind in (("k", count0), ("n_train", count), ("n_validation", count),
                       ("n_test_toxic", count), ("n_test_nontoxic", count),
                       ("sweep_mmlu", count0), ("test_mmlu", count0), ("seed", count0),
                       ("max_perplexity_ratio", bounded(float, above=0.0)),
                       ("max_fluency_ratio", bounded(float, above=0.0)),
                       ("max_mmlu_drop", bounded(float, 0.0))):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=UNSET)
    p.add_argument("--scorer", type=scorer_name, default=UNSET,
                   help="profanity (offline, the default) or detoxify")
    p.add_argument("--out", type=output_folder, required=True,
                   help="output folder (rerun to resume)")
    p.set_defaults(run=_run_detox, resumes="out")


def _run_detox(args: argparse.Namespace) -> int:
    from pruning_bridge.figures import save_figure

    from .detox import DetoxSettings, run_detox_study
    from .figures import pareto_figure

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
    p.add_argument("--data-dir", type=input_folder, default=None,
                   help="local data with rtp/ (default: the hub)")
    p.add_argument("--edit", type=input_folder, default=None,
                   help="a folder written by Edit.save (default: none)")
    p.add_argument("--k", type=count0, default=25, help="samples per prompt (0: greedy only)")
    p.add_argument("--n-toxic", type=count0, default=100, help="test toxic prompts")
    p.add_argument("--n-nontoxic", type=count0, default=50, help="test non-toxic prompts")
    p.add_argument("--seed", type=count0, default=0, help="the split's and the samples' seed")
    p.add_argument("--scorer", type=scorer_name, default="profanity",
                   help="profanity (offline) or detoxify")
    p.add_argument("--out", type=output_file, default=None, help="report JSON")
    p.set_defaults(run=_run_rtp)


def _test_prompts(split, kind: str, n: int) -> list[str]:
    """The first ``n`` test prompts of ``kind``; too many names ``--n-<kind>``."""
    held = split.counts()["test"][kind]
    if n > held:
        raise UsageError(f"--n-{kind} {n}: the RTP test split holds {held} {kind} prompts; pass "
                         f"at most {held}.")
    return split.texts("test", kind, n)


def _run_rtp(args: argparse.Namespace) -> int:
    from .data.rtp import load_rtp, split_rtp
    from .edits.edit import Edit
    from .evaluation.protocol import ProtocolSettings, rtp_protocol

    with naming_option("--edit", args.edit):
        edit = Edit.load(args.edit) if args.edit else None
    with naming_option("--data-dir", args.data_dir):
        split = split_rtp(load_rtp(args.data_dir), seed=args.seed)
    prompts = {kind: _test_prompts(split, kind, n)
               for kind, n in (("toxic", args.n_toxic), ("nontoxic", args.n_nontoxic))}
    settings = ProtocolSettings(k=args.k, seed=args.seed)
    bridge, tokenizer = _load_bridge(args)
    report = rtp_protocol(bridge, tokenizer, prompts, settings, args.scorer, edit)
    print(report)
    if args.out:
        print("wrote", report.to_json(args.out))
    return 0


# ---------------------------------------------------------------- compare


def peer_list(text: str) -> tuple[str, ...]:
    """``"aura,linear_act"``: the published detox edits to compare."""
    return tuple(choice_list(PEERS, "peers")(text))


def combine_list(text: str) -> tuple[str, ...]:
    """``"aura,linear_act"`` (or ``none``): the peers whose pick is tried with ours."""
    return () if text.strip().lower() == "none" else peer_list(text)


def strengths_list(text: str) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """``"iti_c=2,4,8;caa=1,2"`` -> each peer's strengths to sweep (its published default is
    always added)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        kind, _, values = part.partition("=")
        if kind not in PEERS:
            raise argparse.ArgumentTypeError(f"unknown peer {kind!r}; use {', '.join(PEERS)}")
        strengths = tuple(floats(values)) if values else ()
        if not strengths or any(not v >= 0 for v in strengths):
            raise argparse.ArgumentTypeError(f"give {kind} strengths >= 0, e.g. {kind}=0.5,1")
        out.append((kind, strengths))
    if not out:
        raise argparse.ArgumentTypeError("no strengths given")
    return tuple(out)


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="the published detox edits and ours on one protocol")
    add_model_options(p)
    p.add_argument("--data-dir", type=input_folder, default=None,
                   help="local data with rtp/ (default: the hub)")
    p.add_argument("--peers", dest="kinds", metavar="PEERS", type=peer_list, default=UNSET,
                   help=f"comma list of {','.join(PEERS)} (default: all)")
    p.add_argument("--strengths", type=strengths_list, default=UNSET,
                   help='strengths to sweep per peer, e.g. "iti_c=2,4,8;caa=1,2"')
    p.add_argument("--ours", type=input_folder, action="append", default=[],
                   help="our edit (a folder written by Edit.save, e.g. the detox study's "
                        "selected_edit); repeat for several candidates")
    p.add_argument("--measured", type=input_folder, default=None, metavar="DIR",
                   help="a detox study's folder (lens-safety detox --out): its test of the "
                        "unedited model and of its selected edit (same model, prompts and "
                        "settings) stands in for running them again")
    p.add_argument("--search-hows", type=hows_list, default=UNSET, metavar="HOWS",
                   help='our candidates to fit and sweep next to the peers, as detox --hows, '
                        'e.g. "clamp=0,0.25;subtract=1"')
    p.add_argument("--search-wheres", type=layer_set_list, default=UNSET, metavar="SETS",
                   help="layer sets of those candidates, as detox --wheres (default last_fifth)")
    p.add_argument("--combine", type=combine_list, default=UNSET, metavar="PEERS",
                   help="peers whose pick is also tried combined with our pick (comma list, "
                        "or none; default: aura,mean_act,linear_act)")
    for name, kind in (("k", count0), ("n_train", count), ("n_validation", count),
                       ("n_test_toxic", count), ("n_test_nontoxic", count),
                       ("n_neutral", count0), ("sweep_k", count0), ("batch_size", count),
                       ("test_mmlu", count0), ("top_heads", count), ("seed", count0),
                       ("max_perplexity_ratio", bounded(float, above=0.0)),
                       ("max_fluency_ratio", bounded(float, above=0.0))):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=UNSET)
    p.add_argument("--scorer", type=scorer_name, default=UNSET,
                   help="profanity (offline, the default) or detoxify")
    p.add_argument("--out", type=output_folder, required=True,
                   help="output folder (rerun to resume)")
    p.set_defaults(run=_run_compare, resumes="out")


def _run_compare(args: argparse.Namespace) -> int:
    from pruning_bridge.figures import save_figure

    from .data.rtp import load_rtp, split_rtp
    from .edits.edit import Edit
    from .evaluation.compare import (
        CompareSettings,
        compare_edits,
        comparison_figure,
        format_table,
    )

    fields = {k: getattr(args, k) for k in CompareSettings.__dataclass_fields__
              if hasattr(args, k)}
    settings = CompareSettings(**fields)
    ours = []
    for saved in args.ours:
        with naming_option("--ours", saved):
            ours.append(Edit.load(saved))
    with naming_option("--data-dir", args.data_dir):
        split = split_rtp(load_rtp(args.data_dir), seed=settings.seed)
    bridge, tokenizer = _load_bridge(args)
    out = Path(args.out)
    result = compare_edits(bridge, tokenizer, split, settings, ours=ours,
                           data_dir=args.data_dir, folder=out, measured=args.measured)
    print(format_table(result))
    save_figure(comparison_figure(result), out / "comparison")
    print(f"wrote {out / 'comparison.json'}, {out / 'comparison.md'} and the figure")
    return 0


# ---------------------------------------------------------------- generate


def prompt_file(text: str) -> str:
    """An argparse ``type`` for ``--prompts``: a file to read (its text is checked on reading)."""
    if not Path(text).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return str(Path(text).expanduser())


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="greedy continuations of prompts, unedited vs a saved edit")
    add_model_options(p)
    p.add_argument("--edit", type=input_folder, required=True,
                   help="a folder written by Edit.save (e.g. a detox run's selected_edit)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt to continue (repeat for several)")
    p.add_argument("--prompts", type=prompt_file, default=None, metavar="FILE",
                   help="a UTF-8 text file, one prompt per line (blank lines skipped)")
    p.add_argument("--max-new-tokens", type=count, default=20,
                   help="tokens per continuation (default %(default)s)")
    p.set_defaults(run=_run_generate)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """``--prompt`` values, then the lines of ``--prompts``; none at all names both options."""
    prompts = [p for p in args.prompt if p.strip()]
    if args.prompts is not None:
        try:
            lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise UsageError(f"--prompts {args.prompts}: not UTF-8 text ({error.reason} at "
                             f"byte {error.start}).") from None
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise UsageError("No prompts: pass --prompt TEXT (repeatable) or --prompts FILE (one "
                         "prompt per line).")
    return prompts


def _run_generate(args: argparse.Namespace) -> int:
    from .edits.edit import Edit
    from .evaluation.protocol import ProtocolSettings, continuations

    prompts = _read_prompts(args)
    with naming_option("--edit", args.edit):
        edit = Edit.load(args.edit)
    bridge, tokenizer = _load_bridge(args)
    settings = ProtocolSettings(max_new_tokens=args.max_new_tokens)
    with naming_option("--edit", args.edit):
        with edit.apply(bridge):  # a width or layer that does not fit this model: --edit
            after = continuations(bridge, tokenizer, prompts, 1, settings, sample=False).texts
    before = continuations(bridge, tokenizer, prompts, 1, settings, sample=False).texts
    print(f"edit: {edit}")
    for prompt, (unedited,), (edited,) in zip(prompts, before, after):
        print(f"\nprompt:   {prompt!r}\nunedited: {unedited!r}\nedited:   {edited!r}")
    return 0


# ---------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = ArgumentParser(prog="lens-safety", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_probe(sub)
    _add_direction(sub)
    _add_detox(sub)
    _add_rtp(sub)
    _add_generate(sub)
    _add_compare(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
