"""The package layout: the public API is re-exported at the top, and no old module path is left."""

import importlib
import pkgutil

import pytest

import pruning_bridge

SUBPACKAGES = ("bridge", "evals", "figures", "heads", "pruning")

# Module paths of the first release (never published), removed in issue 24.
REMOVED = ("adapters", "data", "tasks", "results", "report", "layers", "layer_sweep", "weights",
           "weight_sweep", "router_training", "head_importance", "head_removal", "head_routing",
           "head_study", "head_sweep")


def test_public_api_is_reexported():
    """Every top-level name is the object its subpackage defines, under the same name."""
    exports = pruning_bridge._EXPORTS
    for module, names in exports.items():
        sub = importlib.import_module(f"pruning_bridge.{module}")
        for name in names:
            assert getattr(pruning_bridge, name) is getattr(sub, name), (module, name)
    for package in SUBPACKAGES:  # what a subpackage exports at the top is in its __all__
        sub = importlib.import_module(f"pruning_bridge.{package}")
        assert set(exports[package]) <= set(sub.__all__), package
    for name in pruning_bridge.__all__:
        assert hasattr(pruning_bridge, name), name
    assert {"RoutedHeads", "train_router", "remove_heads", "run_head_study", "HookBridge",
            "load_model", "layer_sweep", "weight_sweep", "head_sweep"} <= set(
        pruning_bridge.__all__)


@pytest.mark.parametrize("old", REMOVED)
def test_old_module_paths_are_gone(old):
    """``pruning_bridge.<old>`` is not a module; where a function has the name, it is that."""
    assert old not in {m.name for m in pkgutil.iter_modules(pruning_bridge.__path__)}
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"pruning_bridge.{old}")


def test_the_sweep_names_are_functions():
    from pruning_bridge import head_sweep, layer_sweep, weight_sweep
    from pruning_bridge.heads import head_sweep as heads_head_sweep
    from pruning_bridge.pruning import layer_sweep as pruning_layer_sweep

    assert all(callable(f) for f in (layer_sweep, head_sweep, weight_sweep))
    assert layer_sweep is pruning_layer_sweep and head_sweep is heads_head_sweep
    assert pruning_bridge.layer_sweep is layer_sweep
