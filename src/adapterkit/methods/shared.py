"""Shared adapters: one adapter's weights tied across every module it adapts (VL-Adapter, Sung, Cho & Bansal,
CVPR 2022, https://arxiv.org/abs/2112.06825, "weight sharing" across layers; its "single adapter" is the same
adapter used for every task of multi-task training, which is simply one adapter trained on every task).

    placement l of L:   y_l = A_theta(x_l, f_l(x_l))     one parameter set theta for all l
    dL/dtheta = sum_l dL/dtheta|_l                         (autograd sums the placements' contributions)

``Shared(SeqBottleneck(reduction_factor=16))`` wraps any adapter method's spec. One ``attach`` builds the inner
adapter at every placement (``build_all``, so each keeps what belongs to its own base module, e.g. the post-norm
a sequential adapter re-enters), then the first placement keeps the parameters and every other one borrows them:
its own parameters are dropped and its modules read the first placement's tensors (rebound before each call, so a
conversion that replaces parameter objects cannot leave them stale). The weights are therefore stored once (the
other placements' state is empty), counted once, trained once, and a load (which attaches again, same order)
ties them again. Buffers stay per placement.

Every placement must have the same parameter shapes (one output size for a sequential bottleneck), and the inner
adapter's initial parameters must not depend on its own base module (DoRA's magnitudes are the base weights'
norms, PiSSA moves part of each weight into the adapter): placement l could not start from them. A mergeable inner
adapter (LoRA) stays mergeable, each placement merging the same delta; a non-linear one (a bottleneck) is refused
by ``merge``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from adapterkit.core.errors import SpecError, TargetError
from adapterkit.core.interpret import unchanged
from adapterkit.core.layers import io_sizes
from adapterkit.core.protocol import Mergeable, Packed, Resizable, Site
from adapterkit.core.registry import register, spec_from_dict
from adapterkit.core.spec import AdapterSpec, require
from adapterkit.methods.bottleneck import SeqBottleneck

_PATHS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()  # base module -> its path


def remember_path(base: nn.Module, path: str) -> None:
    """Note where ``base`` lives (``check_target`` runs on every placement before ``build_all``) for messages that
    compare placements."""
    _PATHS[base] = path


def path_of(base: nn.Module, index: int) -> str:
    """The path ``remember_path`` noted, or the placement's position when ``build_all`` was called directly."""
    return _PATHS.get(base, f"target {index} ({type(base).__name__})")


def same_output_sizes(method: str, bases: list[nn.Module]) -> None:
    """TargetError naming the first two placements whose output feature sizes differ."""
    first = io_sizes(bases[0])[1]
    for index, base in enumerate(bases[1:], start=1):
        if io_sizes(base)[1] != first:
            raise TargetError(f"{method}: {path_of(base, index)} has output feature size {io_sizes(base)[1]}, "
                              f"{path_of(bases[0], 0)} has {first}; one set of weights needs one size everywhere")


