"""The small public surface that is not a spec class: activation, ``use``, and listing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from adapterkit.core.blocks import Select
from adapterkit.core.context import SelectPlan, override_active, select_rows
from adapterkit.core.errors import AdapterKitError
from adapterkit.inject.engine import adapter_names, hosts, placements, set_active


def activate(model: nn.Module, *names: str) -> None:
    """Make exactly ``names`` the active adapters (in this order); with no names, run the bare base model."""
    set_active(model, list(names))


@contextlib.contextmanager
def use(model: nn.Module, *setup: str | Select) -> Iterator[None]:
    """Run exactly the named adapters inside the block (none: the base model), whatever is active outside it.

    ``use(model, Select(["a", None, "b"]))`` runs one adapter per example (None: the base model), all rows in
    one batch; its segment table is built here, once, and read by every layer.
    """
    if len(setup) == 1 and isinstance(setup[0], Select):
        plan = SelectPlan(setup[0].names)
        held = hosts(model)  # one walk of the module tree, whatever the number of adapters
        attached = {name for _, _, host in held for name in host.names()}
        merged = {name for _, _, host in held for name in host.merged}
        for name in plan.names:
            if name not in attached:
                placements(model, name)  # raises the usual "no adapter named ..." error
            if name in merged:
                raise AdapterKitError(f"Select: adapter {name!r} is merged into the base weights; unmerge it first")
        with override_active(()), select_rows(plan):
            yield
        return
    for item in setup:
        if not isinstance(item, str):
            raise AdapterKitError(f"use: expected adapter names or one Select block, got {type(item).__name__}")
        placements(model, item)
    with override_active(tuple(setup)):  # type: ignore[arg-type]
        yield


def adapters(model: nn.Module) -> list[str]:
    """Names of the adapters attached to ``model``."""
    return adapter_names(model)
