"""Plumbing both packages share: results log, JSON dataclasses, tokens, figures, the report."""

from .errors import OutOfRangeError, UsageError
from .figures import save_figure
from .jsonable import JsonDataclass
from .layers import check_layers
from .report import Section, package_versions, write_report
from .results import ResultsLog, row_key
from .sweep import Prepared, SweepRow, run_sweep
from .tokens import encode_batch, left_pad, left_padding, model_device, position_ids

__all__ = ["JsonDataclass", "OutOfRangeError", "Prepared", "ResultsLog", "Section", "SweepRow",
           "UsageError", "check_layers", "encode_batch", "left_pad", "left_padding",
           "model_device", "package_versions", "position_ids", "row_key", "run_sweep",
           "save_figure", "write_report"]
