"""LoRA: Low-Rank Adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685), with rsLoRA scaling
(Kalajdzievski 2023, https://arxiv.org/abs/2312.03732).

    h = W0 x + s * B A x,   A: (r, in), B: (out, r),   s = alpha / r   (rsLoRA: s = alpha / sqrt(r))

A is Kaiming-uniform (a = sqrt 5, as nn.Linear and peft) or Gaussian (std 1/r), B is zero, so the adapted
model starts as the base model. Supports Linear (and GPT-2 Conv1D), Conv2d and Embedding base layers; for
Embedding, as in the reference code, A is zero and B Gaussian.

``init="pissa"`` / ``"pissa_niter_K"`` / ``"olora"`` take A and B from the base weight's SVD or QR and leave the
residual in the base (PiSSA, OLoRA; Linear and Conv1D only): methods/lora_init.py. ``init="corda_ipm"`` /
``"corda_kpm"`` (CorDA) do the same from the SVD of W times the layer's calibrated input covariance
(methods/corda.py; calibrate first with ``adapterkit.train.calibrate.calibrate_corda``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.context import SelectPlan
from adapterkit.core.errors import TargetError
from adapterkit.core.layers import layer_info, tensor
from adapterkit.core.precision import as_compute, master_dtype
from adapterkit.core.protocol import Site
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require
from adapterkit.methods.lora_init import check_base, from_base, init_from_base
from adapterkit.ops.gathered import segments, stack_factors
from adapterkit.ops.multi_lora import multi_lora

SCALINGS = ("lora", "rslora")
_VERSION = operator.attrgetter("_version")  # a tensor's in-place write counter
INITS = ("kaiming", "gaussian")


def lora_scale(alpha: float, r: int, scaling: str) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rsLoRA (keeps the update's size stable as r grows)."""
    return alpha / math.sqrt(r) if scaling == "rslora" else alpha / r


@register("lora")
@dataclass(frozen=True)
class LoRA(AdapterSpec):
    """Spec of a LoRA adapter."""

    r: int = 8  # rank of the update
    alpha: float = 16.0  # scale numerator
    dropout: float = 0.0  # dropout on the adapter's input
    scaling: str = "lora"  # "lora" (alpha / r) or "rslora" (alpha / sqrt r)
    # init of A: "kaiming" or "gaussian" (B zero); or A and B from the base weight, which keeps the residual:
    # "pissa", "pissa_niter_K" (randomised SVD, K power iterations), "olora", "corda_ipm", "corda_kpm" (CorDA:
    # needs calibrate_corda first); "residual" is what those read once
    # done (the base holds the residual already: a build leaves it alone), see methods/lora_init.py
    init: str = "kaiming"

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0,
                f"{self.method}: rank r must be a positive integer, got {self.r!r}")
        require(self.alpha > 0, f"{self.method}: alpha must be > 0, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, f"{self.method}: dropout must be in [0, 1), got {self.dropout}")
        require(self.scaling in SCALINGS, f"{self.method}: scaling must be one of {SCALINGS}, got {self.scaling!r}")
        require(self.init in INITS or from_base(self.init), f"{self.method}: init must be one of {INITS}, 'pissa', "
                f"'pissa_niter_K' (K >= 0), 'olora', 'corda_ipm', 'corda_kpm' or 'residual', got {self.init!r}")
        require(type(self) is LoRA or not from_base(self.init),  # e.g. DoRA's magnitude would see the residual
                f"{self.method}: init={self.init!r} (factors from the base weight) is for plain LoRA only")

    def check_target(self, base: nn.Module, path: str) -> None:
        info = layer_info(base)
        if info.kind not in ("linear", "conv2d", "embedding"):
            raise TargetError(f"{self.method} cannot adapt {path} ({type(base).__name__}): needs a Linear, Conv1D, "
                              "Conv2d or Embedding")
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise TargetError(f"{self.method} cannot adapt {path}: grouped convolutions are not supported")
        if from_base(self.init):
            check_base(self.init, base, path)
        limit = min(info.in_features, info.out_features)
        if info.kind != "conv2d" and self.r > limit:
            raise TargetError(f"{self.method}: rank {self.r} exceeds min(in, out) = {limit} of {path}")

    def for_counting(self) -> LoRA:
        return dataclasses.replace(self, init="kaiming") if from_base(self.init) else self  # SVD/QR edit the base

    def build(self, base: nn.Module) -> nn.Module:
        kind = layer_info(base).kind
        cls = {"linear": LoRALinear, "conv2d": LoRAConv2d, "embedding": LoRAEmbedding}[kind]
        return cls(self, base)


class _LowRank(nn.Module):
    """Shared by every LoRA form: the factors, the scale and the merge maps."""

    site = Site.PARALLEL

    def __init__(self, spec: LoRA, a_shape: tuple[int, ...], b_shape: tuple[int, ...], like: Tensor) -> None:
        super().__init__()
        self.spec = spec
        self.scale = lora_scale(spec.alpha, spec.r, spec.scaling)
        dtype = master_dtype(like)
        self.lora_a = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=like.device))
        self.lora_b = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=like.device))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None

    def delta_weight(self) -> Tensor:
        """s * B A in the base layer's canonical layout."""
        raise NotImplementedError

    def merge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight + self.delta_weight().to(weight.dtype), bias

    def unmerge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight - self.delta_weight().to(weight.dtype), bias


