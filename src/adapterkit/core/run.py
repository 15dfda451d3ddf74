"""The one interpreter of an adapter setup on a host: the order in which sites apply.

Order per call: INPUT adapters transform the input (before the base runs), then the base runs, then the sum of
PARALLEL deltas (computed from the base's input) is added, then OUTPUT adapters transform the result in order.
Composition blocks (Stack, Parallel, ...) extend this file; methods never see each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from adapterkit.core.protocol import Site


def apply_inputs(adapters: Sequence[nn.Module], x: Tensor) -> Tensor:
    """Run INPUT adapters in order."""
    for adapter in adapters:
        x = adapter(x, None)
    return x


def apply_outputs(adapters: Sequence[nn.Module], x: Tensor, out: Tensor, inplace: bool) -> Tensor:
    """Add PARALLEL deltas to ``out``, then run OUTPUT adapters in order.

    ``inplace`` is set by the host for base layers whose output autograd does not keep (Linear, Conv,
    Embedding): adding the delta in place saves one activation-sized allocation per adapted layer.
    """
    for adapter in adapters:
        if adapter.site is Site.PARALLEL:
            delta = adapter(x, out)
            if inplace and delta.shape == out.shape:
                out = out.add_(delta)
            else:
                out = out + delta
    for adapter in adapters:
        if adapter.site is Site.OUTPUT:
            out = adapter(x, out)
    return out


def apply_select(adapters: Sequence[Any], slots: Tensor, x: Tensor, out: Tensor, cache: dict[str, Any],
                 inplace: bool = False) -> Tensor:
    """One adapter per row: ``adapters[slots[b]]`` for row b (None, or slot len(adapters): the base output).

    When every adapter is of one type that offers ``batched_delta`` (a method's batched form), all rows run in one
    gathered computation, which adds into ``out`` in place when the host allows it (``inplace``, as in
    ``apply_outputs``). Otherwise each adapter runs on its own rows: correct for every method, one pass per adapter.
    """
    present = [a for a in adapters if a is not None]
    kinds = {type(a) for a in present}
    batched = getattr(next(iter(kinds)), "batched_delta", None) if len(kinds) == 1 else None
    if batched is not None and present[0].site is Site.PARALLEL:
        return batched(adapters, x, slots, cache, out) if inplace else out + batched(adapters, x, slots, cache)
    result = out
    for index, adapter in enumerate(adapters):
        if adapter is None:
            continue
        rows = (slots == index).nonzero().squeeze(1)
        if rows.numel() and adapter.site is not Site.INPUT:  # input-site adapters ran in select_inputs
            result = result.index_copy(0, rows, apply_outputs([adapter], x[rows], out[rows], inplace=False))
    return result


def select_inputs(adapters: Sequence[Any], slots: Tensor, x: Tensor) -> Tensor:
    """The input each row's base computation sees: rows whose adapter acts on inputs are transformed."""
    result = x
    for index, adapter in enumerate(adapters):
        if adapter is not None and adapter.site is Site.INPUT:
            rows = (slots == index).nonzero().squeeze(1)
            if rows.numel():
                result = result.index_copy(0, rows, adapter(x[rows], None))
    return result
