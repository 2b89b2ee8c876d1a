"""Deprecated: moved to ``pruning_bridge.common.results``."""

from .common.deprecation import moved

__getattr__ = moved(__name__, "pruning_bridge.common.results")
