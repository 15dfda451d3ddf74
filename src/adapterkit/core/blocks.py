"""Composition blocks: small frozen data that say how adapters combine, nest, and round-trip through JSON.

A child is an adapter name or another block. Fixed blocks need nothing learned:

* ``Stack(a, b)``: ``b`` runs on what ``a`` produced (a language adapter under a task adapter, MAD-X).
* ``Parallel(a, b)``: both run on the same input; their changes add: ``y + (a(y) - y) + (b(y) - y)``.
* ``Average(a, b, weights=(.7, .3))``: the same with fixed weights: ``y + sum_i w_i (child_i(y) - y)``.

The learned block ``Mix(a, b, c, name="fusion")`` runs its children through a *combiner*, a module attached like an
adapter (``ak.attach(model, "fusion", ak.compose.Fusion(), targets)``) that holds the learned part: AdapterFusion
attention, ScaLearn scales, a MixDA gate, X-LoRA / MoLE routing, Poly / MHR task routing. What it learns is the
combiner's (its spec's ``role``), so one block serves them all. ``Fuse``, ``Scale``, ``Gate``, ``Route`` and
``TaskRoute`` are the older names of ``Mix`` that also insist on one role; they are kept for one release.

``Select`` runs one adapter per example of a batch (None: the base model for that row); it is top-level only.

Which block may hold which is the table ``ALLOWED`` below; anything else is a one-line error when the block is
built, so a bad setup never reaches a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from adapterkit.core.errors import SpecError


class Block:
    """Base of the blocks with children (everything except ``Select``)."""

    kind: ClassVar[str] = ""
    children: tuple[Any, ...]

    def _check_children(self) -> None:
        if not self.children:
            raise SpecError(f"{type(self).__name__} needs at least one child")
        allowed = ALLOWED[type(self)]
        for child in self.children:
            if isinstance(child, str):
                if not child:
                    raise SpecError(f"{type(self).__name__}: an adapter name is empty")
                continue
            if not isinstance(child, tuple(allowed)):
                kinds = ", ".join(["adapter names", *(c.__name__ for c in allowed)])
                raise SpecError(f"{type(self).__name__} cannot hold {type(child).__name__} (it holds: {kinds})")
        names = [c for c in self.children if isinstance(c, str)]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise SpecError(f"{type(self).__name__}: adapter {repeated[0]!r} appears twice")

    def leaves(self) -> list[str]:
        """Every adapter name in this block and its sub-blocks, depth first."""
        found: list[str] = []
        for child in self.children:
            found += [child] if isinstance(child, str) else child.leaves()
        return found

    def combiners(self) -> list[tuple[Block, str]]:
        """(block, combiner name) for every learned block in the tree, depth first."""
        own: list[tuple[Block, str]] = [(self, self.name)] if isinstance(self, Learned) else []
        for child in self.children:
            if isinstance(child, Block):
                own += child.combiners()
        return own

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        children = [c if isinstance(c, str) else c.to_dict() for c in self.children]
        return {"block": self.kind, "children": children, **self._fields()}

    def _fields(self) -> dict[str, Any]:
        return {}


def _init_children(block: Block, children: tuple[Any, ...]) -> None:
    object.__setattr__(block, "children", tuple(children))


@dataclass(frozen=True, init=False)
class Stack(Block):
    """Children run one after another, each on the output of the one before."""

    kind: ClassVar[str] = "stack"
    children: tuple[Any, ...]

    def __init__(self, *children: Any) -> None:
        _init_children(self, children)
        self._check_children()


@dataclass(frozen=True, init=False)
class Parallel(Block):
    """Children run on the same input; their changes to the output add up."""

    kind: ClassVar[str] = "parallel"
    children: tuple[Any, ...]

    def __init__(self, *children: Any) -> None:
        _init_children(self, children)
        self._check_children()


@dataclass(frozen=True, init=False)
class Average(Block):
    """Children run on the same input; their changes are weighted by fixed ``weights`` (used as given)."""

    kind: ClassVar[str] = "average"
    children: tuple[Any, ...]
    weights: tuple[float, ...]

    def __init__(self, *children: Any, weights: Any = None) -> None:
        _init_children(self, children)
        self._check_children()
        values = tuple(float(w) for w in weights) if weights is not None else (1.0 / len(children),) * len(children)
        if len(values) != len(self.children):
            raise SpecError(f"Average: {len(values)} weights for {len(self.children)} children")
        object.__setattr__(self, "weights", values)

    def _fields(self) -> dict[str, Any]:
        return {"weights": list(self.weights)}


@dataclass(frozen=True, init=False)
class Learned(Block):
    """A block whose combination is learned: ``name`` is the combiner attached to the model."""

    children: tuple[Any, ...]
    name: str

    def __init__(self, *children: Any, name: str) -> None:
        _init_children(self, children)
        self._check_children()
        if not isinstance(name, str) or not name:
            raise SpecError(f"{type(self).__name__} needs name= the combiner it uses (attach one with ak.attach)")
        object.__setattr__(self, "name", name)

    def _fields(self) -> dict[str, Any]:
        return {"name": self.name}


class Mix(Learned):
    """Children combined by the learned combiner ``name`` attached to the model, whatever it learns."""

    kind: ClassVar[str] = "mix"


class Fuse(Learned):
    """AdapterFusion: per-token attention over the children's outputs (combiner role "fuse")."""

    kind: ClassVar[str] = "fuse"


