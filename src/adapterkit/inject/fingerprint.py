"""Base-model fingerprints: the shapes of a target's own weights and a fixed sample of their values.

A saved adapter records, per adapted module, the logical shape of each base parameter and ``SAMPLES`` values
taken at fixed positions (with the dtype they were held in, ).
Loading compares the samples within what the two dtypes can explain: float32 against float32 agree to rounding,
a bf16 copy of the same weights to bf16's precision, a 4-bit copy within its quantisation error. So an adapter
moves between precisions and onto a quantised twin of its base, while another checkpoint or a random model is
refused.

Records written before this scheme hold only a ``hash``; they are compared by it as before.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
from typing import Any

import torch
from torch import nn

from adapterkit.core.host import HOST_ATTR

SAMPLES = 32
_HASH_SAMPLES = 4096  # the older scheme's strided sample, kept so its records still load
# Largest relative L2 distance between the samples of a 4-bit weight (dequantised) and the float weight it was
# made from. Measured on bitsandbytes' CPU NF4 layers of small random models: 0.09-0.37; two unrelated weights of
# one distribution sit near sqrt(2) = 1.41, and 32 values put a match of them below 0.7 out of reach (< 1e-5 per
# tensor, and every tensor of every target must match).
_QUANT_DISTANCE = 0.7


def _values(param: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The parameter's values as a flat float tensor in its logical shape, and whether they were quantised."""
    state = getattr(param, "quant_state", None)
    if state is not None:  # a bitsandbytes 4-bit weight (inject/quantize.py): compare what it computes with
        functional = importlib.import_module("bitsandbytes.functional")
        return functional.dequantize_4bit(param.data, state).reshape(-1).float(), True
    return param.detach().reshape(-1), False


def _sample(flat: torch.Tensor) -> torch.Tensor:
    if flat.numel() == 0:
        return flat.new_zeros(0, dtype=torch.float32).cpu()
    n, k = flat.numel(), min(SAMPLES, flat.numel())
    if n < 1 << 24:  # float32 holds every position exactly: the positions records have always used
        positions = torch.linspace(0, n - 1, k, device=flat.device).long()
    else:  # float32 rounds beyond 2**24 (the last position can leave the tensor): integer positions instead
        positions = torch.arange(k, device=flat.device) * (n - 1) // max(k - 1, 1)
    return flat[positions].to("cpu", torch.float32)


def tensor_digest(tensor: torch.Tensor) -> str:
    """The older scheme: short hash of a strided sample, rounded to 6 decimals (changes with the dtype)."""
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // _HASH_SAMPLES)
    sample = flat[::step][:_HASH_SAMPLES].to("cpu", torch.float64).numpy().round(6)
    return hashlib.sha256(sample.tobytes()).hexdigest()[:16]


def module_fingerprint(module: nn.Module) -> dict[str, Any]:
    """{"shapes", "dtypes", "samples"} over a module's own parameters (not its adapters)."""
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    samples: dict[str, str] = {}
    for name, param in module.named_parameters():
        if HOST_ATTR in name.split("."):
            continue
        logical = getattr(getattr(param, "quant_state", None), "shape", None)  # a 4-bit weight's real shape
        shapes[name] = list(logical if logical is not None else param.shape)
        flat, quantised = _values(param)
        dtypes[name] = "4bit" if quantised else str(param.dtype).removeprefix("torch.")
        samples[name] = base64.b64encode(_sample(flat).numpy().tobytes()).decode()
    return {"shapes": shapes, "dtypes": dtypes, "samples": samples}


def _eps(dtype: str) -> float:
    found = getattr(torch, dtype, None)
    return torch.finfo(found).eps if isinstance(found, torch.dtype) and found.is_floating_point else 0.0


def same_weights(saved: dict[str, Any], here: dict[str, Any], module: nn.Module) -> bool:
    """Whether the base weights ``here`` are those ``saved`` describes, up to the precision both were held in."""
    if "samples" not in saved:  # a record of the older scheme
        digest = hashlib.sha256()
        for name, param in module.named_parameters():
            if HOST_ATTR not in name.split("."):
                digest.update(tensor_digest(param).encode())
        return saved.get("hash") == digest.hexdigest()[:16]
    for name, encoded in saved["samples"].items():
        if name not in here["samples"]:
            return False
        theirs = torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.float32)
        ours = torch.frombuffer(bytearray(base64.b64decode(here["samples"][name])), dtype=torch.float32)
        if theirs.shape != ours.shape:
            return False
        kinds = (saved.get("dtypes", {}).get(name, "float32"), here["dtypes"].get(name, "float32"))
        if "4bit" in kinds:
            if float((theirs - ours).norm()) > _QUANT_DISTANCE * float(torch.maximum(theirs.norm(), ours.norm())):
                return False
            continue
        relative = 2 * max(_eps(kind) for kind in kinds) + 1e-12
        # fp16 holds values below 6e-5 with an absolute error up to 3e-8: the absolute floor covers them
        allowed = relative * torch.maximum(theirs.abs(), ours.abs()) + (1e-7 if "float16" in kinds else 0.0)
        if not bool(((theirs - ours).abs() <= allowed).all()):
            return False
    return True
