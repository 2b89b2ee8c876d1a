"""The command-line pattern both packages share, and its helpers.

Each CLI has one ``build_parser()`` that calls one ``_add_<command>(sub)`` per subcommand; each
sets ``run=_run_<command>``, and ``main`` is ``run_command(build_parser(), argv)``. Every list
option is a comma list (``--tasks mmlu,perplexity``, ``--layers 0,3``, ``--alphas 0,2,4``).

Arguments are parsed before anything heavy is imported: this module and the parsers import only
the standard library, and each ``_run_<command>`` imports torch, the models and the evaluations
it needs. So ``--help`` and argument errors answer at once, and the argument types here check
what can be checked without a model (types, ranges, names, output paths).

Exit codes: 0 done; 2 bad input, from the parser or a ``UsageError`` raised while running (one
line on stderr, ``error: <what to do>``); 130 interrupted (Ctrl-C; one line saying what was
saved); any other exception is a bug and keeps its traceback (exit 1).

The options that load a model or set up an evaluation (``--model``, ``--tasks``, ...) are in
``pruning_bridge.cli_options``: they need the models and evaluations, which sit above ``common``.

(Not re-exported from ``pruning_bridge.common``: a command-line helper, not library plumbing.)
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Sequence, TypeVar

from .errors import UsageError

T = TypeVar("T")

# Written here, not imported, so that parsing needs no torch; a test keeps them equal to
# evals.tasks.TASKS and the names models.resolve_dtype accepts.
TASKS = ("mmlu", "gsm8k", "perplexity")
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "half")

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose errors are one line on stderr, exit status 2:
    ``error: argument --limit: ... (usage: pruning-bridge eval --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {' '.join(message.split())} (usage: {self.prog} --help)\n")


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run its subcommand (``args.run``); return the exit status.

    A ``UsageError`` (bad input: an unknown model, missing data, an out-of-range value) prints
    ``error: <message>`` on one line to stderr and returns 2. Ctrl-C prints one line saying
    what is saved (see ``interrupted_message``) and returns 130. Anything else propagates with
    its traceback: a plain ``ValueError`` deep in torch is a bug to see, not bad input to hide.
    """
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as error:
        message = str(error)
        option = getattr(error, "option", None)  # e.g. "--data-dir" for a bad data file
        value = getattr(args, (option or "").lstrip("-").replace("-", "_"), None)
        if option and value is not None and not message.startswith(option):
            message = f"{option} {value}: {message}"
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(interrupted_message(args), file=sys.stderr)
        return EXIT_INTERRUPTED


@contextmanager
def naming_option(option: str, value: object) -> Iterator[None]:
    """Prefix a ``UsageError`` raised inside with the option it comes from (``--edit DIR: ...``),
    so that the one line says which argument to fix (no prefix when ``value`` is None: the
    option was not given)."""
    try:
        yield
    except UsageError as error:
        if value is None:
            raise
        raise UsageError(f"{option} {value}: {error}") from error


def interrupted_message(args: argparse.Namespace) -> str:
    """The line printed on Ctrl-C. A command that saves as it goes sets ``resumes`` to the
    destination of the option naming where (``p.set_defaults(resumes="out")``)."""
    saved_in = getattr(args, getattr(args, "resumes", None) or "", None)
    if saved_in:
        return (f"interrupted: the results finished so far are saved in {saved_in}; rerun the "
                f"same command to resume from there.")
    return (f"interrupted: {args.command} saves its results only when it finishes, so nothing "
            f"was saved; rerun the same command to start again.")


# ---------------------------------------------------------------- argument types


def bounded(kind: Callable[[str], T], minimum: T | None = None, maximum: T | None = None, *,
            above: T | None = None, below: T | None = None) -> Callable[[str], T]:
    """An argparse ``type``: a ``kind`` value (int or float) within the given bounds
    (``minimum`` / ``maximum`` inclusive, ``above`` / ``below`` exclusive)."""
    rules = [(minimum, lambda v: v >= minimum, f"at least {minimum}"),
             (maximum, lambda v: v <= maximum, f"at most {maximum}"),
             (above, lambda v: v > above, f"greater than {above}"),
             (below, lambda v: v < below, f"less than {below}")]
    rules = [(holds, text) for bound, holds, text in rules if bound is not None]
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> T:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not all(holds(value) for holds, _ in rules):
            raise argparse.ArgumentTypeError(
                f"must be {' and '.join(words for _, words in rules)}, got {text}")
        return value

    parse.__name__ = noun
    return parse


