"""The command-line pattern both packages share, and its helpers.

Each CLI has one ``build_parser()`` that calls one ``_add_<command>(sub)`` per subcommand; each
sets ``run=_run_<command>``, and ``main`` is ``run_command(build_parser(), argv)``. Every list
option is a comma list (``--tasks mmlu,perplexity``, ``--layers 0,3``, ``--alphas 0,2,4``).

Exit codes: 0 done; 2 bad input, from argparse or a ``UsageError`` raised while running (one
line on stderr, ``error: <what to do>``); any other exception is a bug and keeps its traceback
(exit 1).

(Not re-exported from ``pruning_bridge.common``: this module imports the evaluation settings and
the model loader, which themselves use ``common``.)
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence, TypeVar

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..evals.tasks import TASKS, EvalSettings, parse_tasks
from ..models import load_model
from .errors import UsageError

T = TypeVar("T")

MODEL_HELP = ("hub id, local checkpoint directory, smollm2-135m or tiny-{gpt2,qwen3,llama} "
              "(random weights, for tests)")


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run its subcommand (``args.run``); return the exit status.

    A ``UsageError`` (bad input: an unknown model, missing data, an out-of-range value) prints
    ``error: <message>`` on one line to stderr and returns 2. Anything else propagates with its
    traceback: a plain ``ValueError`` deep in torch is a bug to see, not bad input to hide.
    """
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------- list options


EXAMPLES = {"integers": "0,3,5", "numbers": "0.1,0.5", "names": "a,b"}


def comma_list(item: Callable[[str], T], name: str) -> Callable[[str], list[T]]:
    """An argparse ``type`` for a comma list of ``item`` values (``"0,3"`` -> ``[0, 3]``)."""
    def parse(text: str) -> list[T]:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected a comma list of {name}, got {text!r}")
        try:
            return [item(part) for part in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of {name} (e.g. {EXAMPLES[name]}), got {text!r}"
            ) from None
    parse.__name__ = f"comma list of {name}"
    return parse


ints = comma_list(int, "integers")
floats = comma_list(float, "numbers")
names = comma_list(str, "names")


def tasks_list(text: str) -> list[str]:
    """An argparse ``type`` for ``--tasks``: a comma list of known task names."""
    try:
        return parse_tasks(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def limits(text: str) -> int | dict[str, int]:
    """An argparse ``type`` for ``--limit``: one number for every task, or ``task=N`` pairs."""
    try:
        if "=" not in text:
            return int(text)
        pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
        return {task.strip(): int(value) for task, value in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or task=number pairs (e.g. 57 or mmlu=57,perplexity=4), got "
            f"{text!r}") from None


# ---------------------------------------------------------------- model options


def add_model_options(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--model`` (required unless ``default``), ``--dtype``, ``--device``, and ``--remote``
    / ``--ndif-host`` / ``--ndif-api-key`` to run on an NDIF server instead."""
    parser.add_argument("--model", required=default is None, default=default, help=MODEL_HELP)
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    parser.add_argument("--device", default=None,
                        help="cpu (default), cuda, cuda:1, or auto (spread over all GPUs)")
    parser.add_argument("--remote", action="store_true",
                        help="run on an NDIF server (nnsight remote execution): --model is the "
                             "hub id or checkpoint path the server has deployed; no weights are "
                             "loaded here")
    parser.add_argument("--ndif-host", default=None,
                        help="the NDIF server's URL (implies --remote; default: $NDIF_HOST, "
                             "else nnsight's configured host, the public NDIF service)")
    parser.add_argument("--ndif-api-key", default=None,
                        help="NDIF API key (default: $NDIF_API_KEY, else nnsight's configured)")


def load_model_from_args(
        args: argparse.Namespace) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` for the options of ``add_model_options``; with ``--remote`` (or
    ``--ndif-host``) the model is a remote ``HookBridge`` (``HookBridge.remote``)."""
    host = getattr(args, "ndif_host", None)
    if getattr(args, "remote", False) or host:
        import os

        from ..bridge import HookBridge

        if args.dtype or args.device:
            raise UsageError("--dtype and --device choose how the model is loaded here; with "
                             "--remote the server's deployment decides them: drop them.")
        bridge = HookBridge.remote(args.model, host=host or os.environ.get("NDIF_HOST"),
                                   api_key=args.ndif_api_key or os.environ.get("NDIF_API_KEY"))
        return bridge, bridge.tokenizer
    return load_model(args.model, dtype=args.dtype, device=args.device)


# ---------------------------------------------------------------- evaluation options


def add_eval_options(parser: argparse.ArgumentParser, tasks: str | None = "mmlu,perplexity",
                     window: int | None = None) -> None:
    """The options of an ``EvalSettings``; ``tasks=None`` leaves ``--tasks`` to the command."""
    if tasks is not None:
        parser.add_argument("--tasks", type=tasks_list, default=parse_tasks(tasks),
                            help=f"comma list of {','.join(TASKS)} (default {tasks})")
    parser.add_argument("--limit", type=limits, default=None,
                        help="MMLU questions (default 451) / GSM8K problems (default 131) / "
                             "perplexity windows (default all): one number, or per task "
                             "(mmlu=57,perplexity=4)")
    parser.add_argument("--window", type=int, default=window,
                        help="perplexity window in tokens (default "
                             f"{window or 'min(context, 2048)'})")
    parser.add_argument("--shots", type=int, default=None, help="MMLU default 0, GSM8K default 8")
    parser.add_argument("--seed", type=int, default=EvalSettings.seed,
                        help="draws the MMLU / GSM8K subsets and exemplars")
    parser.add_argument("--max-new-tokens", type=int, default=EvalSettings.max_new_tokens,
                        help="GSM8K generation length")
    parser.add_argument("--batch-size", type=int, default=EvalSettings.batch_size)
    parser.add_argument("--data-dir", default=None,
                        help="local data laid out like the originals (e.g. ../shared/data); "
                             "default: the Hugging Face hub")


def eval_settings(args: argparse.Namespace, tasks: Sequence[str] | None = None) -> EvalSettings:
    """The ``EvalSettings`` of the options of ``add_eval_options`` (``tasks`` overrides)."""
    return EvalSettings(tasks=tuple(tasks if tasks is not None else args.tasks),
                        limit=args.limit, window=args.window, shots=args.shots, seed=args.seed,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        data_dir=args.data_dir)
