"""The one interpreter of an adapter setup on a host, for one call: plain adapters, one adapter per example
(Select, core/rows.py) and composition blocks (core/blocks.py) all apply adapters through ``apply``, the only
site dispatch; the host (core/host.py) picks which of the three a call runs.

Plain order: INPUT adapters transform the input (before the base runs), then the base runs, then the PARALLEL
deltas (computed from the base's input) are added, then OUTPUT adapters transform the result in order.

In blocks, every child, adapter or block, is turned into the same thing -- a function from the base module's output
to a new output -- so Stack, Parallel and Average are written once here, and a learned block hands its children to
its combiner as ``Branch`` objects. A combiner may run all branches (fusion, scaling, gating), only some of them on
some rows (sparse routing), or read their parameters (task routing mixes skills' weights); it never needs to know
which method a branch is.

Adapters that transform the *input* of a module (Site.INPUT) run before the base module, so a block applies them
in the pre-hook (``block_inputs``); only a Stack has an order to apply them in, so anywhere else they are an error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from adapterkit.core.blocks import Average, Learned, Parallel, Stack
from adapterkit.core.context import BlockPlan
from adapterkit.core.errors import AdapterKitError
from adapterkit.core.protocol import Site


def apply(adapter: Any, x: Tensor, out: Tensor, inplace: bool = False) -> Tensor:
    """``out`` with one adapter applied at its site (an INPUT adapter already ran on the input: nothing here)."""
    if adapter.site is Site.PARALLEL:
        if inplace and hasattr(adapter, "add_into"):  # the delta accumulates into ``out`` (protocol.AddsInto)
            return adapter.add_into(x, out)
        delta = adapter(x, out)
        return out.add_(delta) if inplace and delta.shape == out.shape else out + delta
    return adapter(x, out) if adapter.site is Site.OUTPUT else out


def apply_all(adapters: Sequence[Any], x: Tensor, out: Tensor, inplace: bool) -> Tensor:
    """Plain order: every PARALLEL delta (all from the base's output), then OUTPUT adapters in order."""
    for adapter in adapters:
        if adapter.site is Site.PARALLEL:
            out = apply(adapter, x, out, inplace)
    for adapter in adapters:
        if adapter.site is Site.OUTPUT:
            out = apply(adapter, x, out)
    return out


@dataclass
class Call:
    """What a combiner may know about the call it runs in: where it is, task ids, where to report."""

    path: str  # the host's module path, naming its reports
    combiner: str  # the learned block's combiner name
    plan: BlockPlan

    def task_ids(self, x: Tensor) -> Tensor:
        """Task id per row of ``x``."""
        return self.plan.task_ids_for(x)

    def real_tokens(self, x: Tensor) -> Tensor | None:
        """Flat bool mask of ``x``'s real tokens (``use(..., token_mask=)``), or None: count every token."""
        return self.plan.real_tokens(x)

    def record(self, weights: Tensor) -> None:
        """Report the routing / fusion weights used here (kept for plots and inspection, detached)."""
        self.plan.routing.record(self.combiner, self.path, weights.detach())

    def add_loss(self, name: str, value: Tensor) -> None:
        """Report an auxiliary loss term computed here (kept with its graph: add it to the training loss)."""
        self.plan.routing.add_loss(name, value)

    @property
    def state(self) -> dict[str, Any]:
        """Scratch space shared by every layer within the ``use`` block."""
        return self.plan.state


def unchanged(stream: Tensor) -> Tensor:
    """The ``finish`` of adapters whose output is ``stream + delta`` itself (one function, so splits compare)."""
    return stream


@dataclass
class Parts:
    """A child's output split where papers combine adapters: ``child(x, out) == finish(stream + delta)``.

    For a sequential adapter on a post-norm target (``LN(x + A(LN(x)))``) the stream is the norm's input and
    ``finish`` the norm, so a combiner mixes adapter outputs *before* the residual and the norm (AdapterFusion,
    ScaLearn). Adapters without an inner split give ``stream = out``, ``delta = change``, ``finish = identity``.
    """

    stream: Tensor
    delta: Tensor
    finish: Callable[[Tensor], Tensor]


class Branch:
    """One child of a learned block on one host: call it with (x, out) for the new output."""

    def __init__(self, child: Any, host: Any, plan: BlockPlan) -> None:
        self.child = child
        self.name: str | None = child if isinstance(child, str) else None
        # the adapter module when the child is an adapter present on this host (None: a block, or absent)
        self.adapter: Any = host._modules.get(child) if isinstance(child, str) else None
        self._host = host
        self._plan = plan

    @property
    def present(self) -> bool:
        """Whether this child does anything on this host."""
        if self.name is not None:
            return self.adapter is not None
        return any(name in self._host._modules for name in self.child.leaves())

    def __call__(self, x: Tensor, out: Tensor) -> Tensor:
        """The output with this child applied (``out`` itself when the child is absent here)."""
        return run_block(self.child, self._host, x, out, self._plan)

    def change(self, x: Tensor, out: Tensor) -> Tensor | None:
        """What this child adds to ``out`` (None: nothing, it is absent here)."""
        return change(self.child, self._host, x, out, self._plan)

    def parts(self, x: Tensor, out: Tensor) -> Parts | None:
        """This child's (stream, delta, finish) split (None: absent here); see ``Parts``."""
        split = getattr(self.adapter, "parts", None)
        if split is not None and self.adapter.site is Site.OUTPUT:
            return Parts(*split(x, out))
        delta = self.change(x, out)
        return None if delta is None else Parts(out, delta, unchanged)


def common_parts(branches: Sequence[Branch], x: Tensor, out: Tensor, where: str
                 ) -> tuple[Tensor, list[Tensor | None], Callable[[Tensor], Tensor]] | None:
    """(stream, delta per branch or None where absent, finish) shared by every present branch (None: none is).

    Children must split the same way (one stream, one finish) to be mixed before the finish; otherwise their
    deltas live in different spaces and mixing them is an error, named with ``where``.
    """
    parts = [branch.parts(x, out) for branch in branches]
    present = [p for p in parts if p is not None]
    if not present:
        return None
    first = present[0]
    for each, branch in zip(parts, branches):
        if each is not None and (each.stream is not first.stream or each.finish != first.finish):
            raise AdapterKitError(f"{where}: child {branch.name or type(branch.child).__name__!r} combines in "
                                  "another space than the first child (e.g. a sequential adapter beside a LoRA); "
                                  "mix children of one kind")
    return first.stream, [None if p is None else p.delta for p in parts], first.finish


def mixed_change(branches: Sequence[Branch], x: Tensor, weights: Tensor) -> Tensor | None:
    """``sum_k weights[..., k] * delta_k(x)`` in one computation when every branch is a parallel adapter of one
    type that offers ``mixed_delta`` (a method's batched mixture, e.g. LoRA's two matmuls over its stacked factors
    instead of two per branch); None otherwise, and the combiner runs the branches one by one.

    ``weights``: (..., K), one weight per branch, broadcast over ``x``'s leading dimensions.
    """
    adapters = [branch.adapter for branch in branches]
    if not adapters or any(a is None or a.site is not Site.PARALLEL for a in adapters):
        return None
    kinds = {type(a) for a in adapters}
    mixed = getattr(next(iter(kinds)), "mixed_delta", None) if len(kinds) == 1 else None
    return None if mixed is None else mixed(adapters, x, weights)


def run_block(child: Any, host: Any, x: Tensor, out: Tensor, plan: BlockPlan) -> Tensor:
    """``out`` transformed by ``child`` (an adapter name or a block) on ``host``; ``x`` is the module's input."""
    if isinstance(child, str):
        adapter = host._modules.get(child)
        return out if adapter is None else apply(adapter, x, out)  # absent here: unchanged
    if isinstance(child, Stack):
        for each in child.children:
            out = run_block(each, host, x, out, plan)
        return out
    if isinstance(child, (Parallel, Average)):
        weights = child.weights if isinstance(child, Average) else (1.0,) * len(child.children)
        result = out
        for weight, each in zip(weights, child.children):
            delta = change(each, host, x, out, plan)
            if delta is not None:
                result = result + (delta if weight == 1.0 else weight * delta)
        return result
    if isinstance(child, Learned):
        return _run_learned(child, host, x, out, plan)
    raise AdapterKitError(f"cannot run {type(child).__name__} inside a block")


def change(child: Any, host: Any, x: Tensor, out: Tensor, plan: BlockPlan) -> Tensor | None:
    """``run_block(child) - out`` without the subtraction where the child is a parallel adapter."""
    if isinstance(child, str):
        adapter = host._modules.get(child)
        if adapter is None or adapter.site is Site.INPUT:
            return None
        return adapter(x, out) if adapter.site is Site.PARALLEL else adapter(x, out) - out
    new = run_block(child, host, x, out, plan)
    return None if new is out else new - out


def _run_learned(block: Learned, host: Any, x: Tensor, out: Tensor, plan: BlockPlan) -> Tensor:
    branches = [Branch(c, host, plan) for c in block.children]
    combiner = host._modules.get(block.name)
    if combiner is None:
        if any(b.present for b in branches):
            present = [b.name or type(b.child).__name__ for b in branches if b.present]
            raise AdapterKitError(f"{type(block).__name__}: no combiner {block.name!r} at {host.path!r}, where "
                                  f"{present} are attached; attach it to the same modules as its children")
        return out
    return combiner.combine(x, out, branches, Call(host.path, block.name, plan))


def block_inputs(child: Any, host: Any, x: Tensor, in_stack: bool = True) -> Tensor:
    """The input the base module sees: input-site adapters of ``child`` applied in Stack order."""
    if isinstance(child, str):
        adapter = host._modules.get(child)
        if adapter is None or getattr(adapter, "site", None) is not Site.INPUT:
            return x
        if not in_stack:
            raise AdapterKitError(f"adapter {child!r} transforms its module's input ({adapter.spec.method}); "
                                  "only a Stack can order such adapters, not a block that mixes outputs")
        return adapter(x, None)
    for each in child.children:
        x = block_inputs(each, host, x, in_stack=in_stack and isinstance(child, Stack))
    return x


def check_combiners(block: Any, found: Sequence[tuple[str, Any]]) -> None:
    """Each learned block's combiner exists on the model and serves that kind of block.

    ``found`` is (name, module) for the combiner modules on the model, one per name.
    """
    modules = dict(found)
    for learned, name in block.combiners():
        module = modules.get(name)
        if module is None:
            raise AdapterKitError(f"{type(learned).__name__} uses combiner {name!r}, which is not attached "
                                  f"(attached combiners: {sorted(modules) or 'none'})")
        role = getattr(module.spec, "role", None)
        if not role or (learned.kind != "mix" and role != learned.kind):
            needs = "a combiner" if learned.kind == "mix" else f"a {learned.kind!r} combiner"
            raise AdapterKitError(f"{type(learned).__name__} needs {needs}, but {name!r} is a "
                                  f"{role or 'plain adapter'}")
        wanted = getattr(module, "branches", None)
        if wanted is not None and wanted != len(learned.children):
            raise AdapterKitError(f"combiner {name!r} was built for {wanted} children, the "
                                  f"{type(learned).__name__} block has {len(learned.children)}")
