"""Task-vector merging math (TIES, Yadav et al. 2023, https://arxiv.org/abs/2306.01708; DARE, Yu et al. 2023,
https://arxiv.org/abs/2311.03099), defined exactly as peft 0.21.2's ``peft.utils.merge_utils`` defines it.

Every function takes K same-shaped task tensors and K weights and returns one tensor. Nothing here draws random
numbers from the global generator: DARE takes its keep-masks as arguments, and ``random_mask`` draws one from a
given ``torch.Generator`` the way peft's ``torch.bernoulli`` draws it, so the same seed gives the same mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

SIGN_METHODS = ("total", "frequency")
MERGES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # the task-tensor mixes below


def _weighted(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """(K, ...) stack of ``weights[k] * tensors[k]``."""
    stacked = torch.stack(list(tensors))
    scale = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    return stacked * scale.reshape((-1,) + (1,) * (stacked.dim() - 1))


def magnitude_prune(tensor: Tensor, density: float) -> Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest (density >= 1: unchanged)."""
    if density >= 1:
        return tensor
    k = int(density * tensor.numel())
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    keep[torch.topk(tensor.abs().reshape(-1), k=k).indices] = 1
    return tensor * keep.reshape(tensor.shape)


def random_mask(shape: Sequence[int], density: float, generator: torch.Generator,
                device: torch.device | str = "cpu") -> Tensor:
    """A float32 0/1 mask, each entry 1 with probability ``density``: ``torch.bernoulli`` on a float32 tensor, as
    peft draws it for float32 adapters (bernoulli on float64 consumes the stream differently)."""
    return torch.bernoulli(torch.full(tuple(shape), density, dtype=torch.float32, device=device), generator=generator)


def drop_and_rescale(tensor: Tensor, density: float, mask: Tensor | None) -> Tensor:
    """DARE's sparsification: keep the entries where ``mask`` is 1 and divide by ``density`` so the expectation is
    unchanged. density >= 1 (no mask needed): unchanged, as peft."""
    if density >= 1:
        return tensor
    if mask is None:
        raise ValueError(f"drop_and_rescale: density {density} < 1 needs a keep-mask")
    return tensor * mask.to(tensor.dtype) / density


def majority_sign_mask(stacked: Tensor, method: str = "total") -> Tensor:
    """For a (K, ...) stack, True where an entry's sign equals the elected sign: the sign of the sum ("total") or
    of the sign count ("frequency"); ties and zero sums elect +. Zero entries never match."""
    sign = stacked.sign()
    if method == "total":
        magnitude = stacked.sum(dim=0)
    elif method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise ValueError(f"majority sign method must be one of {SIGN_METHODS}, got {method!r}")
    return sign == torch.where(magnitude >= 0, 1, -1).to(sign.dtype)


def disjoint_merge(stacked: Tensor, mask: Tensor) -> Tensor:
    """Mean over the K entries that agree with the elected sign (sum / count, count at least 1)."""
    kept = (stacked * mask).sum(dim=0)
    return kept / torch.clamp(mask.sum(dim=0), min=1.0)


def task_arithmetic(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_k weights[k] * tensors[k] (negative weights negate a task)."""
    return _weighted(tensors, weights).sum(dim=0)


def magnitude_prune_sum(tensors: Sequence[Tensor], weights: Sequence[float], density: float) -> Tensor:
    """Weighted sum of each tensor pruned to its largest-magnitude ``density`` fraction."""
    return task_arithmetic([magnitude_prune(t, density) for t in tensors], weights)


def ties(tensors: Sequence[Tensor], weights: Sequence[float], density: float, method: str = "total") -> Tensor:
    """TIES: prune each by magnitude, elect signs on the pruned (unweighted) tensors, then the disjoint mean of the
    weighted ones."""
    pruned = [magnitude_prune(t, density) for t in tensors]
    mask = majority_sign_mask(torch.stack(pruned), method)
    return disjoint_merge(_weighted(pruned, weights), mask)


def dare_linear(tensors: Sequence[Tensor], weights: Sequence[float], density: float,
                masks: Sequence[Tensor | None]) -> Tensor:
    """DARE: drop entries at random (``masks[k]`` for tensor k), rescale by 1 / density, weighted sum."""
    return task_arithmetic([drop_and_rescale(t, density, m) for t, m in zip(tensors, masks, strict=True)], weights)


def dare_ties(tensors: Sequence[Tensor], weights: Sequence[float], density: float, masks: Sequence[Tensor | None],
              method: str = "total") -> Tensor:
    """DARE's random drop and rescale, then TIES's sign election and disjoint mean."""
    dropped = [drop_and_rescale(t, density, m) for t, m in zip(tensors, masks, strict=True)]
    mask = majority_sign_mask(torch.stack(dropped), method)
    return disjoint_merge(_weighted(dropped, weights), mask)


def mix(how: str, tensors: Sequence[Tensor], weights: Sequence[float], density: float = 1.0,
        masks: Sequence[Tensor | None] | None = None, method: str = "total") -> Tensor:
    """One of ``MERGES`` by name (``masks``: DARE's keep-masks, one per tensor, when density < 1)."""
    if not tensors or len(tensors) != len(weights):
        raise ValueError(f"mix: need one weight per tensor, got {len(tensors)} tensors and {len(weights)} weights")
    drawn: Sequence[Tensor | None] = [None] * len(tensors) if masks is None else masks
    if how == "linear":
        return task_arithmetic(tensors, weights)
    if how == "ties":
        return ties(tensors, weights, density, method)
    if how == "dare_linear":
        return dare_linear(tensors, weights, density, drawn)
    if how == "dare_ties":
        return dare_ties(tensors, weights, density, drawn, method)
    if how == "magnitude_prune":
        return magnitude_prune_sum(tensors, weights, density)
    raise ValueError(f"mix: unknown merge {how!r}; expected one of {MERGES}")
