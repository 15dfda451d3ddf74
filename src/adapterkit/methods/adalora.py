"""AdaLoRA: adaptive budget allocation for parameter-efficient fine-tuning (Zhang et al. 2023,
https://arxiv.org/abs/2303.10512), in peft's form (``peft/tuners/adalora``).

The update is held in an SVD-like form whose singular values can be switched off one by one:

    h = W0 x + s * B (E ⊙ A) x,   A: (r, in), E: (r, 1), B: (out, r),   s = alpha / (r + 1e-5)

r is ``init_r`` for the whole run (peft's ``ranknum``: pruning a triplet does not change the scale). A and B are
Gaussian (std 0.02), E is zero, so the adapted model starts as the base model. During training a rank allocator
(train/adalora_schedule.py, a training callback: the engine knows nothing of it) scores each triplet
(A_i, E_i, B_i) by its smoothed sensitivity |w * grad|, shrinks the total rank from ``init_r`` per layer to
``target_r`` per layer on average over a cubic schedule, and sets the E_i of the weakest triplets to zero; the loss
gets an orthogonality penalty on A and B. Linear and Conv1D layers.

What was pruned is part of the saved state: the zeroed E entries, and ``rank_mask`` (r,), a bool buffer holding
the triplets the last allocation kept (peft's ``rank_pattern``). A loaded adapter computes exactly what the saved
one did, and the allocator re-applies the mask during the final fine-tuning phase.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.errors import TargetError
from adapterkit.core.layers import layer_info, tensor
from adapterkit.core.precision import as_compute, master_dtype
from adapterkit.core.protocol import Site
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require

RANKNUM_EPS = 1e-5  # peft divides by ranknum + 1e-5


@register("adalora")
@dataclass(frozen=True)
class AdaLoRA(AdapterSpec):
    """Spec of an AdaLoRA adapter: the SVD-form update and its rank schedule (peft's AdaLoraConfig names).

    The schedule's phases, in optimizer steps (0-based, the step passed to the allocator): up to ``tinit`` every
    triplet is kept; from then to ``total_step - tfinal`` the budget falls as a cubic from ``init_r`` to
    ``target_r`` per layer, re-allocated every ``deltaT`` steps; the last ``tfinal`` steps fine-tune the final
    allocation. ``total_step`` None (or 0) lets the training loop supply its real number of steps.
    """

    init_r: int = 12  # rank of every layer at the start
    target_r: int = 8  # average rank per layer after the budgeting phase
    alpha: float = 8.0  # scale numerator (peft's lora_alpha): s = alpha / init_r
    dropout: float = 0.0  # dropout on the adapter's input
    tinit: int = 0  # warm-up steps with the full rank
    tfinal: int = 0  # final steps with the allocation fixed
    deltaT: int = 1  # steps between two allocations in the budgeting phase
    beta1: float = 0.85  # EMA factor of the sensitivity
    beta2: float = 0.85  # EMA factor of the uncertainty
    orth_reg_weight: float = 0.5  # weight of the orthogonality penalty added to the loss
    total_step: int | None = None  # training steps the schedule spans (None / 0: the training loop's total)

    # the training-time callbacks this method needs ("module:factory", called as factory(model, name, total_steps);
    # see train/loop.py training_hooks): data naming code of a higher floor, not an import of it
    training_hooks: ClassVar[str] = "adapterkit.train.adalora_schedule:RankAllocator"

    def __post_init__(self) -> None:
        m = self.method
        require(self.init_r > 0, f"{m}: init_r must be a positive integer, got {self.init_r}")
        require(0 <= self.target_r <= self.init_r,
                f"{m}: target_r {self.target_r} must be in [0, init_r = {self.init_r}] (the average rank kept)")
        require(self.alpha > 0, f"{m}: alpha must be > 0, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, f"{m}: dropout must be in [0, 1), got {self.dropout}")
        require(self.tinit >= 0 and self.tfinal >= 0, f"{m}: tinit and tfinal must be >= 0, got {self.tinit}, "
                f"{self.tfinal}")
        require(self.deltaT >= 1, f"{m}: deltaT must be >= 1, got {self.deltaT}")
        require(0 < self.beta1 < 1 and 0 < self.beta2 < 1,
                f"{m}: beta1 and beta2 must be in (0, 1), got {self.beta1}, {self.beta2}")
        require(self.orth_reg_weight >= 0, f"{m}: orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        require(self.total_step is None or self.total_step >= 0,
                f"{m}: total_step must be >= 0 (0 or None: the training loop's), got {self.total_step}")
        if self.total_step:
            self.check_schedule(self.total_step)

    def check_schedule(self, total_step: int) -> None:
        """SpecError unless ``total_step`` leaves a budgeting phase between ``tinit`` and ``total - tfinal``."""
        require(self.tinit + self.tfinal < total_step,
                f"{self.method}: tinit {self.tinit} + tfinal {self.tfinal} must be < total_step {total_step}, "
                "else no step is left to reduce the rank")

    def check_target(self, base: nn.Module, path: str) -> None:
        if layer_info(base).kind != "linear":
            raise TargetError(f"{self.method} cannot adapt {path} ({type(base).__name__}): needs a Linear or Conv1D")

    def build(self, base: nn.Module) -> nn.Module:
        return AdaLoRALinear(self, base)


class AdaLoRALinear(nn.Module):
    """The SVD-form update beside a Linear / Conv1D layer."""

    site = Site.PARALLEL
    rank_mask: Tensor

    def __init__(self, spec: AdaLoRA, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        info, like = layer_info(base), tensor(base, "weight")
        dtype, r = master_dtype(like), spec.init_r
        self.lora_a = nn.Parameter(torch.empty(r, info.in_features, dtype=dtype, device=like.device))  # right
        self.lora_e = nn.Parameter(torch.zeros(r, 1, dtype=dtype, device=like.device))  # singular values
        self.lora_b = nn.Parameter(torch.empty(info.out_features, r, dtype=dtype, device=like.device))  # left
        nn.init.normal_(self.lora_a, std=0.02)
        nn.init.normal_(self.lora_b, std=0.02)
        # the triplets the last allocation kept (all, until one runs): saved, so a pruned adapter reloads as such
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=like.device))
        # peft's scaling / (ranknum + 1e-5) with ranknum a float32 tensor: the same number
        self.scale = spec.alpha / float(torch.tensor(float(r)) + RANKNUM_EPS)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None

    def rank(self) -> int:
        """Triplets kept by the last allocation."""
        return int(self.rank_mask.sum())

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        h = F.linear(x, as_compute(self.lora_a * self.lora_e, x))  # (..., r)
        return F.linear(h * self.scale, as_compute(self.lora_b, x))  # (..., out)

    def delta_weight(self) -> Tensor:
        """s * B (E ⊙ A), (out, in)."""
        return (self.lora_b @ (self.lora_a * self.lora_e)) * self.scale

    def merge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight + self.delta_weight().to(weight.dtype), bias

    def unmerge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight - self.delta_weight().to(weight.dtype), bias
