"""Mixture-of-Modality Adaptation (MMA, LaVIN: Luo et al., NeurIPS 2023, "Cheap and Quick: Efficient Vision-Language
Instruction Tuning for Large Language Models", https://arxiv.org/abs/2305.15023): K adapters at one module and a
router that picks, per example, how much of each runs. The learned part of ``Mix`` (role "route").

routing="learned" (LaVIN's router, ``RepAdapter_Router`` in luogen1996/LaVIN ``lavin/mm_adapter.py``): with z the
adapters' input at this module (``reads``) and z_0 its first token (LaVIN's modality token; ``pool="mean"``: the
mean over the real tokens instead),

    w = softmax((W_r z_0 + b_r) / t)          (B, K), one weight vector per example, broadcast over its tokens
    y = finish(stream + sum_k w_k delta_k)     W_r: (K, d) an nn.Linear (default init), t = 10 as LaVIN

where (stream, delta_k, finish) is each child's split (``Branch.parts``): out and the child's change for parallel
adapters and LoRA (y = f(x) + sum_k w_k A_k(x), LaVIN's x + s [w_0 A_0(x) + w_1 A_1(x)]); the norm's input and the
norm for sequential adapters on a post-norm target. Children of one kind only.

routing="task" (hard routing, no parameters): example i runs child ``task_ids[i]`` of ``use(model, Mix(...),
task_ids=...)`` alone, on its own rows: y_i = child_{t_i}(x_i, out_i). That is ``Select`` over the children, written
as a combiner so it takes task ids and nests in a ``Stack`` (``Select`` is top-level only).

Placement. LaVIN puts its adapters before the attention, on the normalised input it feeds it, attention(z + s sum_k
w_k A_k(z)); adapterkit mixes at a module's output, so the nearest is parallel children beside the attention
(Llama: ``self_attn``, whose x is z: x + attn(z) + sum_k w_k A_k(z)), with reads="input", the default.
``ParBottleneck(activation="identity")`` is LaVIN's (linear) RepAdapter.

Simplifications: LaVIN's two adapters share one down-projection (conv_A) and use grouped up-projections; here each
child is a whole adapter of its own (any method), at the price of one more down-projection per child. LaVIN caches
each layer's weights at the prompt step of generation (start_pos == 0); here a no-grad call with one token per row
reuses the weights the last multi-token call of the same ``use`` block computed at this module (``Call.state``):
generate in one ``use`` block per prompt batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.errors import AdapterKitError, TargetError
from adapterkit.core.interpret import common_parts, mixed_change
from adapterkit.core.layers import io_sizes
from adapterkit.core.precision import as_compute, master_dtype
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require

ROUTINGS = ("learned", "task")
POOLS = ("first", "mean")
READS = ("input", "output")


@register("mma")
@dataclass(frozen=True)
class MMA(AdapterSpec):
    """Spec of a mixture-of-modality router over ``experts`` adapters (the children of its Mix block)."""

    experts: int = 2  # K, the number of children
    routing: str = "learned"  # "learned" (LaVIN's router) or "task" (example i runs child task_ids[i])
    temperature: float = 10.0  # t of the router's softmax (learned)
    pool: str = "first"  # router input per example: "first" token (LaVIN's modality token) or "mean" (real tokens)
    reads: str = "input"  # what the router reads: "input" (x, what parallel adapters and LoRA read) or "output"

    role = "route"

    def __post_init__(self) -> None:
        require(self.experts > 1, f"mma: experts must be an integer > 1, got {self.experts!r}")
        require(self.routing in ROUTINGS, f"mma: routing must be one of {ROUTINGS}, got {self.routing!r}")
        require(self.temperature > 0, f"mma: temperature must be > 0, got {self.temperature}")
        require(self.pool in POOLS, f"mma: pool must be one of {POOLS}, got {self.pool!r}")
        require(self.reads in READS, f"mma: reads must be one of {READS}, got {self.reads!r}")

    def check_target(self, base: nn.Module, path: str) -> None:
        if self.routing == "learned" and io_sizes(base)[READS.index(self.reads)] <= 0:
            raise TargetError(f"mma cannot find the {self.reads} size of {path} ({type(base).__name__}) for its "
                              "router")

    def build(self, base: nn.Module) -> nn.Module:
        return MMARouter(self, base)


class MMARouter(nn.Module):
    """The router of one module: per-example weights over the children (learned), or each row's task's child."""

    def __init__(self, spec: MMA, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.branches = spec.experts
        self.router: nn.Linear | None = None
        if spec.routing == "learned":
            like = next(base.parameters())
            size = io_sizes(base)[READS.index(spec.reads)]
            self.router = nn.Linear(size, spec.experts, dtype=master_dtype(like), device=like.device)

    def combine(self, x: Tensor, out: Tensor, branches: Sequence[Any], call: Any) -> Tensor:
        if self.router is None:
            return self._by_task(x, out, branches, call)
        weights = self.weights(x if self.spec.reads == "input" else out, call)  # (B, K)
        call.record(weights)
        w = weights.to(out.dtype).reshape(weights.shape[0], *([1] * (out.dim() - 2)), -1)  # (B, 1.., K)
        fast = mixed_change(branches, x, w)  # LoRA children: every one in two matmuls
        if fast is not None:
            return out + fast
        split = common_parts(branches, x, out, f"mma {call.combiner!r} at {call.path!r}")
        if split is None:
            return out
        stream, deltas, finish = split
        for k, delta in enumerate(deltas):
            if delta is not None:
                stream = stream + w[..., k : k + 1] * delta
        return finish(stream)

    def weights(self, z: Tensor, call: Any) -> Tensor:
        """softmax((W_r pool(z) + b_r) / t) per example: (B, K), in float32 or wider."""
        assert self.router is not None
        tokens = z if z.dim() == 3 else z.unsqueeze(1)  # (B, T, d)
        key = ("mma", call.combiner, call.path)
        kept = call.state.get(key)
        step = z.dim() == 3 and tokens.shape[1] == 1 and not torch.is_grad_enabled()
        if step and kept is not None and len(kept) == len(tokens):
            return kept  # a generation step after the prompt: the prompt's weights, as LaVIN caches them
        if self.spec.pool == "first":
            pooled = tokens[:, 0]  # (B, d)
        else:
            real = call.real_tokens(tokens)  # flat (B*T,) or None
            mask = (torch.ones(tokens.shape[:2], device=z.device) if real is None
                    else real.reshape(tokens.shape[:2])).to(tokens.dtype)  # (B, T)
            pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # (B, d)
        logits = F.linear(pooled, as_compute(self.router.weight, pooled), as_compute(self.router.bias, pooled))
        wide = torch.promote_types(logits.dtype, torch.float32)  # at least float32 (a float64 model keeps float64)
        weights = torch.softmax(logits.to(wide) / self.spec.temperature, dim=-1)  # (B, K)
        if tokens.shape[1] > 1:
            call.state[key] = weights.detach()
        return weights

    def _by_task(self, x: Tensor, out: Tensor, branches: Sequence[Any], call: Any) -> Tensor:
        ids = call.task_ids(x)  # (B,)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.spec.experts:
            bad, top = low if low < 0 else high, self.spec.experts - 1
            raise AdapterKitError(f"mma at {call.path!r}: task id {bad} is out of range; {call.combiner!r} routes "
                                  f"{self.spec.experts} children, ids 0..{top}")
        call.record(F.one_hot(ids, self.spec.experts).float())
        result = out
        for k, branch in enumerate(branches):
            rows = (ids == k).nonzero().squeeze(1)
            if rows.numel() and branch.present:
                result = result.index_copy(0, rows, branch(x.index_select(0, rows), out.index_select(0, rows)))
        return result
