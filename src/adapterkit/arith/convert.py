"""Any mergeable adapter, or a fine-tune's weight change, as a plain LoRA: the truncated SVD of each module's delta.

A LoRA is the format every server loads (peft, vLLM, LoRAX), so converting DoRA, (IA)^3 or a sparse diff to one
makes it servable; ``extract_lora`` does the same for the difference between a fine-tuned model and its base
(mergekit's extract-lora). The deltas are taken in float64 on each module's own base weight, and the returned
relative Frobenius errors say exactly what the chosen rank loses (Eckart-Young: the SVD tail).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from adapterkit.arith.factors import attach_factors
from adapterkit.core.errors import AdapterKitError
from adapterkit.core.layers import layer_info, read_weight
from adapterkit.core.protocol import Mergeable
from adapterkit.core.tree import placements
from adapterkit.inject.select import Targets, select
from adapterkit.ops.lowrank import truncated_svd

BIAS_MODES = ("refuse", "drop")


class ConvertError(AdapterKitError, ValueError):
    """An adapter or model pair that cannot be turned into a LoRA as asked."""


def _check_args(where: str, rank: int, bias: str) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConvertError(f"{where}: rank must be a positive integer, got {rank!r}")
    if bias not in BIAS_MODES:
        raise ConvertError(f"{where}: bias must be one of {BIAS_MODES}, got {bias!r}")


def _bias_change(old: Tensor | None, new: Tensor | None) -> Tensor | None:
    """The bias change in float64, or None when there is none (unchanged entries compare exactly in float64)."""
    if new is None or old is None:
        return None
    change = new.detach().double() - old.detach().double()
    return change if bool(change.any()) else None


def _compress(where: str, deltas: dict[str, tuple[Tensor, Tensor | None]], rank: int, bias: str
              ) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, float]]:
    """Rank-``rank`` factors of each weight delta, and each module's relative error. A LoRA holds no bias, so a
    bias change is refused, or with ``bias="drop"`` counted in the error: ||[dW - BA, db]|| / ||[dW, db]||."""
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    errors: dict[str, float] = {}
    for path, (delta, bias_delta) in deltas.items():
        if bias_delta is not None and bias == "refuse":
            raise ConvertError(f"{where}: {path} also changes its bias (max |change| "
                               f"{float(bias_delta.abs().max()):.3g}), which a LoRA cannot hold; pass bias='drop' to "
                               "convert without it (the dropped part is counted in the returned error)")
        b, a, error = truncated_svd(delta, rank)
        factors[path] = (b, a)
        if bias_delta is None:
            errors[path] = error
            continue
        weight_norm = float(torch.linalg.matrix_norm(delta))
        missed_sq = (error * weight_norm) ** 2 + float(bias_delta.norm()) ** 2
        errors[path] = math.sqrt(missed_sq / (weight_norm**2 + float(bias_delta.norm()) ** 2))
    return factors, errors


def to_lora(model: nn.Module, name: str, rank: int, new_name: str | None = None, bias: str = "refuse"
            ) -> dict[str, float]:
    """Attach a LoRA of rank ``rank`` (default name ``f"{name}_lora{rank}"``) approximating mergeable adapter
    ``name`` at every module it adapts; the source stays attached. Returns each module path's relative Frobenius
    error ||delta - B A|| / ||delta||, with delta = merge(W) - W in float64 on the module's own base weight; a rank at
    or above min(out, in) (or the delta's own rank) is exact to float32 storage. Modules whose delta is zero get a
    zero LoRA (error 0).

    Args:
        model: the model holding adapter ``name``.
        name: the adapter to convert: one whose modules implement ``merge`` (LoRA, rsLoRA, DoRA, IA3, LT-SFT, ...),
            on Linear / Conv1D layers, not merged into the base.
        rank: the new LoRA's rank (capped per module at min(out, in)).
        new_name: the new adapter's name.
        bias: "refuse" (default) raises for a module whose adapter also changes its bias (BitFit, IA3 on outputs
            with a bias, a sparse diff with bias entries); "drop" converts the weight change alone and counts the
            dropped bias change in that module's error.

    Raises:
        ConvertError: a non-mergeable or merged adapter, a non-Linear module, a bias change under "refuse", a bad
            rank.
    """
    where = f"to_lora({name!r})"
    _check_args(where, rank, bias)
    deltas: dict[str, tuple[Tensor, Tensor | None]] = {}
    for path, module, host in placements(model, name):  # everything is checked before anything is attached
        adapter = host.adapter(name)
        if not isinstance(adapter, Mergeable):
            raise ConvertError(f"{where}: {type(adapter).__name__} at {path} is not mergeable (its function is not "
                               "a change of the base weights), so it has no weight delta to convert")
        if layer_info(module).kind != "linear":
            raise ConvertError(f"{where}: {path} is a {type(module).__name__}; conversion to a LoRA covers Linear / "
                               "Conv1D layers only")
        if name in host.merged:
            # the base weight then already holds the adapter: its delta is not merge(W) - W; unmerging is exact
            raise ConvertError(f"{where}: the adapter is merged into the base at {path}; unmerge it first")
        weight, old_bias = read_weight(module)
        weight, old_bias = weight.double(), None if old_bias is None else old_bias.double()
        with torch.no_grad():
            new_weight, new_bias = adapter.merge(weight.clone(), None if old_bias is None else old_bias.clone())
            # merge keeps what its inverse needs (LT-SFT's overwritten entries, DoRA's norms): unmerge clears it
            adapter.unmerge(new_weight.clone(), None if new_bias is None else new_bias.clone())
        deltas[path] = (new_weight.double() - weight, _bias_change(old_bias, new_bias))
    factors, errors = _compress(where, deltas, rank, bias)
    attach_factors(model, new_name or f"{name}_lora{rank}", factors)
    return errors


def extract_lora(base: nn.Module, tuned: nn.Module, targets: Targets, rank: int, name: str, bias: str = "refuse"
                 ) -> dict[str, float]:
    """Attach to ``base`` a LoRA ``name`` of rank ``rank`` approximating ``tuned.W - base.W`` at every module
    ``targets`` selects in ``base`` (mergekit's extract-lora). Returns each module path's relative Frobenius error.

    Args:
        base: the model the LoRA is attached to (its plain base weights are read; adapters on it are ignored).
        tuned: a fine-tune of the same architecture (only its base weights are read).
        targets: which modules, as for ``ak.attach`` (suffixes, "re:<regex>", types, predicates); Linear / Conv1D.
        rank: the LoRA's rank (capped per module at min(out, in)).
        name: the new adapter's name.
        bias: "refuse" (default) raises where the tuned bias differs; "drop" ignores it and counts it in the error.

    Raises:
        ConvertError: a selected module that is not Linear / Conv1D, missing from ``tuned`` or shaped differently
            there, a bias change under "refuse", a bad rank.
    """
    where = f"extract_lora({name!r})"
    _check_args(where, rank, bias)
    theirs = dict(tuned.named_modules())
    deltas: dict[str, tuple[Tensor, Tensor | None]] = {}
    for path, module in select(base, targets):
        if layer_info(module).kind != "linear":
            raise ConvertError(f"{where}: {path} is a {type(module).__name__}; extraction covers Linear / Conv1D "
                               "layers only")
        other = theirs.get(path)
        if other is None:
            raise ConvertError(f"{where}: the tuned model has no module {path!r}")
        weight, old_bias = read_weight(module)
        if layer_info(other).kind != "linear":
            raise ConvertError(f"{where}: {path} is a {type(other).__name__} in the tuned model, a "
                               f"{type(module).__name__} in the base")
        new_weight, new_bias = read_weight(other)
        if new_weight.shape != weight.shape or (old_bias is None) != (new_bias is None) or (
                old_bias is not None and new_bias is not None and old_bias.shape != new_bias.shape):
            raise ConvertError(f"{where}: {path} is {tuple(new_weight.shape)} in the tuned model, "
                               f"{tuple(weight.shape)} in the base (with bias: {new_bias is not None} vs "
                               f"{old_bias is not None})")
        deltas[path] = (new_weight.double() - weight.double(), _bias_change(old_bias, new_bias))
    factors, errors = _compress(where, deltas, rank, bias)
    attach_factors(base, name, factors)
    return errors
