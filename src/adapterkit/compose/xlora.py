"""X-LoRA: a mixture of frozen LoRA experts with token-level scalings from the model's own hidden state
(Buehler & Buehler 2024, https://arxiv.org/abs/2402.07148); the learned part of ``Route``.

Two passes per forward. The scaling pass runs the model with every expert scaled by ``scaling_pass_value`` (0:
the bare base model, so the experts are skipped) and reads its last hidden state h (B, L, H). A classifier turns
it into scalings for every token, adapted module n and expert k:

    logits = MLP(h)                                   # (B, L, K) shared by all modules, or (B, L, N * K) layerwise
    c[b, t, n, :] = softmax(logits[b, t, n, :] / T)   # optional: keep the top-k, optionally re-softmaxed over them
    y_n = W_n x + g * sum_k c[:, :, n, k] * delta_k(x)   # the real pass, g = global_scaling_weight

The MLP is ``Linear(H, K[*N])`` at depth 1, else ``Linear(H, S), ReLU, Dropout`` then (depth - 2) times
``Linear(S, S), ReLU, Dropout`` and ``Linear(S, K[*N])``: peft's ``XLoraClassifier`` layout, with modules numbered
in model order, so the same weights give the same output. Only the classifier trains.

One ``attach`` builds one module per placement; the first (in model order) holds the classifier and runs the
scaling pass from a forward pre-hook on the model, once per forward (``session``); every module reads its own
slice of the scalings from the ``use`` block's state. ``generate`` works with the KV cache: the scaling pass keeps
its own cache beside the real one, so each step scores only the new tokens (peft needs ``use_cache=False`` and
re-runs both passes over the whole sequence at every step).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from adapterkit.core.errors import AdapterKitError
from adapterkit.core.host import Host
from adapterkit.core.interpret import mixed_change
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require

SCALINGS = ("shared", "layerwise")
NORMALIZE = ("softmax", "none")


@register("xlora")
@dataclass(frozen=True)
class XLoRA(AdapterSpec):
    """Spec of an X-LoRA router over ``experts`` adapters (peft ``XLoraConfig`` names in comments)."""

    role = "route"
    experts: int = 2  # K, the number of children of the Route block
    hidden_size: int = 0  # H, the width of the model's last hidden state (required)
    depth: int = 1  # xlora_depth: number of Linear layers in the classifier
    size: int = 2048  # xlora_size: their width when depth > 1
    dropout: float = 0.2  # xlora_dropout_p, after each hidden ReLU
    scalings: str = "shared"  # "shared" by every module, or "layerwise" (layerwise_scalings=True)
    normalize: str = "softmax"  # enable_softmax: "softmax" over experts, or "none" (raw logits)
    temperature: float = 1.0  # softmax_temperature
    top_k: int | None = None  # top_k_lora: keep the k largest scalings per token (None: all)
    top_k_normalize: str = "none"  # enable_softmax_topk: "softmax" again over the kept ones, or "none"
    scaling_pass_value: float = 0.0  # every expert's scaling in the scaling pass
    global_scaling_weight: float = 1.0  # g

    def __post_init__(self) -> None:
        require(isinstance(self.experts, int) and self.experts > 0, f"xlora: experts must be a positive integer, "
                f"got {self.experts!r}")
        require(isinstance(self.hidden_size, int) and self.hidden_size > 0, "xlora: hidden_size must be the model's "
                f"hidden width (a positive integer), got {self.hidden_size!r}")
        require(isinstance(self.depth, int) and self.depth > 0, f"xlora: depth must be >= 1, got {self.depth!r}")
        require(isinstance(self.size, int) and self.size > 0, f"xlora: size must be >= 1, got {self.size!r}")
        require(0.0 <= self.dropout < 1.0, f"xlora: dropout must be in [0, 1), got {self.dropout}")
        require(self.scalings in SCALINGS, f"xlora: scalings must be one of {SCALINGS}, got {self.scalings!r}")
        require(self.normalize in NORMALIZE, f"xlora: normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        require(self.top_k_normalize in NORMALIZE, f"xlora: top_k_normalize must be one of {NORMALIZE}, got "
                f"{self.top_k_normalize!r}")
        require(self.temperature > 0, f"xlora: temperature must be > 0, got {self.temperature}")
        require(self.top_k is None or (isinstance(self.top_k, int) and 0 < self.top_k <= self.experts),
                f"xlora: top_k must be None or in 1..experts ({self.experts}), got {self.top_k!r}")

    def build(self, base: nn.Module) -> nn.Module:
        return self.build_all([base])[0]

    def build_all(self, bases: list[nn.Module]) -> list[nn.Module]:
        count = len(bases)
        return [XLoRARouter(self, count), *(XLoRASlot(self, index, count) for index in range(1, count))]


@dataclass
class _Pass:
    """The phase of the current forward for one X-LoRA combiner, kept in the ``use`` block's state."""

    phase: str  # "scaling" (experts scaled by scaling_pass_value) or "routed"
    scalings: Tensor | None = None  # (B, L, N, K) in the routed pass


