"""Explicit, exact, reversible merging of adapters into the base weights (never a side effect of eval()).

Each mergeable adapter maps the base layer's (weight, bias) to merged ones and back (core/protocol.py); the host
of each adapted module applies those maps to its base layer (``Host.merge`` / ``Host.unmerge``, in float64).
"""

from __future__ import annotations

from torch import nn

from adapterkit.core.errors import AdapterKitError
from adapterkit.core.protocol import Mergeable
from adapterkit.core.tree import placements


def merge(model: nn.Module, name: str) -> None:
    """Fold adapter ``name`` into the base weights of every module it adapts; outputs stay the same."""
    found = placements(model, name)
    for path, _, host in found:  # check everything before changing anything
        adapter = host.adapter(name)
        if not isinstance(adapter, Mergeable):
            raise AdapterKitError(f"adapter {name!r} ({type(adapter).__name__} at {path}) cannot be merged: "
                                  "its function is not linear in the base weights")
    for _, module, host in found:
        host.merge(module, name)


def unmerge(model: nn.Module, name: str) -> None:
    """Undo ``merge``: restore the base weights (to float32 rounding) and run the adapter unmerged again."""
    found = placements(model, name)
    if not any(name in host.merged for _, _, host in found):
        raise AdapterKitError(f"adapter {name!r} is not merged")
    for _, module, host in found:
        if name in host.merged:
            host.unmerge(module, name)


def is_merged(model: nn.Module, name: str) -> bool:
    """True if adapter ``name`` is merged everywhere it lives."""
    return all(name in host.merged for _, _, host in placements(model, name))
