"""Hydra: multi-head low-rank adaptation (Kim et al. 2023, https://arxiv.org/abs/2309.06922).

A parallel low-rank branch on the layer's input (LoRA: new features) plus a sequential low-rank branch on the
frozen layer's output (a linear combination of the pre-trained features):

    y = y0 + s * B_p drop(A_p x) + s * B_s drop(A_s y0),      y0 = W0 x + b0
    A_p: (r_par, in),  B_p: (out, r_par),  A_s: (r_seq, out),  B_s: (out, r_seq)

B_p and B_s start at zero, so the adapted model starts as the base model. Both branches are linear, so the adapter
folds into the layer exactly, the bias included (the sequential branch sees the bias through y0):

    W' = M W0 + s B_p A_p,   b' = M b0,   M = I + s B_s A_s

and unfolds with M^-1 = I - s B_s (I + s A_s B_s)^-1 A_s (Woodbury: one r_seq x r_seq solve, not out x out).

Simplification: the paper's VTAB code gives A and B biases (a_p, b_p, a_s, b_s); we follow its NLU (RoBERTa)
variant, which has none: those biases only add a learned constant per output row, which the base bias (or
BitFit) already offers. Init of the A factors by name: "kaiming" (NLU code), "xavier" (VTAB code), "gaussian"
(N(0, 0.02), the Elevater code's "lora" init). Linear and GPT-2 Conv1D layers.

The sequential branch reads the base output, so the adapter acts at the OUTPUT site: a PARALLEL adapter is
assumed not to read the base output (a sparse router hands it a placeholder there).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.errors import AdapterKitError, TargetError
from adapterkit.core.layers import layer_info, tensor, weight_view
from adapterkit.core.precision import as_compute, master_dtype
from adapterkit.core.protocol import Site
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require


def _kaiming(a: Tensor) -> None:
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))


def _xavier(a: Tensor) -> None:
    nn.init.xavier_uniform_(a)


def _gaussian(a: Tensor) -> None:
    nn.init.normal_(a, std=0.02)


INITS: dict[str, Callable[[Tensor], None]] = {"kaiming": _kaiming, "xavier": _xavier, "gaussian": _gaussian}


@register("hydra")
@dataclass(frozen=True)
class Hydra(AdapterSpec):
    """Spec of a Hydra adapter (the paper's GLUE setting: r_par=4, r_seq=8 on each FFN output dense)."""

    r_par: int = 4  # rank of the parallel branch (on the layer's input)
    r_seq: int = 4  # rank of the sequential branch (on the layer's output)
    scale: float = 1.0  # s, shared by both branches (the paper searches 0.1 ... 4)
    dropout: float = 0.0  # dropout between A and B in each branch
    init: str = "kaiming"  # init of A_p and A_s: one of INITS

    def __post_init__(self) -> None:
        for name in ("r_par", "r_seq"):
            value = getattr(self, name)
            require(value > 0, f"{self.method}: rank {name} must be a positive integer, got {value!r}")
        require(self.scale > 0, f"{self.method}: scale must be > 0, got {self.scale}")
        require(0.0 <= self.dropout < 1.0, f"{self.method}: dropout must be in [0, 1), got {self.dropout}")
        require(self.init in INITS, f"{self.method}: init must be one of {sorted(INITS)}, got {self.init!r}")

    def check_target(self, base: nn.Module, path: str) -> None:
        info = layer_info(base)
        if info.kind != "linear":
            raise TargetError(f"{self.method} cannot adapt {path} ({type(base).__name__}): needs a Linear or Conv1D "
                              "(both branches fold into its weight)")
        if self.r_par > min(info.in_features, info.out_features):
            raise TargetError(f"{self.method}: r_par {self.r_par} exceeds min(in, out) = "
                              f"{min(info.in_features, info.out_features)} of {path}")
        if self.r_seq > info.out_features:
            raise TargetError(f"{self.method}: r_seq {self.r_seq} exceeds the output size {info.out_features} of "
                              f"{path}")

    def build(self, base: nn.Module) -> nn.Module:
        return HydraLinear(self, base)


class HydraLinear(nn.Module):
    """The two low-rank branches beside one Linear / Conv1D layer."""

    site = Site.OUTPUT

    def __init__(self, spec: Hydra, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.scale = spec.scale
        info = layer_info(base)
        like = tensor(base, "weight")
        dtype, device = master_dtype(like), like.device
        self.par_a = nn.Parameter(torch.empty(spec.r_par, info.in_features, dtype=dtype, device=device))
        self.par_b = nn.Parameter(torch.zeros(info.out_features, spec.r_par, dtype=dtype, device=device))
        self.seq_a = nn.Parameter(torch.empty(spec.r_seq, info.out_features, dtype=dtype, device=device))
        self.seq_b = nn.Parameter(torch.zeros(info.out_features, spec.r_seq, dtype=dtype, device=device))
        with torch.no_grad():
            INITS[spec.init](self.par_a)
            INITS[spec.init](self.seq_a)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None
        self._base = (base,)  # a tuple, so the base is not registered (and saved) a second time

    def _branch(self, a: Tensor, b: Tensor, h: Tensor) -> Tensor:
        z = F.linear(h, as_compute(a, h))  # (..., r)
        if self.dropout is not None:
            z = self.dropout(z)
        return F.linear(z * self.scale, as_compute(b, h))  # (..., out): scale the small (..., r) tensor

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        assert base_out is not None  # an OUTPUT adapter always sees the base output
        parallel = self._branch(self.par_a, self.par_b, x)
        sequential = self._branch(self.seq_a, self.seq_b, base_out)
        return base_out + (parallel + sequential).to(base_out.dtype)

    def _factors(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(s B_p A_p, s B_s, A_s) in ``like``'s dtype (the host merges in float64)."""
        par_a, par_b, seq_a, seq_b = (p.detach().to(like.dtype) for p in (self.par_a, self.par_b, self.seq_a,
                                                                            self.seq_b))
        return (par_b @ par_a) * self.scale, seq_b * self.scale, seq_a

    def merge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        parallel, seq_b, seq_a = self._factors(weight)
        inner = torch.eye(seq_a.shape[0], dtype=weight.dtype, device=weight.device) + seq_a @ seq_b  # (r_seq, r_seq)
        cond = float(torch.linalg.cond(inner))
        if not math.isfinite(cond) or cond > 1e10:
            # M = I + s B_s A_s would lose a direction of the output: the merge could not be undone
            raise AdapterKitError("hydra: cannot merge: I + s B_s A_s is (nearly) singular, so the merge could not "
                                  "be undone; run the adapter unmerged")
        new_weight = weight + parallel + seq_b @ (seq_a @ weight)  # M W0 + s B_p A_p, (out, in)
        new_bias = None if bias is None else bias + seq_b @ (seq_a @ bias)  # M b0, (out,)
        return new_weight, new_bias

    def unmerge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        parallel, seq_b, seq_a = self._factors(weight)
        inner = torch.eye(seq_a.shape[0], dtype=weight.dtype, device=weight.device) + seq_a @ seq_b  # (r_seq, r_seq)

        def undo(y: Tensor) -> Tensor:  # M^-1 y by Woodbury; y: (out, n)
            return y - seq_b @ torch.linalg.solve(inner, seq_a @ y)

        old_bias = None if bias is None else undo(bias[:, None])[:, 0]
        return undo(weight - parallel), old_bias

    def delta_weight(self) -> Tensor:
        """W' - W0 = s (B_p A_p + B_s A_s W0) for the current base weight (it depends on W0, as DoRA's does)."""
        weight = weight_view(self._base[0]).detach()
        weight = weight.to(master_dtype(weight))
        return self.merge(weight, None)[0] - weight
