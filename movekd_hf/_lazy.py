"""Lazy public names for the package's `__init__` modules (PEP 562): a name's module is imported when the name is
first read, so importing a package (or one of its submodules) does not import everything the package exports."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """The `__getattr__` and `__dir__` of `package`.

    Args:
        package: the package's `__name__` (already in `sys.modules`, as it is while its `__init__` runs).
        exports: public name -> the module that defines it, absolute or relative to `package` (leading dot).
    Returns:
        `(__getattr__, __dir__)`. `__getattr__` imports the module, caches the value in the package's namespace
        and returns it; a name not in `exports` raises `AttributeError` naming the package.
    """
    namespace = vars(sys.modules[package])

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