class Scale(Learned):
    """ScaLearn: learned scales over frozen source adapters' outputs (combiner role "scale")."""

    kind: ClassVar[str] = "scale"


class Gate(Learned):
    """MixDA: a softmax gate mixing the base output with domain adapters' outputs (combiner role "gate")."""

    kind: ClassVar[str] = "gate"


class Route(Learned):
    """Token-level routing over expert adapters, soft or sparse top-k (combiner role "route")."""

    kind: ClassVar[str] = "route"


class TaskRoute(Learned):
    """Poly / MHR: per-task routing over a skill inventory, chosen by the ``task_ids`` of ``use`` (role
    "task_route")."""

    kind: ClassVar[str] = "task_route"


FIXED: tuple[type[Block], ...] = (Stack, Parallel, Average)
LEARNED: tuple[type[Block], ...] = (Mix, Fuse, Scale, Gate, Route, TaskRoute)
# Which blocks each block may hold (adapter names are always allowed). Learned blocks combine adapters directly:
# their combiners see one output (or one parameter set) per child, which a nested block does not have.
ALLOWED: dict[type[Block], tuple[type[Block], ...]] = {
    Stack: FIXED + LEARNED,
    Parallel: FIXED + LEARNED,
    Average: FIXED + LEARNED,
    Mix: (), Fuse: (), Scale: (), Gate: (), Route: (), TaskRoute: (),
}


@dataclass(frozen=True)
class Select:
    """Per-example adapters: ``names[i]`` (or None) for row i of the batch, in any order."""

    names: tuple[str | None, ...]
    kind: ClassVar[str] = "select"

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        if not self.names:
            raise SpecError("Select needs one adapter name (or None) per example")
        bad = [n for n in self.names if n is not None and not isinstance(n, str)]
        if bad:
            raise SpecError(f"Select: names must be strings or None, got {bad[0]!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"block": "select", "names": list(self.names)}


BLOCKS: dict[str, Any] = {cls.kind: cls for cls in FIXED + LEARNED} | {Select.kind: Select}


def block_from_dict(data: Any, where: str = "block") -> Any:
    """Inverse of ``to_dict`` for every block type (a string is an adapter name)."""
    if isinstance(data, str):
        return data
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a block object or an adapter name, got {type(data).__name__}")
    kind = data.get("block")
    cls = BLOCKS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise SpecError(f"{where}: unknown block {kind!r} (known: {', '.join(sorted(BLOCKS))})")
    if cls is Select:
        return Select(tuple(data.get("names", ())))
    raw = data.get("children")
    if not isinstance(raw, list):
        raise SpecError(f"{where}: {kind} needs a 'children' list")
    children = [block_from_dict(c, f"{where}.children[{i}]") for i, c in enumerate(raw)]
    if cls is Average:
        return Average(*children, weights=data.get("weights"))
    if issubclass(cls, Learned):
        return cls(*children, name=data.get("name", ""))
    return cls(*children)
