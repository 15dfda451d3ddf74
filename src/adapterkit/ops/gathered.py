"""Gathered low-rank products: one adapter per example in a batch, without a Python loop over adapters.

    delta[b] = x[b] @ A[slot[b]]^T @ B[slot[b]]^T        x: (batch, tokens, in), A: (slots, r, in), B: (slots, out, r)

Each example's factors are gathered (a few KB per example) and two batched matmuls do the rest; ranks are mixed by
zero-padding the stacks to the largest rank, which changes nothing in the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def gathered_lora(x: Tensor, a_stack: Tensor, b_stack: Tensor, slots: Tensor) -> Tensor:
    """The per-example low-rank delta; ``slots`` (batch,) indexes the stacks (a zero slot gives no change)."""
    batch, features = x.shape[0], x.shape[-1]
    flat = x.reshape(batch, -1, features)  # (B, T, in)
    h = torch.bmm(flat, a_stack[slots].transpose(1, 2))  # (B, T, r)
    delta = torch.bmm(h, b_stack[slots].transpose(1, 2))  # (B, T, out)
    return delta.reshape(*x.shape[:-1], b_stack.shape[1])


def stack_factors(factors: Sequence[tuple[Tensor, Tensor] | None], like: Tensor) -> tuple[Tensor, Tensor]:
    """Stack (A, B) pairs of ranks r_i into (n + 1, r_max, in) and (n + 1, out, r_max); the last slot (and any
    None) is all zeros. Built without autograd: the stacks serve inference."""
    present = [f for f in factors if f is not None]
    r_max = max(a.shape[0] for a, _ in present)
    features_in, features_out = present[0][0].shape[1], present[0][1].shape[0]
    with torch.no_grad():
        a_stack = torch.zeros(len(factors) + 1, r_max, features_in, dtype=like.dtype, device=like.device)
        b_stack = torch.zeros(len(factors) + 1, features_out, r_max, dtype=like.dtype, device=like.device)
        for index, pair in enumerate(factors):
            if pair is not None:
                a, b = pair
                a_stack[index, : a.shape[0]] = a
                b_stack[index, :, : b.shape[1]] = b
    return a_stack, b_stack
