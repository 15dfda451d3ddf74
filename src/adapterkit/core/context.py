"""The per-call setup: what runs on each host, set by ``use(model, ...)`` for the duration of a ``with`` block.

State belongs to a model: a ``use`` block maps the hosts of the model it was given (and only those) to one
``Setup``, held in a ContextVar, so threads and async tasks each see their own setups and a second model in the
same thread runs its own adapters. Nothing is stored on modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch


def per_row(values: torch.Tensor, on: dict[torch.device, torch.Tensor], x: torch.Tensor, mismatch: str
            ) -> torch.Tensor:
    """``values`` (one per example) for the rows of activation ``x``: copied to its device once (cached in ``on``);
    beams (batch * k rows) repeat each example's value; ``mismatch`` (with {given}, {rows}) words the error."""
    cached = on.get(x.device)
    if cached is None:
        cached = on[x.device] = values.to(x.device)
    rows = x.shape[0]
    if rows == len(cached):
        return cached
    if rows % len(cached):
        raise ValueError(mismatch.format(given=len(cached), rows=rows))
    return cached.repeat_interleave(rows // len(cached))


class SelectPlan:
    """The segment table of a ``Select``: computed once when the ``use`` block opens, read by every layer.

    ``names`` are the distinct adapters, ``slots[b]`` the index of row b's adapter in ``names`` (len(names) for
    rows without one). Per-device copies of ``slots`` are cached so each layer only indexes, and ``memo`` keeps
    what a method derives from the slots (e.g. the row grouping of its batched form) for every later layer.
    """

    def __init__(self, per_row: tuple[str | None, ...]) -> None:
        # sorted, not in order of first use: a batch whose rows change but whose set of adapters does not (rows of a
        # served batch joining and leaving) keeps the same slots, so a method's stacked weights stay cached
        self.names: tuple[str, ...] = tuple(sorted({n for n in per_row if n is not None}))
        index = {name: i for i, name in enumerate(self.names)}
        self.slots = torch.tensor([index.get(n, len(self.names)) if n else len(self.names) for n in per_row])
        self._on: dict[torch.device, torch.Tensor] = {}
        self.memo: dict[Any, Any] = {}

    def host_slots(self, rows: int) -> torch.Tensor:
        """The row slots of a ``rows``-row batch as a host (CPU) tensor: beams repeat each example's slot."""
        return self.slots if rows == len(self.slots) else self.slots.repeat_interleave(rows // len(self.slots))

    def slots_for(self, x: torch.Tensor) -> torch.Tensor:
        """Row slots for an activation ``x`` (batch first); beams (batch * k rows) repeat each row's slot."""
        return per_row(self.slots, self._on, x, "Select has {given} rows but the batch has {rows}")


_INPLACE: ContextVar[bool] = ContextVar("adapterkit_inplace", default=True)


def inplace_allowed() -> bool:
    """Whether hosts may add adapter deltas into the base output in place (see ``no_inplace``)."""
    return _INPLACE.get()


@contextlib.contextmanager
def no_inplace() -> Iterator[None]:
    """Hosts add deltas out of place inside the block: needed where something keeps the base output by reference
    for later, such as selective activation checkpointing, which caches a projection's output for the recompute
    (an in-place add would change the cached value)."""
    token = _INPLACE.set(False)
    try:
        yield
    finally:
        _INPLACE.reset(token)


class Routing:
    """What the learned blocks of one ``use`` block reported: routing weights and auxiliary losses.

    ``use`` yields it; every forward inside the block overwrites the weights of the hosts it ran and appends its
    losses, so read it (or call ``aux_loss``) after the forward you care about and ``clear`` between steps.
    """

    def __init__(self) -> None:
        self.weights: dict[str, dict[str, torch.Tensor]] = {}  # combiner name -> host path -> weights
        self.losses: dict[str, list[torch.Tensor]] = {}  # loss name -> one value per host and forward

    def record(self, combiner: str, path: str, weights: torch.Tensor) -> None:
        """Keep the weights a combiner used at ``path`` in this forward."""
        self.weights.setdefault(combiner, {})[path] = weights

    def add_loss(self, name: str, value: torch.Tensor) -> None:
        """Add an auxiliary loss term (e.g. load balancing) of this forward."""
        self.losses.setdefault(name, []).append(value)

    def aux_loss(self) -> torch.Tensor:
        """The sum of every auxiliary loss term recorded so far (0 when there is none)."""
        terms = [value for values in self.losses.values() for value in values]
        return torch.stack([t.float().sum() for t in terms]).sum() if terms else torch.zeros(())

    def clear(self) -> None:
        """Forget what earlier forwards recorded."""
        self.weights.clear()
        self.losses.clear()


class TaskIds:
    """Per-row task ids given to ``use(..., task_ids=...)``, for a block's task routing (``BlockPlan``) or for plain
    adapters that read each row's task; per-device copies are cached, so each layer only reads them."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids
        self._on: dict[torch.device, torch.Tensor] = {}

    def for_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Task id per row of ``x`` (beams repeat their example's id)."""
        return per_row(self.ids, self._on, x, "use(...) got {given} task ids but the batch has {rows} rows")


class BlockPlan:
    """One ``use(model, block, task_ids=...)``: the block, per-row task ids, and where results are reported.

    ``state`` is scratch space for combiners that work across layers within one forward (e.g. a router that
    scores every layer from one pass); it lives exactly as long as the ``use`` block.
    """

    def __init__(self, block: Any, task_ids: torch.Tensor | None, routing: Routing,
                 token_mask: torch.Tensor | None = None) -> None:
        self.block = block
        self.names = frozenset(block.leaves()) | {name for _, name in block.combiners()}
        self.task_ids = None if task_ids is None else TaskIds(task_ids)
        self.token_mask = token_mask  # (batch, tokens), nonzero for real tokens; None: every token is real
        self.routing = routing
        self.state: dict[str, Any] = {}
        self._real: dict[torch.device, torch.Tensor] = {}

    def task_ids_for(self, x: torch.Tensor) -> torch.Tensor:
        """Task id per row of ``x`` (beams repeat their example's id); a clear error when none were given."""
        if self.task_ids is None:
            raise ValueError("this block routes by task: pass task_ids= to use(...)")
        return self.task_ids.for_rows(x)

    def real_tokens(self, x: torch.Tensor) -> torch.Tensor | None:
        """For an activation ``x`` (batch, tokens, features): a flat bool mask of its real (non-padding) tokens, or
        None when no mask was given or its shape does not fit ``x`` (e.g. one new token per step in generate)."""
        mask = self.token_mask
        if mask is None or x.dim() != 3 or tuple(mask.shape) != tuple(x.shape[:2]):
            return None
        flat = self._real.get(x.device)
        if flat is None:  # once per device and use block, not once per routed module
            flat = self._real[x.device] = mask.to(x.device).reshape(-1).bool()
        return flat


@dataclass(frozen=True)
class Setup:
    """What one ``use`` block runs on its model's hosts: exactly ``names`` (plain adapters, in order), one adapter
    per example (``select``), or a composition block (``block``); exactly one of the three is set. ``task_ids``
    (with ``names``) are the per-row task ids plain adapters may read (``task_ids_in``)."""

    names: tuple[str, ...] | None = None
    select: SelectPlan | None = None
    block: BlockPlan | None = None
    task_ids: TaskIds | None = None


def task_ids_in(setup: Setup | None, x: torch.Tensor) -> torch.Tensor | None:
    """Task id per row of ``x`` under ``setup``: a block's (``use(model, block, task_ids=)``) or the plain adapters'
    (``use(model, "a", task_ids=)``); None when the call gave none (the reader decides whether that is an error)."""
    if setup is None:
        return None
    ids = setup.block.task_ids if setup.block is not None else setup.task_ids
    return None if ids is None else ids.for_rows(x)


_SETUPS: ContextVar[Mapping[Any, Setup]] = ContextVar("adapterkit_setups", default=MappingProxyType({}))


def setup_for(host: Any) -> Setup | None:
    """The setup of the innermost ``use`` block that covers ``host``; None: the host runs its active adapters."""
    return _SETUPS.get().get(host)


@contextlib.contextmanager
def scoped(hosts: Iterable[Any], setup: Setup) -> Iterator[None]:
    """Run ``setup`` on ``hosts`` (and no other host) inside the block; inner blocks win over outer ones."""
    inner = dict(_SETUPS.get())
    inner.update(dict.fromkeys(hosts, setup))
    token = _SETUPS.set(MappingProxyType(inner))
    try:
        yield
    finally:
        _SETUPS.reset(token)
