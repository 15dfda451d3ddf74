"""Bottleneck adapters: sequential (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751; Pfeiffer et al. 2021,
https://arxiv.org/abs/2005.00247) and scaled parallel (He et al. 2022, https://arxiv.org/abs/2110.04366).

    A(h) = W_up act(W_down h + b_down) + b_up,      W_down: (d/rf, d), W_up: (d, d/rf)

    sequential ("seq_bn"):  y = f(x) + s A(f(x))            on the output of a sub-layer f
        on a post-norm target (a LayerNorm ending a BERT-style sub-layer, f(x) = LN(x)):
                            y = LN(x + s A(LN(x)))          the adapter output re-enters the norm, as AdapterHub's
                                                            "seq_bn" does (residual_before_ln, original_ln_after)
    parallel ("par_bn"):    y = f(x) + s A(x)               beside a sub-layer (W_down: (h, d_in), W_up: (d_out, h),
                                                            h = d_in/rf; d_in may differ from d_out, e.g. MixDA's
                                                            domain adapters beside the FFN's output projection)

Pfeiffer = one sequential adapter after each FFN (on BERT, AdapterHub's "seq_bn": target each layer's
`output.LayerNorm`); Houlsby = after attention and after the FFN (AdapterHub's "double_seq_bn": target the
projections before the residual and norm, `output.dense`, with activation "swish"). They differ in targets, not
in the module. Init "zero_up" (W_up = 0) starts as the base model; "bert" (N(0, 0.02), the AdapterHub
default) and "houlsby" (truncated N(0, 0.01)) do not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.errors import TargetError
from adapterkit.core.interpret import unchanged
from adapterkit.core.layers import io_sizes, is_norm
from adapterkit.core.precision import as_compute, master_dtype
from adapterkit.core.protocol import Site
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity,
}
INITS = ("zero_up", "bert", "houlsby")


def check_bottleneck_fields(spec: AdapterSpec, inits: tuple[str, ...]) -> None:
    """One-line errors for the fields every bottleneck spec has (reduction_factor, hidden, activation, scaling,
    init among ``inits``): the Linear bottlenecks here and the convolutional ones share them."""
    s: Any = spec
    require(s.reduction_factor > 0, f"{s.method}: reduction_factor must be > 0, got {s.reduction_factor}")
    require(s.hidden is None or (isinstance(s.hidden, int) and s.hidden > 0),
            f"{s.method}: hidden must be a positive integer, got {s.hidden!r}")
    require(s.activation in ACTIVATIONS,
            f"{s.method}: activation must be one of {sorted(ACTIVATIONS)}, got {s.activation!r}")
    require(s.scaling > 0, f"{s.method}: scaling must be > 0, got {s.scaling}")
    require(s.init in inits, f"{s.method}: init must be one of {inits}, got {s.init!r}")


@dataclass(frozen=True)
class _BottleneckSpec(AdapterSpec):
    reduction_factor: float = 16.0  # hidden size = model size / reduction_factor
    hidden: int | None = None  # explicit hidden size; overrides reduction_factor
    activation: str = "relu"  # one of ACTIVATIONS
    init: str = "zero_up"  # "zero_up" (identity at start), "bert" or "houlsby"
    scaling: float = 1.0  # s, the output scale

    def __post_init__(self) -> None:
        check_bottleneck_fields(self, INITS)

    @property
    def starts_as_identity(self) -> bool:
        """Only the zero_up init leaves the model unchanged at attach time."""
        return self.init == "zero_up"

    def _size(self, base: nn.Module, path: str, which: int) -> int:
        size = io_sizes(base)[which]
        if size <= 0:
            raise TargetError(f"{self.method} cannot find the feature size of {path} ({type(base).__name__})")
        hidden = self.hidden or max(1, round(size / self.reduction_factor))
        if hidden > size:
            raise TargetError(f"{self.method}: hidden size {hidden} exceeds the feature size {size} of {path}")
        return size


class Bottleneck(nn.Module):
    """The down-project / activation / up-project MLP shared by both placements (hidden size from ``size``)."""

    def __init__(self, spec: _BottleneckSpec, size: int, like: Tensor, size_out: int | None = None) -> None:
        super().__init__()
        hidden = spec.hidden or max(1, round(size / spec.reduction_factor))
        dtype = master_dtype(like)
        self.down = nn.Linear(size, hidden, dtype=dtype, device=like.device)
        self.act = ACTIVATIONS[spec.activation]()
        self.up = nn.Linear(hidden, size_out or size, dtype=dtype, device=like.device)
        with torch.no_grad():
            if spec.init == "bert":
                for layer in (self.down, self.up):
                    layer.weight.normal_(0.0, 0.02)
                    layer.bias.zero_()
            elif spec.init == "houlsby":
                for layer in (self.down, self.up):
                    nn.init.trunc_normal_(layer.weight, std=1e-2, a=-2e-2, b=2e-2)
                    layer.bias.zero_()
            else:
                self.down.bias.zero_()
                self.up.weight.zero_()
                self.up.bias.zero_()

    def forward(self, h: Tensor) -> Tensor:
        down = F.linear(h, as_compute(self.down.weight, h), as_compute(self.down.bias, h))  # (..., hidden)
        return F.linear(self.act(down), as_compute(self.up.weight, h), as_compute(self.up.bias, h))  # (..., size)


@register("seq_bn")
@dataclass(frozen=True)
class SeqBottleneck(_BottleneckSpec):
    """Sequential bottleneck adapter on a sub-layer's output (Pfeiffer / Houlsby by choice of targets)."""

    def check_target(self, base: nn.Module, path: str) -> None:
        self._size(base, path, 1)

    def build(self, base: nn.Module) -> nn.Module:
        return SequentialAdapter(self, base)


