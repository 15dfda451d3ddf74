"""Gradient checkpointing policies for a frozen base with adapters.

``full`` is transformers' checkpointing: each layer keeps only its input and re-runs its whole forward during
backward. With a frozen base that re-run is a large share of the step (backward computes no weight gradients, so
one extra forward costs ~50% instead of ~33% for full fine-tuning).

``selective`` keeps the results of the expensive operations -- matmuls whose inner dimension is large (the base
projections) and attention -- and recomputes the rest (norms, activations, rotary, residual adds, the adapters'
rank-r products) in backward, with torch's selective activation checkpointing. The recompute then costs a few
elementwise passes instead of a forward; memory falls less than with ``full`` because the projections' outputs
stay. It pays where the matmuls dominate (large models on a GPU; not measured yet). On a small CPU model it is no
faster than ``full`` (benchmarks/RESULTS.md: 1.52x vs 1.44x the unchecked step): torch routes every op of the
region through a Python dispatch mode to apply the policy, and at that size the bookkeeping eats the saving.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from adapterkit.core.context import no_inplace

POLICIES = ("full", "selective")
_ATTENTION = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
_MATMULS = ("mm", "addmm", "bmm")
CHEAP_INNER = 128  # a matmul over at most this many inner features (an adapter's rank) is recomputed


def _op_name(op: Any) -> str:
    return str(getattr(op, "_opname", getattr(op, "__name__", ""))).split(".")[0]


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    name = _op_name(op)
    if name in _ATTENTION:
        return CheckpointPolicy.MUST_SAVE
    if name in _MATMULS:
        weight = args[-1] if name != "addmm" else args[2]  # mm(a, b), bmm(a, b), addmm(bias, a, b)
        if isinstance(weight, torch.Tensor) and weight.shape[-2] > CHEAP_INNER:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(policy: str) -> dict[str, Any]:
    """Keyword arguments for ``torch.utils.checkpoint.checkpoint`` (transformers'
    ``gradient_checkpointing_kwargs``) under ``policy`` ("full" or "selective")."""
    if policy not in POLICIES:
        raise ValueError(f"gradient checkpointing policy must be one of {POLICIES}, got {policy!r}")
    kwargs: dict[str, Any] = {"use_reentrant": False}  # non-reentrant: works with a frozen base
    if policy == "selective":
        kwargs["context_fn"] = _selective_contexts
    return kwargs


def _selective_contexts() -> tuple[Any, Any]:
    """torch's selective-checkpoint contexts for the forward and the recompute, each also turning off in-place
    deltas: the cached output of a base projection must stay the base output."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    forward, recompute = create_selective_checkpoint_contexts(_policy)
    return _without_inplace(forward), _without_inplace(recompute)


@contextlib.contextmanager
def _without_inplace(context: Any) -> Iterator[None]:
    with no_inplace(), context:
        yield
