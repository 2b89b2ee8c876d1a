"""Plumbing both packages share: results log, JSON dataclasses, tokens, figures, the report.

The names below are imported on first use (a module ``__getattr__``), so that the command
lines, which need ``common.cli`` and ``common.errors`` to parse their arguments, start without
torch, pandas or plotly.
"""

from importlib import import_module

from .errors import OutOfRangeError, UsageError

_EXPORTS = {
    "save_figure": "figures", "JsonDataclass": "jsonable", "check_layers": "layers",
    "Section": "report", "package_versions": "report", "write_report": "report",
    "ResultsLog": "results", "row_key": "results",
    "Prepared": "sweep", "SweepRow": "sweep", "run_sweep": "sweep",
    "encode_batch": "tokens", "left_pad": "tokens", "left_padding": "tokens",
    "model_device": "tokens", "position_ids": "tokens",
}

__all__ = sorted(["OutOfRangeError", "UsageError", *_EXPORTS])


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
