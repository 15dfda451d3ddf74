"""Read-only queries of a model's module tree: where the hosts are and which adapters they hold.

They sit on the ground floor so that everything that edits adapters (the engine, merging, loading, the store)
reads the tree the same way and none of them needs another to find a host.
"""

from __future__ import annotations

from torch import Tensor, nn

from adapterkit.core.errors import NameInUseError
from adapterkit.core.host import Host, host_of


def hosts(model: nn.Module) -> list[tuple[str, nn.Module, Host]]:
    """(path, base module, host) for every adapted module, in model order."""
    found = []
    for path, module in model.named_modules():
        host = host_of(module)
        if host is not None:
            found.append((path, module, host))
    return found


def names_in(held: list[tuple[str, nn.Module, Host]]) -> list[str]:
    """Adapter names held by ``held`` (from ``hosts``), in attach order."""
    return list(dict.fromkeys(name for _, _, host in held for name in host.names()))


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters attached to ``model``, in attach order."""
    return names_in(hosts(model))


def placements(model: nn.Module, name: str, held: list[tuple[str, nn.Module, Host]] | None = None
               ) -> list[tuple[str, nn.Module, Host]]:
    """Where adapter ``name`` lives (``held``: a ``hosts(model)`` already walked); a clear error if nowhere."""
    held = hosts(model) if held is None else held
    found = [(p, m, h) for p, m, h in held if name in h._modules]
    if not found:
        raise NameInUseError(f"no adapter named {name!r} on this model (attached: {names_in(held) or 'none'})")
    return found


def adapter_tensors(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter ``name``'s parameters and buffers (the live tensors, not copies), keyed ``"<path>/<key>"`` by
    placement; a tensor shared by several placements (a rule stored once) appears once."""
    found: dict[str, Tensor] = {}
    seen: set[int] = set()
    for path, _, host in placements(model, name):
        for key, value in host.adapter(name).state_dict(keep_vars=True).items():
            if id(value) not in seen:
                seen.add(id(value))
                found[f"{path}/{key}"] = value
    return found
