"""Deprecated: moved to ``pruning_bridge.heads.study``."""

from .common.deprecation import moved

__getattr__ = moved(__name__, "pruning_bridge.heads.study")