class XLoRASlot(nn.Module):
    """X-LoRA at one adapted module: mixes the experts' changes with this module's slice of the scalings."""

    def __init__(self, spec: XLoRA, index: int, count: int) -> None:
        super().__init__()
        self.spec = spec
        self.index = index  # n: this module's position among the N placements, in model order
        self.count = count
        self.branches = spec.experts

    def weights(self, scalings: Tensor) -> Tensor:
        """This module's expert weights (B, L, K) from all scalings (B, L, N, K), with top-k applied."""
        chosen = scalings[:, :, self.index, :]  # (B, L, K)
        if self.spec.top_k is not None:
            kept = torch.zeros_like(chosen, dtype=torch.bool)
            kept.scatter_(-1, chosen.topk(self.spec.top_k, dim=-1).indices, True)
            chosen = chosen * kept.to(chosen.dtype)
        if self.spec.top_k_normalize == "softmax":
            nonzero = chosen != 0  # as peft: re-normalise over the non-zero scalings
            chosen = chosen.masked_fill(~nonzero, float("-inf")).softmax(-1).masked_fill(~nonzero, 0.0)
        return chosen

    def combine(self, x: Tensor, out: Tensor, branches: Sequence[Any], call: Any) -> Tensor:
        """``out + g * sum_k c_k * delta_k(x)`` (the scaling pass: c_k = scaling_pass_value)."""
        state = call.state.get(("xlora", call.combiner))
        if state is None:
            raise AdapterKitError(f"X-LoRA {call.combiner!r} at {call.path!r} has no scalings: call the model "
                                  "passed to use(...) itself, so its scaling pass runs first")
        if state.phase == "scaling":
            value = self.spec.scaling_pass_value * self.spec.global_scaling_weight
            if value == 0.0:
                return out  # the base model: the experts need not run at all
            mixed = mixed_change(branches, x, x.new_full((len(branches),), value))
            if mixed is not None:
                return out + mixed
            result = out
            for branch in branches:
                delta = branch.change(x, out)
                result = result if delta is None else result + value * delta
            return result
        weights = self.weights(state.scalings)  # (B, L, K)
        call.record(weights)
        weights = (weights * self.spec.global_scaling_weight).to(out.dtype)
        if weights.shape[:2] != out.shape[:2]:
            raise AdapterKitError(f"X-LoRA at {call.path!r}: scalings for {tuple(weights.shape[:2])} tokens, the "
                                  f"module's output has {tuple(out.shape[:2])}")
        mixed = mixed_change(branches, x, weights)  # every expert in two matmuls, when they allow it
        if mixed is not None:
            return out + mixed
        result = out
        for k, branch in enumerate(branches):
            delta = branch.change(x, out)  # (B, L, out)
            if delta is not None:
                result = result + delta * weights[:, :, k : k + 1]
        return result


