"""Gathered low-rank products: one adapter per example in a batch, without a Python loop over adapters.

    delta[b] = x[b] @ A[slot[b]]^T @ B[slot[b]]^T        x: (batch, tokens, in), A: (slots, r, in), B: (slots, out, r)

Each example's factors are gathered (a few KB per example) and two batched matmuls do the rest; ranks are mixed by
zero-padding the stacks to the largest rank, which changes nothing in the result.

When every slot in use holds the same number of rows (each row its own adapter, or balanced groups), ``Segments``
lets the two matmuls run over a view of the stacks instead: no copy of the adapters' weights, which at a decode step
(one token per row) is most of the adapter cost, as the copy moves more bytes than the matmuls read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Segments:
    """Rows grouped by slot: slots ``first .. first + count - 1`` each hold ``per_slot`` rows; ``order`` lists the
    rows sorted by slot (stable), None when they already are."""

    first: int
    count: int
    per_slot: int
    order: Tensor | None


def segments(slots: Tensor, device: torch.device | None = None) -> Segments | None:
    """The grouping of ``slots`` (batch,) when the slots in use are contiguous and equally filled, else None.

    Reads the slots as Python numbers: pass a host copy (no device sync) and compute it once per batch
    (``SelectPlan.memo``), not per layer; ``order`` is placed on ``device`` (default: the slots' device).
    """
    values = slots.tolist()
    counts = Counter(values)
    used = sorted(counts)
    if not used or used[-1] - used[0] + 1 != len(used) or len(set(counts.values())) != 1:
        return None
    per_slot = counts[used[0]]
    in_order = all(a <= b for a, b in zip(values, values[1:], strict=False))
    order = None if in_order else torch.argsort(slots, stable=True).to(device or slots.device)
    return Segments(used[0], len(used), per_slot, order)


def gathered_lora(x: Tensor, a_stack: Tensor, b_stack: Tensor, slots: Tensor, groups: Segments | None = None
                  ) -> Tensor:
    """The per-example low-rank delta; ``slots`` (batch,) indexes the stacks (a zero slot gives no change).

    With ``groups`` (``segments(slots)``) the rows run grouped over a view of the stacks when that moves fewer
    bytes than gathering the factors: always when the rows are already in slot order, and when sorting them costs
    less (fewer tokens per row than the rank).
    """
    batch, features = x.shape[0], x.shape[-1]
    flat = x.reshape(batch, -1, features)  # (B, T, in)
    if groups is not None and (groups.order is None or flat.shape[1] < a_stack.shape[1]):
        return _grouped(flat, a_stack, b_stack, groups).reshape(*x.shape[:-1], b_stack.shape[1])
    # index_select, not a_stack[slots]: the advanced-indexing kernel is ~7x slower on CPU for this gather (64
    # slots of 2048 x 16 floats: 2.6 ms vs 0.38 ms), which was most of a decode step's adapter cost
    h = torch.bmm(flat, torch.index_select(a_stack, 0, slots).transpose(1, 2))  # (B, T, r)
    delta = torch.bmm(h, torch.index_select(b_stack.transpose(1, 2), 0, slots))  # (B, T, out)
    return delta.reshape(*x.shape[:-1], b_stack.shape[1])


def _grouped(flat: Tensor, a_stack: Tensor, b_stack: Tensor, groups: Segments) -> Tensor:
    """``gathered_lora`` over row groups: (B, T, in) -> (B, T, out), the stacks read in place."""
    batch, tokens, features = flat.shape
    if groups.order is not None:
        flat = flat.index_select(0, groups.order)  # rows sorted by slot
    lo, hi = groups.first, groups.first + groups.count
    grouped = flat.reshape(groups.count, groups.per_slot * tokens, features)  # (slots used, rows x T, in)
    h = torch.bmm(grouped, a_stack[lo:hi].transpose(1, 2))  # (slots used, rows x T, r)
    delta = torch.bmm(h, b_stack[lo:hi].transpose(1, 2)).reshape(batch, tokens, -1)  # sorted rows
    if groups.order is None:
        return delta
    return torch.empty_like(delta).index_copy_(0, groups.order, delta)  # back to the batch's row order


def stack_factors(factors: Sequence[tuple[Tensor, Tensor] | None], like: Tensor) -> tuple[Tensor, Tensor]:
    """Stack (A, B) pairs of ranks r_i into (n + 1, r_max, in) and (n + 1, out, r_max); the last slot (and any
    None) is all zeros. Built without autograd: the stacks serve inference.

    The B stack is a transposed view of (n + 1, r_max, out) memory: the products read B^T row by row, which on a
    CPU makes the expand step 2-4x faster than over (out, r_max) rows (a decode step's 64 x (1 x 16 @ 16 x 2048):
    0.30 ms vs 0.62 ms); the Triton kernels take any strides and read it coalesced along ``out``."""
    present = [f for f in factors if f is not None]
    r_max = max(a.shape[0] for a, _ in present)
    features_in, features_out = present[0][0].shape[1], present[0][1].shape[0]
    with torch.no_grad():
        a_stack = torch.zeros(len(factors) + 1, r_max, features_in, dtype=like.dtype, device=like.device)
        b_stack = torch.zeros(len(factors) + 1, r_max, features_out, dtype=like.dtype,
                              device=like.device).transpose(1, 2)
        for index, pair in enumerate(factors):
            if pair is not None:
                a, b = pair
                a_stack[index, : a.shape[0]] = a
                b_stack[index, :, : b.shape[1]] = b
    return a_stack, b_stack
