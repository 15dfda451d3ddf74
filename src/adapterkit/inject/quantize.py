"""A 4-bit base model for QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314).

``quantize_base`` swaps the frozen ``nn.Linear`` layers of a base model for bitsandbytes ``Linear4bit`` layers
(NF4 or FP4 codes in blocks of 64, optionally with double-quantised block scales), before any adapter is attached.
Adapters then attach and train exactly as on a float base: their weights are float32 masters (the quantised
weights are integers, core/precision.py), cast to the compute dtype where used; the base layer dequantises its
weight on the fly in its own forward and backward, and nothing of it is trained.

What a quantised base cannot do: methods that read or edit the base weight (merge, DoRA, LT-SFT, mask tuning,
SPLoRA pruning) stop with a one-line error naming the layer (core/layers.py). To merge, load the adapter onto the
float base with ``strict_base=False`` (the 4-bit weights hash differently) and merge there.

bitsandbytes is optional: imported only here, on the first call (0.45+ runs 4-bit layers on the CPU too).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import nn

from adapterkit.core.errors import TargetError
from adapterkit.core.host import host_of
from adapterkit.core.layers import is_quantized

QUANT_TYPES = ("nf4", "fp4")
# output heads stay in full precision, as in the QLoRA paper (and transformers' default for lm_head)
HEADS = ("lm_head", "classifier", "score", "qa_outputs", "pooler.dense")


def _bitsandbytes() -> ModuleType:
    # On CPUs with AVX512-BF16, bitsandbytes warns at import that an optional inference kernel (from the `kernels`
    # hub package) is missing; that path is the in-place repacking switched off below, so the warning is noise here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        return importlib.import_module("bitsandbytes")
    except Exception as error:  # absent, or present but broken for this torch
        raise TargetError("quantize_base needs bitsandbytes (pip install 'adapterkit[qlora]'): "
                          f"{type(error).__name__}: {error}") from None


def quantize_base(model: nn.Module, quant_type: str = "nf4", compute_dtype: torch.dtype | None = None,
                  double_quant: bool = True, skip: Sequence[str] = HEADS, keep: Sequence[str] = ()) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (except paths ending in one of ``skip`` or ``keep``) by a 4-bit
    layer.

    Args:
        quant_type: "nf4" (4-bit NormalFloat, the paper's choice) or "fp4".
        compute_dtype: dtype the layer dequantises to and computes in; default the layer's weight dtype.
        double_quant: also quantise the block scales (saves ~0.37 bits per weight).
        skip: path suffixes left in full precision (default: output heads).
        keep: more such suffixes, on top of ``skip`` (e.g. modules trained beside the adapter).

    Returns:
        the paths of the quantised layers. Call before attaching adapters.
    """
    if quant_type not in QUANT_TYPES:
        raise TargetError(f"quantize_base: quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    adapted = [path for path, module in model.named_modules() if host_of(module) is not None]
    if adapted:
        raise TargetError(f"quantize_base: {adapted[0]} already holds adapters; quantise the base before attaching")
    bnb = _bitsandbytes()
    chosen = [(path, module) for path, module in model.named_modules()
              if type(module) is nn.Linear and not any(path == s or path.endswith("." + s) for s in (*skip, *keep))]
    for path, module in chosen:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, _four_bit(bnb, module, quant_type, compute_dtype, double_quant))
    return [path for path, _ in chosen]


def _four_bit(bnb: ModuleType, linear: nn.Linear, quant_type: str, compute_dtype: torch.dtype | None,
              double_quant: bool) -> nn.Module:
    weight = linear.weight.detach()
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype or weight.dtype, compress_statistics=double_quant,
                              quant_type=quant_type, device="meta")
    layer.weight = bnb.nn.Params4bit(weight.to("cpu"), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double_quant, module=layer)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer = layer.to(weight.device)  # quantises here (bitsandbytes quantises on the move to a device)
    # bitsandbytes' CPU inference shortcut repacks the weight in place on the first no-grad forward (bf16 block
    # scales, another layout): outputs move, the base's fingerprint changes under a loaded adapter, and layers
    # narrower than a block fail. Keep the one format the adapter was trained against.
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False
    layer.train(linear.training)
    return layer


def quantized_layers(model: nn.Module) -> list[str]:
    """Paths of the layers whose weights are quantised (integer storage)."""
    return [path for path, module in model.named_modules() if is_quantized(module)]


def parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the model's parameters and buffers as stored -- a 4-bit weight with its block scales and
    quantisation code --, bytes they would take in float32)."""
    stored = logical = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        stored += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is None:
            logical += 4 * tensor.numel()
            continue
        logical += 4 * int(torch.Size(state.shape).numel())
        extras = state.as_dict(packed=True).values()  # absmax, nested absmax and codes, packed metadata
        stored += sum(v.numel() * v.element_size() for v in extras if isinstance(v, torch.Tensor))
    return stored, logical
