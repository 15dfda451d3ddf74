"""A package that exports the spec classes registered from its modules (``adapterkit.methods.LowBit``), lists
them (``available()``), and answers the call of its older, function form for one release."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

from adapterkit.core.registry import registered_classes


class _Namespace(types.ModuleType):
    available: Callable[[], list[str]]

    def __call__(self) -> list[str]:
        # ``ak.methods()`` / ``ak.combiners()`` were functions before the packages became the public names
        warnings.warn(f"calling {self.__name__}() is deprecated; use {self.__name__}.available()",
                      DeprecationWarning, stacklevel=2)
        return self.available()


def fill(package: str, path: list[str], listing: Callable[[], list[str]]) -> list[str]:
    """Import every module of ``package`` (each registers itself), export its spec classes and ``available``;
    returns the exported names (the package's ``__all__``)."""
    for info in pkgutil.iter_modules(path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
    module: Any = sys.modules[package]
    exported = []
    for cls in registered_classes():
        if cls.__module__.startswith(package + "."):
            setattr(module, cls.__name__, cls)
            exported.append(cls.__name__)
    module.available = listing
    module.__class__ = _Namespace
    return sorted(exported) + ["available"]
