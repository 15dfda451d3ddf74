"""Method registry: ``@register("<name>")`` on a spec class; no enum to edit when adding a method."""

from __future__ import annotations

import difflib
from typing import Any, TypeVar

from adapterkit.core.errors import UnknownMethodError
from adapterkit.core.spec import AdapterSpec

_SPECS: dict[str, type[AdapterSpec]] = {}
SpecT = TypeVar("SpecT", bound=type[AdapterSpec])


def register(name: str):  # noqa: ANN201 - decorator
    """Class decorator: register a spec class under ``name`` and tag it with that method name."""

    def wrap(cls: SpecT) -> SpecT:
        if name in _SPECS and _SPECS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice ({_SPECS[name].__qualname__}, {cls.__qualname__})")
        cls.method = name
        _SPECS[name] = cls
        return cls

    return wrap


def spec_class(name: str) -> type[AdapterSpec]:
    """The spec class registered as ``name``; unknown names get a did-you-mean error."""
    if name not in _SPECS:
        close = difflib.get_close_matches(name, _SPECS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownMethodError(f"unknown method {name!r} (known: {', '.join(sorted(_SPECS))}){hint}")
    return _SPECS[name]


def methods() -> list[str]:
    """Names of every registered adapter method, sorted (combiners are listed by ``combiners``)."""
    return sorted(name for name, cls in _SPECS.items() if not cls.role)


def combiners() -> list[str]:
    """Names of every registered combiner (the learned part of a ``Mix`` block), sorted."""
    return sorted(name for name, cls in _SPECS.items() if cls.role)


def registered_classes() -> list[type[AdapterSpec]]:
    """Every registered spec class (methods and combiners), in registration order."""
    return list(_SPECS.values())


def spec_from_dict(data: dict[str, Any], where: str = "spec") -> AdapterSpec:
    """Inverse of ``AdapterSpec.to_dict``."""
    if "method" not in data:
        raise UnknownMethodError(f"{where}: no 'method' key")
    return spec_class(data["method"]).from_fields(data, where)

