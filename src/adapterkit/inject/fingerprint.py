"""Base-model fingerprints: the shapes of a target's own weights and a hash of a fixed sample of them.

Hashing a strided sample (at most 4096 values per tensor) keeps fingerprinting a 7B model fast while still
telling two checkpoints of the same architecture apart.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from adapterkit.core.host import HOST_ATTR

_SAMPLES = 4096


def tensor_digest(tensor: torch.Tensor) -> str:
    """Short hash of a strided sample of ``tensor`` (computed in float64 so dtype moves do not matter)."""
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLES)
    sample = flat[::step][:_SAMPLES].to("cpu", torch.float64).numpy().round(6)
    return hashlib.sha256(sample.tobytes()).hexdigest()[:16]


def module_fingerprint(module: nn.Module) -> dict[str, object]:
    """{"shapes": {param: shape}, "hash": digest} over a module's own parameters (not its adapters)."""
    shapes: dict[str, list[int]] = {}
    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        if HOST_ATTR in name.split("."):
            continue
        logical = getattr(getattr(param, "quant_state", None), "shape", None)  # a 4-bit weight's real shape
        shapes[name] = list(logical if logical is not None else param.shape)
        digest.update(tensor_digest(param).encode())
    return {"shapes": shapes, "hash": digest.hexdigest()[:16]}
