"""Deprecated: moved to ``pruning_bridge.pruning.layer_sweep``."""

from .common.deprecation import moved

__getattr__ = moved(__name__, "pruning_bridge.pruning.layer_sweep")
