"""Choosing what runs: activation, and ``use`` blocks (adapter names, a per-example Select, or a composition
block), and listing.

A ``use`` block belongs to the model it was given: it covers that model's hosts (those of a sub-module, if given
one), and a second adapted model in the same thread, inside or outside the block, runs its own active adapters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from adapterkit.core.blocks import Block, Select
from adapterkit.core.context import BlockPlan, Routing, SelectPlan, Setup, TaskIds, scoped
from adapterkit.core.errors import AdapterKitError
from adapterkit.core.host import Host
from adapterkit.core.interpret import check_combiners
from adapterkit.core.protocol import Site
from adapterkit.core.tree import hosts, names_in, placements
from adapterkit.inject.engine import adapter_names, set_active


def activate(model: nn.Module, *names: str) -> None:
    """Make exactly ``names`` the active adapters (in this order); with no names, run the bare base model."""
    set_active(model, list(names))


@contextlib.contextmanager
def use(model: nn.Module, *setup: str | Select | Block, task_ids: Sequence[int] | torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None) -> Iterator[Routing]:
    """Run exactly the named adapters, or one block, on ``model`` inside the ``with`` (none: the base model).

    ``use(model, "a", "b")`` runs those adapters whatever is active outside. ``use(model, Select(["a", None]))``
    runs one adapter per example (None: the base model), all rows in one batch; its segment table is built
    here, once. ``use(model, Stack("lang", Fuse("a", "b", name="fusion")), task_ids=...)`` runs a composition
    block; ``task_ids`` (one per example) feed task routing (and, with adapter names, adapters that read each row's
    task, ``core.host.task_ids_for``), and ``token_mask`` (the attention mask, batch x
    tokens) keeps padding out of what routers average over (MoLE's load-balancing loss). The ``with`` yields a
    ``Routing`` record: the weights learned blocks used and their auxiliary losses (``routing.aux_loss()``).

    Only ``model``'s own modules are affected. A merged adapter is part of the base weights, so a setup without it
    (the bare base, other adapters, a Select or a block) cannot run and is refused with one line.
    """
    routing = Routing()
    held = hosts(model)  # one walk of the module tree, whatever the number of adapters
    if len(setup) == 1 and isinstance(setup[0], (Select, Block)):
        block = setup[0]
        needed = block.names if isinstance(block, Select) else block.leaves()
        attached = set(names_in(held))
        for name in needed:
            if name is not None and name not in attached:
                placements(model, name, held)  # raises the usual "no adapter named ..." error
        _refuse_merged(held, (), type(block).__name__)
        _refuse_calls(held, set(needed) - {None}, type(block).__name__)
        if isinstance(block, Select):
            with scoped(_hosts_only(held), Setup(select=SelectPlan(block.names))):
                yield routing
            return
        found = {n: host.adapter(n) for _, _, host in held for n in host.names() if host.adapter(n).spec.role}
        check_combiners(block, list(found.items()))
        ids = None if task_ids is None else torch.as_tensor(task_ids, dtype=torch.long).reshape(-1)
        plan = BlockPlan(block, ids, routing, token_mask)
        with contextlib.ExitStack() as stack:
            stack.enter_context(scoped(_hosts_only(held), Setup(block=plan)))
            for name in {n for _, n in block.combiners()}:
                for _, _, host in held:  # model-level work of a combiner (e.g. a scoring pass): once per call
                    session = getattr(host._modules.get(name), "session", None)
                    if session is not None:
                        stack.enter_context(session(model, plan))
            yield routing
        return
    for item in setup:
        if not isinstance(item, str):
            raise AdapterKitError(f"use: expected adapter names or one block (Select, Stack, ...), got "
                                  f"{type(item).__name__}")
        _, _, host = placements(model, item, held)[0]
        if host.adapter(item).spec.role:
            raise AdapterKitError(f"use: {item!r} is a combiner; run it through its block")
    if token_mask is not None:
        raise AdapterKitError("use: token_mask= feeds routers, which only apply to a composition block")
    names: tuple[str, ...] = tuple(setup)  # type: ignore[arg-type]
    _refuse_merged(held, names, "use")
    row_ids = None if task_ids is None else TaskIds(torch.as_tensor(task_ids, dtype=torch.long).reshape(-1))
    with scoped(_hosts_only(held), Setup(names=names, task_ids=row_ids)):
        yield routing


def _hosts_only(held: list[tuple[str, nn.Module, Host]]) -> list[Host]:
    return [host for _, _, host in held]


def _refuse_calls(held: list[tuple[str, nn.Module, Host]], names: set[Any], what: str) -> None:
    """Adapters that rewrite the whole call (prompt / prefix methods) cannot run per example or inside a block."""
    for _, _, host in held:
        for name in names & set(host.names()):
            if host.adapter(name).site is Site.CALL:
                raise AdapterKitError(f"{what}: adapter {name!r} ({host.adapter(name).spec.method}) rewrites the "
                                      "model's call (its inputs or cache), so it cannot run per example or inside a "
                                      f"block; run it alone with ak.use(model, {name!r})")


def _refuse_merged(held: list[tuple[str, nn.Module, Host]], allowed: tuple[str, ...], what: str) -> None:
    """A merged adapter not among ``allowed`` would still run (it is in the base weights): refuse, naming it."""
    for _, _, host in held:
        for name in host.merged:
            if name not in allowed:
                runs = "the bare base model" if what == "use" and not allowed else f"{what}{allowed or ''}"
                raise AdapterKitError(f"{what}: adapter {name!r} is merged into the base weights, so {runs} "
                                      f"cannot run without it; ak.unmerge(model, {name!r}) first")


def adapters(model: nn.Module) -> list[str]:
    """Names of the adapters attached to ``model``."""
    return adapter_names(model)
