"""AdapterFusion (Pfeiffer et al. 2021, https://arxiv.org/abs/2005.00247): per-token attention over adapter outputs.

At one sub-layer, with N adapters whose outputs are ``a_i = s U_i act(D_i LN(h + r))`` (h: the sub-layer output,
r: its residual input) and the layer's normalised output ``q = LN(h + r)`` as the query:

    score_i = (W_q q + b_q) . (W_k a_i + b_k)                         (B, T, N)
    p       = softmax(dropout(score) / T)                             over the N adapters
    y       = LN(h + r + sum_i p_i W_v a_i)                           W_v: (d, d), no bias

as AdapterHub's ``BertFusion`` computes it (query after the norm, value before the softmax, residual after the
fusion, dropout on the raw scores). ``form="dynamic"`` (AdapterHub's default) has the value matrix, initialised to
the identity (1e-6 off the diagonal) and pulled towards it in training by ``value_reg * ||I - W_v||^2`` (an
auxiliary loss of the block, ``routing.aux_loss()``); ``form="static"`` has none (W_v = I). W_q, W_k ~ N(0, 0.02),
zero biases. The children are the frozen source adapters, mixed before the residual and the norm
(``Branch.parts``); children without that split (e.g. LoRA) are mixed by their change of the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.errors import TargetError
from adapterkit.core.interpret import common_parts
from adapterkit.core.layers import io_sizes
from adapterkit.core.precision import as_compute, master_dtype
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require

FORMS = ("dynamic", "static")


@register("fusion")
@dataclass(frozen=True)
class Fusion(AdapterSpec):
    """The learned part of ``Fuse``: query, key (and value) projections at each adapted sub-layer."""

    form: str = "dynamic"  # "dynamic": query, key, value (AdapterHub's default); "static": query, key
    dropout: float = 0.1  # on the attention scores (AdapterHub: the model's attention_probs_dropout_prob)
    temperature: float = 1.0  # T of the softmax
    value_reg: float = 0.01  # weight of ||I - W_v||^2 in training (dynamic only)

    role = "fuse"

    def __post_init__(self) -> None:
        require(self.form in FORMS, f"fusion: form must be one of {FORMS}, got {self.form!r}")
        require(0.0 <= self.dropout < 1.0, f"fusion: dropout must lie in [0, 1), got {self.dropout}")
        require(self.temperature > 0, f"fusion: temperature must be > 0, got {self.temperature}")
        require(self.value_reg >= 0, f"fusion: value_reg must be >= 0, got {self.value_reg}")

    def check_target(self, base: nn.Module, path: str) -> None:
        if io_sizes(base)[1] <= 0:
            raise TargetError(f"fusion cannot find the output size of {path} ({type(base).__name__})")

    def build(self, base: nn.Module) -> nn.Module:
        return FusionLayer(self, io_sizes(base)[1], next(base.parameters()))


class FusionLayer(nn.Module):
    """Attention over the children's outputs at one sub-layer."""

    def __init__(self, spec: Fusion, size: int, like: Tensor) -> None:
        super().__init__()
        self.spec = spec
        dtype = master_dtype(like)
        self.query = nn.Linear(size, size, dtype=dtype, device=like.device)
        self.key = nn.Linear(size, size, dtype=dtype, device=like.device)
        self.value = nn.Linear(size, size, bias=False, dtype=dtype, device=like.device) \
            if spec.form == "dynamic" else None
        with torch.no_grad():
            for layer in (self.query, self.key):
                layer.weight.normal_(0.0, 0.02)
                layer.bias.zero_()
            if self.value is not None:  # near-identity: fusion starts as a weighted average of the adapters
                self.value.weight.fill_(1e-6).fill_diagonal_(1.0)

    def combine(self, x: Tensor, out: Tensor, branches: Sequence[Any], call: Any) -> Tensor:
        split = common_parts(branches, x, out, f"Fuse {call.combiner!r} at {call.path!r}")
        if split is None:
            return out
        stream, deltas, finish = split
        ups = torch.stack([d for d in deltas if d is not None], dim=-2)  # (B, T, N, d)
        query = F.linear(out, as_compute(self.query.weight, out), as_compute(self.query.bias, out))  # (B, T, d)
        key = F.linear(ups, as_compute(self.key.weight, ups), as_compute(self.key.bias, ups))  # (B, T, N, d)
        value = ups if self.value is None else F.linear(ups, as_compute(self.value.weight, ups))  # (B, T, N, d)
        scores = torch.matmul(query.unsqueeze(-2), key.transpose(-2, -1)).squeeze(-2)  # (B, T, N)
        scores = F.dropout(scores, self.spec.dropout, self.training)
        probs = torch.softmax(scores / self.spec.temperature, dim=-1)  # (B, T, N)
        call.record(probs)
        fused = torch.matmul(probs.unsqueeze(-2), value).squeeze(-2)  # (B, T, d)
        if self.training and self.value is not None and self.spec.value_reg and self.value.weight.requires_grad:
            eye = torch.eye(self.value.weight.shape[0], dtype=self.value.weight.dtype, device=self.value.weight.device)
            call.add_loss("fusion_value", self.spec.value_reg * (eye - self.value.weight).pow(2).sum())
        return finish(stream + fused)
