"""BitFit: bias-only tuning (Ben Zaken et al. 2022, https://arxiv.org/abs/2106.10199).

    y = W x + (b + delta_b)

The base bias stays frozen and untouched; the adapter learns delta_b (zero at start). Training delta_b is
training the bias, but the change can be saved, detached and merged like any other adapter.
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
from adapterkit.core.spec import AdapterSpec


@register("bitfit")
@dataclass(frozen=True)
class BitFit(AdapterSpec):
    """Spec of bias tuning on the chosen modules (Linear, Conv1D, Conv2d, LayerNorm: anything with a bias)."""

    def check_target(self, base: nn.Module, path: str) -> None:
        bias = getattr(base, "bias", None)
        if not isinstance(bias, Tensor):
            raise TargetError(f"bitfit: {path} ({type(base).__name__}) has no bias to tune")

    def build(self, base: nn.Module) -> nn.Module:
        return BiasDelta(self, base)


class BiasDelta(nn.Module):
    """A learned offset to one module's bias."""

    site = Site.PARALLEL

    def __init__(self, spec: BitFit, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.channel_dim = 1 if layer_info(base).kind == "conv2d" else -1
        bias = tensor(base, "bias")
        self.delta_b = nn.Parameter(torch.zeros_like(bias, dtype=master_dtype(bias)))

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        assert base_out is not None  # a PARALLEL adapter always sees the base output
        delta = as_compute(self.delta_b, base_out)
        if self.channel_dim == 1:
            return delta[:, None, None].expand_as(base_out)  # (C,) -> (B, C, H, W)
        return delta.expand_as(base_out)

    def merge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        assert bias is not None  # check_target admits only modules with a bias
        return weight, bias + self.delta_b.to(bias.dtype)

    def unmerge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        assert bias is not None
        return weight, bias - self.delta_b.to(bias.dtype)
