"""Attention heads: MoH-style routing, router training, importance, physical removal, and the
routed-vs-removed sweep and study (the report's Figure 3)."""

from .importance import gradient_head_importance, mean_gate_importance
from .removal import (HEAD_SELECTIONS, LayerGrowthWarning, head_counts, heads_to_remove,
                      load_head_pruned, remove_heads)
from .routing import HeadRouter, RoutedHeads, load_balancing_loss, top_k_for
from .study import HeadStudy, run_head_study
from .sweep import REPORT_FRACTIONS, head_sweep
from .training import RouterTrainingError, RouterTrainingLog, train_router, training_windows

__all__ = [
    "HEAD_SELECTIONS", "HeadRouter", "HeadStudy", "LayerGrowthWarning", "REPORT_FRACTIONS",
    "RoutedHeads", "RouterTrainingError", "RouterTrainingLog", "gradient_head_importance",
    "head_counts", "head_sweep", "heads_to_remove", "load_balancing_loss", "load_head_pruned",
    "mean_gate_importance", "remove_heads", "run_head_study", "top_k_for", "train_router",
    "training_windows",
]
