"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al. 2024, https://arxiv.org/abs/2310.11454).

    h = W0 x + Λ_b B Λ_d A x,   A: (r, in), B: (out, r) frozen random, shared by every layer;
    d: (r,) trainable, init d_initial;   b: (out,) trainable, zero init (so the model starts as the base)

Sharing across layers, in a library whose adapters live one per module: one ``attach`` builds all its placements
at once (``build_all``), draws A (r, max in) and B (max out, r) once from ``torch.Generator().manual_seed(seed)``
(Kaiming-uniform, A then B, as peft's ``projection_prng_key``) and gives each module the top-left slice it needs, as
a view of the shared matrices and a non-persistent buffer. The spec stores only the seed, so a saved adapter holds
only d and b; a load attaches again over the same targets, which draws the same matrices. Linear and Conv1D layers.
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

_MAX_SEED = 2**63 - 1


def projections(seed: int, r: int, max_in: int, max_out: int) -> tuple[Tensor, Tensor]:
    """The shared frozen (A, B): Kaiming-uniform (gain sqrt 2, fan-in) draws from one seeded CPU generator, A first.

    The same numbers peft draws for ``VeraConfig(projection_prng_key=seed, r=r)`` over layers whose largest input
    and output widths are ``max_in`` / ``max_out`` (float32, on the CPU, whatever the model's device)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for shape in ((r, max_in), (max_out, r)):
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])  # fan-in of a (rows, cols) matrix is cols
        out.append(torch.empty(shape).uniform_(-bound, bound, generator=generator))
    return out[0], out[1]


@register("vera")
@dataclass(frozen=True)
class VeRA(AdapterSpec):
    """Spec of a VeRA adapter."""

    r: int = 256  # rank of the shared random matrices (VeRA's ranks are large: only d and b train)
    d_initial: float = 0.1  # initial value of every entry of d
    dropout: float = 0.0  # dropout on the adapter's input
    seed: int = 0  # seed of the shared frozen matrices (peft's projection_prng_key)

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0,
                f"{self.method}: rank r must be a positive integer, got {self.r!r}")
        require(self.d_initial > 0, f"{self.method}: d_initial must be > 0, got {self.d_initial}")
        require(0.0 <= self.dropout < 1.0, f"{self.method}: dropout must be in [0, 1), got {self.dropout}")
        require(0 <= self.seed <= _MAX_SEED, f"{self.method}: seed must be in [0, 2**63), got {self.seed}")

    def check_target(self, base: nn.Module, path: str) -> None:
        if layer_info(base).kind != "linear":
            raise TargetError(f"{self.method} cannot adapt {path} ({type(base).__name__}): needs a Linear or Conv1D")

    def build(self, base: nn.Module) -> nn.Module:
        return self.build_all([base])[0]

    def build_all(self, bases: list[nn.Module]) -> list[nn.Module]:
        infos = [layer_info(base) for base in bases]
        a, b = projections(self.seed, self.r, max(i.in_features for i in infos), max(i.out_features for i in infos))
        return [VeRALinear(self, base, a, b) for base in bases]


class VeRALinear(nn.Module):
    """VeRA beside a Linear / Conv1D layer: the trainable scaling vectors and views of the shared projections."""

    site = Site.PARALLEL
    vera_a: Tensor
    vera_b: Tensor

    def __init__(self, spec: VeRA, base: nn.Module, shared_a: Tensor, shared_b: Tensor) -> None:
        super().__init__()
        self.spec = spec
        info, like = layer_info(base), tensor(base, "weight")
        dtype = master_dtype(like)
        # slices of the shared matrices: views of one storage while the dtype and device agree (no copy per layer)
        self.register_buffer("vera_a", shared_a[:, : info.in_features].to(like.device, dtype), persistent=False)
        self.register_buffer("vera_b", shared_b[: info.out_features].to(like.device, dtype), persistent=False)
        self.lambda_d = nn.Parameter(torch.full((spec.r,), float(spec.d_initial), dtype=dtype, device=like.device))
        self.lambda_b = nn.Parameter(torch.zeros(info.out_features, dtype=dtype, device=like.device))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        h = F.linear(x, as_compute(self.vera_a, x)) * as_compute(self.lambda_d, x)  # (..., r)
        return F.linear(h, as_compute(self.vera_b, x)) * as_compute(self.lambda_b, x)  # (..., out)

    def delta_weight(self) -> Tensor:
        """Λ_b B Λ_d A, (out, in)."""
        return (self.lambda_b[:, None] * self.vera_b) @ (self.lambda_d[:, None] * self.vera_a)

    def merge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight + self.delta_weight().to(weight.dtype), bias

    def unmerge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight - self.delta_weight().to(weight.dtype), bias
