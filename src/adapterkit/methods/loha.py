"""LoHa: low-rank Hadamard product (Hyeon-Woo et al. 2022, FedPara, https://arxiv.org/abs/2108.06098; as LyCORIS
and peft implement it).

    ΔW = ((W1a W1b) ⊙ (W2a W2b)) * alpha / r,   W1a, W2a: (out, r), W1b, W2b: (r, in)

The Hadamard product of two rank-r matrices can reach rank r², so LoHa spends the parameters of a rank-2r LoRA on
a rank up to r² update. W1a, W1b, W2a are Kaiming-uniform (a = sqrt 5) and W2b is zero, as in peft, so the adapted
model starts as the base. Linear / Conv1D layers and Conv2d (the kernel flattened into the input side, peft's
``use_effective_conv2d=False``). The delta is formed each call (it is not a product of the input with factors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.errors import TargetError
from adapterkit.core.layers import layer_info, tensor
from adapterkit.core.precision import as_compute, master_dtype
from adapterkit.core.protocol import Site
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require


def check_weight_target(spec: AdapterSpec, base: nn.Module, path: str) -> None:
    """Linear, Conv1D or ungrouped Conv2d (shared by LoHa and LoKr)."""
    kind = layer_info(base).kind
    if kind not in ("linear", "conv2d"):
        raise TargetError(f"{spec.method} cannot adapt {path} ({type(base).__name__}): needs a Linear, Conv1D or "
                          "Conv2d")
    if isinstance(base, nn.Conv2d) and base.groups != 1:
        raise TargetError(f"{spec.method} cannot adapt {path}: grouped convolutions are not supported")


class WeightDelta(nn.Module):
    """A PARALLEL adapter whose update is a full weight delta built from its factors (LoHa, LoKr): the forward
    applies it as the base layer would, and merge / unmerge add / subtract it."""

    site = Site.PARALLEL

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.shape = tuple(tensor(base, "weight").shape) if isinstance(base, nn.Conv2d) else (
            layer_info(base).out_features, layer_info(base).in_features)  # canonical (out, in, *kernel)
        self.conv = (base.stride, base.padding, base.dilation) if isinstance(base, nn.Conv2d) else None

    def delta_weight(self) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        delta = as_compute(self.delta_weight(), x)
        if self.conv is None:
            return F.linear(x, delta)  # (..., out)
        stride, padding, dilation = self.conv
        return F.conv2d(x, delta, stride=stride, padding=padding, dilation=dilation)  # type: ignore[call-overload]

    def merge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight + self.delta_weight().to(weight.dtype), bias

    def unmerge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight - self.delta_weight().to(weight.dtype), bias


def new_factor(shape: tuple[int, ...], like: Tensor, init: str) -> nn.Parameter:
    """A master-dtype factor on ``like``'s device: "kaiming" (uniform, a = sqrt 5, as nn.Linear) or "zeros"."""
    param = nn.Parameter(torch.zeros(shape, dtype=master_dtype(like), device=like.device))
    if init == "kaiming":
        nn.init.kaiming_uniform_(param, a=math.sqrt(5))
    return param


@register("loha")
@dataclass(frozen=True)
class LoHa(AdapterSpec):
    """Spec of a LoHa adapter."""

    r: int = 8  # rank of each of the two low-rank products
    alpha: float = 8.0  # scale numerator: ΔW is scaled by alpha / r

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0,
                f"{self.method}: rank r must be a positive integer, got {self.r!r}")
        require(self.alpha > 0, f"{self.method}: alpha must be > 0, got {self.alpha}")

    def check_target(self, base: nn.Module, path: str) -> None:
        check_weight_target(self, base, path)

    def build(self, base: nn.Module) -> nn.Module:
        return LoHaLayer(self, base)


class LoHaLayer(WeightDelta):
    """The four LoHa factors beside a Linear, Conv1D or Conv2d layer."""

    def __init__(self, spec: LoHa, base: nn.Module) -> None:
        super().__init__(base)
        self.spec = spec
        self.scale = spec.alpha / spec.r
        out, fan_in = self.shape[0], math.prod(self.shape[1:])  # a conv kernel folds into the input side
        like = tensor(base, "weight")
        self.w1_a = new_factor((out, spec.r), like, "kaiming")
        self.w1_b = new_factor((spec.r, fan_in), like, "kaiming")
        self.w2_a = new_factor((out, spec.r), like, "kaiming")
        self.w2_b = new_factor((spec.r, fan_in), like, "zeros")

    def delta_weight(self) -> Tensor:
        """((W1a W1b) ⊙ (W2a W2b)) * alpha / r in the base layer's canonical layout."""
        delta = ((self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b)) * self.scale  # (out, in * kernel)
        return delta.reshape(self.shape)
