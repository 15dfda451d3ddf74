"""SNNK adapter layers (Sehanobish, Choromanski et al., ICLR 2024, "Scalable Neural Network Kernels",
https://arxiv.org/abs/2310.13225).

A bottleneck adapter's down-projection and nonlinearity f(W0 h) are replaced by a kernel factorisation with
random features, f(w_i . h) ~ phi(w_i) . phi(h), which separates the input from the parameters: the adapter is a
trained linear map of a fixed random-feature map of its input.

    phi(h) = m^-1/2 max(G h, -leak)              "relu" (ReLU-SNNK; the paper's constant c = -leak <= 0)
    phi(h) = m^-1/2 exp(G h - ||h||^2 / 2)       "exp" (the paper's general map with A = a = 1: E phi(w).phi(h)
                                                 = exp(w . h))
    G: (m, d) ~ N(0, 1), frozen, m = features
    z = Psi phi(h)                               Psi: (k, m) trained, initialised to phi of the rows of a
                                                 kaiming-uniform W0: (k, d)
    u = W_up z + b_up                            hidden = k given: W_up (d, k), b_up (d,), zero init
    u = v * z                                    hidden None (k = d, the paper's default): v (d,), zero init
    y = f(x) + u(f(x))                           sequential, on a sub-layer's output f(x), with its own residual
    on a post-norm target (a LayerNorm ending a BERT-style sub-layer): y = LN(x + u(LN(x))), as seq_bn does

The paper places two per layer (Houlsby): after the attention output projection and after the FFN output dense,
before the residual add (BERT: target "output.dense", which matches both). Trained parameters per adapter with
hidden None: d m + d (BERT-base, m = 64: 49.9k), against 2 d h + h + d for a bottleneck of hidden size h = m.

Simplifications of the paper's code, and why:
* G is drawn from a private generator seeded by ``seed`` (the code seeds the global stream, or draws from it per
  layer), so a saved adapter holds only Psi and the up-projection and a load rebuilds G exactly without touching
  the global random stream. Every layer of one width therefore shares one G; each layer's kernel estimate is
  still unbiased, and the layers' Psi are trained separately.
* The code's optional input normalisation, orthogonal G, layer norms around the adapter and "bert" init are left
  out: its fine-tuning scripts use none of them (the default "mam" init, which starts as the identity).
Not mergeable: phi is non-linear in the input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.errors import TargetError
from adapterkit.core.layers import io_sizes, layer_info
from adapterkit.core.precision import as_compute, master_dtype
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require
from adapterkit.methods.bottleneck import OnOutput


def relu_features(h: Tensor, projection: Tensor, floor: float) -> Tensor:
    """m^-1/2 max(G h, floor): (..., d) -> (..., m). Features of the arc-cosine (ReLU) kernel for floor 0."""
    return F.linear(h, projection).clamp_min(floor) * projection.shape[0] ** -0.5


def exp_features(h: Tensor, projection: Tensor, floor: float) -> Tensor:
    """m^-1/2 exp(G h - ||h||^2 / 2): (..., d) -> (..., m), positive features of exp(w . h) (floor unused).

    Meant for inputs of moderate norm (the paper's code normalises optionally; we do not)."""
    return torch.exp(F.linear(h, projection) - h.pow(2).sum(-1, keepdim=True) / 2) * projection.shape[0] ** -0.5


FEATURE_MAPS: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {"relu": relu_features, "exp": exp_features}


def random_projection(features: int, size: int, seed: int) -> Tensor:
    """G: (features, size) ~ N(0, 1) from a private generator (float32 on the CPU: the same G on every device)."""
    return torch.randn(features, size, generator=torch.Generator().manual_seed(seed))


@register("snnk")
@dataclass(frozen=True)
class SNNK(AdapterSpec):
    """Spec of an SNNK adapter layer (the paper's fine-tuning runs: features=64, hidden None)."""

    features: int = 64  # m, the number of random features
    hidden: int | None = None  # k, the kernel layer's width (the paper's down_sample); None: k = d, v * z up
    feature_map: str = "relu"  # one of FEATURE_MAPS
    leak: float = 0.0  # the relu map's floor is -leak (0: ReLU; > 0: the paper's leaky variant c < 0)
    seed: int = 0  # seeds the frozen random projection G

    def __post_init__(self) -> None:
        require(self.features > 0, f"{self.method}: features must be a positive integer, got {self.features!r}")
        require(self.hidden is None or self.hidden > 0,
                f"{self.method}: hidden must be a positive integer or None, got {self.hidden!r}")
        require(self.feature_map in FEATURE_MAPS,
                f"{self.method}: feature_map must be one of {sorted(FEATURE_MAPS)}, got {self.feature_map!r}")
        require(math.isfinite(self.leak) and self.leak >= 0,
                f"{self.method}: leak must be a finite number >= 0 (the floor is -leak), got {self.leak}")
        require(self.leak == 0 or self.feature_map == "relu",
                f"{self.method}: leak applies to the relu feature map only, got leak={self.leak} with "
                f"feature_map={self.feature_map!r}")
        require(self.seed >= 0, f"{self.method}: seed must be >= 0, got {self.seed}")

    def check_target(self, base: nn.Module, path: str) -> None:
        if layer_info(base).kind == "conv2d":
            raise TargetError(f"{self.method} cannot adapt {path} (Conv2d): its output's features are not the last "
                              "dimension; target a Linear, a norm or a sub-layer block")
        if io_sizes(base)[1] <= 0:
            raise TargetError(f"{self.method} cannot find the feature size of {path} ({type(base).__name__}); "
                              "target a Linear, a norm or a block containing them")

    def build(self, base: nn.Module) -> nn.Module:
        return SNNKAdapter(self, base)


class SNNKAdapter(OnOutput):
    """y = f(x) + u(f(x)), or LN(x + u(LN(x))) on a post-norm target; u the random-feature kernel layer."""

    projection: Tensor  # G: (m, d), a non-persistent buffer
    up: nn.Linear | None
    modulation: nn.Parameter | None

    def __init__(self, spec: SNNK, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        size = io_sizes(base)[1]
        like = next(base.parameters())
        dtype, device = master_dtype(like), like.device
        self.feature_map = FEATURE_MAPS[spec.feature_map]
        self.floor = -spec.leak
        # frozen and rebuilt from the seed: a non-persistent buffer moves with the model but is never saved
        projection = random_projection(spec.features, size, spec.seed).to(dtype=dtype, device=device)
        self.register_buffer("projection", projection, persistent=False)
        width = spec.hidden or size
        w0 = torch.empty(width, size, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(w0, a=math.sqrt(5))  # the code's "mam" init, as nn.Linear's weight
        self.psi = nn.Parameter(self.feature_map(w0, projection, self.floor))  # (k, m): phi of W0's rows
        if spec.hidden is not None:
            self.up = nn.Linear(width, size, dtype=dtype, device=device)
            with torch.no_grad():
                self.up.weight.zero_()
                self.up.bias.zero_()
            self.modulation = None
        else:
            self.up = None
            self.modulation = nn.Parameter(torch.zeros(size, dtype=dtype, device=device))  # v: (d,)
        self._on(base)

    def change(self, h: Tensor) -> Tensor:
        """u(h) = up(Psi phi(h)): (..., d) -> (..., d)."""
        phi = self.feature_map(h, as_compute(self.projection, h), self.floor)  # (..., m)
        z = F.linear(phi, as_compute(self.psi, h))  # (..., k)
        if self.up is not None:
            return F.linear(z, as_compute(self.up.weight, h), as_compute(self.up.bias, h))  # (..., d)
        assert self.modulation is not None
        return z * as_compute(self.modulation, h)  # (..., d)
