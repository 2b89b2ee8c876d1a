"""What the figure scripts share: the options that pick a model, its data and where results go."""

from __future__ import annotations

import argparse
from pathlib import Path


def figure_parser(doc: str, tasks: str = "mmlu,perplexity") -> argparse.ArgumentParser:
    """A parser with ``--model --tasks --limit --window --data-dir --results --figures --dtype
    --device``; a script adds its own options and reads ``results_dir(args)``."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default=tasks)
    parser.add_argument("--limit", type=int, default=None,
                        help="MMLU questions / GSM8K problems / perplexity windows per task")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--results", default="results")
    parser.add_argument("--figures", default="figures")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default=None)
    return parser


def results_dir(args: argparse.Namespace) -> Path:
    """``results/<model>/`` (a hub id's ``/`` becomes ``--``)."""
    return Path(args.results) / args.model.replace("/", "--")