count = bounded(int, 1)         # how many of something: 1 or more
count0 = bounded(int, 0)        # 0 or more (a seed, a number of shots)
window_size = bounded(int, 2)   # tokens: at least one to condition on and one to predict


EXAMPLES = {"integers": "0,3,5", "numbers": "0.1,0.5", "names": "a,b"}


def comma_list(item: Callable[[str], T], name: str) -> Callable[[str], list[T]]:
    """An argparse ``type`` for a comma list of ``item`` values (``"0,3"`` -> ``[0, 3]``)."""
    def parse(text: str) -> list[T]:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected a comma list of {name}, got {text!r}")
        try:
            return [item(part) for part in parts]
        except argparse.ArgumentTypeError as error:
            where = f" (in {text!r})" if len(parts) > 1 else ""
            raise argparse.ArgumentTypeError(f"{error}{where}") from None
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of {name} (e.g. {EXAMPLES.get(name, 'a,b')}), got "
                f"{text!r}") from None
    parse.__name__ = f"comma list of {name}"
    return parse


ints = comma_list(int, "integers")
floats = comma_list(float, "numbers")
names = comma_list(str, "names")


def choice_list(choices: Sequence[str], name: str) -> Callable[[str], list[str]]:
    """An argparse ``type`` for a comma list of ``choices`` (each once, in the order given)."""
    def parse(text: str) -> list[str]:
        values = comma_list(str, name)(text)
        unknown = [value for value in values if value not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {name} {', '.join(map(repr, unknown))}; "
                                             f"choose from {', '.join(choices)}")
        return list(dict.fromkeys(values))
    parse.__name__ = f"comma list of {name}"
    return parse


tasks_list = choice_list(TASKS, "tasks")


def limits(text: str) -> int | dict[str, int]:
    """An argparse ``type`` for ``--limit``: one number for every task, or ``task=N`` pairs."""
    try:
        if "=" not in text:
            values: int | dict[str, int] = int(text)
        else:
            pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
            values = {task.strip(): int(value) for task, value in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or task=number pairs (e.g. 57 or mmlu=57,perplexity=4), got "
            f"{text!r}") from None
    if isinstance(values, dict):
        unknown = [task for task in values if task not in TASKS]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown task {', '.join(map(repr, unknown))} in "
                                             f"{text!r}; tasks are {', '.join(TASKS)}")
    if min(values.values() if isinstance(values, dict) else [values]) < 1:
        raise argparse.ArgumentTypeError(f"limits must be at least 1, got {text!r}")
    return values


def dtype_name(text: str) -> str:
    """An argparse ``type`` for ``--dtype``: a name ``models.resolve_dtype`` accepts."""
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; use float32, bfloat16 or "
                                         f"float16 (or fp32, bf16, fp16, half)")
    return text


# ---------------------------------------------------------------- output paths


def _writable_folder(path: Path) -> str | None:
    """Why files cannot be created at ``path`` (None if they can): the nearest existing folder
    on the way must be a writable folder (missing folders below it are created)."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"the folder {existing} is not writable"
    return None


def output_file(text: str) -> str:
    """An argparse ``type`` for a file to write (``--out results.jsonl``): not a folder, in a
    folder that can be written; checked before any model is loaded."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; pass a file path in it (e.g. "
                                         f"{path / 'results.json'})")
    problem = _writable_folder(path.parent)
    if problem:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {problem}; pass a path in a "
                                         f"writable folder")
    return text


def output_folder(text: str) -> str:
    """An argparse ``type`` for a folder to write into (``--out DIR``): not a file, and
    writable (or creatable); checked before any model is loaded."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; pass a folder (it is created if "
                                         f"missing)")
    problem = _writable_folder(path)
    if problem:
        raise argparse.ArgumentTypeError(f"cannot write into {text}: {problem}; pass a "
                                         f"writable folder")
    return text


def input_folder(text: str) -> str:
    """An argparse ``type`` for a folder to read (``--data-dir``, ``--edit``, ``--from``); what
    is in it is checked by its loader."""
    if not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return text