@register("shared")
@dataclass(frozen=True)
class Shared(AdapterSpec):
    """Spec of an adapter whose weights are shared by every placement of one ``attach``."""

    base: AdapterSpec = SeqBottleneck()  # the adapter whose weights every placement shares

    def __post_init__(self) -> None:
        if isinstance(self.base, dict):  # from JSON or the CLI's -p base={...}
            object.__setattr__(self, "base", spec_from_dict(self.base, where=f"{self.method}.base"))
        require(isinstance(self.base, AdapterSpec) and not isinstance(self.base, Shared) and not self.base.role,
                f"{self.method}: base must be an adapter method's spec, e.g. SeqBottleneck(), got {self.base!r}")
        require(self.base.for_counting() == self.base, f"{self.method}: this {self.base.method} init moves part of "
                "each base weight into the adapter, so its placements cannot share one set of weights")

    @property
    def starts_as_identity(self) -> bool:
        """As the inner adapter (borrowed parameters are the same initial values)."""
        return bool(getattr(self.base, "starts_as_identity", True))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "base": self.base.to_dict()}

    def check_target(self, base: nn.Module, path: str) -> None:
        remember_path(base, path)
        self.base.check_target(base, path)

    def build(self, base: nn.Module) -> nn.Module:
        return self.build_all([base])[0]

    def build_all(self, bases: list[nn.Module]) -> list[nn.Module]:
        inners = self.base.build_all(bases)
        if isinstance(inners[0], (Packed, Resizable)):
            raise SpecError(f"{self.method}: a {self.base.method} adapter stores a packed or resized form per module, "
                            "so its weights cannot be shared")
        start = self._seeded(bases[0]) if len(bases) > 1 else []
        for index in range(1, len(bases)):
            self._check_like(inners[0], inners[index], start, bases, index)
        mergeable = isinstance(inners[0], Mergeable)
        cls = MergeableSharedAdapter if mergeable else SharedAdapter
        owner = cls(self, inners[0], None)
        return [owner, *(cls(self, inner, owner) for inner in inners[1:])]

    def _check_like(self, first: nn.Module, inner: nn.Module, start: list[Tensor], bases: list[nn.Module],
                    index: int) -> None:
        """Same parameter names and shapes as the first placement, and an init that ignores the base: built again
        from one seed, placement ``index`` must start where the first one does (``start``, also from that seed)."""
        where = f"{self.method}: {path_of(bases[index], index)}"
        if [(n, p.shape) for n, p in inner.named_parameters()] != [(n, p.shape) for n, p in first.named_parameters()]:
            raise TargetError(f"{where} has feature sizes (in, out) = {io_sizes(bases[index])}, {path_of(bases[0], 0)} "
                              f"has {io_sizes(bases[0])}, and its {self.base.method} has other parameter shapes; "
                              "one set of weights needs one shape everywhere")
        if any(not torch.equal(a, b) for a, b in zip(start, self._seeded(bases[index]))):
            raise TargetError(f"{where}: {self.base.method}'s initial parameters depend on each module's own "
                              "weights, so one shared set cannot start right everywhere")


    def _seeded(self, base: nn.Module) -> list[Tensor]:
        """The inner adapter's initial parameters at ``base`` drawn from seed 0 (the caller's stream untouched)."""
        devices = sorted({p.device for p in base.parameters() if p.device.type == "cuda"}, key=str)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            return [p.detach() for p in self.base.build(base).parameters()]


class SharedAdapter(nn.Module):
    """One placement of a shared adapter: the inner adapter built for this module, its parameters the owner's."""

    def __init__(self, spec: Shared, inner: nn.Module, owner: SharedAdapter | None) -> None:
        super().__init__()
        self.spec = spec
        self.site: Site = getattr(inner, "site")  # noqa: B009 - typed: the Adapter contract's site
        self.inner = inner
        # (module in inner, parameter name, the owner's module holding it): rebound before every call
        self._tied: list[tuple[nn.Module, str, nn.Module]] = []
        if owner is None:
            return
        sources = dict(owner.inner.named_modules())
        for path, module in inner.named_modules():
            for pname in list(module._parameters):
                if module._parameters[pname] is None:
                    continue
                del module._parameters[pname]  # no own copy: not saved, not counted, not trained
                self._tied.append((module, pname, sources[path]))
        self._bind()

    def _bind(self) -> None:
        for module, pname, source in self._tied:
            module.__dict__[pname] = source._parameters[pname]  # a plain attribute: found before __getattr__

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        self._bind()
        return self.inner(x, base_out)

    def parts(self, x: Tensor, base_out: Tensor) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
        """The inner adapter's (stream, delta, finish) split where it has one (a sequential adapter on a
        post-norm), else ``(base_out, change, identity)``."""
        split = getattr(self.inner, "parts", None)
        if split is None:
            return base_out, self.forward(x, base_out) - base_out, unchanged
        self._bind()
        return split(x, base_out)


class MergeableSharedAdapter(SharedAdapter):
    """A shared mergeable adapter (LoRA): every placement folds the same delta into its own base weight."""

    def merge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        self._bind()
        inner: Any = self.inner  # Mergeable (checked in Shared.build_all)
        return inner.merge(weight, bias)

    def unmerge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        self._bind()
        inner: Any = self.inner
        return inner.unmerge(weight, bias)
