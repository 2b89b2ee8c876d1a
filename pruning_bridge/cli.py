"""Command line: ``python -m pruning_bridge {eval,layers,weights,heads} --model SPEC ...``."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from .evals import EvalResult


def _evaluate(args: argparse.Namespace) -> EvalResult:
    from .evals import default_window, gsm8k_accuracy, mmlu_accuracy, perplexity
    from .evals.data import load_wikitext2
    from .evals.tasks import perplexity_batch
    from .models import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    common = dict(seed=args.seed, data_dir=args.data_dir, batch_size=args.batch_size)
    if args.task == "mmlu":
        result = mmlu_accuracy(model, tokenizer, shots=args.shots or 0,
                               limit=args.limit or 451, **common)
    elif args.task == "gsm8k":
        shots = 8 if args.shots is None else args.shots
        result = gsm8k_accuracy(model, tokenizer, shots=shots, limit=args.limit or 131,
                                max_new_tokens=args.max_new_tokens, **common)
    else:
        window = args.window or default_window(model)
        value = perplexity(model, tokenizer, load_wikitext2("test", args.data_dir), window=window,
                           max_windows=args.limit, batch_size=perplexity_batch(args.batch_size))
        result = EvalResult(task="perplexity", metric="perplexity", value=value,
                            settings={"window": window, "limit": args.limit,
                                      "text": "wikitext-2-raw-v1 test"})
    result.settings = {"model": args.model, "dtype": args.dtype, **result.settings}
    return result


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model on MMLU, GSM8K or WikiText-2 perplexity")
    p.add_argument("--model", required=True,
                   help="hub id, local checkpoint directory, smollm2-135m or tiny-{gpt2,qwen3,llama}")
    p.add_argument("--task", required=True, choices=["mmlu", "gsm8k", "perplexity"])
    p.add_argument("--limit", type=int, default=None,
                   help="questions (MMLU, default 451), problems (GSM8K, default 131) or "
                        "perplexity windows (default: all)")
    p.add_argument("--shots", type=int, default=None, help="MMLU default 0, GSM8K default 8")
    p.add_argument("--window", type=int, default=None,
                   help="perplexity window (default min(context, 2048))")
    p.add_argument("--data-dir", default=None,
                   help="local data laid out like the originals (e.g. ../shared/data); "
                        "default: the Hugging Face hub")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256, help="GSM8K generation length")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    result = _evaluate(args)
    result.settings["seconds"] = round(time.perf_counter() - start, 2)
    print(result)
    if args.out:
        print(f"wrote {result.to_json(args.out)}")
    return 0


def _ints(text: str | None) -> list[int] | None:
    return None if not text else [int(x) for x in text.split(",") if x.strip()]


def _add_common(p, tasks_default: str,
                out_help: str = "results JSONL (appended; rerun to resume)") -> None:
    p.add_argument("--model", required=True,
                   help="hub id, local checkpoint directory, smollm2-135m or tiny-{gpt2,qwen3,llama}")
    p.add_argument("--tasks", default=tasks_default, help="comma-separated: mmlu,gsm8k,perplexity")
    p.add_argument("--limit", type=int, default=None,
                   help="MMLU questions / GSM8K problems / perplexity windows")
    p.add_argument("--window", type=int, default=None, help="perplexity window")
    p.add_argument("--shots", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data-dir", default=None, help="local data (default: the hub)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--figure", default=None, help="also write the figure here (HTML + PNG)")


def _run_layers(args: argparse.Namespace) -> int:
    from .figures import layer_removal_figure, save_figure
    from .models import load_model
    from .pruning.layer_sweep import layer_sweep

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    rows = layer_sweep(model, tokenizer, args.tasks, layers=_ints(args.layers), out=args.out,
                       data_dir=args.data_dir, limit=args.limit, window=args.window,
                       shots=args.shots, seed=args.seed, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, reuse_prefix=not args.no_reuse)
    for row in rows:
        print(f"{row['task']:<11} removed={str(row['config']['removed']):<6} "
              f"{row['metric']}={row['value']:.4f}")
    if args.figure:
        print("wrote", *save_figure(layer_removal_figure(rows, f"{args.model}: removing one layer"),
                                    args.figure))
    return 0


def _add_layers(sub) -> None:
    p = sub.add_parser("layers", help="remove each layer in turn and evaluate (Figure 1)")
    _add_common(p, "mmlu,perplexity")
    p.add_argument("--layers", default=None, help="comma-separated layer indices (default all)")
    p.add_argument("--no-reuse", action="store_true",
                   help="evaluate each pruned model from scratch (the naive loop)")
    p.set_defaults(run=_run_layers)


def _run_weights(args: argparse.Namespace) -> int:
    from .figures import save_figure, weight_pruning_figure
    from .models import load_model
    from .pruning.weight_sweep import weight_sweep

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    sparsities = [float(x) for x in args.sparsities.split(",") if x.strip()]
    rows = weight_sweep(model, tokenizer, args.tasks, sparsities,
                        [m.strip() for m in args.method.split(",")], out=args.out,
                        scope=args.scope, data_dir=args.data_dir, limit=args.limit,
                        window=args.window, shots=args.shots, seed=args.seed,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    for row in rows:
        print(f"{row['method']:<10} sparsity={row['config']['sparsity']:<5} {row['task']:<11} "
              f"{row['metric']}={row['value']:.4f}")
    if args.figure:
        print("wrote", *save_figure(weight_pruning_figure(rows, f"{args.model}: weight pruning"),
                                    args.figure))
    return 0


def _add_weights(sub) -> None:
    p = sub.add_parser("weights", help="prune weights at several sparsities and evaluate "
                                       "(Figure 2)")
    _add_common(p, "mmlu,perplexity")
    p.add_argument("--sparsities", default="0.05,0.1,0.2,0.3,0.4,0.5")
    p.add_argument("--method", default="magnitude",
                   help="magnitude, wanda, or both comma-separated")
    p.add_argument("--scope", default="per_matrix", choices=["per_matrix", "global"],
                   help="magnitude pruning threshold per matrix or across all matrices")
    p.set_defaults(run=_run_weights)


def _run_heads(args: argparse.Namespace) -> int:
    from .figures import (
        head_importance_figure,
        head_pruning_figure,
        router_loss_figure,
        save_figure,
    )
    from .heads.study import run_head_study
    from .models import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    study = run_head_study(
        model, tokenizer, args.out, n_shared=args.shared, top_k=args.top_k,
        layers=_ints(args.layers), steps=args.steps, batch_size=args.train_batch_size,
        seq_len=args.seq_len, lr=args.lr, beta=args.beta,
        fractions=[float(x) for x in args.fractions.split(",")], tasks=args.tasks,
        data_dir=args.data_dir, limit=args.limit, window=args.window, shots=args.shots,
        max_new_tokens=args.max_new_tokens, eval_batch_size=args.batch_size, seed=args.seed)
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


def _add_heads(sub) -> None:
    p = sub.add_parser("heads", help="train a head router, rank heads, evaluate routed and "
                                     "removed heads (Figure 3)")
    _add_common(p, "mmlu,perplexity", out_help="output directory (router, importance, results; "
                                               "rerun to resume)")
    p.add_argument("--shared", type=int, default=1, help="always-on heads per layer")
    p.add_argument("--top-k", type=int, default=None,
                   help="top-k of the router whose mean gates rank the heads (Figure 3); "
                        "default: the most selective of the fractions' routers")
    p.add_argument("--steps", type=int, default=100, help="training steps of each router")
    p.add_argument("--layers", default=None, help="routed layers, comma-separated (default all)")
    p.add_argument("--train-batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--beta", type=float, default=0.01, help="load-balancing loss weight")
    p.add_argument("--fractions", default="0.9,0.75,0.5", help="active head fractions to evaluate")
    p.set_defaults(run=_run_heads)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="python -m pruning_bridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_eval(sub)
    _add_layers(sub)
    _add_weights(sub)
    _add_heads(sub)
    return parser


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run its subcommand; bad input prints one clear line and returns 2."""
    from .evals.data import DataNotFoundError
    from .heads.training import RouterTrainingError
    from .models import ModelLoadError

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ModelLoadError, DataNotFoundError, FileNotFoundError, ValueError, IndexError,
            RouterTrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
