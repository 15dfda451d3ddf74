"""The injection engine: the ONLY code that adds or removes adapters in a model's module tree (the one other
edit of the tree, swapping frozen base layers for 4-bit ones before any adapter attaches, is inject/quantize.py).

``attach`` places a host (see core/host.py) on each target module and gives it the adapter the spec builds;
``detach`` removes adapters, and a host with none left is removed with its hooks, so the model is exactly
what it was (same modules, same parameters, bit-identical state dict).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

from adapterkit.core.errors import NameInUseError, TargetError
from adapterkit.core.host import HOST_ATTR, Host, host_of
from adapterkit.core.spec import AdapterSpec
from adapterkit.inject.fingerprint import module_fingerprint
from adapterkit.inject.select import Targets, select

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,127}")


def hosts(model: nn.Module) -> list[tuple[str, nn.Module, Host]]:
    """(path, base module, host) for every adapted module, in model order."""
    found = []
    for path, module in model.named_modules():
        host = host_of(module)
        if host is not None:
            found.append((path, module, host))
    return found


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters attached to ``model``, in attach order."""
    names: list[str] = []
    for _, _, host in hosts(model):
        names += [n for n in host.names() if n not in names]
    return names


def placements(model: nn.Module, name: str) -> list[tuple[str, nn.Module, Host]]:
    """Where adapter ``name`` lives; a clear error if it is not attached."""
    found = [(p, m, h) for p, m, h in hosts(model) if name in h.names()]
    if not found:
        known = adapter_names(model)
        raise NameInUseError(f"no adapter named {name!r} on this model (attached: {known or 'none'})")
    return found


def attach(model: nn.Module, name: str, spec: AdapterSpec, targets: Targets) -> list[str]:
    """Attach a new adapter ``name`` built from ``spec`` to every module ``targets`` selects; returns paths."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise NameInUseError(f"adapter name {name!r} is invalid: use letters, digits, '_' or '-', not starting "
                             "with a digit")
    if name in adapter_names(model):
        raise NameInUseError(f"adapter name {name!r} is already attached; detach it first or pick another name")
    if not isinstance(spec, AdapterSpec):
        raise TargetError(f"attach({name!r}): expected an adapter spec such as LoRA(r=8), got {type(spec).__name__}")
    chosen = select(model, targets)
    for path, module in chosen:  # validate everything before changing anything
        spec.check_target(module, path)
    modules = spec.build_all([module for _, module in chosen])
    built = [(path, module, adapter) for (path, module), adapter in zip(chosen, modules, strict=True)]
    for path, module, adapter in built:
        host = host_of(module)
        if host is None:
            host = Host(module, module_fingerprint(module), path)
            module.add_module(HOST_ATTR, host)
        host.add(name, adapter)
    return [path for path, _, _ in built]


def detach(model: nn.Module, name: str | None = None, keep_merged: bool = False) -> None:
    """Remove adapter ``name`` (or all adapters).

    Merged adapters are unmerged first, so the model is restored exactly; with ``keep_merged`` their effect
    stays baked into the base weights (how a merged model is exported).
    """
    from adapterkit.merge.merging import unmerge  # merge/ sits beside inject/; imported late to avoid a cycle

    names = adapter_names(model) if name is None else [name]
    for each in names:
        placements(model, each)  # clear error for unknown names
        if not keep_merged:
            unmerge(model, each, missing_ok=True)
        for _, module, host in hosts(model):
            if each in host.names():
                host.remove(each)
                if not host.names():
                    host.release()
                    delattr(module, HOST_ATTR)


def set_active(model: nn.Module, names: Sequence[str]) -> None:
    """Make exactly ``names`` active (in this order) on every host; [] runs the bare base model."""
    known = adapter_names(model)
    for each in names:
        if each not in known:
            raise NameInUseError(f"no adapter named {each!r} on this model (attached: {known or 'none'})")
    for _, _, host in hosts(model):
        for each in names:
            if each in host.names() and host.adapter(each).spec.role:
                raise NameInUseError(f"{each!r} is a {host.adapter(each).spec.role!r} combiner: run it through its "
                                     "block, e.g. ak.use(model, ak.Fuse('a', 'b', name=...))")
    for _, _, host in hosts(model):
        host.active = [n for n in names if n in host.names()]


def train_only(model: nn.Module, names: str | Iterable[str], also: Iterable[str] = ()) -> int:
    """Freeze every parameter except adapters ``names`` and the modules whose path ends with ``also``.

    Returns the number of trainable parameters.
    """
    wanted = [names] if isinstance(names, str) else list(names)
    for each in wanted:
        placements(model, each)
    for param in model.parameters():
        param.requires_grad_(False)
    for _, _, host in hosts(model):
        for each in wanted:
            if each in host.names():
                host.adapter(each).requires_grad_(True)
    for suffix in also:
        matched = [m for p, m in select(model, [suffix])]
        for module in matched:
            for pname, param in module.named_parameters():
                if HOST_ATTR not in pname.split("."):
                    param.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
