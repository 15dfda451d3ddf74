"""The per-call setup: which adapters run, set by ``use(...)`` for the duration of a ``with`` block.

Held in a ContextVar, so threads and async tasks each see their own setup; nothing is stored on modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

# None: every host runs its own active list. A tuple: run exactly these names (where present), in order.
_ACTIVE_OVERRIDE: ContextVar[tuple[str, ...] | None] = ContextVar("adapterkit_active", default=None)


def active_override() -> tuple[str, ...] | None:
    """The names forced by the innermost ``use`` block, or None."""
    return _ACTIVE_OVERRIDE.get()


@contextlib.contextmanager
def override_active(names: tuple[str, ...]) -> Iterator[None]:
    """Run exactly ``names`` (an empty tuple runs the bare base model) inside the block."""
    token = _ACTIVE_OVERRIDE.set(tuple(names))
    try:
        yield
    finally:
        _ACTIVE_OVERRIDE.reset(token)


class SelectPlan:
    """The segment table of a ``Select``: computed once when the ``use`` block opens, read by every layer.

    ``names`` are the distinct adapters, ``slots[b]`` the index of row b's adapter in ``names`` (len(names) for
    rows without one). Per-device copies of ``slots`` are cached so each layer only indexes.
    """

    def __init__(self, per_row: tuple[str | None, ...]) -> None:
        self.names: tuple[str, ...] = tuple(dict.fromkeys(n for n in per_row if n is not None))
        index = {name: i for i, name in enumerate(self.names)}
        self.slots = torch.tensor([index.get(n, len(self.names)) if n else len(self.names) for n in per_row])
        self._on: dict[torch.device, torch.Tensor] = {}

    def slots_for(self, x: torch.Tensor) -> torch.Tensor:
        """Row slots for an activation ``x`` (batch first); beams (batch * k rows) repeat each row's slot."""
        slots = self._on.get(x.device)
        if slots is None:
            slots = self._on[x.device] = self.slots.to(x.device)
        rows = x.shape[0]
        if rows != len(slots):
            if rows % len(slots):
                raise ValueError(f"Select has {len(slots)} rows but the batch has {rows}")
            slots = slots.repeat_interleave(rows // len(slots))
        return slots


_SELECT: ContextVar[SelectPlan | None] = ContextVar("adapterkit_select", default=None)


def select_plan() -> SelectPlan | None:
    """The per-example plan of the innermost ``use(model, Select(...))`` block, or None."""
    return _SELECT.get()


@contextlib.contextmanager
def select_rows(plan: SelectPlan) -> Iterator[None]:
    """Run one adapter per example inside the block."""
    token = _SELECT.set(plan)
    try:
        yield
    finally:
        _SELECT.reset(token)
