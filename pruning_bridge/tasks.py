"""Deprecated: moved to ``pruning_bridge.evals.tasks``."""

from .common.deprecation import moved

__getattr__ = moved(__name__, "pruning_bridge.evals.tasks")
