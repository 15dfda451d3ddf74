"""Gathered low-rank products: one adapter per example in a batch, without a Python loop over adapters.

    delta[b] = x[b] @ A[slot[b]]^T @ B[slot[b]]^T        x: (batch, tokens, in), A: (slots, r, in), B: (slots, out, r)

Each example's factors are gathered (a few KB per example) and two batched matmuls do the rest; ranks are mixed by
zero-padding the stacks to the largest rank, which changes nothing in the result.

``Segments`` lets the two matmuls run over the stacks of the slots in use instead: rows are laid out by slot, each
slot's group padded to the largest one, and two batched matmuls run over (slots in use) x (rows of the largest
group). No per-row copy of the adapters' weights is made, which at a decode step (one token per row) is most of the
adapter cost, as the copy moves far more bytes than the matmuls read: 32 rows of rank-16 factors for a 576 x 1536
layer are 4.4 MB a layer, the rows themselves 74 KB.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Segments:
    """Rows grouped by slot. The slots in use are ``used`` (sorted), or ``first .. first + count - 1`` when
    ``used`` is None (contiguous: the stacks are read as a view); each group is padded to ``per_slot`` rows.
    ``dest[b]`` is row b's place in that padded (count * per_slot) layout, None when it is the identity (groups
    already equal and in slot order: the rows are used as they are)."""

    first: int
    count: int
    per_slot: int
    dest: Tensor | None
    used: Tensor | None = None

    @property
    def padded(self) -> int:
        """Rows of the padded layout."""
        return self.count * self.per_slot


def segments(slots: Tensor, device: torch.device | None = None) -> Segments | None:
    """The grouping of ``slots`` (batch,) by slot (None for an empty batch).

    Reads the slots as Python numbers: pass a host copy (no device sync) and compute it once per batch
    (``SelectPlan.memo``), not per layer; tensors are placed on ``device`` (default: the slots' device).
    """
    values = slots.tolist()
    if not values:
        return None
    counts = Counter(values)
    used = sorted(counts)
    per_slot = max(counts.values())
    place = {slot: i for i, slot in enumerate(used)}
    seen: Counter = Counter()
    dest = []
    for slot in values:
        dest.append(place[slot] * per_slot + seen[slot])
        seen[slot] += 1
    device = device or slots.device
    contiguous = used[-1] - used[0] + 1 == len(used)
    identity = len(used) * per_slot == len(values) and dest == list(range(len(values)))  # equal groups, in order
    return Segments(used[0], len(used), per_slot, None if identity else torch.tensor(dest, device=device),
                    None if contiguous else torch.tensor(used, device=device))


def gathered_lora(x: Tensor, a_stack: Tensor, b_stack: Tensor, slots: Tensor, groups: Segments | None = None
                  ) -> Tensor:
    """The per-example delta; ``slots`` (batch,) indexes the stacks (a zero slot gives no change).

    With ``groups`` (``segments(slots)``) the rows run grouped over the stacks when that moves fewer bytes than
    gathering each row's factors: always when the rows are already laid out by slot, and otherwise when a row has
    fewer tokens than the rank (a decode step) and padding at most doubles the rows.
    """
    batch, features = x.shape[0], x.shape[-1]
    flat = x.reshape(batch, -1, features)  # (B, T, in)
    if groups is not None and (groups.dest is None or (flat.shape[1] < a_stack.shape[1]
                                                       and groups.padded <= 2 * batch)):
        return _grouped(flat, a_stack, b_stack, groups).reshape(*x.shape[:-1], b_stack.shape[1])
    # index_select, not a_stack[slots]: the advanced-indexing kernel is ~7x slower on CPU for this gather (64
    # slots of 2048 x 16 floats: 2.6 ms vs 0.38 ms)
    h = torch.bmm(flat, torch.index_select(a_stack, 0, slots).transpose(1, 2))  # (B, T, r)
    delta = torch.bmm(h, torch.index_select(b_stack.transpose(1, 2), 0, slots))  # (B, T, out)
    return delta.reshape(*x.shape[:-1], b_stack.shape[1])


def _grouped(flat: Tensor, a_stack: Tensor, b_stack: Tensor, groups: Segments) -> Tensor:
    """``gathered_lora`` over padded row groups: (B, T, in) -> (B, T, out), the used slots' stacks read once."""
    _, tokens, features = flat.shape
    if groups.dest is not None:  # rows into their group's places; padding rows stay zero
        flat = flat.new_zeros(groups.padded, tokens, features).index_copy_(0, groups.dest, flat)
    if groups.used is None:
        a, b = a_stack[groups.first:groups.first + groups.count], b_stack[groups.first:groups.first + groups.count]
    else:
        a, b = a_stack.index_select(0, groups.used), b_stack.index_select(0, groups.used)
    grouped = flat.reshape(groups.count, groups.per_slot * tokens, features)  # (slots used, rows x T, in)
    h = torch.bmm(grouped, a.transpose(1, 2))  # (slots used, rows x T, r)
    delta = torch.bmm(h, b.transpose(1, 2)).reshape(groups.padded, tokens, -1)  # padded layout
    return delta if groups.dest is None else delta.index_select(0, groups.dest)  # back to the batch's rows


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
