"""Low-rank approximation of a weight delta: the best rank-r factors (Eckart-Young) and how much they miss."""

from __future__ import annotations

import torch
from torch import Tensor


def truncated_svd(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """``delta`` (out, in) ~ ``b @ a`` with ``b``: (out, r), ``a``: (r, in), r = min(rank, out, in); also the relative
    Frobenius error ||delta - b a|| / ||delta|| (0 for a zero delta). Computed in float64; the singular values are
    split evenly between the factors (sqrt on each side), as peft's svd merges do."""
    if rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    full = delta.detach().to(torch.float64).reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(full, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b, a = u[:, :r] * root, root[:, None] * vh[:r]
    norm = float(torch.linalg.matrix_norm(full))
    error = float(torch.linalg.matrix_norm(full - b @ a)) / norm if norm > 0 else 0.0
    return b, a, error
