"""Gradient checkpointing over a frozen base: the input embeddings' output requires grad while it is on.

Reentrant checkpointing (``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)``, transformers' default)
runs each segment's forward under ``no_grad`` and gives gradients only if one of the segment's *inputs* requires
grad. With a frozen base, the first segment's input -- the output of the input embeddings -- does not, so nothing
inside any segment (every adapter) gets a gradient: the backward fails with "element 0 of tensors does not require
grad", or, with a trainable head after the last segment, silently trains the head alone.

``enable_input_grads`` (called by ``train_only``) puts one forward hook on the model's ``get_input_embeddings()``
module that, only in training mode with grad enabled and while the model's ``gradient_checkpointing`` flags are
on, marks that output as requiring grad; in every other case it returns at once, so it costs one Python call per
forward and nothing else. Reading the flags at forward time makes it independent of the order of ``train_only``
and ``gradient_checkpointing_enable()``. Non-reentrant checkpointing needs none of this (gradients reach the
parameters inside a segment whatever its inputs); the hook then only adds the input gradient of the layers below
the first adapter. ``disable_input_grads`` (called by ``detach`` once no adapter is left) removes the hook.

A model without ``get_input_embeddings`` (or without transformers' ``gradient_checkpointing`` flags) is left
alone: with plain ``torch.utils.checkpoint`` pass ``use_reentrant=False``, or make the tensor that enters the
first checkpointed segment require grad (``x.requires_grad_()``) when it does not.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class InputGrads:
    """The forward hook: marks the input embeddings' output as requiring grad while checkpointing is on.

    It holds the modules that carry a ``gradient_checkpointing`` flag (found once, when it is placed) rather than
    the model, so a deep copy of the model copies a hook that reads the copy's flags.
    """

    def __init__(self, flagged: list[nn.Module]) -> None:
        self.flagged = flagged

    def checkpointing(self) -> bool:
        """Whether any flagged module has gradient checkpointing on (``model.is_gradient_checkpointing``)."""
        return any(getattr(module, "gradient_checkpointing", False) for module in self.flagged)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()) or not self.checkpointing():
            return
        hidden = output[0] if isinstance(output, tuple) else output
        if isinstance(hidden, torch.Tensor) and hidden.is_floating_point() and not hidden.requires_grad:
            hidden.requires_grad_(True)  # a tensor that needs no grad is a leaf: its flag may be set in place


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's input embeddings module (transformers' ``get_input_embeddings``), or None without one."""
    getter = getattr(model, "get_input_embeddings", None)
    if not callable(getter):
        return None
    try:
        found = getter()
    except (NotImplementedError, AttributeError):  # transformers' base class raises for models without one
        return None
    return found if isinstance(found, nn.Module) else None


def enable_input_grads(model: nn.Module) -> bool:
    """Place the hook on ``model``'s input embeddings (once); returns whether the model has it now."""
    embeddings = input_embeddings(model)
    if embeddings is None:
        return False
    if any(isinstance(hook, InputGrads) for hook in embeddings._forward_hooks.values()):
        return True
    flagged = [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]
    if not flagged:  # not a transformers model that can checkpoint: nothing would ever turn the hook on
        return False
    embeddings.register_forward_hook(InputGrads(flagged))
    return True


def disable_input_grads(model: nn.Module) -> None:
    """Remove the hook from every module of ``model`` (wherever it is now: the embeddings may have been replaced)."""
    for module in model.modules():
        for key in [k for k, hook in module._forward_hooks.items() if isinstance(hook, InputGrads)]:
            # what RemovableHandle.remove does; no handle is kept, so a copied model's hook is found the same way
            del module._forward_hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)


def has_input_grads(model: nn.Module) -> bool:
    """Whether any module of ``model`` carries the hook."""
    return any(isinstance(hook, InputGrads) for module in model.modules() for hook in module._forward_hooks.values())