class XLoRARouter(XLoRASlot):
    """The first placement: also holds the classifier and runs the scaling pass once per forward."""

    def __init__(self, spec: XLoRA, count: int) -> None:
        super().__init__(spec, 0, count)
        width = spec.experts * (count if spec.scalings == "layerwise" else 1)
        layers: list[nn.Module] = []
        features = spec.hidden_size
        for _ in range(spec.depth - 1):
            layers += [nn.Linear(features, spec.size), nn.ReLU()]
            layers += [nn.Dropout(spec.dropout)] if spec.dropout > 0 else []
            features = spec.size
        self.classifier = nn.Sequential(*layers, nn.Linear(features, width))

    def scalings(self, hidden: Tensor) -> Tensor:
        """Scalings (B, L, N, K) from the last hidden state (B, L, H)."""
        dtype = next(self.classifier.parameters()).dtype
        logits = self.classifier(hidden.to(dtype))  # (B, L, K) or (B, L, N * K)
        batch, length = hidden.shape[:2]
        if self.spec.scalings == "shared":
            logits = logits.unsqueeze(2).expand(batch, length, self.count, self.spec.experts)
        logits = logits.reshape(batch, length, self.count, self.spec.experts)  # (B, L, N, K)
        if self.spec.normalize == "softmax":
            logits = (logits / self.spec.temperature).softmax(-1)
        return logits

    @contextlib.contextmanager
    def session(self, model: nn.Module, plan: Any) -> Iterator[None]:
        """Hook ``model``: before each of its forwards, run the scaling pass and store the scalings."""
        key = ("xlora", self._name(model, plan))
        shadow: dict[str, Any] = {}  # the scaling pass's own KV cache, beside generate's

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            plan.state[key] = _Pass("scaling")
            scoring = {k: v for k, v in kwargs.items() if k != "labels"}  # the scaling pass needs no loss
            scoring.update(output_hidden_states=True, return_dict=True)
            cache = kwargs.get("past_key_values")
            if cache is not None:
                scoring["past_key_values"] = self._shadow_cache(cache, shadow)
            with torch.no_grad():
                result = module.forward(*args, **scoring)  # forward, not __call__: this hook must not re-enter
            # a cache the model creates itself in this call: paired with the real one when that comes back
            shadow["pending"] = getattr(result, "past_key_values", None) if cache is None else None
            hidden = getattr(result, "hidden_states", None)
            if not hidden:
                raise AdapterKitError(f"X-LoRA: {type(module).__name__} returned no hidden_states for the scaling "
                                      "pass; use(...) the model whose forward takes output_hidden_states")
            plan.state[key] = _Pass("routed", self.scalings(hidden[-1]))

        def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            pending, real = shadow.pop("pending", None), getattr(output, "past_key_values", None)
            if pending is not None and real is not None:
                shadow["for"], shadow["cache"] = id(real), pending

        handles = [model.register_forward_pre_hook(pre_hook, with_kwargs=True),
                   model.register_forward_hook(post_hook, with_kwargs=True)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            plan.state.pop(key, None)

    @staticmethod
    def _shadow_cache(cache: Any, shadow: dict[str, Any]) -> Any:
        """The scaling pass's cache for generate's ``cache``: a fresh copy when that one starts empty, then kept
        in step with it (both see the same tokens)."""
        if not hasattr(cache, "get_seq_length"):
            raise AdapterKitError(f"X-LoRA: past_key_values of type {type(cache).__name__} is not supported; pass "
                                  "a transformers Cache or use_cache=False")
        if cache.get_seq_length() == 0:
            shadow["for"], shadow["cache"] = id(cache), copy.deepcopy(cache)
        elif shadow.get("for") != id(cache):
            raise AdapterKitError("X-LoRA: the KV cache was filled outside this use(...) block, so the scaling pass "
                                  "has no cache of its own; generate inside one use block or pass use_cache=False")
        return shadow["cache"]

    def _name(self, model: nn.Module, plan: Any) -> str:
        """The name this router is attached under (the block names it; one walk of the model)."""
        names = {name for _, name in plan.block.combiners()}
        for module in model.modules():
            if isinstance(module, Host):
                for name in names:
                    if module._modules.get(name) is self:
                        return name
        raise AdapterKitError("X-LoRA: this router is not attached to the model passed to use(...)")
