"""MixDA (Diao et al. 2023, https://arxiv.org/abs/2306.05406): domain adapters beside the FFN, mixed by a gate.

At an FFN's output projection (BERT: ``layer.i.output.dense``), with ``u`` its input (the FFN's intermediate
activation, 4d wide), ``f = W_out u + b`` its output and J domain adapters ``e_j = U_j act(D_j u)`` beside it
(``par_bn`` adapters with d_in = 4d, d_out = d, scaling 1, GELU; zero-initialised ``U_j``):

    g = softmax(MLP(u_pool))                  (B, J + 1), one gate per sequence, broadcast over its tokens
    m = sum_j g_j e_j + g_{J+1} f             replaces f; the layer then runs as usual: LN(TaskAdapter(m) + r)

The gate MLP is Dropout, Linear(4d -> H), [ReLU, Dropout, Linear(H -> H)] x (depth - 1), ReLU, Dropout,
Linear(H -> J + 1) with H = 768, depth 3 and dropout 0.2 in the paper; ``u_pool`` is the last token's activation
there (``pool="last"``; "first" and "mean" are offered for encoders with right padding). A decoder needs
``pool="token"``: one gate per token from that token's own activation, since any per-sequence pool lets earlier
positions see later tokens (the answer being predicted) through the gate. The paper adapts only a few layers (7
and 11 of RoBERTa-large). The children of the ``Gate`` block are the J domain adapters.

Training (both stages): ``adapterkit.train.mixda``. Stage 1 trains the domain adapters and the gate on domain
data with an old-knowledge loss; stage 2 freezes the domain adapters and trains a task adapter, the gate and a head.
Note: at init the gate is near uniform, so the FFN output is scaled by about 1 / (J + 1) (as in the paper).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from adapterkit.core.errors import TargetError
from adapterkit.core.layers import io_sizes
from adapterkit.core.precision import master_dtype
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require

POOLS = ("last", "first", "mean", "token")


@register("mixda")
@dataclass(frozen=True)
class MixDA(AdapterSpec):
    """The learned part of ``Gate``: a softmax gate over J domain adapters and the FFN output itself."""

    domains: int = 1  # J, the number of children of the Gate block
    hidden: int = 768  # H, the gate MLP's width
    depth: int = 3  # hidden Linear layers of the gate MLP
    dropout: float = 0.2
    pool: str = "last"  # which token's FFN activation feeds the gate: "last" (paper), "first", "mean", or
    # "token": each token its own (causal, for decoders)

    role = "gate"

    def __post_init__(self) -> None:
        require(isinstance(self.domains, int) and self.domains > 0,
                f"mixda: domains must be a positive integer, got {self.domains!r}")
        require(isinstance(self.hidden, int) and self.hidden > 0,
                f"mixda: hidden must be a positive integer, got {self.hidden!r}")
        require(isinstance(self.depth, int) and self.depth > 0,
                f"mixda: depth must be a positive integer, got {self.depth!r}")
        require(0.0 <= self.dropout < 1.0, f"mixda: dropout must lie in [0, 1), got {self.dropout}")
        require(self.pool in POOLS, f"mixda: pool must be one of {POOLS}, got {self.pool!r}")

    def check_target(self, base: nn.Module, path: str) -> None:
        if min(io_sizes(base)) <= 0:
            raise TargetError(f"mixda cannot find the feature sizes of {path} ({type(base).__name__}); target the "
                              "FFN's output projection")

    def build(self, base: nn.Module) -> nn.Module:
        return GateLayer(self, io_sizes(base)[0], next(base.parameters()))


class GateLayer(nn.Module):
    """The gate MLP at one FFN: pooled input -> softmax weights of (domain adapters..., FFN)."""

    def __init__(self, spec: MixDA, size_in: int, like: Tensor) -> None:
        super().__init__()
        self.spec = spec
        self.branches = spec.domains
        kwargs: dict[str, Any] = {"dtype": master_dtype(like), "device": like.device}
        layers: list[nn.Module] = [nn.Dropout(spec.dropout), nn.Linear(size_in, spec.hidden, **kwargs)]
        for _ in range(spec.depth - 1):
            layers += [nn.ReLU(), nn.Dropout(spec.dropout), nn.Linear(spec.hidden, spec.hidden, **kwargs)]
        layers += [nn.ReLU(), nn.Dropout(spec.dropout), nn.Linear(spec.hidden, spec.domains + 1, **kwargs)]
        self.mlp = nn.Sequential(*layers)

    def pooled(self, x: Tensor) -> Tensor:
        """The gate's input per sequence, (B, 4d), or with pool "token" every position's own, x itself."""
        if self.spec.pool == "token":
            return x
        tokens = x if x.dim() == 3 else x.unsqueeze(1)  # (B, T, 4d)
        if self.spec.pool == "last":
            return tokens[:, -1]
        if self.spec.pool == "first":
            return tokens[:, 0]
        return tokens.mean(1)

    def combine(self, x: Tensor, out: Tensor, branches: Sequence[Any], call: Any) -> Tensor:
        first: Any = self.mlp[1]
        gate = torch.softmax(self.mlp(self.pooled(x).to(first.weight.dtype)).float(), dim=-1)  # (B[, T], J+1)
        call.record(gate)
        lead = gate.shape[:-1]  # (B,) or per token (B, T): broadcast over the remaining dimensions of ``out``
        gate = gate.to(out.dtype).reshape(*lead, *([1] * (out.dim() - len(lead))), gate.shape[-1])
        mixed = gate[..., -1] * out  # the FFN's own share
        for index, branch in enumerate(branches):
            delta = branch.change(x, out)
            if delta is not None:
                mixed = mixed + gate[..., index] * delta
        return mixed
