"""The injection engine: the ONLY code that adds or removes adapters in a model's module tree (the one other
edit of the tree, swapping frozen base layers for 4-bit ones before any adapter attaches, is inject/quantize.py).

``attach`` places a host (see core/host.py) on each target module and gives it the adapter the spec builds;
``detach`` removes adapters, and a host with none left is removed with its hooks, so the model is exactly
what it was (same modules, same parameters, bit-identical state dict). Read-only queries of the tree (``hosts``,
``placements``, ``adapter_names``) live in core/tree.py and are re-exported here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from adapterkit.core.errors import NameInUseError, TargetError
from adapterkit.core.host import HOST_ATTR, Host, host_of
from adapterkit.core.spec import AdapterSpec
from adapterkit.core.tree import adapter_names, hosts, names_in, placements
from adapterkit.inject.fingerprint import module_fingerprint
from adapterkit.inject.grad_inputs import disable_input_grads, enable_input_grads
from adapterkit.inject.select import Targets, placed, select

__all__ = ["adapter_names", "attach", "attach_at", "detach", "hosts", "placements", "set_active", "train_only"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,127}")


def attach(model: nn.Module, name: str, spec: AdapterSpec, targets: Targets | None = None) -> list[str]:
    """Attach a new adapter ``name`` built from ``spec`` to every module ``targets`` selects; returns paths.

    Without targets the spec places itself (``AdapterSpec.default_targets``: prompt and prefix methods, which act
    on the model's call as a whole); other specs need targets."""
    _check_new(model, name, spec)
    return _build(name, spec, placed(model, spec, targets, f"attach({name!r})"))


def attach_at(model: nn.Module, name: str, spec: AdapterSpec, paths: Sequence[str], fresh_init: bool = True,
              modules: dict[str, nn.Module] | None = None, specs: dict[str, AdapterSpec] | None = None) -> list[str]:
    """Attach ``name`` at exactly these module ``paths`` (no target selection): how a saved adapter is rebuilt.

    With ``fresh_init=False`` the spec's random initialisation draws from a forked random stream, so the caller's
    RNG state is left as it was (the weights are about to be overwritten by saved ones anyway). ``modules`` is
    ``dict(model.named_modules())`` when the caller has it already (one walk of the tree fewer). ``specs`` gives
    the paths whose adapter has a spec of its own (e.g. peft's per-module ranks); the others get ``spec``.
    """
    _check_new(model, name, spec)
    modules = dict(model.named_modules()) if modules is None else modules
    missing = [p for p in paths if p not in modules or HOST_ATTR in p.split(".")]
    if missing:
        raise TargetError(f"attach({name!r}): this model has no module {missing[0]!r}")
    chosen = [(path, modules[path]) for path in paths]
    if fresh_init:
        return _build(name, spec, chosen, specs)
    devices = sorted({p.device for _, m in chosen for p in m.parameters() if p.device.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=devices):
        return _build(name, spec, chosen, specs)


def _check_new(model: nn.Module, name: str, spec: AdapterSpec) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise NameInUseError(f"adapter name {name!r} is invalid: use letters, digits, '_' or '-', not starting "
                             "with a digit")
    if name in adapter_names(model):
        raise NameInUseError(f"adapter name {name!r} is already attached; detach it first or pick another name")
    if not isinstance(spec, AdapterSpec):
        raise TargetError(f"attach({name!r}): expected an adapter spec such as LoRA(r=8), got {type(spec).__name__}")


def _build(name: str, spec: AdapterSpec, chosen: list[tuple[str, nn.Module]],
           specs: dict[str, AdapterSpec] | None = None) -> list[str]:
    spec_at = {path: (specs or {}).get(path, spec) for path, _ in chosen}
    for path, module in chosen:  # validate everything before changing anything
        spec_at[path].check_target(module, path)
    built: dict[str, nn.Module] = {}
    distinct: list[AdapterSpec] = []
    for each in spec_at.values():  # by equality: a spec's fields need not be hashable
        if all(each != seen for seen in distinct):
            distinct.append(each)
    for each in distinct:  # one build_all per spec: placements of one spec may share parameters
        group = [(path, module) for path, module in chosen if spec_at[path] == each]
        built.update(zip([p for p, _ in group], each.build_all([m for _, m in group]), strict=True))
    for path, module in chosen:
        adapter = built[path]
        host = host_of(module)
        if host is None:
            host = Host(module, module_fingerprint(module), path)
            module.add_module(HOST_ATTR, host)
        host.train(module.training)  # a new module starts in training mode; it follows the model's instead
        adapter.train(module.training)
        host.add(name, adapter)
    return [path for path, _ in chosen]


def detach(model: nn.Module, name: str | None = None, keep_merged: bool = False) -> None:
    """Remove adapter ``name`` (or all adapters).

    Merged adapters are unmerged first, so the model is restored exactly; with ``keep_merged`` their effect
    stays baked into the base weights (how a merged model is exported).
    """
    held = hosts(model)
    names = names_in(held) if name is None else [name]
    for each in names:
        placements(model, each, held)  # clear error for unknown names
    for each in names:
        for _, module, host in held:
            if each not in host.names():
                continue
            if each in host.merged and not keep_merged:
                host.unmerge(module, each)
            host.merged = [n for n in host.merged if n != each]
            host.remove(each)
            if not host.names():
                host.release()
                delattr(module, HOST_ATTR)
    if not any(host.names() for _, _, host in held):
        disable_input_grads(model)  # the last adapter is gone: the model is given back without our hooks


def set_active(model: nn.Module, names: Sequence[str]) -> None:
    """Make exactly ``names`` active (in this order) on every host; [] runs the bare base model."""
    held = hosts(model)
    known = names_in(held)
    for each in names:
        if each not in known:
            raise NameInUseError(f"no adapter named {each!r} on this model (attached: {known or 'none'})")
    for _, _, host in held:
        for each in names:
            if each in host.names() and host.adapter(each).spec.role:
                raise NameInUseError(f"{each!r} is a {host.adapter(each).spec.role!r} combiner: run it through its "
                                     "block, e.g. ak.use(model, ak.Mix('a', 'b', name=...))")
    for _, _, host in held:
        host.active = [n for n in names if n in host.names()]


def train_only(model: nn.Module, names: str | Iterable[str], also: Iterable[str] = ()) -> int:
    """Freeze every parameter except adapters ``names`` and the modules whose path ends with ``also``.

    The ``also`` modules (e.g. a classification head) are remembered with each adapter: ``save`` stores them
    beside it unless told otherwise. Returns the number of trainable parameters.
    """
    wanted = [names] if isinstance(names, str) else list(names)
    held = hosts(model)
    for each in wanted:
        placements(model, each, held)
    beside = [path for suffix in also for path, _ in select(model, [suffix])]
    for param in model.parameters():
        param.requires_grad_(False)
    for _, _, host in held:
        for each in wanted:
            if each in host.names():
                host.adapter(each).requires_grad_(True)
                host.beside[each] = list(dict.fromkeys(beside))
    modules = dict(model.named_modules())
    for path in beside:
        for pname, param in modules[path].named_parameters():
            if HOST_ATTR not in pname.split("."):
                param.requires_grad_(True)
    enable_input_grads(model)  # reentrant gradient checkpointing over the frozen base (inject/grad_inputs.py)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
