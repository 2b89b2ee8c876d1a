"""Command line: ``pruning-bridge {eval,layers,weights,heads,lm-eval} --model SPEC ...``.

(``python -m pruning_bridge`` is the same.)
One ``_add_<command>`` per subcommand builds its options (shared ones from
``pruning_bridge.common.cli`` and ``pruning_bridge.cli_options``); lists are comma lists. Bad input exits with 2 and one line.
The parser imports nothing heavy: each ``_run_<command>`` imports what it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from .cli_options import (add_eval_options, add_model_options, check_options_fit, eval_settings,
                          load_model_from_args)
from .common.cli import (TASKS, ArgumentParser, bounded, choice_list, comma_list, count, count0,
                         input_folder, ints, names, naming_option, output_file, output_folder,
                         run_command)

SWEEP_OUT_HELP = "results JSONL (appended; rerun to resume)"

# Written here, not imported, so that parsing needs no torch; a test keeps them equal to
# pruning.weight_sweep's and heads.sweep's.
REPORT_SPARSITIES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
PRUNING_METHODS = ("magnitude", "wanda")
SCOPES = ("per_matrix", "global")
REPORT_FRACTIONS = (0.9, 0.75, 0.5)


def _sparsity(text: str) -> float:
    """A sparsity in [0, 1); a percentage gets a hint."""
    value = bounded(float)(text)
    if not 0 <= value < 1:
        hint = f" (did you mean {value / 100:g}?)" if 1 <= value < 100 else ""
        raise argparse.ArgumentTypeError(f"a sparsity is a fraction in [0, 1), e.g. 0.5 to zero "
                                         f"half of the weights; got {text}{hint}")
    return value


sparsities = comma_list(_sparsity, "sparsities")
fractions = comma_list(bounded(float, maximum=1.0, above=0.0), "fractions")


def _comma(values) -> str:
    return ",".join(str(v) for v in values)


# ---------------------------------------------------------------- eval


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model on MMLU, GSM8K or WikiText-2 perplexity")
    add_model_options(p)
    p.add_argument("--task", required=True, choices=TASKS)
    add_eval_options(p, tasks=None)
    p.add_argument("--out", type=output_file, default=None, help="write the result as JSON here")
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from .evals.tasks import evaluate

    settings = eval_settings(args, tasks=[args.task])
    model, tokenizer = load_model_from_args(args)
    check_options_fit(model, args)
    start = time.perf_counter()
    result = evaluate(model, tokenizer, args.task, settings)
    result.settings = {"model": args.model, "dtype": args.dtype,
                       **settings.task_settings(args.task, model), **result.settings,
                       "seconds": round(time.perf_counter() - start, 2)}
    print(result)
    if args.out:
        print(f"wrote {result.to_json(args.out)}")
    return 0


# ---------------------------------------------------------------- layers


def _add_sweep_options(p, out_help: str = SWEEP_OUT_HELP, folder: bool = False) -> None:
    add_model_options(p)
    add_eval_options(p)
    p.add_argument("--out", type=output_folder if folder else output_file, required=True,
                   help=out_help)
    p.add_argument("--figure", type=output_file, default=None,
                   help="also write the figure here (HTML + PNG)")
    p.set_defaults(resumes="out")


def _add_layers(sub) -> None:
    p = sub.add_parser("layers", help="remove each layer in turn and evaluate (Figure 1)")
    _add_sweep_options(p)
    p.add_argument("--layers", type=ints, default=None,
                   help="comma list of layer indices (default all)")
    p.add_argument("--no-reuse", action="store_true",
                   help="evaluate each pruned model from scratch (the naive loop)")
    p.set_defaults(run=_run_layers)


def _run_layers(args: argparse.Namespace) -> int:
    from .figures import save_figure
    from .figures import layer_removal_figure
    from .pruning.layer_sweep import layer_sweep

    settings = eval_settings(args)
    model, tokenizer = load_model_from_args(args)
    check_options_fit(model, args)
    rows = layer_sweep(model, tokenizer, settings, layers=args.layers, out=args.out,
                       reuse_prefix=not args.no_reuse)
    for row in rows:
        print(f"{row['task']:<11} removed={str(row['config']['removed']):<6} "
              f"{row['metric']}={row['value']:.4f}")
    if args.figure:
        print("wrote", *save_figure(layer_removal_figure(rows, f"{args.model}: removing one layer"),
                                    args.figure))
    return 0


# ---------------------------------------------------------------- weights


def _add_weights(sub) -> None:
    p = sub.add_parser("weights", help="prune weights at several sparsities and evaluate "
                                       "(Figure 2)")
    _add_sweep_options(p)
    p.add_argument("--sparsities", type=sparsities, default=list(REPORT_SPARSITIES),
                   help=f"comma list of fractions in [0, 1) (default {_comma(REPORT_SPARSITIES)})")
    p.add_argument("--method", type=choice_list(PRUNING_METHODS, "methods"),
                   default=["magnitude"], help="magnitude, wanda, or both as a comma list")
    p.add_argument("--scope", default="per_matrix", choices=SCOPES,
                   help="magnitude pruning threshold per matrix or across all matrices")
    p.set_defaults(run=_run_weights)


def _run_weights(args: argparse.Namespace) -> int:
    from .figures import save_figure
    from .figures import weight_pruning_figure
    from .pruning.weight_sweep import weight_sweep

    settings = eval_settings(args)
    model, tokenizer = load_model_from_args(args)
    check_options_fit(model, args)
    rows = weight_sweep(model, tokenizer, settings, args.sparsities, args.method, out=args.out,
                        scope=args.scope)
    for row in rows:
        print(f"{row['method']:<10} sparsity={row['config']['sparsity']:<5} {row['task']:<11} "
              f"{row['metric']}={row['value']:.4f}")
    if args.figure:
        print("wrote", *save_figure(weight_pruning_figure(rows, f"{args.model}: weight pruning"),
                                    args.figure))
    return 0


# ---------------------------------------------------------------- heads


def _add_heads(sub) -> None:
    p = sub.add_parser("heads", help="train a head router, rank heads, evaluate routed and "
                                     "removed heads (Figure 3)")
    _add_sweep_options(p, out_help="output directory (router, importance, results; rerun to "
                                   "resume)", folder=True)
    p.add_argument("--shared", type=count0, default=1, help="always-on heads per layer")
    p.add_argument("--top-k", type=count, default=None,
                   help="top-k of the router whose mean gates rank the heads (Figure 3); "
                        "default: the most selective of the fractions' routers")
    p.add_argument("--steps", type=count, default=100, help="training steps of each router")
    p.add_argument("--layers", type=ints, default=None,
                   help="routed layers, comma list (default all)")
    p.add_argument("--train-batch-size", type=count, default=4)
    p.add_argument("--seq-len", type=bounded(int, 2), default=256)
    p.add_argument("--lr", type=bounded(float, above=0.0), default=1e-2)
    p.add_argument("--beta", type=bounded(float, 0.0), default=0.01,
                   help="load-balancing loss weight")
    p.add_argument("--fractions", type=fractions, default=list(REPORT_FRACTIONS),
                   help=f"active head fractions to evaluate (default {_comma(REPORT_FRACTIONS)})")
    p.set_defaults(run=_run_heads)


def _run_heads(args: argparse.Namespace) -> int:
    from .figures import save_figure
    from .figures import head_importance_figure, head_pruning_figure, router_loss_figure
    from .heads.study import run_head_study

    settings = eval_settings(args)
    model, tokenizer = load_model_from_args(args)
    check_options_fit(model, args)
    study = run_head_study(model, tokenizer, args.out, settings, n_shared=args.shared,
                           top_k=args.top_k, layers=args.layers, steps=args.steps,
                           batch_size=args.train_batch_size, seq_len=args.seq_len, lr=args.lr,
                           beta=args.beta, fractions=args.fractions)
    print(f"router: {study.router.settings()}, {len(study.log.steps)} steps, "
          f"{study.log.seconds_per_step:.2f} s/step")
    for row in study.rows:
        print(f"{row['method']:<8} active={row['config']['active_fraction']:.3f} "
              f"{row['task']:<11} {row['metric']}={row['value']:.4f}")
    print("layers where the router is most selective:",
          ", ".join(f"{layer} ({spread:.2f})" for layer, spread in study.layer_ranking()[:5]))
    figure = args.figure or str(args.out).rstrip("/") + "/figure3_head_importance"
    print("wrote", *save_figure(head_importance_figure(
        study.mean_gates, f"{args.model}: mean router gate", study.router.n_shared), figure))
    print("wrote", *save_figure(router_loss_figure(study.log.steps), figure + "_training"))
    print("wrote", *save_figure(head_pruning_figure(study.rows), figure + "_sweep"))
    return 0


# ---------------------------------------------------------------- lm-eval


def _limit(text: str) -> int | float:
    """lm-eval's ``--limit``: a number of items per task, or a fraction below 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of items (e.g. 100) or a fraction "
                                         f"(e.g. 0.1), got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--limit must be positive, got {text!r}")
    return int(value) if value >= 1 else value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as "
                                         f"'{{\"mmlu_limit\": 57}}', got {text!r} ({error.msg})"
                                         ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _add_lm_eval(sub) -> None:
    p = sub.add_parser(
        "lm-eval", help="evaluate a model (pruned, under an edit, with skipped layers) with "
                        "lm-evaluation-harness (pip install 'layers-to-latents[lm-eval]')")
    add_model_options(p)
    p.add_argument("--tasks", type=names, required=True,
                   help="comma list of lm-eval tasks: the toolkit's pb_mmlu, pb_gsm8k, "
                        "pb_wikitext (local data, see --data-dir) or any lm-eval task "
                        "(arc_easy, hellaswag, ...)")
    p.add_argument("--edit", type=input_folder, default=None,
                   help="a saved lens_safety edit (the folder Edit.save wrote) to apply")
    p.add_argument("--skip-layers", type=ints, default=None,
                   help="comma list of layers to skip (each passes its input through)")
    p.add_argument("--limit", type=_limit, default=None,
                   help="items per task (or a fraction below 1); default all")
    p.add_argument("--num-fewshot", type=count0, default=None,
                   help="lm-eval's few-shot count (the pb_* tasks take theirs from --metadata)")
    p.add_argument("--batch-size", type=count, default=8)
    p.add_argument("--max-length", type=bounded(int, 2), default=None,
                   help="context in tokens for truncation and rolling windows "
                        "(default the model's)")
    p.add_argument("--data-dir", type=input_folder, default=None,
                   help="local data for the pb_* tasks, laid out like the originals "
                        "(e.g. ../shared/data)")
    p.add_argument("--metadata", type=_json_object, default=None,
                   help="JSON for the tasks, e.g. '{\"mmlu_limit\": 57, \"mmlu_shots\": 5}'")
    p.add_argument("--log-samples", action="store_true",
                   help="keep every request and answer in the JSON")
    p.add_argument("--out", type=output_file, default=None,
                   help="write lm-eval's results as JSON here")
    p.set_defaults(run=_run_lm_eval)


