"""Adapter specs: frozen dataclasses that serialise to JSON with a "method" tag.

A spec says *what* an adapter is (rank, activation, ...), never *where* it goes: targets are chosen at
attach time. Unknown keys in a saved spec warn and are dropped, so files written by a newer adapterkit
still load (peft users hit hard failures there, peft#1979).

Every field is checked against its annotation when a spec is built (directly, by ``dataclasses.replace`` or
from JSON), before the spec's own ``__post_init__`` runs: ``int`` (not a bool), ``float`` (an int will do, a
bool will not), ``str``, ``bool``, ``Literal`` choices, ``X | None``, ``tuple[X, ...]`` / ``tuple[X, Y]`` (a list
is accepted and stored as a tuple) and nested specs (a dict is accepted: the spec converts it). So a wrong type
is a one-line ``SpecError`` naming the spec and the field, never a ``TypeError`` from a comparison.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
import typing
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from torch import nn

from adapterkit.core.errors import SpecError


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """Base of every method spec. Subclasses are frozen dataclasses registered with ``@register``."""

    method: ClassVar[str] = ""
    # "" for an adapter method; for a combiner (the learned part of a block) the block kind it serves, e.g. "fuse"
    role: ClassVar[str] = ""
    # True for methods whose modules rewrite the model's call (Site.CALL: prompt / prefix methods): one setting for
    # the whole batch, so per-example serving and Select cannot run them
    rewrites_call: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None:  # the field types are checked before a subclass's own checks compare values
            cls.__post_init__ = _checked_first(own)  # type: ignore[assignment,method-assign]

    def __post_init__(self) -> None:
        _check_fields(self)

    def build(self, base: nn.Module) -> nn.Module:
        """Create the adapter module for one base module (implemented by each method)."""
        raise NotImplementedError

    def build_all(self, bases: list[nn.Module]) -> list[nn.Module]:
        """Create the modules for every placement of one ``attach``, in model order (the default builds each on
        its own). A spec whose placements share parameters (a model-level router read by every module) overrides
        this and keeps the shared part in one of the modules it returns; save and load follow, since a load attaches
        again (same order) before copying tensors."""
        return [self.build(base) for base in bases]

    def check_target(self, base: nn.Module, path: str) -> None:
        """Raise a one-line error if this spec cannot adapt ``base`` (found at ``path``)."""

    def default_targets(self, model: nn.Module) -> list[tuple[str, nn.Module]] | None:
        """Where this spec goes when ``attach`` is given no targets: None (the default) means targets are required.
        Methods that act on the model's call as a whole (prompt / prefix tuning) return the one module whose call
        they rewrite, found from its interface (e.g. the outermost module taking ``inputs_embeds``), path first."""
        return None

    def for_counting(self) -> AdapterSpec:
        """A spec with the same parameter shapes whose ``build`` leaves the base alone: what a dry run
        (``explain``) builds. The default is the spec itself; a spec whose build edits the base weight (an init
        that moves part of W into the adapter) returns a plain-init twin."""
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: the method tag plus every field."""
        out: dict[str, Any] = {"method": self.method}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_fields(cls, fields: dict[str, Any], where: str = "spec") -> AdapterSpec:
        """Build from a dict of fields; unknown keys warn (naming ``where``) and are ignored."""
        if not isinstance(fields, dict):
            raise SpecError(f"{where}: a spec must be a JSON object, got {type(fields).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(fields) - set(known) - {"method"})
        if unknown:
            warnings.warn(
                f"{where}: ignoring unknown {cls.method} spec keys {unknown} (written by a newer adapterkit?)",
                stacklevel=3,
            )
        kwargs = {}
        for name, value in fields.items():
            if name in known:
                kwargs[name] = tuple(value) if isinstance(value, list) else value
        try:
            return cls(**kwargs)
        except (TypeError, SpecError) as exc:  # a SpecError names the field; ``where`` adds the file
            raise SpecError(f"{where}: {exc}") from None


def require(condition: bool, message: str) -> None:
    """Raise SpecError(message) unless condition holds; keeps __post_init__ checks one line each."""
    if not condition:
        raise SpecError(message)


def _checked_first(post_init: Callable[[Any], None]) -> Callable[[Any], None]:
    @functools.wraps(post_init)
    def wrapper(self: AdapterSpec) -> None:
        # Only the __post_init__ the instance's class resolves to checks: one that a subclass reaches through
        # super() would check the same fields a second time.
        if type(self).__post_init__ is wrapper:
            _check_fields(self)
        post_init(self)

    return wrapper


def _check_fields(spec: AdapterSpec) -> None:
    """Raise a SpecError naming the spec and field for the first field whose value its annotation rejects."""
    hints = _hints(type(spec))
    for field in dataclasses.fields(spec):
        if field.name not in hints:
            continue
        hint, value = hints[field.name], getattr(spec, field.name)
        value = _as_tuples(hint, value)
        if not _accepts(hint, value):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise SpecError(f"{spec.method or type(spec).__name__}: field {field.name} must be {_describe(hint)}, "
                            f"got {shown} ({type(value).__name__})")
        if value is not getattr(spec, field.name):
            object.__setattr__(spec, field.name, value)  # frozen: a list given for a tuple field is stored as one


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a spec class's fields (cached per class)."""
    if cls not in _HINTS:
        _HINTS[cls] = _resolve(cls)
    return _HINTS[cls]


def _resolve(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # e.g. a name imported only for type checking: resolve field by field, skip what fails
        hints: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            namespace = vars(sys.modules.get(klass.__module__, typing))
            for name, text in vars(klass).get("__annotations__", {}).items():
                try:
                    hints[name] = eval(text, dict(namespace)) if isinstance(text, str) else text
                except Exception:
                    hints.pop(name, None)
        return hints


def _union_args(hint: Any) -> tuple[Any, ...] | None:
    return get_args(hint) if get_origin(hint) in (Union, types.UnionType) else None


def _as_tuples(hint: Any, value: Any) -> Any:
    """A list where the annotation allows a tuple, as a tuple (JSON and the CLI have lists only)."""
    options = _union_args(hint) or (hint,)
    if isinstance(value, list) and any(get_origin(o) is tuple for o in options):
        return tuple(value)
    return value


def _accepts(hint: Any, value: Any) -> bool:
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if hint is type(None) or hint is None:
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    options = _union_args(hint)
    if options is not None:
        return any(_accepts(option, value) for option in options)
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_accepts(args[0], item) for item in value)
        return len(value) == len(args) and all(_accepts(a, item) for a, item in zip(args, value))
    if origin is not None:  # list[int], dict[str, float], ...: the container only
        return isinstance(origin, type) and isinstance(value, origin)
    if isinstance(hint, type):
        if issubclass(hint, AdapterSpec):  # a nested spec may arrive as its JSON dict; the spec converts it
            return isinstance(value, hint | dict)
        return isinstance(value, hint)
    return True  # an annotation this check does not model


def _describe(hint: Any) -> str:
    options = _union_args(hint)
    if options is not None:
        return " or ".join(_describe(option) for option in options)
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return f"one of {args!r}"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple of {_describe(args[0])}"
        return f"a tuple ({', '.join(_describe(a) for a in args)})"
    names = {int: "an int", float: "a number", str: "a str", bool: "a bool", type(None): "None"}
    if hint in names:
        return names[hint]
    name = str(getattr(hint, "__name__", None) or hint)
    if isinstance(hint, type) and issubclass(hint, AdapterSpec):
        name += " (or its dict)"
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
