"""The one kind of error that means "bad input": the message says what to do.

Command lines print a ``UsageError`` on one line and exit with status 2; any other exception is
a bug and keeps its traceback (exit 1). ``UsageError`` is a ``ValueError``, and the named errors
of the toolkit derive from it as well as from their natural built-in class. Every one of them
is defined here; the modules that raise them import them from here and re-export them (e.g.
``pruning_bridge.models.ModelLoadError``, ``pruning_bridge.evals.DataNotFoundError``).
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input (an argument, a file, a model or data that cannot be used as given)."""


class OutOfRangeError(UsageError, IndexError):
    """An index (layer, head) outside the model."""


class NeedsLocalWeightsError(UsageError):
    """Work that needs the model's weights here, asked of a remote bridge (NDIF)."""


def require_local_weights(model, what: str) -> None:
    """Raise ``NeedsLocalWeightsError`` when ``model`` (an HF model or a bridge) has no weights
    here: a remote bridge (NDIF) or a model on the meta device. ``what`` names the work."""
    remote = getattr(model, "remote", None)
    module = getattr(model, "model", model) if remote is not None else model
    meta = any(p.is_meta for p in module.parameters()) if hasattr(module, "parameters") else False
    if remote is not None or meta:
        raise NeedsLocalWeightsError(
            f"{what} needs the model's weights on this machine, and they are not here"
            + (f" (this bridge runs on an NDIF server: {remote})" if remote is not None else
               " (the model is on the meta device)")
            + ". Load the model locally (pruning_bridge.models.load_model) for weight edits "
              "and training; hook-based studies (caching, ablation, skipped layers, routed "
              "heads at inference) run remotely.")


class RemoteError(UsageError):
    """A request to an NDIF server failed: the message names the server, what was sent and what
    to do (start the server, check the URL, retry later); the original error is its cause."""


class ModelLoadError(RuntimeError, UsageError):
    """A model spec could not be turned into a model; the message says what to do."""


class UnsupportedArchitectureError(UsageError):
    """The model's family is not in the architecture table."""


class UnknownHookError(KeyError, UsageError):
    """A hook name that the bridge does not provide; the message lists the closest ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnsendableError(UsageError):
    """A function or object that an NDIF server could not run inside a trace."""


class DataNotFoundError(FileNotFoundError, UsageError):
    """A data set is neither in the given local directory nor reachable on the hub."""

    option = "--data-dir"  # the command-line option a CLI names in the one-line error


class DataFormatError(UsageError):
    """A local data file has a line or row that is not in the original format."""

    option = "--data-dir"


class LmEvalMissingError(ImportError, UsageError):
    """lm-evaluation-harness is not installed (it is an optional extra)."""


class RouterTrainingError(RuntimeError, UsageError):
    """Training hit a non-finite value; the message names the step and the layer."""


class PreflightError(UsageError):
    """Something the run needs is missing; the message lists what and how to get it."""
