"""What the figure scripts share: the options that pick a model, its evaluation and where results
go (the toolkit's own CLI options, from ``pruning_bridge.cli_options``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pruning_bridge.cli_options import add_eval_options, add_model_options, eval_settings

__all__ = ["eval_settings", "figure_parser", "results_dir"]


def figure_parser(doc: str, tasks: str = "mmlu,perplexity") -> argparse.ArgumentParser:
    """A parser with the model options (``--model``, default smollm2-135m, ``--dtype``,
    ``--device``), the evaluation options (``--tasks --limit --window`` (default 512) ``--shots
    --seed --max-new-tokens --batch-size --data-dir``), ``--results`` and ``--figures``. A script
    adds its own options and reads ``eval_settings(args)`` and ``results_dir(args)``."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser, default="smollm2-135m")
    add_eval_options(parser, tasks=tasks, window=512)
    parser.add_argument("--results", default="results")
    parser.add_argument("--figures", default="figures")
    return parser


def results_dir(args: argparse.Namespace) -> Path:
    """``results/<model>/`` (a hub id's ``/`` becomes ``--``)."""
    return Path(args.results) / args.model.replace("/", "--")
