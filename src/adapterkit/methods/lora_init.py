"""LoRA initialisations taken from the base weight (a helper of methods/lora.py; registers nothing).

They move the adapter's starting delta out of the base weight, so the adapted layer computes ``W x`` at step 0
and training starts in a chosen subspace of ``W`` (W in the canonical (out, in) layout, s the LoRA scale):

* PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948), ``init="pissa"``: ``W = U S V^T``,
  ``A = sqrt(S_r / s) V_r^T`` (r, in), ``B = U_r sqrt(S_r / s)`` (out, r), so ``s B A = U_r S_r V_r^T``, the
  principal part, and the base weight becomes the residual ``W_res = W - s B A``.
  ``init="pissa_niter_K"``: the same from ``torch.svd_lowrank(W, q=r, niter=K)``, a randomised SVD that draws
  from torch's global RNG (the same seed gives the same factors).
* OLoRA (Buyukakyuz 2024, https://arxiv.org/abs/2406.01775), ``init="olora"``: ``W = Q R``, ``B = Q[:, :r]``,
  ``A = R[:r]``, ``W_res = W - s B A``. As in peft, the factors are not divided by the scale: with s != 1 the
  moved part is ``s Q_r R_r``, not ``Q_r R_r``.
* CorDA (Yang et al. 2024), ``init="corda_ipm"`` / ``"corda_kpm"``: the SVD of ``W C`` for the layer's input
  covariance C from calibration data, largest or smallest components (methods/corda.py).

The factorisation runs in float32 (as peft's ``pissa_init`` / ``olora_init``) and the residual is written back in
the base weight's dtype. The adapter keeps its initial factors as buffers ``lora_a0`` / ``lora_b0``: with them
arith/residual_lora.py turns a trained adapter into a plain LoRA of rank 2r on the original base.

What a save records. Once initialised, the adapter's spec reads ``init="residual"``: "the base holds the
residual already". Building that spec allocates the factors and leaves the base alone, so a load never
decomposes a weight twice. The host fingerprints its base after the build, so a saved adapter records the
RESIDUAL base's fingerprint: loading it onto a model whose base holds that residual (the same model, or one
saved after the init) is exact; loading it onto a fresh original model is refused by the fingerprint check
(its weights differ). To use the adapter on the original base, convert it first
(``adapterkit.arith.residual_lora.residual_to_lora``). Detaching leaves the residual in the base, as peft's
``unload`` does.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import Tensor, nn

from adapterkit.core.errors import TargetError
from adapterkit.core.layers import is_quantized, layer_info, read_weight, tensor, write_weight
from adapterkit.methods.corda import MODES, corda_factors, take, waiting

RESIDUAL = "residual"  # the spec of an initialised adapter: its base already holds the residual
_NITER = re.compile(r"pissa_niter_(\d+)")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes peft decomposes


def from_base(init: str) -> bool:
    """Whether ``init`` takes the adapter's factors from the base weight (and so edits the base)."""
    return init in ("pissa", "olora", RESIDUAL) or init in MODES or _NITER.fullmatch(init) is not None


def check_base(init: str, base: nn.Module, path: str) -> None:
    """One-line TargetError if ``base`` cannot be decomposed for ``init``."""
    kind = layer_info(base).kind
    if kind != "linear":
        raise TargetError(f"lora init={init!r} cannot adapt {path} ({type(base).__name__}): it decomposes a Linear "
                          "or Conv1D weight only")
    if is_quantized(base):
        raise TargetError(f"lora init={init!r} cannot adapt {path}: its weight is quantised "
                          f"({tensor(base, 'weight').dtype}); initialise on the float base, then quantise the residual")
    dtype = tensor(base, "weight").dtype
    if dtype not in _FLOATS:
        raise TargetError(f"lora init={init!r} cannot adapt {path}: its weight is {dtype}, not float32, float16 or "
                          "bfloat16")
    if init in MODES:
        covariance = waiting(base)
        width = layer_info(base).in_features
        if covariance is None:
            raise TargetError(f"lora init={init!r} needs calibration data: no input covariance for {path}; run "
                              "adapterkit.train.calibrate.calibrate_corda(model, batches, targets) first")
        if tuple(covariance.shape) != (width, width):
            raise TargetError(f"lora init={init!r}: the covariance calibrated for {path} is "
                              f"{tuple(covariance.shape)}, not ({width}, {width}); calibrate this model again")


def initial_factors(weight: Tensor, r: int, scale: float, init: str,
                    covariance: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(A (r, in), B (out, r)) of ``init`` from a float32 (out, in) weight (peft's pissa_init / olora_init /
    corda_init; CorDA also needs the layer's input ``covariance``)."""
    if init in MODES:
        assert covariance is not None
        return corda_factors(weight, covariance.to(weight.device), r, scale, init)
    if init == "olora":
        q, upper = torch.linalg.qr(weight)  # q: (out, k), upper: (k, in), k = min(out, in)
        return upper[:r].contiguous(), q[:, :r].contiguous()
    found = _NITER.fullmatch(init)
    if found is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]  # (out, r), (r,), (r, in)
    else:
        u, s, v = torch.svd_lowrank(weight, q=r, niter=int(found.group(1)))  # v: (in, r)
        vh = v.t()
    root = torch.sqrt(s / scale)  # s B A = U_r S_r V_r^T
    return (root[:, None] * vh).contiguous(), (u * root).contiguous()


@torch.no_grad()
def init_from_base(adapter: Any, base: nn.Module) -> None:
    """Give a LoRALinear its base-derived factors, keep them as ``lora_a0`` / ``lora_b0``, write the residual
    into ``base`` and mark the adapter's spec ``init="residual"`` (see the module docstring for why)."""
    spec = adapter.spec
    adapter.register_buffer("lora_a0", torch.zeros_like(adapter.lora_a))
    adapter.register_buffer("lora_b0", torch.zeros_like(adapter.lora_b))
    adapter.spec = dataclasses.replace(spec, init=RESIDUAL)
    if spec.init == RESIDUAL:  # rebuilt for a load: the saved factors are copied in next, the base is residual
        adapter.lora_a.zero_()
        return
    weight = read_weight(base)[0].float()  # (out, in), a copy
    covariance = take(base) if spec.init in MODES else None
    a, b = initial_factors(weight, spec.r, adapter.scale, spec.init, covariance)
    for param, value in ((adapter.lora_a, a), (adapter.lora_b, b), (adapter.lora_a0, a), (adapter.lora_b0, b)):
        param.copy_(value)
    write_weight(base, weight - adapter.scale * (b @ a), None)  # cast to the base weight's dtype by the copy
