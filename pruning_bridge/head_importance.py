"""Deprecated: moved to ``pruning_bridge.heads.importance``."""

from .common.deprecation import moved

__getattr__ = moved(__name__, "pruning_bridge.heads.importance")
