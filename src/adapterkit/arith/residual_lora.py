"""A trained PiSSA / OLoRA adapter as a plain LoRA on the ORIGINAL base (peft's ``subtract_mutated_init``, what
``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes).

Such an adapter trains on a residual base: ``W = W_res + s B0 A0`` at the start, ``W_res + s B A`` after
training. Its change to the original weight is therefore ``s (B A - B0 A0) = s [B | -B0] [A ; A0]``: a LoRA of
rank 2r, exact by concatenation. As in peft, the converted LoRA keeps the scale by doubling alpha (alpha * sqrt 2
with rsLoRA), so it exports to peft's format with the same ``r`` / ``lora_alpha`` peft writes. It is attached to
the original model, whose base is untouched: its saves record the original base's fingerprint and load on any
fresh copy of it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from adapterkit.core.errors import AdapterKitError
from adapterkit.core.layers import read_weight
from adapterkit.core.tree import placements
from adapterkit.inject.engine import attach_at, detach
from adapterkit.methods.lora import LoRA
from adapterkit.methods.lora_init import RESIDUAL

# the original weight must equal the residual plus the initial delta to this many units of rounding of their
# dtype (times their size): a float32 residual is off by ~1 unit, another checkpoint by O(|W|)
_ROUNDING_UNITS = 64


class ResidualError(AdapterKitError, ValueError):
    """An adapter or base model that cannot be converted back to a plain LoRA as asked."""


def residual_to_lora(model: nn.Module, name: str, original: nn.Module, new_name: str | None = None) -> list[str]:
    """Attach to ``original`` (the base model before the PiSSA / OLoRA init) adapter ``new_name`` (default
    ``name``): the plain rank-2r LoRA whose delta on ``original`` gives what ``model`` computes with adapter
    ``name`` on its residual base. Returns the adapted paths.

    Each original weight is checked to be the residual plus the adapter's initial delta (a one-line
    ``ResidualError`` names the first module that is not: another base, or the residual model itself).
    """
    where = placements(model, name)
    if any(name in host.merged for _, _, host in where):
        raise ResidualError(f"residual_to_lora: adapter {name!r} is merged into {model.__class__.__name__}; unmerge "
                            "it first (the residual must be the base weight)")
    originals = dict(original.named_modules())
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    spec: LoRA | None = None
    for path, module, host in where:
        adapter = host.adapter(name)
        if not isinstance(adapter.spec, LoRA) or adapter.spec.init != RESIDUAL:
            raise ResidualError(f"residual_to_lora: adapter {name!r} at {path} is {adapter.spec.method} with "
                                f"init={getattr(adapter.spec, 'init', None)!r}, not one initialised from the base "
                                "weight (pissa / olora): it is a plain LoRA already")
        if path not in originals:
            raise ResidualError(f"residual_to_lora: the original model has no module {path!r} (another model?)")
        _check_original(path, module, originals[path], adapter)
        spec = spec or adapter.spec
        a, b = adapter.lora_a.detach(), adapter.lora_b.detach()
        a0, b0 = adapter.lora_a0.to(a.dtype), adapter.lora_b0.to(b.dtype)
        factors[path] = (torch.cat([a, a0]), torch.cat([b, -b0], dim=1))  # (2r, in), (out, 2r)
    assert spec is not None  # placements() raised for an unknown name
    alpha = spec.alpha * (math.sqrt(2) if spec.scaling == "rslora" else 2)  # the same scale at rank 2r
    doubled = LoRA(r=2 * spec.r, alpha=alpha, dropout=spec.dropout, scaling=spec.scaling)
    target = new_name or name
    attach_at(original, target, doubled, list(factors), fresh_init=False, modules=originals)
    try:
        with torch.no_grad():
            for path, _, host in placements(original, target):
                adapter = host.adapter(target)
                a, b = factors[path]
                adapter.lora_a.copy_(a)
                adapter.lora_b.copy_(b)
    except BaseException:
        detach(original, target)
        raise
    return list(factors)


def _check_original(path: str, residual_layer: nn.Module, original_layer: nn.Module, adapter: Any) -> None:
    """ResidualError unless original = residual + s B0 A0 (float64, to the weights' rounding)."""
    residual, original = read_weight(residual_layer)[0], read_weight(original_layer)[0]
    if residual.shape != original.shape:
        raise ResidualError(f"residual_to_lora: {path} has shape {tuple(original.shape)} in the original model but "
                            f"{tuple(residual.shape)} here (another model?)")
    initial = adapter.scale * (adapter.lora_b0.double() @ adapter.lora_a0.double())  # (out, in)
    gap = (residual.double() + initial - original.double()).abs().max().item()
    eps = max(torch.finfo(residual.dtype).eps, torch.finfo(original.dtype).eps)
    allowed = _ROUNDING_UNITS * eps * (original.double().abs().max().item() + initial.abs().max().item())
    if not gap <= allowed:
        raise ResidualError(f"residual_to_lora: {path} of the original model is not the residual plus the initial "
                            f"delta (max gap {gap:.3g}, allowed {allowed:.3g}): pass the base model as it was before "
                            "the pissa / olora init")
