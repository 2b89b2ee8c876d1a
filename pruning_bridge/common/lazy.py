"""Package namespaces whose public names are imported on first use.

    __all__, __getattr__, __dir__ = lazy_exports(__name__, {"results": ("ResultsLog",)})

Both packages re-export their API this way, so that the command lines, which only need
argparse to parse their arguments (``--help``, a bad argument), start without torch. Kept free
of imports beyond the standard library for the same reason.
"""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Any, Callable, Mapping, Sequence


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]],
                 eager: Sequence[str] = ()) -> tuple[list[str], Callable[[str], Any],
                                                     Callable[[], list[str]]]:
    """``(__all__, __getattr__, __dir__)`` for ``package``: each name of ``exports`` (module ->
    names) is imported from ``package.<module>`` when first asked for, then cached in the
    package; ``eager`` lists names the package imports itself."""
    module_of = {name: module for module, names in exports.items() for name in names}
    namespace = sys.modules[package].__dict__
    names = sorted({*eager, *module_of})

    def __getattr__(name: str) -> Any:
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f".{module_of[name]}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *names})

    return names, __getattr__, __dir__
