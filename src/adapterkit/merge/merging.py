"""Explicit, exact, reversible merging of adapters into the base weights (never a side effect of eval()).

Each mergeable adapter maps the base layer's (weight, bias) to merged ones and back (core/protocol.py);
this module only reads and writes the layers through core/layers.py, in float64 for accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

from adapterkit.core.errors import AdapterKitError
from adapterkit.core.layers import read_weight, write_weight
from adapterkit.core.protocol import Mergeable
from adapterkit.inject.engine import placements


def _check_mergeable(model: nn.Module, name: str) -> None:
    for path, _, host in placements(model, name):
        adapter = host.adapter(name)
        if not isinstance(adapter, Mergeable):
            raise AdapterKitError(f"adapter {name!r} ({type(adapter).__name__} at {path}) cannot be merged: "
                                  "its function is not linear in the base weights")


@torch.no_grad()
def merge(model: nn.Module, name: str) -> None:
    """Fold adapter ``name`` into the base weights of every module it adapts; outputs stay the same."""
    _check_mergeable(model, name)
    for _, module, host in placements(model, name):
        if name in host.merged:
            continue
        weight, bias = read_weight(module)
        dtype = weight.dtype
        adapter = host.adapter(name)
        new_w, new_b = adapter.merge(weight.double(), None if bias is None else bias.double())
        write_weight(module, new_w.to(dtype), None if new_b is None else new_b.to(dtype))
        host.merged.append(name)


@torch.no_grad()
def unmerge(model: nn.Module, name: str, missing_ok: bool = False) -> None:
    """Undo ``merge``: restore the base weights (to float32 rounding) and run the adapter unmerged again."""
    for _, module, host in placements(model, name):
        if name not in host.merged:
            if missing_ok:
                continue
            raise AdapterKitError(f"adapter {name!r} is not merged")
        # Merges stack: undo the later ones first, then redo them, so each sees the weights it merged into.
        later = host.merged[host.merged.index(name):]
        for each in reversed(later):
            weight, bias = read_weight(module)
            old_w, old_b = host.adapter(each).unmerge(weight.double(), None if bias is None else bias.double())
            write_weight(module, old_w.to(weight.dtype), None if old_b is None else old_b.to(weight.dtype))
        host.merged = host.merged[: host.merged.index(name)]
        for each in later[1:]:
            weight, bias = read_weight(module)
            new_w, new_b = host.adapter(each).merge(weight.double(), None if bias is None else bias.double())
            write_weight(module, new_w.to(weight.dtype), None if new_b is None else new_b.to(weight.dtype))
            host.merged.append(each)


def is_merged(model: nn.Module, name: str) -> bool:
    """True if adapter ``name`` is merged everywhere it lives."""
    return all(name in host.merged for _, _, host in placements(model, name))
