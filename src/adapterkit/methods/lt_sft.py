"""LT-SFT: Lottery-Ticket Sparse Fine-Tuning (Ansell et al., ACL 2022, "Composable Sparse Fine-Tuning for
Cross-Lingual Transfer", https://arxiv.org/abs/2110.07560).

A sparse fine-tuning is a sparse difference phi with theta = theta0 + phi, found in two phases:

    1. full fine-tuning of the target weights:           theta1 = argmin L(theta)        (from theta0)
    2. keep the K entries with the largest |theta1 - theta0| over ALL targets (one global threshold), reset to theta0
    3. sparse fine-tuning of those K entries only:        phi = argmin L(theta0 + phi),  supp(phi) = top-K
       optionally with an L1 pull to the base:            L + lambda * sum |phi| / N      (N = all target entries)

Diffs compose by addition:  theta = theta0 + phi_domain + phi_task.

Here a diff is one ``SparseDiff`` per target Linear (or GPT-2 Conv1D): ``indices`` into the layer's flattened
parameters [W (out, in) in canonical layout, then b] and the matching ``values``, both tensors of the adapter, so
``ak.save`` writes them to safetensors as they are (K indices + K values, not a dense matrix) and the fingerprint
check rejects a diff meant for another base model. Apply = ``ak.merge`` (W[idx] += values, zero inference cost),
revert = ``ak.unmerge`` (writes back the K saved base entries, so the base is restored bit for bit). Unmerged, the
diff runs as a PARALLEL delta x dW^T, which is how it is trained: a dense matmul while the diff is dense (phase 1),
a sparse O(K N) product (forward and gradients) once it is sparse.

A new diff is dense (all entries, values 0): training it is phase 1. ``lottery_ticket`` runs the procedure around
any training function (our ``run_training``, HF Trainer, a plain loop). Differences from the reference code: the
diff values are the trained parameters (exactly gradient masking of W, since theta0 is frozen), so AdamW weight decay
pulls phi, not theta, toward 0; the L1 term is added to the gradient (sign(phi) * lambda / N) rather than the loss,
the same subgradient without touching the training loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.errors import AdapterKitError, TargetError
from adapterkit.core.host import host_of
from adapterkit.core.layers import layer_info, weight_view
from adapterkit.core.precision import as_compute, master_dtype
from adapterkit.core.protocol import Site
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require


@register("lt_sft")
@dataclass(frozen=True)
class LTSFT(AdapterSpec):
    """Spec of a sparse fine-tuning: K, the number of entries ``lottery_ticket`` keeps over all targets."""

    k: int = 100_000  # the reference code's ft_params_num

    def __post_init__(self) -> None:
        require(isinstance(self.k, int) and self.k > 0, f"lt_sft: k must be a positive integer, got {self.k!r}")

    def check_target(self, base: nn.Module, path: str) -> None:
        if layer_info(base).kind != "linear":
            raise TargetError(f"lt_sft cannot adapt {path} ({type(base).__name__}): needs a Linear or Conv1D")

    def build(self, base: nn.Module) -> nn.Module:
        return SparseDiff(self, base)


class SparseDiff(nn.Module):
    """phi for one layer: ``indices`` (K,) into [W.flatten(), b] and ``values`` (K,)."""

    site = Site.PARALLEL

    def __init__(self, spec: LTSFT, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        weight = weight_view(base)
        bias = getattr(base, "bias", None)
        self.shape = tuple(weight.shape)  # (out, in)
        self.bias_size = bias.numel() if isinstance(bias, Tensor) else 0
        self.size = weight.numel() + self.bias_size
        self.index_dtype = torch.int32 if self.size < 2**31 else torch.int64  # half the bytes on disk
        self.l1 = 0.0  # gradient pull lambda / N, set by lottery_ticket
        self.register_buffer("indices", torch.empty(0, dtype=self.index_dtype, device=weight.device))
        self.values = nn.Parameter(torch.empty(0, dtype=master_dtype(weight), device=weight.device))
        self.register_buffer("saved", None, persistent=False)  # the K base entries a merge overwrote
        self.densify()

    # -- the diff's support -----------------------------------------------------------------------
    def set_support(self, indices: Tensor, values: Tensor) -> None:
        """Replace the diff by (indices, values); a new parameter, keeping whether it trains."""
        trains = self.values.requires_grad
        self.indices = indices.to(self.index_dtype)
        self.values = nn.Parameter(values.detach().to(self.values.dtype).clone(), requires_grad=trains)

    def densify(self) -> None:
        """Every entry, value 0: the start of phase 1 (full fine-tuning of this layer)."""
        device = self.indices.device
        self.set_support(torch.arange(self.size, device=device), torch.zeros(self.size, device=device))

    def resize(self, state: Mapping[str, Tensor]) -> None:
        """Allocate to a saved diff's K, checking it fits this layer (see core/protocol.py Resizable)."""
        indices, values = state.get("indices"), state.get("values")
        if indices is None or values is None:
            raise ValueError("lt_sft diff needs 'indices' and 'values' tensors")
        if indices.dim() != 1 or values.dim() != 1 or indices.numel() != values.numel():
            raise ValueError(f"lt_sft indices {tuple(indices.shape)} and values {tuple(values.shape)} must be 1-D "
                             "and of equal length")
        if indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"lt_sft indices must be int32 or int64, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.size):
            raise ValueError(f"lt_sft indices must lie in [0, {self.size}) for this layer {self.shape} "
                             f"(found {int(indices.min())}..{int(indices.max())}; a diff for another layer?)")
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise ValueError("lt_sft indices must be strictly increasing (sorted, no duplicates)")
        self.set_support(indices.to(self.indices.device), torch.zeros(values.shape, device=self.values.device))

    def dense(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor | None]:
        """(delta W (out, in), delta b (out,) or None) with the diff scattered in."""
        values = self.values if self.l1 == 0 else _L1Pull.apply(self.values, self.l1)
        values = values if dtype is None else values.to(dtype)
        flat = values.new_zeros(self.size).index_put((self.indices.long(),), values)  # (out * in + out,)
        weight = flat[: math.prod(self.shape)].view(self.shape)
        return weight, (flat[-self.bias_size:] if self.bias_size else None)

    def delta_weight(self) -> Tensor:
        return self.dense()[0]

    # -- the Adapter contract -----------------------------------------------------------------------
    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        if self.values.numel() > self.size * _SPARSE_BELOW:  # phase 1 (dense): a plain matmul is cheaper
            weight, bias = self.dense()
            return F.linear(x, as_compute(weight, x), None if bias is None else as_compute(bias, x))  # (..., out)
        values = self.values if self.l1 == 0 else _L1Pull.apply(self.values, self.l1)
        values = as_compute(values, x)
        split = int(torch.searchsorted(self.indices, math.prod(self.shape)))  # weight entries first, then bias
        index = self.indices[:split].long()
        rows, cols = index // self.shape[1], index % self.shape[1]
        flat = x.reshape(-1, self.shape[1])  # (N, in)
        out = _SparseLinear.apply(flat, values[:split], rows, cols, self.shape[0])  # (N, out): K*N work, not out*in*N
        if self.bias_size:
            bias = values.new_zeros(self.bias_size).index_put((self.indices[split:].long() - math.prod(self.shape),),
                                                              values[split:])
            out = out + bias
        return out.reshape(*x.shape[:-1], self.shape[0])

    def _flat(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        return torch.cat([weight.reshape(-1), bias.reshape(-1)]) if self.bias_size and bias is not None \
            else weight.reshape(-1).clone()

    def _split(self, flat: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        new_w = flat[: weight.numel()].view_as(weight)
        return new_w, (flat[weight.numel():].view_as(bias) if self.bias_size and bias is not None else bias)

    def merge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        index = self.indices.long()
        flat = self._flat(weight, bias)
        self.saved = flat[index].clone()  # revert writes these back: exact, unlike W + v - v in floating point
        flat[index] += self.values.detach().to(flat.dtype)
        return self._split(flat, weight, bias)

    def unmerge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.saved is None:
            raise AdapterKitError("lt_sft: revert (unmerge) called on a diff that is not applied")
        flat = self._flat(weight, bias)
        flat[self.indices.long()] = self.saved.to(flat.dtype)
        self.saved = None  # type: ignore[assignment]  # a buffer slot: None until the next merge
        return self._split(flat, weight, bias)


_SPARSE_BELOW = 0.05  # density under which the unmerged forward uses the sparse product
_CHUNK = 8192  # entries per chunk of the values' gradient: bounds its (N, chunk) scratch


class _SparseLinear(torch.autograd.Function):
    """y = x dW^T for dW with K entries (rows, cols, values); every pass costs O(K N), not O(out in N)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, rows: Tensor, cols: Tensor, out_features: int) -> Tensor:
        ctx.save_for_backward(x, values, rows, cols)
        ctx.out_features = out_features
        sparse = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (out_features, x.shape[1]),
                                         check_invariants=False, is_coalesced=True)  # sorted, unique
        return torch.sparse.mm(sparse, x.t()).t()  # (N, out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        x, values, rows, cols = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            sparse_t = torch.sparse_coo_tensor(torch.stack([cols, rows]), values, (x.shape[1], ctx.out_features),
                                               check_invariants=False)
            grad_x = torch.sparse.mm(sparse_t, grad.t()).t()  # (N, in) = grad dW
        if ctx.needs_input_grad[1]:
            # d/d values[k] = sum_n grad[n, rows[k]] x[n, cols[k]], in chunks of entries
            parts = [(grad[:, r] * x[:, c]).sum(0) for r, c in zip(rows.split(_CHUNK), cols.split(_CHUNK), strict=True)]
            grad_values = torch.cat(parts) if parts else values.new_zeros(0)
        return grad_x, grad_values, None, None, None


class _L1Pull(torch.autograd.Function):
    """Identity forward; backward adds d/dphi of (lambda / N) sum |phi|, the reference code's L1 term."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, coefficient: float) -> Tensor:
        ctx.save_for_backward(values)
        ctx.coefficient = coefficient
        return values.view_as(values)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (values,) = ctx.saved_tensors
        return grad + ctx.coefficient * torch.sign(values), None


def diffs(model: nn.Module, name: str) -> list[SparseDiff]:
    """The SparseDiff of adapter ``name`` on every layer it adapts, in model order."""
    found = []
    for module in model.modules():
        host = host_of(module)
        if host is not None and name in host.names():
            adapter = host.adapter(name)
            if not isinstance(adapter, SparseDiff):
                raise AdapterKitError(f"adapter {name!r} is {type(adapter).__name__}, not an lt_sft diff")
            found.append(adapter)
    if not found:
        raise AdapterKitError(f"no lt_sft adapter named {name!r} on this model")
    return found


@torch.no_grad()
def keep_top_k(model: nn.Module, name: str, k: int | None = None) -> int:
    """Keep the K entries of largest |phi| over all of ``name``'s layers (one global threshold) and reset them to
    0 (theta0). Returns the number kept."""
    parts = diffs(model, name)
    k = parts[0].spec.k if k is None else k
    scores = torch.cat([d.values.detach().abs().float() for d in parts])  # (sum of entries,)
    k = min(k, scores.numel())
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen[torch.topk(scores, k, sorted=False).indices] = True
    for diff, keep in zip(parts, chosen.split([d.values.numel() for d in parts]), strict=True):
        kept = diff.indices[keep]  # stays sorted: a boolean selection keeps the order
        diff.set_support(kept, torch.zeros(kept.shape, device=kept.device))
    return k


def lottery_ticket(model: nn.Module, name: str, train: Callable[[], Any], k: int | None = None,
                   l1_full: float = 0.0, l1_sparse: float = 0.0) -> int:
    """Run LT-SFT on the attached diff ``name``: phase 1 (dense diff), top-K, reset, phase 2 (sparse diff).

    ``train`` trains whatever requires grad and builds its own optimizer on each call (the diff's parameter is
    replaced between phases, and the paper uses a fresh optimizer and schedule). Every other trainable tensor
    (e.g. the head) is reset to its value before phase 1, as the paper resets all parameters. ``l1_*`` are the
    paper's lambda for each phase (divided by N, the number of target entries). Returns K.
    """
    require(l1_full >= 0 and l1_sparse >= 0, f"lt_sft: l1 weights must be >= 0, got {l1_full}, {l1_sparse}")
    parts = diffs(model, name)
    for diff in parts:
        diff.densify()
    own = {id(d.values) for d in parts}
    snapshot = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad and id(p) not in own]
    total = sum(d.size for d in parts)
    try:
        for diff in parts:
            diff.l1 = l1_full / total
        train()
        kept = keep_top_k(model, name, k)
        with torch.no_grad():
            for param, value in snapshot:
                param.copy_(value)
        for diff in parts:
            diff.l1 = l1_sparse / total
        train()
    finally:
        for diff in parts:
            diff.l1 = 0.0
    return kept


@torch.no_grad()
def add_diff(model: nn.Module, into: str, other: str) -> None:
    """phi_into <- phi_into + phi_other on every layer (union of supports): one diff applying both."""
    targets, sources = diffs(model, into), diffs(model, other)
    if len(targets) != len(sources) or any(t.size != s.size for t, s in zip(targets, sources, strict=True)):
        raise AdapterKitError(f"lt_sft: {into!r} and {other!r} adapt different layers; cannot add them")
    for target, source in zip(targets, sources, strict=True):
        flat = target.values.new_zeros(target.size)  # (entries,): a dense scratch, sums overlapping entries
        flat.index_put_((target.indices.long(),), target.values.detach())
        flat.index_put_((source.indices.long(),), source.values.detach().to(flat.dtype), accumulate=True)
        union = torch.unique(torch.cat([target.indices, source.indices]).long())  # sorted
        target.set_support(union, flat[union])
