"""Poly and MHR: per-task routing over a skill inventory of LoRAs, mixing the skills' *parameters* (the learned
part of ``TaskRoute``).

Polytropon (Ponti et al. 2022, https://arxiv.org/abs/2202.13914) and Multi-Head Routing (Caccia et al. 2023,
https://arxiv.org/abs/2211.03831). The children of ``TaskRoute`` are m LoRA skills of the same rank r; this
combiner holds the routing logits Z of shape (T, h * m) (T tasks, h splits or "heads", m skills). For a row of
task t, with z = Z[t] viewed as (h, m):

    z' = sigmoid(z)   (eval)    or   z' ~ RelaxedBernoulli(temperature 1, logits z)   (training, "relaxed_bernoulli")
    w_q = z'_q / (sum_s z'_{q,s} + 1e-12)                                             (per head q)
    A_t[:, in slice q]  = sum_s w_{q,s} A_s[:, in slice q]       A_s: (r, in)
    B_t[out slice q, :] = sum_s w_{q,s} B_s[out slice q, :]      B_s: (out, r)
    y = W x + scale * B_t A_t x                                   (scale = the skills' alpha / r; peft: 1 / r)

Poly is h = 1, MHR h > 1. The layout, router init (Z ~ U(-1e-3, 1e-3)), sampling and normalisation follow peft's
``tuners/poly``; with skills ``LoRA(r, alpha=1.0)`` the outputs equal peft's ``poly`` (tests/compose/test_poly.py).
MHR-z and MHR-mu (few-shot adaptation) are ``mhr_z`` and ``mhr_mu`` in train/poly_tools.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from adapterkit.core.errors import AdapterKitError, TargetError
from adapterkit.core.layers import layer_info, tensor
from adapterkit.core.precision import as_compute, master_dtype
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require

EPS = 1e-12  # peft / mttl: keeps the normalisation finite when every sigmoid underflows
SAMPLINGS = ("relaxed_bernoulli", "sigmoid")


@register("poly")
@dataclass(frozen=True)
class Poly(AdapterSpec):
    """Spec of the Poly / MHR router of one TaskRoute block (one router per adapted module, as peft)."""

    n_tasks: int = 1  # rows of the routing matrix: task ids 0 .. n_tasks - 1
    n_skills: int = 4  # children of the TaskRoute block (LoRA skills of one rank)
    n_splits: int = 1  # heads: 1 is Poly, > 1 is MHR (must divide the module's in and out features)
    sampling: str = "relaxed_bernoulli"  # training weights: "relaxed_bernoulli" (peft, mttl) or "sigmoid" (mttl T0)
    role = "task_route"

    def __post_init__(self) -> None:
        for field in ("n_tasks", "n_skills", "n_splits"):
            value = getattr(self, field)
            require(isinstance(value, int) and value > 0, f"{self.method}: {field} must be a positive integer, "
                                                         f"got {value!r}")
        require(self.sampling in SAMPLINGS, f"{self.method}: sampling must be one of {SAMPLINGS}, "
                                            f"got {self.sampling!r}")

    def check_target(self, base: nn.Module, path: str) -> None:
        info = layer_info(base)
        if info.kind != "linear":
            raise TargetError(f"{self.method} cannot route {path} ({type(base).__name__}): its skills are LoRAs of "
                              "a Linear or Conv1D layer")
        for side, size in (("in", info.in_features), ("out", info.out_features)):
            if size % self.n_splits:
                raise TargetError(f"{self.method}: n_splits={self.n_splits} does not divide the {side} features "
                                  f"({size}) of {path}")

    def build(self, base: nn.Module) -> nn.Module:
        return PolyRouter(self, base)


class PolyRouter(nn.Module):
    """Routing logits of one module and the parameter mixing; the skills stay in their own LoRA modules."""

    def __init__(self, spec: Poly, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.branches = spec.n_skills
        like = tensor(base, "weight")
        shape = (spec.n_tasks, spec.n_splits * spec.n_skills)
        self.module_logits = nn.Parameter(torch.empty(shape, dtype=master_dtype(like), device=like.device))
        nn.init.uniform_(self.module_logits, -1e-3, 1e-3)  # peft / mttl: near-uniform routing at the start

    def task_weights(self, task_ids: Tensor, where: str = "") -> Tensor:
        """Mixing weights w for each row's task: (B, n_splits, n_skills), each head's row summing to ~1."""
        low, high = int(task_ids.min()), int(task_ids.max())
        if low < 0 or high >= self.spec.n_tasks:
            bad = low if low < 0 else high
            raise AdapterKitError(f"poly{where}: task id {bad} is out of range; this router has {self.spec.n_tasks} "
                                  f"task(s), ids 0..{self.spec.n_tasks - 1}")
        logits = self.module_logits[task_ids.to(self.module_logits.device)]
        logits = logits.view(-1, self.spec.n_splits, self.spec.n_skills)  # (B, Q, S)
        if self.training and self.spec.sampling == "relaxed_bernoulli":
            z = RelaxedBernoulli(temperature=torch.tensor(1.0, device=logits.device), logits=logits).rsample()
        else:
            z = torch.sigmoid(logits)
        return z / (z.sum(dim=-1, keepdim=True) + EPS)  # (B, Q, S)

    def combine(self, x: Tensor, out: Tensor, branches: Sequence[Any], call: Any) -> Tensor:
        """``out`` plus the task-mixed LoRA's update, one mixed (A, B) per row."""
        skills = _skills(branches, call.path)
        if skills is None:
            return out
        weights = self.task_weights(call.task_ids(x), f" at {call.path!r}")  # (B, Q, S)
        call.record(weights)
        a_mix, b_mix = mix_factors(skills, weights, x)  # (B, r, in), (B, out, r)
        lead = skills[0]
        if lead.dropout is not None:
            x = lead.dropout(x)
        rows = x.shape[0]
        flat = x.reshape(rows, -1, x.shape[-1])  # (B, T, in): any middle dims become T
        h = torch.bmm(flat, a_mix.transpose(1, 2)) * lead.scale  # (B, T, r): scale the small tensor
        delta = torch.bmm(h, b_mix.transpose(1, 2))  # (B, T, out)
        return out + delta.reshape(*out.shape).to(out.dtype)


