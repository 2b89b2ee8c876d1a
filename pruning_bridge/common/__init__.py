"""Plumbing both packages share: results log, JSON dataclasses, tokens, figures, the report."""

from .figures import save_figure
from .jsonable import JsonDataclass
from .report import Section, package_versions, write_report
from .results import ResultsLog, row_key
from .tokens import encode_batch, left_pad, left_padding, model_device, position_ids

__all__ = ["JsonDataclass", "ResultsLog", "Section", "encode_batch", "left_pad", "left_padding",
           "model_device", "package_versions", "position_ids", "row_key", "save_figure",
           "write_report"]