class OnOutput(nn.Module):
    """The sequential form every output-rewriting adapter shares: y = f(x) + u(f(x)), or LN(x + u(LN(x))) on a
    post-norm target (the adapter output re-enters the norm). Subclasses call ``_on(base)`` and give ``change``."""

    site = Site.OUTPUT
    _norm: tuple[nn.Module, ...] | None

    def _on(self, base: nn.Module) -> None:
        self._norm = (base,) if is_norm(base) else None  # tuple: reference the norm without re-registering it

    def change(self, h: Tensor) -> Tensor:
        """u(h): (..., d) -> (..., d)."""
        raise NotImplementedError

    def parts(self, x: Tensor, base_out: Tensor) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
        """(stream, u(f(x)), finish) with output ``finish(stream + u(f(x)))``: on a post-norm target the stream is
        the norm's input (sub-layer output + residual) and finish the norm, else the stream is f(x)."""
        delta = self.change(base_out)
        if self._norm is not None:
            return x, delta, self._norm[0].forward  # .forward: skip the hooks, which would recurse
        return base_out, delta, unchanged

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        assert base_out is not None  # an output-site adapter always gets the base output
        stream, delta, finish = self.parts(x, base_out)
        return finish(stream + delta)


class SequentialAdapter(OnOutput):
    """y = f(x) + s A(f(x)), or LN(x + s A(LN(x))) on a post-norm target."""

    def __init__(self, spec: SeqBottleneck, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.block = Bottleneck(spec, io_sizes(base)[1], next(base.parameters()))
        self._on(base)

    def change(self, h: Tensor) -> Tensor:
        return self.block(h) * self.spec.scaling


@register("par_bn")
@dataclass(frozen=True)
class ParBottleneck(_BottleneckSpec):
    """Scaled parallel adapter beside a sub-layer (He et al. use s = 4 beside the FFN)."""

    scaling: float = 4.0

    def check_target(self, base: nn.Module, path: str) -> None:
        if is_norm(base):
            raise TargetError(f"par_bn: {path} is a normalisation layer; target the sub-layer (e.g. the mlp) instead")
        self._size(base, path, 0)
        self._size(base, path, 1)

    def build(self, base: nn.Module) -> nn.Module:
        return ParallelAdapter(self, base)


class ParallelAdapter(nn.Module):
    """Delta s A(x) added to the sub-layer's output."""

    site = Site.PARALLEL

    def __init__(self, spec: ParBottleneck, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        size_in, size_out = io_sizes(base)
        self.block = Bottleneck(spec, size_in, next(base.parameters()), size_out)

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        return self.block(x) * self.spec.scaling
