"""(IA)^3: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022,
https://arxiv.org/abs/2205.05638).

    position "output":  y = l * (W x + b)      (keys, values: l has one entry per output feature)
    position "input":   y = W (l * x) + b      (FFN down-projections: l has one entry per input feature)

l starts at 1, so the adapted model starts as the base model. Both forms merge exactly into W (and b).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from adapterkit.core.errors import TargetError
from adapterkit.core.layers import layer_info, tensor
from adapterkit.core.precision import as_compute, master_dtype
from adapterkit.core.protocol import Site
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require

POSITIONS = ("output", "input")


@register("ia3")
@dataclass(frozen=True)
class IA3(AdapterSpec):
    """Spec of an (IA)^3 adapter."""

    position: str = "output"  # "output": scale the layer's outputs; "input": scale its inputs (FFN layers)
    init: float = 1.0  # initial scale (1.0 = identity)

    def __post_init__(self) -> None:
        require(self.position in POSITIONS, f"ia3: position must be one of {POSITIONS}, got {self.position!r}")
        require(self.init > 0, f"ia3: init must be > 0 (a zero scale cannot be unmerged), got {self.init}")

    def check_target(self, base: nn.Module, path: str) -> None:
        if layer_info(base).kind != "linear":
            raise TargetError(f"ia3 cannot adapt {path} ({type(base).__name__}): needs a Linear or Conv1D")

    def build(self, base: nn.Module) -> nn.Module:
        return IA3Scale(self, base)


class IA3Scale(nn.Module):
    """A learned vector that rescales a Linear layer's outputs or inputs."""

    def __init__(self, spec: IA3, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        info = layer_info(base)
        size = info.out_features if spec.position == "output" else info.in_features
        self.site = Site.OUTPUT if spec.position == "output" else Site.INPUT
        weight = tensor(base, "weight")
        self.ia3_l = nn.Parameter(torch.full((size,), float(spec.init), dtype=master_dtype(weight),
                                             device=weight.device))

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        scaled = x if base_out is None else base_out  # INPUT site: no base output yet
        return scaled * as_compute(self.ia3_l, scaled)  # broadcasts over (..., features)

    def _factor(self, weight: Tensor) -> Tensor:
        scale = self.ia3_l.to(weight.dtype)
        return scale[:, None] if self.site is Site.OUTPUT else scale[None, :]  # (out, 1) or (1, in)

    def merge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.site is Site.OUTPUT and bias is not None:
            bias = bias * self.ia3_l.to(bias.dtype)
        return weight * self._factor(weight), bias

    def unmerge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if bool((self.ia3_l == 0).any()):
            raise ValueError("ia3: cannot unmerge a scale vector that contains zeros")
        if self.site is Site.OUTPUT and bias is not None:
            bias = bias / self.ia3_l.to(bias.dtype)
        return weight / self._factor(weight), bias
