"""Targets -> module paths, and ``explain``: the dry run that shows what ``attach`` would touch, or (called with the
model alone) a summary of the adapters attached, with peft's ``print_trainable_parameters`` line.

A target is one of: a name suffix ("query" matches "encoder.layer.0.attention.self.query"), a regex written
"re:<pattern>" (full match on the dotted path), a module type, or a predicate ``(path, module) -> bool``.
A list matches the union.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import overload

import torch
from torch import nn

from adapterkit.core.errors import TargetError
from adapterkit.core.host import HOST_ATTR
from adapterkit.core.spec import AdapterSpec
from adapterkit.core.tree import hosts, names_in

Target = str | type | Callable[[str, nn.Module], bool]
Targets = Target | Sequence[Target]


def _matcher(target: Target) -> Callable[[str, nn.Module], bool]:
    if isinstance(target, str):
        if target.startswith("re:"):
            pattern = re.compile(target[3:])
            return lambda path, _m: pattern.fullmatch(path) is not None
        return lambda path, _m: path == target or path.endswith("." + target)
    if isinstance(target, type):
        return lambda _p, module: isinstance(module, target)
    if callable(target):
        return target
    raise TargetError(f"target {target!r} is not a name suffix, 're:<regex>', module type or predicate")


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module of the model except adapterkit's own hosts and what they hold."""
    found = []
    for path, module in model.named_modules():
        if path == "" or HOST_ATTR in path.split("."):
            continue
        found.append((path, module))
    return found


def select(model: nn.Module, targets: Targets | None) -> list[tuple[str, nn.Module]]:
    """Modules matching ``targets``, in model order; a one-line error with near names if none match."""
    if targets is None or (isinstance(targets, Sequence) and not isinstance(targets, str) and not targets):
        raise TargetError("no targets given: name module suffixes, 're:<regex>', a module type or a predicate")
    items = [targets] if isinstance(targets, (str, type)) or callable(targets) else list(targets)
    matchers = [_matcher(t) for t in items]
    modules = candidate_modules(model)
    chosen = [(p, m) for p, m in modules if any(match(p, m) for match in matchers)]
    if not chosen:
        raise TargetError(f"targets {items!r} match no module; closest names: {_closest(modules, items)}")
    return chosen


def placed(model: nn.Module, spec: AdapterSpec, targets: Targets | None, what: str) -> list[tuple[str, nn.Module]]:
    """Where ``spec`` goes: the modules ``targets`` select, or, for a spec that places itself (prompt / prefix
    methods: ``AdapterSpec.default_targets``), its own place, in which case targets must be absent (None or [])."""
    own = spec.default_targets(model)
    if own is None:
        return select(model, targets)
    if not (targets is None or (isinstance(targets, (list, tuple)) and not targets)):
        raise TargetError(f"{what}: {spec.method} places itself ({own[0][0] or 'the model'}); give no targets")
    return own


def _closest(modules: list[tuple[str, nn.Module]], items: list[Target]) -> str:
    leaves = sorted({p.split(".")[-1] for p, _ in modules} | {".".join(p.split(".")[-2:]) for p, _ in modules})
    words = [t[3:] if t.startswith("re:") else t for t in items if isinstance(t, str)]
    near: list[str] = []
    for word in words:
        near += [n for n in difflib.get_close_matches(word, leaves, n=4, cutoff=0.4) if n not in near]
    return ", ".join(near[:6]) if near else ", ".join(leaves[:6])


@dataclass(frozen=True)
class PlanRow:
    """One module ``attach`` would adapt."""

    path: str
    module_type: str
    adapter_params: int


@dataclass(frozen=True)
class Plan:
    """What ``attach`` would do: the rows, and totals. ``str(plan)`` is a readable table."""

    rows: tuple[PlanRow, ...]
    model_params: int

    @property
    def adapter_params(self) -> int:
        """Parameters the adapter would add."""
        return sum(r.adapter_params for r in self.rows)

    def __str__(self) -> str:
        width = max([len(r.path) for r in self.rows] + [6])
        lines = [f"{'module':<{width}}  {'type':<20} {'params':>10}"]
        lines += [f"{r.path:<{width}}  {r.module_type:<20} {r.adapter_params:>10,}" for r in self.rows]
        share = 100 * self.adapter_params / max(self.model_params, 1)
        lines.append(f"{len(self.rows)} modules, {self.adapter_params:,} adapter parameters "
                     f"({share:.3f}% of the model's {self.model_params:,})")
        return "\n".join(lines)


