"""Structured Pruning Adapters, SPLoRA (Hedegaard et al., https://arxiv.org/abs/2211.10155): a fused low-rank
adapter pruned together with its base layer's output channels, so the adapted model is exported smaller and faster.

    W' = W0 + C R,   R: (r, in) "rows",  C: (out, r) "cols",   b' = b0 + b_delta     (W0, b0 frozen)
    m_out in {0, 1}^out,   y = m_out * (x W'^T + b')      trained as  m_out * (x W0^T + b0 + (x R^T) C^T + b_delta)
    deployed:  W'[m_out], b'[m_out]  and the consumer layer's weight [:, m_out]  (channels physically removed)

R is Kaiming-uniform (a = sqrt 5), C ~ U(-init_range, init_range) (1e-4 in the authors' library: near zero, not
zero; ``init_range=0`` starts exactly at the base model). Channel importance is the paper's weight-L2 criterion on
the fused rows, ||W'_j||_2; each pruning step (``prune_channels``) removes the least important of the still-kept
channels in every adapted layer until that layer's pruned share reaches the step's sparsity (a uniform per-layer
share, which makes every layer equally smaller). The iterative schedule (``sparsity_schedule``: 5 % steps in the
paper) alternates pruning steps with recovery training, done by the caller's loop. Stored: the channel mask (1 bit
per channel, packed), R, and only the kept rows of C and b_delta.

Export (channels physically removed): merge the adapter (W' with pruned rows zeroed), detach it keeping the merge,
then ``shrink(model, keep, consumer_of)`` cuts the pruned rows out of each producer Linear and the matching columns
out of its consumer Linear. The result equals the masked model exactly in function (the activation between them must
map 0 to 0, as GELU and ReLU do). Scope: output channels of a Linear whose only consumer is one Linear, e.g. a BERT
FFN (``intermediate.dense`` -> ``output.dense``, ``bert_ffn_consumer``); input-channel masks, convolutions and
residual-stream channels are not implemented.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.errors import TargetError
from adapterkit.core.host import host_of
from adapterkit.core.layers import layer_info, read_weight, tensor
from adapterkit.core.precision import as_compute, master_dtype
from adapterkit.core.protocol import Site
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require
from adapterkit.ops.bitpack import BitpackError, pack, unpack


@register("splora")
@dataclass(frozen=True)
class SPLoRA(AdapterSpec):
    """Spec of a structured-pruning low-rank adapter (prunes the base layer's output channels with it)."""

    r: int = 8  # rank of C R
    init_range: float = 1e-4  # C ~ U(-init_range, init_range); 0 starts exactly at the base model

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0,
                f"{self.method}: rank r must be a positive integer, got {self.r!r}")
        require(self.init_range >= 0, f"{self.method}: init_range must be >= 0, got {self.init_range}")

    @property
    def starts_as_identity(self) -> bool:
        """Only a zero C leaves the model unchanged at attach time."""
        return self.init_range == 0

    def check_target(self, base: nn.Module, path: str) -> None:
        info = layer_info(base)
        if info.kind != "linear":
            raise TargetError(f"{self.method} cannot adapt {path} ({type(base).__name__}): needs a Linear or Conv1D")
        if self.r > min(info.in_features, info.out_features):
            raise TargetError(f"{self.method}: rank {self.r} exceeds min(in, out) of {path}")

    def build(self, base: nn.Module) -> nn.Module:
        return SPLoRALinear(self, base)


