"""The package layout: the public API is re-exported at the top, no old module path is left, and
``common`` is the bottom layer."""

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

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


# ---------------------------------------------------------------- common is the bottom layer

COMMON = Path(pruning_bridge.__file__).parent / "common"


def _imports_above_common(path: Path) -> list[str]:
    """The ``pruning_bridge`` modules outside ``common`` that a file of common imports, at its
    top or inside a function (read from its syntax tree)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level >= 2:  # from .. or ... : above common
                found.append("." * node.level + (node.module or ""))
            elif node.level == 0 and (node.module or "").startswith("pruning_bridge") and not (
                    node.module + ".").startswith("pruning_bridge.common."):
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("pruning_bridge")
                      and not (a.name + ".").startswith("pruning_bridge.common.")]
    return found


def test_common_imports_nothing_above_it():
    files = sorted(COMMON.rglob("*.py"))
    assert len(files) >= 10 and COMMON / "cli.py" in files
    assert {str(p.relative_to(COMMON)): _imports_above_common(p) for p in files} == {
        str(p.relative_to(COMMON)): [] for p in files}
    # and loading every module of common loads nothing else of pruning_bridge
    names = [m.name for m in pkgutil.walk_packages([str(COMMON)], "pruning_bridge.common.")]
    code = ("import importlib, sys\n"
            f"for name in {names!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('pruning_bridge')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout
    outside = [m for m in eval(loaded) if m != "pruning_bridge"  # noqa: S307 - our own output
               and not m.startswith("pruning_bridge.common")]
    assert outside == [] and len(names) >= 10


def test_the_check_sees_an_import_from_above(tmp_path):
    """The reader above finds each way of importing from outside common."""
    bad = tmp_path / "bad.py"
    bad.write_text("from ..models import load_model\n"
                   "def f():\n    from pruning_bridge.evals import tasks\n"
                   "    import pruning_bridge.bridge\n"
                   "from .errors import UsageError\nfrom pruning_bridge.common import tokens\n")
    assert _imports_above_common(bad) == ["..models", "pruning_bridge.evals",
                                          "pruning_bridge.bridge"]
