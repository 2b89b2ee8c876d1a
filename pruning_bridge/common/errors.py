"""The one kind of error that means "bad input": the message says what to do.

Command lines print a ``UsageError`` on one line and exit with status 2; any other exception is
a bug and keeps its traceback (exit 1). ``UsageError`` is a ``ValueError``, and the named errors
of the toolkit derive from it as well as from their natural built-in class.
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