@dataclass(frozen=True)
class AttachedAdapter:
    """One attached adapter: its method, the modules it adapts (path, parameters there) and whether it trains."""

    name: str
    method: str
    modules: tuple[tuple[str, int], ...]
    trainable_params: int

    @property
    def params(self) -> int:
        return sum(count for _, count in self.modules)


@dataclass(frozen=True)
class Summary:
    """The adapters attached to a model and peft's parameter counts; ``str(summary)`` prints both."""

    adapters: tuple[AttachedAdapter, ...]
    trainable_params: int
    all_params: int

    def trainable_line(self) -> str:
        """peft's ``print_trainable_parameters`` line, character for character (peft/peft_model.py)."""
        return (f"trainable params: {self.trainable_params:,d} || all params: {self.all_params:,d} || "
                f"trainable%: {100 * self.trainable_params / max(self.all_params, 1):.4f}")

    def __str__(self) -> str:
        lines = [] if self.adapters else ["no adapters attached"]
        for each in self.adapters:
            # module paths grouped by their last part: "q_proj x30, v_proj x30" reads better than 60 paths
            kinds = Counter(path.rsplit(".", 1)[-1] for path, _ in each.modules)
            where = ", ".join(f"{leaf} x{n}" if n > 1 else leaf for leaf, n in kinds.items())
            lines.append(f"{each.name}: {each.method}, {len(each.modules)} modules ({where}), {each.params:,} "
                         f"params, {each.trainable_params:,} trainable")
        return "\n".join([*lines, self.trainable_line()])


def _counted(param: torch.Tensor) -> int:
    """A parameter's count as peft's ``get_nb_trainable_parameters`` counts it: a bitsandbytes 4-bit weight holds
    two values per byte of its storage."""
    if type(param).__name__ == "Params4bit":
        size = param.element_size() if hasattr(param, "element_size") else 1
        return param.numel() * 2 * size
    return param.numel()


def summarize(model: nn.Module) -> Summary:
    """The attached adapters and the trainable / all parameter counts, as peft counts them: every parameter of
    the model once (tied ones once, adapters included), trainable when it requires grad."""
    held = hosts(model)
    adapters = []
    for name in names_in(held):
        modules, trainable, method = [], 0, ""
        for path, _, host in held:
            if name in host.names():
                adapter = host.adapter(name)
                method = method or adapter.spec.method
                params = list(adapter.parameters())
                modules.append((path, sum(p.numel() for p in params)))
                trainable += sum(p.numel() for p in params if p.requires_grad)
        adapters.append(AttachedAdapter(name, method, tuple(modules), trainable))
    counted = [(_counted(p), p.requires_grad) for p in model.parameters()]
    return Summary(tuple(adapters), sum(n for n, grad in counted if grad), sum(n for n, _ in counted))


@overload
def explain(model: nn.Module) -> Summary: ...


@overload
def explain(model: nn.Module, targets: Targets, spec: AdapterSpec | None = None) -> Plan: ...


def explain(model: nn.Module, targets: Targets | None = None, spec: AdapterSpec | None = None) -> Plan | Summary:
    """Dry run: list the modules ``targets`` select and, given a spec, the parameters it would add. With the model
    alone: a ``Summary`` of the adapters attached (method, modules, parameters) ending in peft's
    ``trainable params: X || all params: Y || trainable%: Z`` line."""
    if targets is None and spec is None:
        return summarize(model)
    chosen = placed(model, spec, targets, "explain") if spec is not None else select(model, targets)
    counts = [0] * len(chosen)
    if spec is not None:
        for path, module in chosen:
            spec.check_target(module, path)
        with torch.random.fork_rng(devices=[]):  # a dry run must not move the seeded random stream
            # all placements at once, as attach builds them: a parameter they share counts once, where it is kept
            built = spec.for_counting().build_all([module for _, module in chosen])
            counts = [sum(p.numel() for p in each.parameters()) for each in built]
    rows = [PlanRow(path, type(module).__name__, count) for (path, module), count in zip(chosen, counts)]
    total = sum(p.numel() for n, p in model.named_parameters() if f".{HOST_ATTR}." not in f".{n}")
    return Plan(tuple(rows), total)
