"""Inner adaptor layers (IAA; Wang et al. 2024, https://arxiv.org/abs/2408.12902): new trainable transformer blocks
inserted inside a frozen model, after chosen decoder layers, each a copy of the layer it follows.

    h_i  = layer_i(h_{i-1})                                  the frozen decoder layer, unchanged
    h'_i = h_i + g_i * (B_i(h_i) - h_i)                      B_i: a trainable copy of layer_i, g_i: (d,), 0 at init

The inserted block B_i runs on the layer's output with the layer's own call (attention mask, rotary angles,
cache position, ...), so it is a decoder layer of the same architecture, as IAA's are (its released model code builds
them as decoder layers of the LLM's config, run on the output of layers 0, 1, 5, 6, ... with a cache of their own).
That code does not show how they are initialised; here B_i starts as a copy of layer_i, in the base's feature space
(a fresh init would start far from it). With g = 1 this is IAA's form,
h'_i = B_i(h_i) (the block's output replaces the hidden states; tests/methods/test_inner_layers.py checks it against
the model with the block really inserted into its layer list). IAA needs no identity start, since its text-only
workflow never runs the inserted layers; here the zero-init gate (per channel) makes attaching leave the model
unchanged, so the adapter starts as the base model and ``use(model)`` / detaching gives the base model back
exactly. At g = 0 the block's weights get no gradient; the gate's gradient moves it from the first step, as in
Flamingo's zero-init gated layers. Cost: about one decoder layer's parameters per inserted block (plus d).
Targets are the decoder layers to insert after, e.g. ``targets="re:model\\.layers\\.(3|7)"``. Not included: IAA's
own copies of the input embedding, final norm and LM head that its multimodal workflow uses instead of the base's.

KV cache: the block's attention keeps its own keys and values in the model's own cache object, in a layer of its own
after the model's layers (the first time a block meets a cache it appends one, of the same kind as its base
layer's, and sets its attentions' ``layer_idx`` to it). So beam search, cropping and reordering, which act on every
layer of the cache, move the block's entries too, and ``generate`` with a cache equals decoding the whole sequence
without one. Caches with preallocated layers (static, quantised) are refused with a one-line error. (An attention
whose arithmetic reads ``layer_idx``, GPT-2 with ``scale_attn_by_inverse_layer_idx``, would see the new index.)
"""

from __future__ import annotations

import copy
import inspect
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from adapterkit.core.errors import AdapterKitError, TargetError
from adapterkit.core.host import HOST_ATTR
from adapterkit.core.layers import io_sizes
from adapterkit.core.precision import as_compute, master_dtype
from adapterkit.core.protocol import Site
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec
from adapterkit.methods.virtual_tokens import call_kwargs, first_of

_CACHE_KEYS = ("past_key_values", "past_key_value", "layer_past")


@register("inner_layers")
@dataclass(frozen=True)
class InnerLayers(AdapterSpec):
    """A gated trainable copy after each target decoder layer (``ak.attach(model, "iaa", ak.methods.InnerLayers(),
    targets="re:model\\.layers\\.(3|7)")``)."""

    rewrites_call = True  # a CALL adapter on a decoder layer: one setting per batch (no Select, no per-request serving)

    def check_target(self, base: nn.Module, path: str) -> None:
        indices = {_index(m) for m in _indexed(base) if m is not base}
        if not indices:
            raise TargetError(f"inner_layers: {path} ({type(base).__name__}) holds no attention with a layer_idx; "
                              "the targets must be decoder layers, e.g. 're:model\\.layers\\.(3|7)'")
        if len(indices) > 1:
            raise TargetError(f"inner_layers: {path} ({type(base).__name__}) spans layers {sorted(indices)}; target "
                              "single decoder layers, e.g. 're:model\\.layers\\.(3|7)'")
        if io_sizes(base)[0] <= 0:
            raise TargetError(f"inner_layers: cannot find the hidden size of {path} ({type(base).__name__})")

    def build(self, base: nn.Module) -> nn.Module:
        return InnerBlock(self, base)


def _indexed(module: nn.Module) -> list[nn.Module]:
    """The modules that index a KV cache (Hugging Face attentions keep their layer's index in ``layer_idx``)."""
    return [m for m in module.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def _index(module: nn.Module) -> int:
    value = getattr(module, "layer_idx", None)
    assert isinstance(value, int)
    return value


def bare_copy(base: nn.Module) -> nn.Module:
    """A deep copy of ``base`` without the adapter hosts (and their hooks) attached inside it."""
    hosts = [m for m in base.modules() if isinstance(m._modules.get(HOST_ATTR), nn.Module)]
    memo: dict[int, Any] = {id(m._modules[HOST_ATTR]): m._modules[HOST_ATTR] for m in hosts}  # not copied
    block = copy.deepcopy(base, memo)
    for module in list(block.modules()):
        host = module._modules.pop(HOST_ATTR, None)
        if host is None:
            continue
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, hook in hooks.items() if getattr(hook, "__self__", None) is host]:
                del hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
    return block


