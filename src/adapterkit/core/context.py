"""The per-call setup: which adapters run, set by ``use(...)`` for the duration of a ``with`` block.

Held in a ContextVar, so threads and async tasks each see their own setup; nothing is stored on modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

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
