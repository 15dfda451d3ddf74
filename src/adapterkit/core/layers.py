"""What the engine knows about base layer types: weight layout and size, nothing about methods.

Methods see every weight-bearing base layer through ``LayerInfo`` in one canonical layout, (out, in, *kernel),
so GPT-2's transposed ``Conv1D`` needs no special case in any method file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from adapterkit.core.errors import TargetError


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a Linear with a transposed (in, out) weight."""
    # transformers' Conv1D is a Linear with a transposed (in, out) weight; matched by type name to avoid
    # importing transformers in the core.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def tensor(module: nn.Module, name: str) -> Tensor:
    """A module's parameter or buffer ``name`` as a Tensor (a typed getattr)."""
    value = getattr(module, name)
    if not isinstance(value, Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is not a tensor")
    return value


@dataclass(frozen=True)
class LayerInfo:
    """Kind and sizes of a base layer: kind is "linear", "conv2d", "embedding", "norm" or "module"."""

    kind: str
    in_features: int
    out_features: int


def layer_info(module: nn.Module) -> LayerInfo:
    """Describe ``module``; anything unknown is kind "module" with sizes 0."""
    if isinstance(module, nn.Linear):
        return LayerInfo("linear", module.in_features, module.out_features)
    if is_conv1d(module):
        shape = tensor(module, "weight").shape
        return LayerInfo("linear", int(shape[0]), int(shape[1]))
    if isinstance(module, nn.Conv2d):
        return LayerInfo("conv2d", module.in_channels, module.out_channels)
    if isinstance(module, nn.Embedding):
        return LayerInfo("embedding", module.num_embeddings, module.embedding_dim)
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("RMSNorm"):
        weight = getattr(module, "weight", None)
        size = int(weight.shape[0]) if isinstance(weight, Tensor) else 0
        return LayerInfo("norm", size, size)
    return LayerInfo("module", 0, 0)


def is_norm(module: nn.Module) -> bool:
    """True for normalisation layers (a sequential adapter on a post-norm re-enters the norm)."""
    return layer_info(module).kind == "norm"


def is_quantized(module: nn.Module) -> bool:
    """A layer whose own weight is stored as integers (e.g. a bitsandbytes 4-bit layer, inject/quantize.py)."""
    weight = module._parameters.get("weight")
    return weight is not None and not weight.is_floating_point()


def _float_weight(module: nn.Module) -> Tensor:
    # methods that read or edit the base weight need real values, not 4-bit codes: fail clearly, not silently
    if is_quantized(module):
        raise TargetError(f"{type(module).__name__} stores its weight quantised ({tensor(module, 'weight').dtype}): "
                          "merging and methods that read the base weight (DoRA, LT-SFT, mask tuning, SPLoRA "
                          "pruning) need a float base; load the adapter onto the float model to merge it")
    return tensor(module, "weight")


def read_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) of a base layer in the canonical (out, in, ...) layout, as detached copies."""
    weight = _float_weight(module).detach()
    if is_conv1d(module):
        weight = weight.t()
    bias = getattr(module, "bias", None)
    return weight.clone(), (bias.detach().clone() if isinstance(bias, Tensor) else None)


@torch.no_grad()
def write_weight(module: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
    """Copy canonical-layout (weight, bias) back into the base layer's own parameters."""
    if is_conv1d(module):
        weight = weight.t()
    _float_weight(module).copy_(weight)
    if bias is not None:
        tensor(module, "bias").copy_(bias)


def supports_inplace_delta(module: nn.Module) -> bool:
    """Layers whose output autograd does not save, so a delta may be added in place (not bitsandbytes' 4-bit
    layers: their matmul returns a view from a custom autograd Function, which autograd forbids writing to)."""
    return layer_info(module).kind in ("linear", "conv2d", "embedding") and not is_quantized(module)


def weight_view(module: nn.Module) -> Tensor:
    """The live weight in canonical (out, in, ...) layout (a view for Conv1D; gradients flow)."""
    weight = _float_weight(module)
    return weight.t() if is_conv1d(module) else weight


def io_sizes(module: nn.Module) -> tuple[int, int]:
    """(input size, output size) of a block such as an FFN: its first and last weight-bearing children."""
    info = layer_info(module)
    if info.kind != "module":
        return info.in_features, info.out_features
    sized = [layer_info(m) for m in module.modules() if m is not module]
    sized = [s for s in sized if s.kind in ("linear", "norm", "conv2d")]
    if not sized:
        return 0, 0
    return sized[0].in_features, sized[-1].out_features
