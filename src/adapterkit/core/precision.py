"""The precision policy: adapter weights are float32 masters, activations keep the base model's dtype.

On a bf16/fp16 base, adapter parameters are created in float32 (so AdamW updates are not rounded away) and
cast to the activation dtype where they are used. Casting the small weights, never the (batch, tokens, features)
activations, keeps the adapter's activation memory and the base model's kernels unchanged. peft's default
instead keeps float32 adapters and casts the activations to them, which doubles a LoRA step's cost on a GPU
(see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

_LOW = (torch.float16, torch.bfloat16)


def master_dtype(like: Tensor) -> torch.dtype:
    """float32 for low-precision or integer (quantised) base weights, else the base weight's dtype."""
    if not like.is_floating_point() or like.dtype in _LOW:
        return torch.float32
    return like.dtype


def as_compute(weight: Tensor, activation: Tensor) -> Tensor:
    """``weight`` in the activation's dtype (a no-op when they match); gradients flow to the master."""
    if activation.is_floating_point() and weight.dtype != activation.dtype:
        return weight.to(activation.dtype)
    return weight
