"""Command line: ``python -m lens_safety probe --model SPEC --data-dir DIR --out DIR``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


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
        from pruning_bridge.figures import save_figure

        print("wrote", *save_figure(summary["probes"].figure(f"{args.model}: harmful-vs-neutral "
                                                              f"probe per layer"),
                                    f"{args.out}/probes"))
    return 0


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from pruning_bridge.data import DataNotFoundError
    from pruning_bridge.models import ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ModelLoadError, DataNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
