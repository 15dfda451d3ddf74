"""The one interpreter of an adapter setup on a host: the order in which sites apply.

Order per call: INPUT adapters transform the input (before the base runs), then the base runs, then the sum of
PARALLEL deltas (computed from the base's input) is added, then OUTPUT adapters transform the result in order.
Composition blocks (Stack, Parallel, ...) extend this file; methods never see each other.
"""

from __future__ import annotations

from collections.abc import Sequence

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
