"""What the prompt and prefix methods share: they act on a model's call, not on one layer's tensors.

Prompt tuning and P-tuning prepend n learned embeddings to the input; prefix tuning prepends n learned keys and
values to every attention layer through the model's own KV-cache interface. Neither needs per-architecture code:
the module whose call is rewritten is found by its interface (the outermost module whose ``forward`` takes
``inputs_embeds`` or ``past_key_values``), the sizes come from the model's config, and everything else the model
already does (masks, positions, caching during ``generate``) follows from three edits of the call:

* the attention mask gains n ones on the left, in every call (prefill and each decode step);
* on the first call of a sequence (no cache yet, or an empty one) the virtual tokens go in: embeddings before the
  input's, labels padded with -100 and token types with 0 (prompt methods), or a cache holding the prefix;
* positions follow: prompt methods let the model number the n + T positions itself (peft drops given
  ``position_ids``); prefix tuning shifts given ``position_ids`` / ``cache_position`` by n, since the cache already
  holds n entries when the first real token arrives.

The logits the caller sees have the virtual positions removed, so they line up with the caller's labels and inputs
(peft returns n + T positions for prompt methods, which breaks ``compute_metrics`` in a Trainer).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor, nn

from adapterkit.core.errors import AdapterKitError, TargetError
from adapterkit.core.host import HOST_ATTR


def outermost(model: nn.Module, parameter: str, method: str) -> list[tuple[str, nn.Module]]:
    """[(path, module)] of the first module, root first, whose ``forward`` takes ``parameter``."""
    for path, module in model.named_modules():
        if HOST_ATTR in path.split("."):
            continue
        if parameter in _parameters(type(module).forward):
            return [(path, module)]
    raise TargetError(f"{method}: no module of this {type(model).__name__} takes {parameter!r} in its forward, "
                      "which this method acts through (a Hugging Face transformer model has one)")


@functools.cache
def _parameters(forward: Any) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return ()


def call_parameters(module: nn.Module) -> tuple[str, ...]:
    """The parameter names of ``module``'s forward."""
    return _parameters(type(module).forward)


def call_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call as keywords only (``model(ids)`` names ``ids`` after forward's first parameter)."""
    if not args:
        return dict(kwargs)
    names = [n for n in _parameters(type(module).forward) if n != "self"]
    if len(args) > len(names):
        raise AdapterKitError(f"{type(module).__name__} got {len(args)} positional arguments; pass them by name")
    return {**dict(zip(names, args, strict=False)), **kwargs}


def config_of(model: nn.Module, method: str) -> Any:
    """The text part of a Hugging Face config (multimodal configs nest it)."""
    config = getattr(model, "config", None)
    if config is None:
        raise TargetError(f"{method}: {type(model).__name__} has no Hugging Face config to read its sizes from")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def first_of(config: Any, *names: str) -> Any:
    """The first of ``names`` the config sets (configs spell sizes differently: n_layer, num_hidden_layers, ...)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def context_length(config: Any) -> int | None:
    """How many positions the model has, if its config says (absolute-position models cannot go past it)."""
    value = first_of(config, "max_position_embeddings", "n_positions", "n_ctx")
    return int(value) if isinstance(value, int) else None


def rows_and_length(kw: dict[str, Any], method: str) -> tuple[int, int]:
    """(batch, tokens) of this call's input."""
    for key in ("input_ids", "inputs_embeds"):
        value = kw.get(key)
        if isinstance(value, Tensor):
            return value.shape[0], value.shape[1]
    raise AdapterKitError(f"{method}: the model was called without input_ids or inputs_embeds")


def cached_length(cache: Any) -> int:
    """Entries already in a KV cache (0: none given, or an empty one)."""
    if cache is None:
        return 0
    length = getattr(cache, "get_seq_length", None)
    if length is not None:
        return int(length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:  # the legacy tuple format
        return int(cache[0][0].shape[-2])
    return 0


def check_room(config: Any, n: int, length: int, cached: int, method: str) -> None:
    """A one-line error when the virtual tokens push the sequence past the model's context."""
    room = context_length(config)
    if room is not None and n + cached + length > room:
        raise AdapterKitError(f"{method}: {n} virtual tokens + {cached + length} tokens exceed the model's context "
                              f"of {room} positions (config.max_position_embeddings); use fewer virtual tokens or "
                              "shorter inputs")


def widen_mask(kw: dict[str, Any], n: int, method: str) -> None:
    """Prepend n ones (the virtual tokens are always visible) to a 2-D attention mask."""
    mask = kw.get("attention_mask")
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise AdapterKitError(f"{method}: needs a 2-D attention mask (batch x tokens), got "
                              f"{getattr(mask, 'shape', type(mask).__name__)}")
    ones = torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device)
    kw["attention_mask"] = torch.cat([ones, mask], dim=1)


def pad_left(value: Tensor | None, n: int, fill: int, length: int) -> Tensor | None:
    """``value`` (batch, T) with n columns of ``fill`` in front (labels: -100, token types: 0); anything that is not
    per token (a classifier's labels, one per row) is returned as it is."""
    if not isinstance(value, Tensor) or value.dim() != 2 or value.shape[1] != length:
        return value
    pad = torch.full((value.shape[0], n), fill, dtype=value.dtype, device=value.device)
    return torch.cat([pad, value], dim=1)


def strip_logits(output: Any, n: int) -> Any:
    """The output with the n virtual positions removed from its per-token logits (a ModelOutput's ``logits``)."""
    logits = output.get("logits") if isinstance(output, dict) else None
    if isinstance(logits, Tensor) and logits.dim() == 3 and logits.shape[1] > n:
        output["logits"] = logits[:, n:]
    return output


def start_ids(init: str, init_ids: tuple[int, ...], n: int, vocab: int, method: str) -> Tensor:
    """The n token ids a virtual-token init copies: drawn from the vocabulary ("vocab"), or ``init_ids`` repeated or
    cut to n ("text"); a one-line error for ids outside the vocabulary."""
    ids = (torch.randint(0, vocab, (n,)) if init == "vocab"
           else torch.tensor(init_ids).repeat(-(-n // len(init_ids)))[:n])
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise TargetError(f"{method}: init_ids must lie in [0, {vocab}), the vocabulary")
    return ids
