"""One adapter per example (``use(model, Select([...]))``): each row of a batch runs its own adapter, all rows in
one forward. A method's batched form (``batched_delta``) runs every row in one gathered computation; otherwise each
adapter runs on its own rows through the interpreter's site dispatch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from adapterkit.core.context import SelectPlan
from adapterkit.core.interpret import apply
from adapterkit.core.protocol import Site


def _trains(adapters: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for a in adapters for p in a.parameters())


def select_outputs(host: Any, plan: SelectPlan, x: Tensor, out: Tensor, inplace: bool) -> Tensor | None:
    """One adapter per row: ``plan.names[slots[b]]`` for row b (no adapter, or absent here: the base output).

    When every adapter is of one type that offers ``batched_delta`` (a method's batched form), all rows run in one
    gathered computation (inference only: its stacked weights carry no gradient). Otherwise, and whenever gradients
    are wanted, each adapter runs on its own rows: correct for every method, one pass per adapter.
    """
    chosen = [host._modules.get(n) for n in plan.names]
    present = [a for a in chosen if a is not None]
    if not present:
        return None
    slots = plan.slots_for(x)
    kinds = {type(a) for a in present}
    batched = getattr(next(iter(kinds)), "batched_delta", None) if len(kinds) == 1 else None
    if batched is not None and present[0].site is Site.PARALLEL and not _trains(present):
        if inplace:
            return batched(chosen, x, slots, host.select_cache, out, plan=plan)
        return out + batched(chosen, x, slots, host.select_cache, plan=plan)
    result = out
    for index, adapter in enumerate(chosen):
        if adapter is None:
            continue
        rows = (slots == index).nonzero().squeeze(1)
        if rows.numel() and adapter.site is not Site.INPUT:  # input-site adapters ran in select_inputs
            result = result.index_copy(0, rows, apply(adapter, x[rows], out[rows]))
    return result


def select_inputs(host: Any, plan: SelectPlan, x: Tensor) -> Tensor:
    """The input each row's base computation sees: rows whose adapter acts on inputs are transformed."""
    result = x
    slots = None
    for index, name in enumerate(plan.names):
        adapter = host._modules.get(name)
        if adapter is not None and adapter.site is Site.INPUT:
            slots = plan.slots_for(x) if slots is None else slots
            rows = (slots == index).nonzero().squeeze(1)
            if rows.numel():
                result = result.index_copy(0, rows, adapter(x[rows], None))
    return result
