"""LoKr: low-rank Kronecker product (Edalati et al. 2022, KronA, https://arxiv.org/abs/2212.10650; as LyCORIS and
peft implement it).

    ΔW = (w1 ⊗ w2) * alpha / r,   w1: (out_l, in_m),  w2: (out_k, in_n),  out = out_l out_k,  in = in_m in_n

Each width is split into two factors by peft's ``factorization`` (the pair nearest its square root, or a given
``decompose_factor``; the smaller one goes to w1). w2 is a rank-r product w2_a w2_b when r < max(out_k, in_n) / 2,
else a full matrix; with ``decompose_both`` w1 is likewise w1_a w1_b when r < max(out_l, in_m) / 2. w1 (or w1_a)
starts at zero, the rest Kaiming-uniform (a = sqrt 5), as peft's default init, so the model starts as the base.
Linear / Conv1D layers (applied without forming ΔW: y = w1 X w2^T for x viewed as X: (in_m, in_n)) and Conv2d
(kernel on the w2 side, flattened when w2 is factored: peft's ``use_effective_conv2d=False``). No rank dropout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from adapterkit.core.layers import tensor
from adapterkit.core.precision import as_compute
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require
from adapterkit.methods.loha import WeightDelta, check_weight_target, new_factor


def factorization(dimension: int, factor: int | None = None) -> tuple[int, int]:
    """Split ``dimension`` into (m, n), m * n = dimension, as peft's ``lokr.layer.factorization``.

    A ``factor`` dividing the dimension gives (factor, dimension // factor) as is. Otherwise m walks up the
    divisors while m < n and m stays within ``factor`` (no factor: the whole dimension), which ends at the pair
    nearest the square root; the result is ordered m <= n."""
    if factor is not None and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor is None else factor
    m, n = 1, dimension
    while m < n:
        step = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if step > bound:
            break
        m, n = step, dimension // step
    return min(m, n), max(m, n)


@register("lokr")
@dataclass(frozen=True)
class LoKr(AdapterSpec):
    """Spec of a LoKr adapter."""

    r: int = 8  # rank of the factored Kronecker factor(s)
    alpha: float = 8.0  # scale numerator: ΔW is scaled by alpha / r
    decompose_both: bool = False  # also factor w1 into w1_a w1_b when the rank is small enough
    decompose_factor: int | None = None  # width split near this factor (None: near the square root; peft's -1)

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0,
                f"{self.method}: rank r must be a positive integer, got {self.r!r}")
        require(self.alpha > 0, f"{self.method}: alpha must be > 0, got {self.alpha}")
        require(self.decompose_factor is None or self.decompose_factor > 0,
                f"{self.method}: decompose_factor must be a positive integer or None, got {self.decompose_factor}")

    def check_target(self, base: nn.Module, path: str) -> None:
        check_weight_target(self, base, path)

    def build(self, base: nn.Module) -> nn.Module:
        return LoKrLayer(self, base)


class LoKrLayer(WeightDelta):
    """The Kronecker factors beside a Linear, Conv1D or Conv2d layer; absent factors are simply not there (the
    parameter names are w1 or w1_a / w1_b, and w2 or w2_a / w2_b, as peft's lokr_w1 ... lokr_w2_b)."""

    def __init__(self, spec: LoKr, base: nn.Module) -> None:
        super().__init__(base)
        self.spec = spec
        self.scale = spec.alpha / spec.r
        out, fan_in, kernel = self.shape[0], self.shape[1], self.shape[2:]
        out_l, out_k = factorization(out, spec.decompose_factor)
        in_m, in_n = factorization(fan_in, spec.decompose_factor)
        self.split = (out_l, out_k, in_m, in_n)
        like, r = tensor(base, "weight"), spec.r
        if spec.decompose_both and r < max(out_l, in_m) / 2:
            self.w1_a, self.w1_b = new_factor((out_l, r), like, "zeros"), new_factor((r, in_m), like, "kaiming")
        else:
            self.w1 = new_factor((out_l, in_m), like, "zeros")
        if r < max(out_k, in_n) / 2:
            self.w2_a = new_factor((out_k, r), like, "kaiming")
            self.w2_b = new_factor((r, in_n * math.prod(kernel)), like, "kaiming")
        else:
            self.w2 = new_factor((out_k, in_n, *kernel), like, "kaiming")

    def factors(self) -> tuple[Tensor, Tensor]:
        """(w1, w2), each rebuilt from its low-rank pair where it has one."""
        w1 = self.w1 if "w1" in self._parameters else self.w1_a @ self.w1_b
        w2 = self.w2 if "w2" in self._parameters else self.w2_a @ self.w2_b
        return w1, w2

    def delta_weight(self) -> Tensor:
        """(w1 ⊗ w2) * alpha / r in the base layer's canonical layout."""
        w1, w2 = self.factors()
        if w2.dim() == 4:  # a full conv w2 (out_k, in_n, kh, kw): w1 gets unit kernel dims, so ⊗ spans the kernel
            w1 = w1[:, :, None, None]
        return (torch.kron(w1, w2) * self.scale).reshape(self.shape)

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        if self.conv is not None:
            return super().forward(x, base_out)
        w1, w2 = (as_compute(w, x) for w in self.factors())
        out_l, out_k, in_m, in_n = self.split
        grid = x.reshape(*x.shape[:-1], in_m, in_n)  # (..., in_m, in_n): x[j * in_n + q] at [j, q]
        y = torch.matmul(torch.matmul(w1, grid), w2.t())  # (..., out_l, out_k) = w1 X w2^T
        return y.reshape(*x.shape[:-1], out_l * out_k) * self.scale  # (..., out)
