"""The package layout: old import paths still work for one release, with a DeprecationWarning."""

import importlib

import pytest

MOVED = {
    "adapters": ("bridge.adapters", "adapter_for"),
    "data": ("evals.data", "load_mmlu"),
    "tasks": ("evals.tasks", "parse_tasks"),
    "results": ("common.results", "ResultsLog"),
    "report": ("common.report", "write_report"),
    "layers": ("pruning.layers", "skip_layers"),
    "layer_sweep": ("pruning.layer_sweep", "layer_sweep"),
    "weights": ("pruning.weights", "magnitude_prune"),
    "weight_sweep": ("pruning.weight_sweep", "weight_sweep"),
    "head_routing": ("heads.routing", "RoutedHeads"),
    "router_training": ("heads.training", "train_router"),
    "head_importance": ("heads.importance", "mean_gate_importance"),
    "head_removal": ("heads.removal", "remove_heads"),
    "head_sweep": ("heads.sweep", "head_sweep"),
    "head_study": ("heads.study", "run_head_study"),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_import_path_warns_and_forwards(old):
    new, name = MOVED[old]
    module = importlib.import_module(f"pruning_bridge.{old}")
    with pytest.warns(DeprecationWarning, match=f"pruning_bridge.{new}"):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(f"pruning_bridge.{new}"), name)
    with pytest.raises(AttributeError):
        getattr(module, "no_such_name_here")


def test_public_api_is_reexported():
    import pruning_bridge
    import pruning_bridge.heads as heads

    for name in heads.__all__:  # the heads API is part of the top-level package
        if name in pruning_bridge.__all__:
            assert getattr(pruning_bridge, name) is getattr(heads, name)
    for name in pruning_bridge.__all__:
        assert hasattr(pruning_bridge, name), name
    assert {"RoutedHeads", "train_router", "remove_heads", "run_head_study"} <= set(
        pruning_bridge.__all__)