class LoRALinear(_LowRank):
    """LoRA beside a Linear / Conv1D layer."""

    def __init__(self, spec: LoRA, base: nn.Module) -> None:
        info = layer_info(base)
        super().__init__(spec, (spec.r, info.in_features), (info.out_features, spec.r), tensor(base, "weight"))
        if spec.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        elif spec.init == "gaussian":
            nn.init.normal_(self.lora_a, std=1 / spec.r)
        else:  # PiSSA / OLoRA: factors from the base weight, the residual left in the base
            init_from_base(self, base)

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        h = F.linear(x, as_compute(self.lora_a, x))  # (..., r)
        return F.linear(h * self.scale, as_compute(self.lora_b, x))  # (..., out): scale the small (..., r) tensor

    def add_into(self, x: Tensor, out: Tensor) -> Tensor:
        """``out += scale * (x A^T) B^T`` by one accumulating matmul: no (..., out) delta is allocated."""
        if self.dropout is not None:
            x = self.dropout(x)
        h = F.linear(x, as_compute(self.lora_a, x))  # (..., r)
        if not out.is_contiguous() or out.dim() < 2 or h.shape[:-1] != out.shape[:-1]:
            return out.add_(F.linear(h * self.scale, as_compute(self.lora_b, h)))
        flat = out.view(-1, out.shape[-1])  # under autocast ``out`` may be bf16 while x is float32: match it
        flat.addmm_(h.reshape(-1, h.shape[-1]).to(out.dtype), self.lora_b.to(out.dtype).t(), alpha=self.scale)
        return out

    def delta_weight(self) -> Tensor:
        return (self.lora_b @ self.lora_a) * self.scale  # (out, in)

    @staticmethod
    def batched_delta(adapters: Sequence[LoRALinear | None], x: Tensor, slots: Tensor, cache: dict,
                      into: Tensor | None = None, plan: SelectPlan | None = None) -> Tensor:
        """Row b gets adapters[slots[b]]'s delta (no adapter: zero) in one computation (ops/multi_lora: Triton
        kernels on GPU, the gathered torch path elsewhere); with ``into``, returns ``into`` plus the delta, added
        in place. ``plan`` is the Select block's plan, which keys the cache check and the row grouping.

        The stacked factors (scale folded into B, ranks zero-padded) and each slot's rank (the last slot, "no
        adapter", has rank 0) are cached on the host. They are checked once per ``use`` block (per SelectPlan) and
        each time the adapters or the activation dtype/device change, and rebuilt when the adapters or a weight
        (its version counter) changed; a weight edited in place inside an open Select block is picked up at the
        next block. Why not at every call: reading 2N version counters costs ~0.25 us each, ~30 us a layer at
        N=64 on a CPU, a large share of a decode step (the stacks serve inference: they carry no gradient).
        """
        fresh = (plan is not None and cache.get("plan") is plan and cache["like"] == (x.dtype, x.device)
                 and cache["adapters"] == list(adapters))  # lists compare by identity first, in C
        if not fresh:
            params: list[Tensor] | None = cache.get("params")
            if (params is None or cache["like"] != (x.dtype, x.device) or cache["adapters"] != list(adapters)
                    or cache["versions"] != list(map(_VERSION, params))):
                params = [p for a in adapters if a is not None for p in (a.lora_a, a.lora_b)]
                factors = [None if a is None else (a.lora_a, a.lora_b * a.scale) for a in adapters]
                ranks = [0 if a is None else a.lora_a.shape[0] for a in adapters] + [0]
                cache.update(params=params, like=(x.dtype, x.device), adapters=list(adapters),
                             versions=list(map(_VERSION, params)), stacks=stack_factors(factors, x),
                             ranks=torch.tensor(ranks, dtype=torch.int32, device=x.device))  # ranks: (slots,)
            cache["plan"] = plan
        a_stack, b_stack = cache["stacks"]
        groups = None
        if plan is not None:  # the row grouping, derived once per batch for every layer
            key = ("lora segments", slots.device, slots.shape[0])
            if key not in plan.memo:  # from the plan's host copy of the slots: no device sync
                plan.memo[key] = segments(plan.host_slots(slots.shape[0]), slots.device)
            groups = plan.memo[key]
        return multi_lora(x, a_stack, b_stack, slots, cache["ranks"], into, groups)


    @staticmethod
    def mixed_delta(adapters: Sequence[LoRALinear], x: Tensor, weights: Tensor) -> Tensor | None:
        """``sum_k weights[..., k] * s_k B_k A_k x`` for K LoRAs on one layer in two matmuls: the A factors stacked
        into one (sum r_k, in) matrix, each token's weights spread over its expert's r_k rows, the B factors side by
        side. Used by mixtures that weight every expert per token (X-LoRA); gradients reach the factors and the
        weights. None when an adapter has dropout (each expert would draw its own mask): the caller loops."""
        if any(a.dropout is not None for a in adapters):
            return None
        a_cat = torch.cat([as_compute(a.lora_a, x) for a in adapters])  # (sum r, in)
        b_cat = torch.cat([as_compute(a.lora_b, x) for a in adapters], dim=1)  # (out, sum r)
        ranks = torch.tensor([a.lora_a.shape[0] for a in adapters], device=x.device)
        scales = torch.tensor([a.scale for a in adapters], dtype=weights.dtype, device=weights.device)
        spread = torch.repeat_interleave(weights * scales, ranks, dim=-1)  # (..., sum r)
        return F.linear(F.linear(x, a_cat) * spread.to(x.dtype), b_cat)  # (..., out)


