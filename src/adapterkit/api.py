"""The small public surface that is not a spec class: activation, ``use``, and listing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from adapterkit.core.context import override_active
from adapterkit.inject.engine import adapter_names, placements, set_active


def activate(model: nn.Module, *names: str) -> None:
    """Make exactly ``names`` the active adapters (in this order); with no names, run the bare base model."""
    set_active(model, list(names))


@contextlib.contextmanager
def use(model: nn.Module, *names: str) -> Iterator[None]:
    """Run exactly ``names`` inside the block (none: the base model), whatever is active outside it."""
    for name in names:
        placements(model, name)
    with override_active(tuple(names)):
        yield


def adapters(model: nn.Module) -> list[str]:
    """Names of the adapters attached to ``model``."""
    return adapter_names(model)
