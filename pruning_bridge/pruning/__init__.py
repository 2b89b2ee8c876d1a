"""Structured layer removal and unstructured weight pruning, each with its sweep."""

from .layer_sweep import layer_sweep, rank_correlation
from .layers import block_influence, decoder_layers, drop_layers, skip_layers
from .weight_sweep import REPORT_SPARSITIES, calibration_texts, weight_sweep
from .weights import (SparsityReport, apply_masks, input_norms, magnitude_masks, magnitude_prune,
                      nm_masks, nm_prune, prunable_linears, prune_permanently, sparsity_report,
                      wanda_masks, wanda_prune)

__all__ = [
    "REPORT_SPARSITIES", "SparsityReport", "apply_masks", "block_influence", "calibration_texts",
    "decoder_layers", "drop_layers", "input_norms", "layer_sweep", "magnitude_masks",
    "magnitude_prune", "nm_masks", "nm_prune", "prunable_linears", "prune_permanently",
    "rank_correlation", "skip_layers", "sparsity_report", "wanda_masks", "wanda_prune",
    "weight_sweep",
]
