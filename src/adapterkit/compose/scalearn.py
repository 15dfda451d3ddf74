"""ScaLearn (Frohmann et al. 2023, https://arxiv.org/abs/2310.01217): learned scales over frozen source adapters.

At one sub-layer, with N frozen source adapters whose outputs are ``a_i`` (mixed before the residual and the norm,
as the adapters' ``parts`` split them):

    y = LN(h + r + sum_i dropout(w_i) * a_i)          w_i ~ N(c / N, 0.001) at init, c = 2

No softmax, no sum-to-one constraint. Variants are two named choices (the paper's four):

* ``form="vector"``: w_i in R^d (ScaLearn);  ``form="scalar"``: w_i in R (ScaLearnUniform).
* ``share="layer"``: own scales at every adapted sub-layer;  ``share="model"``: one set for the whole model
  (ScaLearn++ / ScaLearnUniform++).

Dropout (p = 0.3 in the paper) acts on the scales themselves, in training. With ``share="model"`` the first
placement owns the parameter and the others borrow it (``link``): it trains once, counts once, and is saved once,
by the first placement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.errors import SpecError, TargetError
from adapterkit.core.interpret import common_parts
from adapterkit.core.layers import io_sizes
from adapterkit.core.precision import as_compute, master_dtype
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require

FORMS = ("vector", "scalar")
SHARES = ("layer", "model")


@register("scalearn")
@dataclass(frozen=True)
class ScaLearn(AdapterSpec):
    """The learned part of ``Scale``: one scale (vector or scalar) per source adapter."""

    sources: int = 2  # N, the number of children of the Scale block
    form: str = "vector"  # "vector": w_i in R^d; "scalar": w_i in R
    share: str = "layer"  # "layer": scales per adapted module; "model": one set shared by every module
    init_scale: float = 2.0  # c: scales start around c / N
    init_std: float = 0.001
    dropout: float = 0.3  # on the scales, in training

    role = "scale"

    def __post_init__(self) -> None:
        require(isinstance(self.sources, int) and self.sources > 0,
                f"scalearn: sources must be a positive integer, got {self.sources!r}")
        require(self.form in FORMS, f"scalearn: form must be one of {FORMS}, got {self.form!r}")
        require(self.share in SHARES, f"scalearn: share must be one of {SHARES}, got {self.share!r}")
        require(self.init_std >= 0, f"scalearn: init_std must be >= 0, got {self.init_std}")
        require(0.0 <= self.dropout < 1.0, f"scalearn: dropout must lie in [0, 1), got {self.dropout}")

    def check_target(self, base: nn.Module, path: str) -> None:
        if self.form == "vector" and io_sizes(base)[1] <= 0:
            raise TargetError(f"scalearn cannot find the output size of {path} ({type(base).__name__})")

    def build(self, base: nn.Module) -> nn.Module:
        return ScaleLayer(self, io_sizes(base)[1] if self.form == "vector" else 1, next(base.parameters()))

    def build_all(self, bases: list[nn.Module]) -> list[nn.Module]:
        """One ScaleLayer per placement; with share="model" they all borrow the first one's scales (saved once,
        tied again on load, which attaches in the same order)."""
        modules = [self.build(base) for base in bases]
        if self.share == "layer" or not modules:
            return modules
        owner = modules[0]
        assert isinstance(owner, ScaleLayer)
        for module in modules[1:]:
            assert isinstance(module, ScaleLayer)
            if module.scales.shape != owner.scales.shape:
                raise SpecError(f"scalearn: share='model' needs one feature size at every target, got "
                                f"{tuple(owner.scales.shape)} and {tuple(module.scales.shape)}")
            module.borrow(owner)
        return modules


class ScaleLayer(nn.Module):
    """Scales of the N sources at one sub-layer (or a borrowed reference to the model-wide set)."""

    def __init__(self, spec: ScaLearn, size: int, like: Tensor) -> None:
        super().__init__()
        self.spec = spec
        self.branches = spec.sources
        scales = torch.empty(spec.sources, size, dtype=master_dtype(like), device=like.device)  # (N, d or 1)
        nn.init.normal_(scales, mean=spec.init_scale / spec.sources, std=spec.init_std)
        self.scales = nn.Parameter(scales)
        self._owner: tuple[ScaleLayer, ...] = ()  # tuple: reference the owner without registering it twice

    def borrow(self, owner: ScaleLayer) -> None:
        """Use ``owner``'s scales from now on (model-wide sharing); this module then holds no parameter."""
        del self.scales
        self._owner = (owner,)

    def weights(self) -> Tensor:
        """The scales this module uses, (N, d) or (N, 1)."""
        return self._owner[0].scales if self._owner else self.scales

    def combine(self, x: Tensor, out: Tensor, branches: Sequence[Any], call: Any) -> Tensor:
        split = common_parts(branches, x, out, f"Scale {call.combiner!r} at {call.path!r}")
        if split is None:
            return out
        stream, deltas, finish = split
        scales = F.dropout(self.weights(), self.spec.dropout, self.training)  # (N, d or 1)
        call.record(scales)
        mixed = stream
        for scale, delta in zip(as_compute(scales, stream), deltas):
            if delta is not None:
                mixed = mixed + scale * delta  # (d,) or (1,) broadcast over (B, T, d)
        return finish(mixed)
