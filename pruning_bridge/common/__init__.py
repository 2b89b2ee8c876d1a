"""Plumbing both packages share: errors, results log, JSON dataclasses, tokens, atomic files,
the command-line pattern. The bottom layer: it imports nothing else of ``pruning_bridge``.

The names below are imported on first use (a module ``__getattr__``), so that the command
lines, which need ``common.cli`` and ``common.errors`` to parse their arguments, start without
torch, pandas or plotly.
"""

from .errors import (  # noqa: F401  (re-exported: light)
    DataFormatError, DataNotFoundError, LmEvalMissingError, ModelLoadError, NeedsLocalWeightsError,
    OutOfRangeError, PreflightError, RemoteError, RouterTrainingError, UnknownHookError,
    UnsendableError, UnsupportedArchitectureError, UsageError)
from .lazy import lazy_exports

ERRORS = ["DataFormatError", "DataNotFoundError", "LmEvalMissingError", "ModelLoadError",
          "NeedsLocalWeightsError", "OutOfRangeError", "PreflightError", "RemoteError",
          "RouterTrainingError", "UnknownHookError", "UnsendableError",
          "UnsupportedArchitectureError", "UsageError"]

_EXPORTS = {
    "jsonable": ("JsonDataclass",), "layers": ("check_layers",),
    "results": ("ResultsLog", "row_key"), "sweep": ("Prepared", "SweepRow", "run_sweep"),
    "tokens": ("encode_batch", "left_pad", "left_padding", "model_device", "position_ids"),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, eager=ERRORS)
