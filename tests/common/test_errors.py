"""Every "bad input" error of pruning_bridge is defined in ``common/errors.py``, and stays
importable from the modules that raise it."""

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import pruning_bridge
from pruning_bridge.common import errors
from pruning_bridge.common.errors import UsageError

PACKAGE = Path(pruning_bridge.__file__).parent

# where users import each error from (as before issue 24), and the built-in class it also is
PLACES = {
    "ModelLoadError": (["pruning_bridge", "pruning_bridge.models"], RuntimeError),
    "UnknownHookError": (["pruning_bridge", "pruning_bridge.bridge",
                          "pruning_bridge.bridge.hook_bridge",
                          "pruning_bridge.bridge.activation_cache"], KeyError),
    "UnsupportedArchitectureError": (["pruning_bridge", "pruning_bridge.bridge",
                                      "pruning_bridge.bridge.architectures"], ValueError),
    "UnsendableError": (["pruning_bridge.bridge.remote"], ValueError),
    "DataNotFoundError": (["pruning_bridge", "pruning_bridge.evals",
                           "pruning_bridge.evals.data"], FileNotFoundError),
    "DataFormatError": (["pruning_bridge.evals.data"], ValueError),
    "LmEvalMissingError": (["pruning_bridge.evals.lm_eval_adapter"], ImportError),
    "RouterTrainingError": (["pruning_bridge", "pruning_bridge.heads",
                             "pruning_bridge.heads.training"], RuntimeError),
    "PreflightError": (["pruning_bridge.preflight"], ValueError),
}


def _all_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(pruning_bridge.__path__, "pruning_bridge.")]
    return [name for name in names if not name.endswith("__main__")]  # __main__ runs the CLI


def _subclasses(cls: type) -> set[type]:
    direct = set(cls.__subclasses__())
    return direct.union(*(_subclasses(c) for c in direct))


def test_every_usage_error_is_defined_in_common_errors():
    for name in _all_modules():
        importlib.import_module(name)
    ours = {c for c in _subclasses(UsageError) if c.__module__.startswith("pruning_bridge")}
    assert {c.__module__ for c in ours} == {"pruning_bridge.common.errors"}
    assert set(PLACES) <= {c.__name__ for c in ours}


def test_no_error_class_is_written_outside_common_errors():
    """Read every source file: a ``class ...Error`` anywhere but common/errors.py is a leak
    (also where a module would not import here)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "common" / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(
                    ast.unparse(base).split(".")[-1].endswith(("Error", "Exception"))
                    for base in node.bases):
                found.append(f"{path.relative_to(PACKAGE)}: {node.name}")
    assert found == []


@pytest.mark.parametrize("name", sorted(PLACES))
def test_errors_import_from_where_they_did(name):
    modules, builtin = PLACES[name]
    cls = getattr(errors, name)
    for module in modules:
        assert getattr(importlib.import_module(module), name) is cls, module
    assert getattr(importlib.import_module("pruning_bridge.common"), name) is cls
    assert issubclass(cls, UsageError) and issubclass(cls, ValueError) and issubclass(cls, builtin)
    with pytest.raises(builtin):
        raise cls("what to do")


def test_unknown_hook_error_reads_as_its_message():
    """KeyError would quote the message; the one-line CLI error must not."""
    assert str(errors.UnknownHookError("blocks.9.hook_x: no such hook")) == \
        "blocks.9.hook_x: no such hook"
    assert repr(KeyError("a")) == "KeyError('a')" and str(KeyError("a")) == "'a'"