def _model_layers(block: nn.Module) -> int | None:
    """The model's number of layers, from a config held in the block (attentions keep one)."""
    for module in block.modules():
        config = getattr(module, "config", None)
        if config is not None:
            config = config.get_text_config() if hasattr(config, "get_text_config") else config
            value = first_of(config, "num_hidden_layers", "n_layer", "num_layers")
            if isinstance(value, int):
                return value
    return None


class InnerBlock(nn.Module):
    """B_i (a copy of the decoder layer, float32 masters on a half-precision base) and the gate g_i."""

    site = Site.CALL

    def __init__(self, spec: InnerLayers, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        like = next(base.parameters())
        self.block = bare_copy(base).to(master_dtype(like))
        for param in self.block.parameters():
            param.requires_grad_(True)
        self.gate = nn.Parameter(torch.zeros(io_sizes(base)[0], dtype=master_dtype(like), device=like.device))
        self._base_index = next(_index(m) for m in _indexed(self.block) if m is not self.block)
        self._model_layers = _model_layers(self.block)
        self._input = next(n for n in inspect.signature(type(base).forward).parameters if n != "self")
        self._slots: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()  # cache -> its layer for B_i

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        raise TypeError("inner_layers runs after the decoder layer's call; it has no per-tensor forward")

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if not isinstance(hidden, Tensor):
            raise AdapterKitError(f"inner_layers: {type(module).__name__} returned no hidden states; the targets "
                                  "must be decoder layers")
        kw = call_kwargs(module, args, kwargs)
        kw.pop(self._input, None)  # B_i runs on the layer's output (positional: checkpointing needs it so)
        cache = next((kw[k] for k in _CACHE_KEYS if kw.get(k) is not None), None)
        if cache is not None:
            slot = self._slot(getattr(cache, "self_attention_cache", cache))  # an encoder-decoder cache: its self part
            for attention in _indexed(self.block):
                setattr(attention, "layer_idx", slot)  # noqa: B010 (an int attribute, not a submodule)
        result = self._run(hidden, kw)
        out = result[0] if isinstance(result, tuple) else result
        new = hidden + as_compute(self.gate, hidden) * (out.to(hidden.dtype) - hidden)  # (B, T, d)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def _run(self, hidden: Tensor, kw: dict[str, Any]) -> Any:
        """B_i(hidden, **kw) with the layer's own call; float32 masters are cast to the activations' dtype where they
        differ (gradients reach the masters)."""
        params = dict(self.block.named_parameters())
        if hidden.is_floating_point() and any(p.dtype != hidden.dtype for p in params.values()):
            return functional_call(self.block, {n: as_compute(p, hidden) for n, p in params.items()}, (hidden,), kw)
        return self.block(hidden, **kw)

    def _slot(self, cache: Any) -> int:
        """The layer of ``cache`` holding B_i's keys and values: appended after the model's layers the first time."""
        slot = self._slots.get(cache)
        if slot is not None:
            return slot
        layers = getattr(cache, "layers", None)
        if not isinstance(layers, list):
            raise AdapterKitError(f"inner_layers: the KV cache ({type(cache).__name__}) has no list of layers to keep "
                                  "the inserted blocks' keys and values in; use a transformers DynamicCache")
        grows = getattr(cache, "layer_class_to_replicate", None)
        if grows is not None:  # a lazily grown cache: the model's later layers will take the indices before ours
            if self._model_layers is None:
                raise AdapterKitError("inner_layers: the model's config does not give its number of layers, which "
                                      "a lazily grown cache needs; pass DynamicCache(config=model.config)")
            slot = max(len(layers), self._model_layers)
        else:
            slot = len(layers)
        while len(layers) <= slot:
            like = layers[min(self._base_index, slot - 1):]  # the base layer's own cache layer
            layers.append(grows() if grows is not None else _empty_like(cache, like))
        self._slots[cache] = slot
        return slot


def _empty_like(cache: Any, layers: list) -> Any:
    """An empty cache layer of the kind of ``layers[0]`` (the dynamic kinds only: others are preallocated)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    kind = type(layers[0]) if layers else None
    if kind is DynamicLayer:
        return DynamicLayer()
    if kind is DynamicSlidingWindowLayer:
        return DynamicSlidingWindowLayer(sliding_window=layers[0].sliding_window)
    raise AdapterKitError(f"inner_layers: cannot add a layer for the inserted blocks to a {type(cache).__name__} "
                          f"({getattr(kind, '__name__', 'no')} layers are preallocated); generate with a dynamic "
                          "cache (cache_implementation='dynamic')")
