"""A new LoRA adapter from explicit low-rank factors per module: what combining and converting produce."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from adapterkit.core.errors import AdapterKitError
from adapterkit.core.layers import layer_info
from adapterkit.core.tree import placements
from adapterkit.inject.engine import attach_at, detach
from adapterkit.methods.lora import LoRA


def attach_factors(model: nn.Module, name: str, factors: Mapping[str, tuple[Tensor, Tensor]]) -> list[str]:
    """Attach adapter ``name``: at each module path, a LoRA whose delta is exactly ``b @ a`` (``b``: (out, r),
    ``a``: (r, in), in the canonical (out, in) layout; ranks may differ per module). Each LoRA gets alpha = r, so
    its scale is 1 and the factors are stored as given (cast to the adapter's float32 masters)."""
    modules = dict(model.named_modules())
    specs: dict[str, LoRA] = {}
    for path, (b, a) in factors.items():
        base = modules.get(path)
        if base is None:
            raise AdapterKitError(f"attach_factors({name!r}): this model has no module {path!r}")
        info = layer_info(base)
        if info.kind != "linear":
            raise AdapterKitError(f"attach_factors({name!r}): {path} is a {type(base).__name__}; low-rank factors "
                                  "are attached to Linear / Conv1D layers only")
        if b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != (info.out_features, info.in_features):
            raise AdapterKitError(f"attach_factors({name!r}): factors {tuple(b.shape)} @ {tuple(a.shape)} do not "
                                  f"give {path}'s ({info.out_features}, {info.in_features}) weight")
        specs[path] = LoRA(r=int(a.shape[0]), alpha=float(a.shape[0]))
    paths = list(factors)
    first = specs[paths[0]]
    attach_at(model, name, first, paths, fresh_init=False, modules=modules,
              specs={p: s for p, s in specs.items() if s != first})
    try:
        with torch.no_grad():
            for path, _, host in placements(model, name):
                adapter = host.adapter(name)
                b, a = factors[path]
                adapter.lora_a.copy_(a.to(adapter.lora_a.dtype))
                adapter.lora_b.copy_(b.to(adapter.lora_b.dtype))
    except BaseException:
        detach(model, name)
        raise
    return paths
