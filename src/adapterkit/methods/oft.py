"""OFT: Orthogonal Finetuning (Qiu et al. 2023, https://arxiv.org/abs/2306.07280), in peft's current form
(peft >= 0.18, ``peft/tuners/oft``).

    y = W0 (R^T x) + b  (peft: each input block, as a row, is multiplied by its R_i),   i.e.   W' = W0 R^T,
    R = blockdiag(R_1, ..., R_k),   R_i = (I - Q_i)(I + Q_i)^-1   (Cayley transform),   Q_i = U_i - U_i^T

U_i holds the block's bs (bs - 1) / 2 trainable numbers above the diagonal (one row of ``oft_r`` per block, in
``torch.triu_indices`` order). A skew-symmetric Q gives an exactly orthogonal R_i, so the rotation keeps the
angles between the base weight's neurons (the paper's point) and unmerging is W0 = W' R. ``cayley="neumann"`` is
peft's default fast form: I + 2Q + 2Q^2 + ... + 2Q^(t-2) + Q^(t-1) (t = ``neumann_terms`` >= 4), the series of
(I + Q)(I - Q)^-1. It is only nearly orthogonal (and its rotation runs the other way), so its unmerge solves with
R^T instead of multiplying by R. Q = 0 at init: R = I, the base model. The width is split into ``r`` blocks or
into blocks of ``block_size`` (exactly one is given); a split that does not divide the width is refused. Linear and
Conv1D layers; the adapter rewrites the base layer's input (INPUT site).
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
from adapterkit.core.spec import AdapterSpec, require

CAYLEY = ("exact", "neumann")


def skew(vec: Tensor, size: int) -> Tensor:
    """(k, size (size - 1) / 2) -> (k, size, size) skew-symmetric: the numbers above the diagonal, minus their
    mirror below it."""
    rows, cols = torch.triu_indices(size, size, 1, device=vec.device)
    upper = vec.new_zeros(vec.shape[0], size, size)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-2, -1)


def rotation(vec: Tensor, size: int, cayley: str, terms: int) -> Tensor:
    """The blocks R_i, (k, size, size), from their parameters ``vec`` (k, size (size - 1) / 2)."""
    q = skew(vec, size)
    eye = torch.eye(size, dtype=vec.dtype, device=vec.device).expand_as(q)
    if cayley == "exact":
        return torch.linalg.solve(eye + q, eye - q, left=False)  # X (I + Q) = I - Q
    out = eye + 2 * q  # peft's series, term by term: t = 3 and t = 4 give the same sum there
    if terms > 2:
        power = q @ q
        out = out + 2 * power
        for _ in range(3, terms - 1):
            power = power @ q
            out = out + 2 * power
        out = out + power @ q  # the last power is not doubled
    return out


@register("oft")
@dataclass(frozen=True)
class OFT(AdapterSpec):
    """Spec of an OFT adapter: exactly one of ``r`` (number of blocks) and ``block_size`` is non-zero."""

    r: int = 0  # number of diagonal blocks (0: set by block_size)
    block_size: int = 32  # width of each block (0: set by r); peft's oft_block_size
    cayley: str = "exact"  # "exact" Cayley transform or peft's truncated "neumann" series
    neumann_terms: int = 5  # terms of the series (cayley="neumann" only)

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r >= 0, f"{self.method}: r must be an integer >= 0, got {self.r!r}")
        require(self.block_size >= 0, f"{self.method}: block_size must be an integer >= 0, got {self.block_size}")
        require((self.r == 0) != (self.block_size == 0),
                f"{self.method}: give exactly one of r ({self.r}) and block_size ({self.block_size}), the other 0")
        require(self.block_size != 1, f"{self.method}: block_size 1 has nothing to rotate; use 2 or more")
        require(self.cayley in CAYLEY, f"{self.method}: cayley must be one of {CAYLEY}, got {self.cayley!r}")
        require(self.neumann_terms >= 2, f"{self.method}: neumann_terms must be >= 2, got {self.neumann_terms}")

    def blocks(self, width: int) -> tuple[int, int]:
        """(number of blocks, block size) for an input of ``width`` features; ValueError if they do not fit."""
        parts = self.r or width // self.block_size
        if parts == 0 or width % parts or (self.block_size and parts * self.block_size != width):
            given = f"r {self.r}" if self.r else f"block_size {self.block_size}"
            raise ValueError(f"{given} does not divide the {width} input features")
        return parts, width // parts

    def check_target(self, base: nn.Module, path: str) -> None:
        info = layer_info(base)
        if info.kind != "linear":
            raise TargetError(f"{self.method} cannot adapt {path} ({type(base).__name__}): needs a Linear or Conv1D")
        try:
            parts, size = self.blocks(info.in_features)
        except ValueError as exc:
            raise TargetError(f"{self.method}: {exc} of {path}") from None
        if size < 2:
            raise TargetError(f"{self.method}: r {self.r} leaves blocks of width 1 in {path}: nothing to rotate")

    def build(self, base: nn.Module) -> nn.Module:
        return OFTLinear(self, base)


class OFTLinear(nn.Module):
    """The block rotation of a Linear / Conv1D layer's input."""

    site = Site.INPUT

    def __init__(self, spec: OFT, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        like = tensor(base, "weight")
        self.parts, self.size = spec.blocks(layer_info(base).in_features)
        self.oft_r = nn.Parameter(torch.zeros(self.parts, self.size * (self.size - 1) // 2,
                                              dtype=master_dtype(like), device=like.device))

    def rotation(self, dtype: torch.dtype | None = None) -> Tensor:
        """The blocks R_i, (k, bs, bs), computed in ``dtype`` (default: the parameter's)."""
        vec = self.oft_r if dtype is None else self.oft_r.to(dtype)
        return rotation(vec, self.size, self.spec.cayley, self.spec.neumann_terms)

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        blocks = as_compute(self.rotation(), x)
        grid = x.reshape(*x.shape[:-1], self.parts, self.size)  # (..., k, bs)
        return torch.einsum("...rk,rkc->...rc", grid, blocks).reshape(x.shape)  # row times R_i, per block

    def merge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """W' = W R^T, block by block on W's input columns."""
        blocks = self.rotation(weight.dtype)
        grid = weight.reshape(weight.shape[0], self.parts, self.size)  # (out, k, bs)
        return torch.einsum("orc,rkc->ork", grid, blocks).reshape(weight.shape), bias

    def unmerge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """W = W' R (R orthogonal: (R^T)^-1 = R); the Neumann form is not orthogonal, so solve X R^T = W' there."""
        blocks = self.rotation(weight.dtype)
        grid = weight.reshape(weight.shape[0], self.parts, self.size).transpose(0, 1)  # (k, out, bs)
        if self.spec.cayley == "exact":
            base = grid @ blocks
        else:
            base = torch.linalg.solve(blocks.transpose(-2, -1), grid, left=False)
        return base.transpose(0, 1).reshape(weight.shape), bias