def mix_factors(skills: Sequence[Any], weights: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row mixed LoRA factors from skills' (A, B) and head weights (B, Q, S): A (B, r, in), B (B, out, r)."""
    a = torch.stack([as_compute(s.lora_a, like) for s in skills])  # (S, r, in)
    b = torch.stack([as_compute(s.lora_b, like) for s in skills])  # (S, out, r)
    count, rank, size_in = a.shape
    size_out = b.shape[1]
    heads = weights.shape[1]
    w = weights.to(a.dtype)
    # head q owns input slice q of A and output slice q of B; the rank-r bottleneck is shared by all heads
    a_mix = torch.einsum("bqs,srqd->brqd", w, a.view(count, rank, heads, size_in // heads))
    b_mix = torch.einsum("bqs,sqor->bqor", w, b.view(count, heads, size_out // heads, rank))
    return a_mix.reshape(-1, rank, size_in), b_mix.reshape(-1, size_out, rank)


def _skills(branches: Sequence[Any], path: str) -> list[Any] | None:
    """The skills' LoRA modules on this host (None: no skill is here); one-line errors for a bad inventory."""
    present = [b for b in branches if b.adapter is not None]
    if not present:
        return None
    if len(present) != len(branches):
        missing = [b.name for b in branches if b.adapter is None]
        raise AdapterKitError(f"poly at {path!r}: skills {missing} are not attached here; attach every skill to "
                              "the same modules")
    skills = [b.adapter for b in branches]
    for branch, skill in zip(branches, skills):
        if getattr(skill.spec, "method", "") != "lora" or skill.lora_a.dim() != 2:
            raise AdapterKitError(f"poly at {path!r}: skill {branch.name!r} is a {skill.spec.method}, not a LoRA "
                                  "of a Linear layer")
    first = skills[0]
    for branch, skill in zip(branches, skills):
        if skill.lora_a.shape != first.lora_a.shape or skill.scale != first.scale:
            raise AdapterKitError(f"poly at {path!r}: skill {branch.name!r} has rank {skill.lora_a.shape[0]} and "
                                  f"scale {skill.scale}, {branches[0].name!r} has {first.lora_a.shape[0]} and "
                                  f"{first.scale}; skills must share one LoRA spec")
    return skills
