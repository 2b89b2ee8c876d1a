"""The command-line options that load a model or set up an evaluation, shared by both CLIs
and the examples: ``add_model_options`` / ``load_model_from_args``, ``check_options_fit``,
``add_eval_options`` / ``eval_settings``.

They sit above ``pruning_bridge.common`` because they end in the models, the bridge and the
evaluations; parsing still imports only the standard library (each helper that loads or runs
something imports it when called), so ``--help`` and bad arguments answer at once.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Sequence

from .common.cli import (TASKS, count, count0, dtype_name, input_folder, limits, naming_option,
                         tasks_list, window_size)
from .common.errors import UsageError

if TYPE_CHECKING:
    from .evals.tasks import EvalSettings

MODEL_HELP = ("hub id, local checkpoint directory, smollm2-135m or tiny-{gpt2,qwen3,llama} "
              "(random weights, for tests)")

# Written here, not imported, so that parsing needs no torch; a test keeps them equal to
# EvalSettings' defaults.
EVAL_SEED, EVAL_MAX_NEW_TOKENS, EVAL_BATCH_SIZE = 0, 256, 8


# ---------------------------------------------------------------- model options


def add_model_options(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--model`` (required unless ``default``), ``--dtype``, ``--device``, and ``--remote``
    / ``--ndif-host`` / ``--ndif-api-key`` to run on an NDIF server instead."""
    parser.add_argument("--model", required=default is None, default=default, help=MODEL_HELP)
    parser.add_argument("--dtype", type=dtype_name, default=None,
                        help="float32 (default), bfloat16 or float16")
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


def load_model_from_args(args: argparse.Namespace):
    """``(model, tokenizer)`` for the options of ``add_model_options``; with ``--remote`` (or
    ``--ndif-host``) the model is a remote ``HookBridge`` (``HookBridge.remote``)."""
    host = getattr(args, "ndif_host", None)
    if getattr(args, "remote", False) or host:
        from .bridge import HookBridge

        if args.dtype or args.device:
            raise UsageError("--dtype and --device choose how the model is loaded here; with "
                             "--remote the server's deployment decides them: drop them.")
        bridge = HookBridge.remote(args.model, host=host or os.environ.get("NDIF_HOST"),
                                   api_key=args.ndif_api_key or os.environ.get("NDIF_API_KEY"))
        return bridge, bridge.tokenizer
    from .models import check_device, load_model

    with naming_option("--device", args.device):
        check_device(args.device)
    with naming_option("--model", args.model):
        return load_model(args.model, dtype=args.dtype, device=args.device)


def check_options_fit(model, args: argparse.Namespace) -> None:
    """``UsageError`` naming the option when a length in tokens (``--window``, ``--seq-len``,
    ``--max-length``) is longer than ``model``'s context, or a layer list (``--layers``,
    ``--skip-layers``) is outside its layers; call it once the model is loaded, before any work."""
    from .bridge import model_dims
    from .common.layers import check_layers
    from .evals.perplexity import check_window

    for dest in ("window", "seq_len", "max_length"):
        if getattr(args, dest, None) is not None:
            check_window(model, getattr(args, dest), option="--" + dest.replace("_", "-"))
    for dest in ("layers", "skip_layers"):
        if getattr(args, dest, None) is not None:
            option, value = "--" + dest.replace("_", "-"), ",".join(map(str, getattr(args, dest)))
            with naming_option(option, value):
                check_layers(getattr(args, dest), model_dims(model).n_layers)


# ---------------------------------------------------------------- evaluation options


def add_eval_options(parser: argparse.ArgumentParser, tasks: str | None = "mmlu,perplexity",
                     window: int | None = None) -> None:
    """The options of an ``EvalSettings``; ``tasks=None`` leaves ``--tasks`` to the command."""
    if tasks is not None:
        parser.add_argument("--tasks", type=tasks_list, default=tasks_list(tasks),
                            help=f"comma list of {','.join(TASKS)} (default {tasks})")
    parser.add_argument("--limit", type=limits, default=None,
                        help="MMLU questions (default 451) / GSM8K problems (default 131) / "
                             "perplexity windows (default all): one number, or per task "
                             "(mmlu=57,perplexity=4)")
    parser.add_argument("--window", type=window_size, default=window,
                        help="perplexity window in tokens, at most the model's context "
                             f"(default {window or 'min(context, 2048)'})")
    parser.add_argument("--shots", type=count0, default=None,
                        help="MMLU default 0, GSM8K default 8")
    parser.add_argument("--seed", type=count0, default=EVAL_SEED,
                        help="draws the MMLU / GSM8K subsets and exemplars")
    parser.add_argument("--max-new-tokens", type=count, default=EVAL_MAX_NEW_TOKENS,
                        help="GSM8K generation length")
    parser.add_argument("--batch-size", type=count, default=EVAL_BATCH_SIZE)
    parser.add_argument("--data-dir", type=input_folder, default=None,
                        help="local data laid out like the originals (e.g. ../shared/data); "
                             "default: the Hugging Face hub")


def eval_settings(args: argparse.Namespace, tasks: Sequence[str] | None = None) -> EvalSettings:
    """The ``EvalSettings`` of the options of ``add_eval_options`` (``tasks`` overrides)."""
    from .evals.tasks import EvalSettings

    return EvalSettings(tasks=tuple(tasks if tasks is not None else args.tasks),
                        limit=args.limit, window=args.window, shots=args.shots, seed=args.seed,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        data_dir=args.data_dir)
