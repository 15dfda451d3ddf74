"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al. 2024, https://arxiv.org/abs/2402.09353).

    W' = m * V / ||V||,   V = W0 + s * B A,   m initialised to ||W0|| (one norm per output row)

As in the paper (section 4.3) and peft, ||V|| is treated as a constant in the backward pass. Computed without
forming W' per call:  y = (m / ||V||) * (W0 x + s B A x) + b. Because the result rescales the base output
rather than adding to it, the adapter acts at the OUTPUT site. Linear and GPT-2 Conv1D layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.errors import TargetError
from adapterkit.core.layers import layer_info, weight_view
from adapterkit.core.precision import master_dtype
from adapterkit.core.protocol import Site
from adapterkit.core.registry import register
from adapterkit.methods.lora import LoRA, LoRALinear


@register("dora")
@dataclass(frozen=True)
class DoRA(LoRA):
    """Spec of a DoRA adapter: the LoRA fields, plus a learned magnitude per output row."""

    def check_target(self, base: nn.Module, path: str) -> None:
        if layer_info(base).kind != "linear":
            raise TargetError(f"{self.method} cannot adapt {path} ({type(base).__name__}): needs a Linear or Conv1D")
        super().check_target(base, path)

    def build(self, base: nn.Module) -> nn.Module:
        return DoRALinear(self, base)


class DoRALinear(nn.Module):
    """The low-rank direction update of LoRA plus the magnitude vector m."""

    site = Site.OUTPUT

    def __init__(self, spec: DoRA, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.lora = LoRALinear(spec, base)
        self._base = (base,)  # a tuple, so the base is not registered (and saved) a second time
        with torch.no_grad():
            weight = weight_view(base).detach()
            self.magnitude = nn.Parameter(weight.to(master_dtype(weight)).norm(dim=1))  # (out,)
        self.register_buffer("merged_norm", None, persistent=False)

    def _direction_norm(self, weight: Tensor) -> Tensor:
        return (weight + self.lora.delta_weight().to(weight.dtype)).norm(dim=1)  # (out,)

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        assert base_out is not None  # an OUTPUT adapter always sees the base output
        base = self._base[0]
        weight = weight_view(base)
        norm = self._direction_norm(weight.to(self.magnitude.dtype)).detach()
        factor = (self.magnitude / norm).to(base_out.dtype)  # (out,)
        bias = getattr(base, "bias", None)
        no_bias = base_out if bias is None else base_out - bias
        if self.lora.dropout is not None:
            # the base product must see the dropped-out input too, so recompute it
            x = self.lora.dropout(x)
            no_bias = F.linear(x, weight_view(base))
        out = factor * (no_bias + self.lora(x, None))  # (..., out)
        return out if bias is None else out + bias

    def delta_weight(self) -> Tensor:
        """W' - W0 for the current base weight."""
        weight = weight_view(self._base[0]).detach()
        return self.merge(weight, None)[0] - weight

    def merge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        direction = weight + self.lora.delta_weight().to(weight.dtype)
        norm = direction.norm(dim=1)
        self.merged_norm = norm  # unmerge needs ||V||, which the merged weight no longer shows
        return direction * (self.magnitude.to(weight.dtype) / norm)[:, None], bias

    def unmerge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.merged_norm is None:
            raise RuntimeError("DoRA unmerge called before merge")
        direction = weight * (self.merged_norm.to(weight.dtype) / self.magnitude.to(weight.dtype))[:, None]
        self.merged_norm = None
        return direction - self.lora.delta_weight().to(weight.dtype), bias
