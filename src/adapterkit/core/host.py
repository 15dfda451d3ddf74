"""The host: a child module placed on each adapted base module, holding its named adapters.

The base module itself is never replaced or subclassed. The host registers one forward pre-hook and one
forward hook on it; with no active adapter both return at once. Because the base keeps its place in the
tree, the model's own parameter names do not change, and removing the host restores the model exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from adapterkit.core.context import Setup, inplace_allowed, setup_for, task_ids_in
from adapterkit.core.errors import AdapterKitError
from adapterkit.core.interpret import apply_all, block_inputs, run_block
from adapterkit.core.layers import read_weight, supports_inplace_delta, write_weight
from adapterkit.core.protocol import Site
from adapterkit.core.rows import select_inputs, select_outputs

HOST_ATTR = "adapterkit"


class Host(nn.Module):
    """Named adapters of one base module, their activation and merge state, and the base fingerprint."""

    def __init__(self, base: nn.Module, fingerprint: dict[str, Any], path: str = "") -> None:
        super().__init__()
        self.path = path  # the base module's path in the model: names routing reports and errors
        self.active: list[str] = []
        self.merged: list[str] = []
        # per adapter: paths of the modules trained beside it (train_only's ``also``), saved with it by default
        self.beside: dict[str, list[str]] = {}
        self.fingerprint = fingerprint
        self._has_inputs = False  # lets the pre-hook return at once in the common case
        self._has_calls = False  # CALL adapters (prompt / prefix methods) are held here
        self.select_cache: dict[str, Any] = {}  # stacked weights for Select, reused while they are unchanged
        # the setups of the last forward with and without grad mode, for activation checkpointing (see _setup)
        self._last_setup: dict[bool, Setup | None] = {True: None, False: None}
        self._inplace = supports_inplace_delta(base)
        self._handles: list[RemovableHandle] = [
            base.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            base.register_forward_hook(self._post_hook, with_kwargs=True),
        ]

    # -- registry of this module's adapters -------------------------------------------------------
    def names(self) -> list[str]:
        """Adapters held here, in attach order."""
        return list(self._modules)

    def adapter(self, name: str) -> Any:
        """The adapter called ``name`` (an nn.Module meeting the Adapter contract; typed Any because the
        contract's optional parts, such as ``merge``, are checked at run time)."""
        return self._modules[name]

    def add(self, name: str, adapter: nn.Module) -> None:
        """Hold ``adapter`` under ``name`` and make it active."""
        # Written into _modules directly: add_module refuses names that shadow attributes ("train", "add"),
        # and adapter names are the user's. They are only ever read back through _modules.
        self._modules[name] = adapter
        spec: Any = adapter.spec
        if not spec.role:  # a combiner never runs on its own, only through its block
            self.active.append(name)
        self._sites_changed()

    def remove(self, name: str) -> None:
        """Drop ``name`` (the caller unmerges it first)."""
        del self._modules[name]
        self.active = [n for n in self.active if n != name]
        self.beside.pop(name, None)
        self._sites_changed()

    def _sites_changed(self) -> None:
        sites = {getattr(a, "site", None) for a in self._modules.values()}
        self._has_inputs = Site.INPUT in sites or Site.CALL in sites  # the pre-hook has work
        self._has_calls = Site.CALL in sites

    # -- merging into the base module's weights ----------------------------------------------------
    @torch.no_grad()
    def merge(self, base: nn.Module, name: str) -> None:
        """Fold adapter ``name`` into ``base``'s weights (in float64, written back in the weights' dtype)."""
        if name in self.merged:
            return
        self._fold(base, name, "merge")
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, base: nn.Module, name: str) -> None:
        """Undo ``merge`` of ``name``; adapters merged after it are undone first and redone after, so each one's
        inverse sees the weights it was merged into."""
        if name not in self.merged:
            raise AdapterKitError(f"adapter {name!r} is not merged at {self.path!r}")
        later = self.merged[self.merged.index(name):]
        for each in reversed(later):
            self._fold(base, each, "unmerge")
        self.merged = self.merged[: self.merged.index(name)]
        for each in later[1:]:
            self._fold(base, each, "merge")
            self.merged.append(each)

    def _fold(self, base: nn.Module, name: str, way: str) -> None:
        weight, bias = read_weight(base)
        new_w, new_b = getattr(self._modules[name], way)(weight.double(), None if bias is None else bias.double())
        write_weight(base, new_w.to(weight.dtype), None if new_b is None else new_b.to(weight.dtype))

    def release(self) -> None:
        """Unhook from the base module (the engine then deletes the host)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """Identity. adapterkit never calls a host; a container that calls every child (nn.Sequential)
        reaches its host last and passes the value through unchanged."""
        return x

    def running(self, names: tuple[str, ...] | None = None) -> list[Any]:
        """The adapters that run in this call: ``names`` (forced by ``use``) or the active ones, present here and
        not merged."""
        chosen = self.active if names is None else names
        return [self._modules[n] for n in chosen if n in self._modules and n not in self.merged]

    def _setup(self) -> Setup | None:
        """This call's setup. Activation checkpointing runs a layer's forward again inside backward, which often
        comes after the ``use`` block has closed (a Trainer calls backward outside the loss code); such a recompute
        must run what the forward ran. So a host called inside backward and outside any block takes the setup of
        its last forward: the last one under no_grad for reentrant checkpointing (whose forward runs without grad),
        else the last one with grad. (Two such forwards under different setups before one backward would recompute
        the first with the second's setup: run backward inside the block then.)"""
        setup = setup_for(self)
        if torch._C._current_graph_task_id() == -1:  # not inside a backward pass: an ordinary forward
            self._last_setup[torch.is_grad_enabled()] = setup
            return setup
        if setup is not None:
            return setup
        node = getattr(torch._C, "_current_autograd_node", lambda: None)()
        return self._last_setup[type(node).__name__ != "CheckpointFunctionBackward"]

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self._has_inputs:
            return None
        setup = self._setup()
        changed = False
        if self._has_calls:
            for adapter in self._calls(setup):
                args, kwargs = adapter.before(module, args, kwargs)
                changed = True
        if not args:
            return (args, kwargs) if changed else None
        new = run_inputs(self, setup, args[0])
        return ((new, *args[1:]), kwargs) if changed or new is not args[0] else None

    def _calls(self, setup: Setup | None) -> list[Any]:
        """The CALL adapters that run in this call (a Select or block never runs them: ``use`` refuses that)."""
        if setup is not None and (setup.block is not None or setup.select is not None):
            return []
        return [a for a in self.running(None if setup is None else setup.names) if a.site is Site.CALL]

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        setup = self._setup()
        calls = self._calls(setup) if self._has_calls else []
        new = self._outputs(setup, args, kwargs, output)
        if not calls:
            return new
        output = output if new is None else new
        for adapter in calls:
            output = adapter.after(module, args, kwargs, output)
        return output

    def _outputs(self, setup: Setup | None, args: tuple, kwargs: dict, output: Any) -> Any:
        """The base output with the tensor adapters (PARALLEL, OUTPUT) applied; None: unchanged."""
        if not args and not kwargs:
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        # modules such as attention blocks return (hidden, extras...): adapters act on the first element
        hidden = output[0] if isinstance(output, tuple) else output
        inplace = self._inplace and hidden is output and inplace_allowed()
        new = run_outputs(self, setup, x, hidden, inplace)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new


def run_inputs(host: Any, setup: Setup | None, x: Tensor) -> Tensor:
    """The input ``host``'s base module sees under ``setup`` (None: the host's active adapters)."""
    if setup is not None and setup.block is not None:
        return block_inputs(setup.block.block, host, x)
    if setup is not None and setup.select is not None:
        return select_inputs(host, setup.select, x)
    for adapter in host.running(None if setup is None else setup.names):
        if adapter.site is Site.INPUT:
            x = adapter(x, None)
    return x


def run_outputs(host: Any, setup: Setup | None, x: Tensor, out: Tensor, inplace: bool) -> Tensor | None:
    """``host``'s base output ``out`` (for input ``x``) with the adapters of ``setup`` applied; None: unchanged.

    ``inplace`` is set by the host for base layers whose output autograd does not keep (Linear, Conv, Embedding):
    adding a delta in place saves one activation-sized allocation per adapted layer.
    """
    if setup is not None and setup.block is not None:
        if setup.block.names.isdisjoint(host._modules):
            return None
        return run_block(setup.block.block, host, x, out, setup.block)
    if setup is not None and setup.select is not None:
        return select_outputs(host, setup.select, x, out, inplace)
    adapters = host.running(None if setup is None else setup.names)
    return apply_all(adapters, x, out, inplace) if adapters else None


def host_of(module: nn.Module) -> Host | None:
    """The host on ``module``, if any."""
    host = module._modules.get(HOST_ATTR)
    return host if isinstance(host, Host) else None


def task_ids_for(module: nn.Module, x: Tensor) -> Tensor | None:
    """Task id per row of ``x`` in the current call, for an adapter on base module ``module`` (the one it was built
    for): what ``use(model, ..., task_ids=)`` gave, with a block or with plain adapter names; None when it gave
    none. Adapters that read each row's task (a task-conditioned hypernetwork) call this from their forward; the
    host's setup is the one its hooks run (also in an activation-checkpointing recompute)."""
    host = host_of(module)
    return None if host is None else task_ids_in(host._setup(), x)
