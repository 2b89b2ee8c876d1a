"""Deprecated: moved to ``pruning_bridge.common.report``."""

from .common.deprecation import moved

__getattr__ = moved(__name__, "pruning_bridge.common.report")