class SPLoRALinear(nn.Module):
    """Low-rank update, bias offset and output-channel mask of one Linear (Conv1D) layer."""

    site = Site.OUTPUT  # the mask multiplies the whole output, base included
    keep: Tensor  # (out,) bool buffer: the channels that survive

    def __init__(self, spec: SPLoRA, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        info = layer_info(base)
        like = tensor(base, "weight")
        dtype = master_dtype(like)
        self.rows = nn.Parameter(torch.empty(spec.r, info.in_features, dtype=dtype, device=like.device))  # R
        self.cols = nn.Parameter(torch.empty(info.out_features, spec.r, dtype=dtype, device=like.device))  # C
        nn.init.kaiming_uniform_(self.rows, a=math.sqrt(5))
        nn.init.uniform_(self.cols, -spec.init_range, spec.init_range)
        has_bias = isinstance(getattr(base, "bias", None), Tensor)
        self.bias = nn.Parameter(torch.zeros(info.out_features, dtype=dtype, device=like.device)) if has_bias else None
        self.register_buffer("keep", torch.ones(info.out_features, dtype=torch.bool, device=like.device))
        self._held: tuple[Tensor, Tensor, Tensor | None] | None = None  # pruned base rows while merged

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        h = F.linear(x, as_compute(self.rows, x))  # (..., r)
        bias = None if self.bias is None else as_compute(self.bias, x)
        assert base_out is not None  # an OUTPUT adapter always gets the base output
        out = base_out + F.linear(h, as_compute(self.cols, x), bias)  # (..., out)
        if bool(self.keep.all()):
            return out
        return out * self.keep.to(out.dtype)  # pruned channels are exactly zero

    def delta_weight(self) -> Tensor:
        """C R in (out, in) layout."""
        return self.cols @ self.rows

    def importance(self, weight: Tensor) -> Tensor:
        """Weight-L2 importance of each output channel of the fused weight W0 + C R (out,)."""
        return (weight + self.delta_weight().to(weight.dtype)).norm(dim=1)

    @torch.no_grad()
    def prune_to(self, weight: Tensor, sparsity: float) -> int:
        """Prune the least important kept channels until ``sparsity`` of all are pruned; returns channels kept."""
        target = self.keep.numel() - round(sparsity * self.keep.numel())
        if target >= int(self.keep.sum()):
            return int(self.keep.sum())
        score = self.importance(weight.to(self.cols.dtype)).masked_fill(~self.keep, -math.inf)
        keep = torch.zeros_like(self.keep)
        keep[score.topk(target).indices] = True
        self.keep.copy_(keep)
        return target

    def merge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        keep = self.keep.to(weight.device)
        self._held = (keep, weight[~keep].clone(), None if bias is None else bias[~keep].clone())
        merged = (weight + self.delta_weight().to(weight.dtype)) * keep[:, None].to(weight.dtype)
        if bias is None:
            return merged, None
        new_bias = bias if self.bias is None else bias + self.bias.to(bias.dtype)
        return merged, new_bias * keep.to(bias.dtype)

    def unmerge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self._held is None:
            raise ValueError("splora: unmerge without a preceding merge")
        keep, rows, biases = self._held
        weight = weight - self.delta_weight().to(weight.dtype)
        weight[~keep] = rows
        if bias is not None:
            bias = bias if self.bias is None else bias - self.bias.to(bias.dtype)
            if biases is not None:
                bias[~keep] = biases
        self._held = None
        return weight, bias

    def packed_state(self) -> dict[str, Tensor]:
        """The channel mask as bits, R, and the kept rows of C and of the bias offset."""
        state = {"keep": pack(self.keep, 1), "rows": self.rows.detach(), "cols": self.cols.detach()[self.keep]}
        if self.bias is not None:
            state["bias"] = self.bias.detach()[self.keep]
        return state

    @torch.no_grad()
    def load_packed(self, state: dict[str, Tensor]) -> None:
        """Scatter the stored kept rows back; pruned rows are zero (they never reach the output)."""
        names = ["keep", "rows", "cols"] + ([] if self.bias is None else ["bias"])
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(f"missing tensors {missing}")
        try:
            keep = unpack(state["keep"], 1, tuple(self.keep.shape)).bool().to(self.keep.device)
        except BitpackError as exc:
            raise ValueError(f"tensor keep: {exc}") from None
        kept = int(keep.sum())
        expected = {"rows": tuple(self.rows.shape), "cols": (kept, self.cols.shape[1]), "bias": (kept,)}
        for name in names[1:]:
            if tuple(state[name].shape) != expected[name]:
                raise ValueError(f"tensor {name} has shape {tuple(state[name].shape)}, expected {expected[name]} "
                                 f"({kept} kept channels)")
        self.keep.copy_(keep)
        self.rows.copy_(state["rows"])
        self.cols.zero_()
        self.cols[keep] = state["cols"].to(self.cols.dtype)
        if self.bias is not None:
            self.bias.zero_()
            self.bias[keep] = state["bias"].to(self.bias.dtype)


def _adapters(model: nn.Module, name: str) -> Iterator[tuple[str, nn.Module, SPLoRALinear]]:
    found = False
    for path, module in model.named_modules():
        host = host_of(module)
        if host is not None and name in host.names() and isinstance(host.adapter(name), SPLoRALinear):
            found = True
            yield path, module, host.adapter(name)
    if not found:
        raise ValueError(f"no splora adapter named {name!r} on this model")


def sparsity_schedule(target: float, step: float = 0.05) -> list[float]:
    """The iterative schedule: step, 2 step, ... up to ``target`` (the paper: 5 % steps)."""
    if not 0 < step <= target < 1:
        raise ValueError(f"need 0 < step <= target < 1, got step {step}, target {target}")
    count = math.ceil(round(target / step, 9))
    return [min(target, round(step * (i + 1), 9)) for i in range(count)]


def prune_channels(model: nn.Module, name: str, sparsity: float) -> dict[str, int]:
    """One pruning step: every SPLoRA layer of adapter ``name`` keeps (1 - sparsity) of its output channels,
    dropping the lowest fused-weight L2 first; channels pruned before stay pruned. Returns kept counts."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return {path: adapter.prune_to(read_weight(module)[0], sparsity)
            for path, module, adapter in _adapters(model, name)}


def kept_channels(model: nn.Module, name: str) -> dict[str, Tensor]:
    """{layer path: bool mask of kept output channels} of adapter ``name`` (read this before detaching it)."""
    return {path: adapter.keep.clone() for path, _, adapter in _adapters(model, name)}


def bert_ffn_consumer(path: str) -> str:
    """The layer that reads a BERT FFN's intermediate channels: ``...intermediate.dense`` -> ``...output.dense``."""
    suffix = "intermediate.dense"
    if not path.endswith(suffix):
        raise ValueError(f"{path}: not a BERT FFN intermediate layer (expected a path ending with {suffix!r})")
    return path[: -len(suffix)] + "output.dense"


@torch.no_grad()
def shrink(model: nn.Module, keep: dict[str, Tensor], consumer_of: Callable[[str], str] = bert_ffn_consumer) -> None:
    """Physically remove pruned channels: rows of each producer Linear and the matching columns of its consumer.

    Call it on a model whose pruning adapter is merged and detached (``detach(..., keep_merged=True)``); the Linear
    modules stay the same objects with smaller parameters, so the module tree is unchanged. A transformers config
    still names the old sizes (``intermediate_size``): the shrunk model runs, but ``save_pretrained`` + reload would
    rebuild the full-size layers.
    """
    modules = dict(model.named_modules())
    for path, mask in keep.items():
        producer, consumer = modules.get(path), modules.get(consumer_of(path))
        for where, layer in ((path, producer), (consumer_of(path), consumer)):
            if not isinstance(layer, nn.Linear):
                raise TargetError(f"shrink: {where} is {type(layer).__name__}, not a Linear")
            if host_of(layer) is not None:
                raise TargetError(f"shrink: {where} still has adapters; merge and detach them first")
        assert isinstance(producer, nn.Linear) and isinstance(consumer, nn.Linear)
        if mask.numel() != producer.out_features or mask.numel() != consumer.in_features:
            raise TargetError(f"shrink: mask of {mask.numel()} channels does not fit {path} -> {consumer_of(path)}")
        index = mask.nonzero().squeeze(1).to(producer.weight.device)  # (kept,)
        producer.weight = nn.Parameter(producer.weight[index].clone(), requires_grad=producer.weight.requires_grad)
        if producer.bias is not None:
            producer.bias = nn.Parameter(producer.bias[index].clone(), requires_grad=producer.bias.requires_grad)
        consumer.weight = nn.Parameter(consumer.weight[:, index].clone(), requires_grad=consumer.weight.requires_grad)
        producer.out_features = consumer.in_features = int(index.numel())
