"""Plumbing both packages share: results log, JSON dataclasses, tokens, figures, the report.

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
    "figures": ("save_figure",), "jsonable": ("JsonDataclass",), "layers": ("check_layers",),
    "report": ("Section", "package_versions", "write_report"),
    "results": ("ResultsLog", "row_key"), "sweep": ("Prepared", "SweepRow", "run_sweep"),
    "tokens": ("encode_batch", "left_pad", "left_padding", "model_device", "position_ids"),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, eager=ERRORS)
