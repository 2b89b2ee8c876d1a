"""Deprecated: moved to ``pruning_bridge.bridge.adapters``."""

from .common.deprecation import moved

__getattr__ = moved(__name__, "pruning_bridge.bridge.adapters")
