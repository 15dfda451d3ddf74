"""Regularized Mask Tuning: learned binary masks on frozen base weights (R-AMT; Zheng, Wu et al., ICCV 2023,
https://arxiv.org/abs/2307.15049).

For each chosen base weight W (out, in), real-valued scores M of the same shape are trained; the forward uses

    M_bin = 1[M > alpha]                 (alpha = 5e-3; M starts at 1e-2, so the mask starts all ones)
    W_eff = M_bin * W                    straight-through estimator: dL/dM := dL/dM_bin
    L = task loss + lambda * sum_W ||M||_2     (lambda = 1e-4: the L2 penalty pushes scores towards 0, pruning)

Nothing is added to the network: merging writes W <- M_bin * W exactly (the values it zeroes are kept, so unmerge
restores the base exactly). Unmerged, the adapter adds the parallel delta x ((M_bin - 1) * W)^T, which is zero where
the mask is one, so it composes with other adapters. What is stored is the binary mask, bit-packed (1 bit per
weight, ops/bitpack.py); loading rebuilds scores on either side of the threshold, giving the same mask.

The regulariser is explicit: ``mask_regularizer(model, name)`` returns lambda * sum ||M||_2 for the training loop
to add to its loss (no hidden globals). Not implemented: the paper's gradient-dropout between the task loss and a
KL to zero-shot CLIP logits, which needs a zero-shot teacher that a fresh classification head does not have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.errors import TargetError
from adapterkit.core.host import host_of
from adapterkit.core.layers import layer_info, weight_view
from adapterkit.core.precision import as_compute, master_dtype
from adapterkit.core.protocol import Site
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require
from adapterkit.ops.bitpack import BitpackError, pack, unpack


@register("mask_tuning")
@dataclass(frozen=True)
class MaskTuning(AdapterSpec):
    """Spec of a learned binary mask on a base layer's weight (R-AMT)."""

    init: float = 1e-2  # initial score of every weight (the paper's mask_scale)
    threshold: float = 5e-3  # alpha: a weight is kept where its score exceeds this
    reg: float = 1e-4  # lambda of the L2 penalty on the scores (used by mask_regularizer)

    def __post_init__(self) -> None:
        require(self.threshold >= 0, f"{self.method}: threshold must be >= 0, got {self.threshold}")
        require(self.init > self.threshold,
                f"{self.method}: init ({self.init}) must exceed threshold ({self.threshold}): the mask starts at ones")
        require(self.reg >= 0, f"{self.method}: reg must be >= 0, got {self.reg}")

    def check_target(self, base: nn.Module, path: str) -> None:
        if layer_info(base).kind != "linear":
            raise TargetError(f"{self.method} cannot mask {path} ({type(base).__name__}): needs a Linear or Conv1D")

    def build(self, base: nn.Module) -> nn.Module:
        return MaskedWeight(self, base)


class MaskedWeight(nn.Module):
    """Scores over a Linear's weight; the delta x ((M_bin - 1) * W)^T turns the base output into the masked one."""

    site = Site.PARALLEL

    def __init__(self, spec: MaskTuning, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self._base = (base,)  # tuple: reference the base layer without registering it as a child
        weight = weight_view(base)  # (out, in)
        dtype = master_dtype(weight)
        self.scores = nn.Parameter(torch.full(weight.shape, spec.init, dtype=dtype, device=weight.device))
        self._held: tuple[Tensor, Tensor] | None = None  # (mask, zeroed base values) while merged

    def binary(self) -> Tensor:
        """M_bin as a bool tensor (out, in)."""
        return self.scores > self.spec.threshold

    def mask(self) -> Tensor:
        """M_bin in the scores' dtype, with the straight-through gradient to the scores."""
        hard = self.binary().to(self.scores.dtype)
        return hard + (self.scores - self.scores.detach())

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        weight = weight_view(self._base[0]).detach()  # (out, in), frozen
        return F.linear(x, as_compute((self.mask() - 1) * weight, x))  # (..., out)

    def regularizer(self) -> Tensor:
        """lambda * ||M||_2 for this weight."""
        return self.spec.reg * self.scores.norm()

    def merge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        keep = self.binary().to(weight.device)
        self._held = (keep, weight[~keep].clone())  # what W * M_bin loses, for an exact unmerge
        return weight * keep.to(weight.dtype), bias

    def unmerge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self._held is None:
            raise ValueError("mask_tuning: unmerge without a preceding merge")
        keep, values = self._held
        restored = weight.clone()
        restored[~keep] = values.to(weight.dtype)
        self._held = None
        return restored, bias

    def packed_state(self) -> dict[str, Tensor]:
        """The binary mask, 1 bit per weight."""
        return {"mask": pack(self.binary(), 1)}

    @torch.no_grad()
    def load_packed(self, state: dict[str, Tensor]) -> None:
        """Scores on either side of the threshold, reproducing the stored mask exactly."""
        if "mask" not in state:
            raise ValueError("missing tensor 'mask'")
        try:
            keep = unpack(state["mask"], 1, tuple(self.scores.shape)).bool().to(self.scores.device)
        except BitpackError as exc:
            raise ValueError(f"tensor mask: {exc} (the base weight is {tuple(self.scores.shape)})") from None
        gap = self.spec.init - self.spec.threshold
        self.scores.copy_(torch.where(keep, self.spec.threshold + gap, self.spec.threshold - gap))


def mask_regularizer(model: nn.Module, name: str) -> Tensor:
    """lambda * sum over masked weights of ||M||_2, for adapter ``name``; add it to the training loss."""
    terms = []
    for module in model.modules():
        host = host_of(module)
        if host is not None and name in host.names():
            adapter = host.adapter(name)
            if isinstance(adapter, MaskedWeight):
                terms.append(adapter.regularizer())
    if not terms:
        raise ValueError(f"no mask_tuning adapter named {name!r} on this model")
    return torch.stack(terms).sum()


def masked_fraction(model: nn.Module, name: str) -> float:
    """Share of the masked weights that are set to zero (the paper reports 2.56 % on average)."""
    zeros, total = 0, 0
    for module in model.modules():
        host = host_of(module)
        if host is not None and name in host.names() and isinstance(host.adapter(name), MaskedWeight):
            keep = host.adapter(name).binary()
            zeros, total = zeros + int((~keep).sum()), total + keep.numel()
    return zeros / max(total, 1)
