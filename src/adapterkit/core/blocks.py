"""Composition blocks: small frozen data that say how adapters combine, round-tripping through JSON.

``Select`` runs one adapter per example of a batch (None: the base model for that row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adapterkit.core.errors import SpecError


@dataclass(frozen=True)
class Select:
    """Per-example adapters: ``names[i]`` (or None) for row i of the batch, in any order."""

    names: tuple[str | None, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        if not self.names:
            raise SpecError("Select needs one adapter name (or None) per example")
        bad = [n for n in self.names if n is not None and not isinstance(n, str)]
        if bad:
            raise SpecError(f"Select: names must be strings or None, got {bad[0]!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"block": "select", "names": list(self.names)}


def block_from_dict(data: dict[str, Any]) -> Select:
    """Inverse of ``to_dict`` for every block type."""
    kind = data.get("block")
    if kind == "select":
        return Select(tuple(data["names"]))
    raise SpecError(f"unknown block {kind!r} (known: select)")
