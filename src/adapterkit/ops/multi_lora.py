"""Per-example LoRA, one entry point: the Triton shrink/expand kernels on GPU, the torch gathered path elsewhere.

``ADAPTERKIT_KERNELS`` (read at each call) forces a path:

- ``auto`` (default): Triton when the activations are on CUDA in bf16, fp16 or fp32, triton imports, no gradient
  is needed (the kernels have no backward) and the rank is at most 128; the torch gathered path otherwise (CPU
  tensors always, even under TRITON_INTERPRET=1).
- ``torch``: always the gathered path (``ops/gathered.py``).
- ``triton``: always the kernels; a one-line error when they cannot run (triton missing, a gradient needed, or CPU
  tensors while triton was imported without ``TRITON_INTERPRET=1``; with it, they run interpreted on the CPU).

triton stays optional: it is imported only on the first call that wants the kernels.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from functools import cache
from types import ModuleType

import torch
from torch import Tensor

from adapterkit.ops.gathered import Segments, gathered_lora

ENV = "ADAPTERKIT_KERNELS"
_CHOICES = frozenset(("auto", "torch", "triton"))
_KERNEL_DTYPES = frozenset((torch.bfloat16, torch.float16, torch.float32))


@cache
def _kernels() -> ModuleType | str:
    """The kernel module, or why it cannot be loaded (triton absent or broken)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'adapterkit[gpu]')"
    try:
        return importlib.import_module("adapterkit.ops.triton_lora")
    except Exception as error:  # a broken triton install must not break the torch path
        return f"triton failed to import ({type(error).__name__}: {error})"


def kernel_path(x: Tensor, a_stack: Tensor) -> str:
    """"triton" or "torch": the path ``multi_lora`` takes for these operands under ``ADAPTERKIT_KERNELS``.

    Raises:
        ValueError: ``ADAPTERKIT_KERNELS`` holds an unknown value, or is "triton" where the kernels cannot run.
    """
    choice = os.environ.get(ENV, "auto")  # read at every call (~1 us): a benchmark may flip it between runs
    if choice not in _CHOICES:
        choice = choice.strip().lower() or "auto"
    if choice == "torch":
        return "torch"
    if choice not in ("auto", "triton"):
        raise ValueError(f"{ENV}={choice!r}: expected one of auto, torch, triton")
    if choice == "auto" and not x.is_cuda:  # the interpreter runs only when asked for by name
        return "torch"
    problem = _why_not(x, a_stack, _kernels())
    if problem is None:
        return "triton"
    if choice == "triton":
        raise ValueError(f"{ENV}=triton: {problem}")
    return "torch"


def _why_not(x: Tensor, a_stack: Tensor, kernels: ModuleType | str) -> str | None:
    """Why the kernels cannot take these operands, or None when they can."""
    if isinstance(kernels, str):
        return kernels
    if torch.is_grad_enabled() and (x.requires_grad or a_stack.requires_grad):
        return "the kernels have no backward; a gradient is needed here"
    if x.dtype not in _KERNEL_DTYPES:
        return f"dtype {x.dtype} is not one of bfloat16, float16, float32"
    if a_stack.shape[1] > kernels.MAX_RANK:
        return f"rank {a_stack.shape[1]} is above the kernels' {kernels.MAX_RANK}"
    if not x.is_cuda and not kernels.INTERPRETED:
        return (f"tensors are on {x.device.type}; the kernels run on CUDA, or on the CPU only with "
                "TRITON_INTERPRET=1 set before triton is imported")
    return None


def multi_lora(x: Tensor, a_stack: Tensor, b_stack: Tensor, slots: Tensor, ranks: Tensor | None = None,
               into: Tensor | None = None, groups: Segments | None = None) -> Tensor:
    """The per-example delta ``x[b] @ A[slots[b]]^T @ B[slots[b]]^T`` (``gathered_lora``'s signature), or, with
    ``into``, ``into`` plus that delta, accumulated in place (the caller vouches that ``into`` may be overwritten).

    Args:
        x: (B, ..., in) activations, batch first.
        a_stack: (slots, r_max, in) stacked A factors; b_stack: (slots, out, r_max), from ``stack_factors``.
        slots: (B,) int64 slot of each row.
        ranks: (slots,) int32 rank of each slot; the kernels skip rank-0 slots and read only a
            slot's own rank. None: every slot counts as full rank (zero-padded slots still give a zero delta).
        into: (B, ..., out) tensor to add the delta to in place, typically the base layer's output.
        groups: ``gathered.segments(slots)``, lets the torch path skip the gather (the kernels need no grouping).
    """
    if kernel_path(x, a_stack) == "torch":
        delta = gathered_lora(x, a_stack, b_stack, slots, groups)
        return delta if into is None else into.add_(delta)
    kernels = _kernels()
    assert not isinstance(kernels, str)  # kernel_path said "triton"
    if ranks is None:
        ranks = torch.full((a_stack.shape[0],), a_stack.shape[1], dtype=torch.int32, device=x.device)
    if into is None:
        into = torch.zeros(*x.shape[:-1], b_stack.shape[1], dtype=x.dtype, device=x.device)  # (B, ..., out)
    return kernels.triton_lora_(into, x, a_stack, b_stack, slots, ranks)