def _run_lm_eval(args: argparse.Namespace) -> int:
    # imported here: lm-eval is an optional extra (missing -> one line, exit 2)
    from .evals.lm_eval_adapter import (PruningBridgeLM, evaluate_with_lm_eval, load_edit,
                                        results_table, write_results)

    with naming_option("--edit", args.edit):  # a damaged edit is found before the model loads
        edit = load_edit(args.edit)
    model, tokenizer = load_model_from_args(args)
    check_options_fit(model, args)
    lm = PruningBridgeLM(model, tokenizer, edit=edit, skip_layers=args.skip_layers,
                         batch_size=args.batch_size, max_length=args.max_length)
    start = time.perf_counter()
    results = evaluate_with_lm_eval(lm, tasks=args.tasks, limit=args.limit,
                                    num_fewshot=args.num_fewshot, data_dir=args.data_dir,
                                    metadata=args.metadata, log_samples=args.log_samples)
    results.setdefault("config", {}).update(model_spec=args.model,
                                            seconds=round(time.perf_counter() - start, 2))
    print(results_table(results))
    if args.out:
        print(f"wrote {write_results(results, args.out)}")
    return 0


# ---------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = ArgumentParser(prog="pruning-bridge", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_eval(sub)
    _add_layers(sub)
    _add_weights(sub)
    _add_heads(sub)
    _add_lm_eval(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