class LoRAConv2d(_LowRank):
    """LoRA beside a Conv2d: A is a conv with the base's kernel, stride and padding; B is 1x1."""

    def __init__(self, spec: LoRA, base: nn.Conv2d) -> None:
        kh, kw = base.kernel_size
        super().__init__(spec, (spec.r, base.in_channels, kh, kw), (base.out_channels, spec.r, 1, 1), base.weight)
        self.stride, self.padding, self.dilation = base.stride, base.padding, base.dilation
        if spec.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_a, std=1 / spec.r)

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        h = F.conv2d(x, as_compute(self.lora_a, x), stride=self.stride, padding=self.padding,  # type: ignore[call-overload]
                     dilation=self.dilation)  # (B, r, H', W')
        return F.conv2d(h * self.scale, as_compute(self.lora_b, x))  # (B, out, H', W')

    def delta_weight(self) -> Tensor:
        r = self.lora_a.shape[0]
        flat = self.lora_b.reshape(-1, r) @ self.lora_a.reshape(r, -1)  # (out, in * kh * kw)
        return flat.reshape(self.lora_b.shape[0], *self.lora_a.shape[1:]) * self.scale


class LoRAEmbedding(_LowRank):
    """LoRA beside an Embedding: A holds r numbers per token (zero init), B maps them to the embedding."""

    def __init__(self, spec: LoRA, base: nn.Embedding) -> None:
        super().__init__(spec, (spec.r, base.num_embeddings), (base.embedding_dim, spec.r), base.weight)
        nn.init.zeros_(self.lora_a)
        nn.init.normal_(self.lora_b)
        self.padding_idx = base.padding_idx

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        h = F.embedding(x, self.lora_a.t(), padding_idx=self.padding_idx)  # (..., r)
        delta = F.linear(h * self.scale, self.lora_b)  # (..., dim)
        return delta if base_out is None else delta.to(base_out.dtype)  # ids carry no dtype: match the embedding

    def delta_weight(self) -> Tensor:
        return (self.lora_b @ self.lora_a).t() * self.scale  # (num_embeddings, dim)
