"""What a resumable run records of the object that drives it (a continual or test-time method): its constructor's
arguments, as JSON-able values, so a resumed run can check it continues with the same settings."""

from __future__ import annotations

import inspect
from typing import Any


def constructor_settings(obj: Any) -> dict[str, Any]:
    """``{argument: value}`` for every argument of ``type(obj).__init__`` (stored on ``obj`` under its own name);
    specs become their dicts, tuples lists."""
    names = [p for p in inspect.signature(type(obj).__init__).parameters if p != "self"]
    return {name: _plain(getattr(obj, name)) for name in names}


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
