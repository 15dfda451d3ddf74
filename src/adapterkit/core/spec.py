"""Adapter specs: frozen dataclasses that serialise to JSON with a "method" tag.

A spec says *what* an adapter is (rank, activation, ...), never *where* it goes: targets are chosen at
attach time. Unknown keys in a saved spec warn and are dropped, so files written by a newer adapterkit
still load (peft users hit hard failures there, peft#1979).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

from torch import nn

from adapterkit.core.errors import SpecError


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """Base of every method spec. Subclasses are frozen dataclasses registered with ``@register``."""

    method: ClassVar[str] = ""
    # "" for an adapter method; for a combiner (the learned part of a block) the block kind it serves, e.g. "fuse"
    role: ClassVar[str] = ""

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
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - set(known) - {"method"})
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
        except TypeError as exc:
            raise SpecError(f"{where}: {exc}") from None


def require(condition: bool, message: str) -> None:
    """Raise SpecError(message) unless condition holds; keeps __post_init__ checks one line each."""
    if not condition:
        raise SpecError(message)
