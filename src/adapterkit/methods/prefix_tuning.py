"""Prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190): n learned keys and values in front of every
attention layer's own.

    attention_l(x) = softmax(q [P^K_l ; K_l]^T / sqrt(d_h)) [P^V_l ; V_l]      P^K_l, P^V_l: (heads_kv, n, d_h)

    P = E                                   (plain: E of shape (n, L * 2 * heads_kv * d_h) is trained)
    P_0 = the model's keys / values of n real tokens (init "vocab" / "text", the paper's section 7.2; peft's
          random N(0, 1) start is init "random", and it derails small models: SmolLM2's loss goes from 1.1 to 9)
    P = W_2 tanh(W_1 E + b_1) + b_2          (projection="mlp": E (n, heads_kv * d_h), hidden ``hidden`` wide;
                                            the paper's reparametrisation for stabler training)

The prefix reaches every layer through the model's KV-cache interface: on the first call of a sequence the model
gets a cache that already holds P (one entry per layer), and a 2-D attention mask with n more ones; positions
then start at n, as they would after n cached tokens (peft's choice; ``positions="kept"`` numbers the real tokens
0..T-1 as if there were no prefix: AdapterHub's, whose prefix sits inside the attention). No attention code is
touched, so any Hugging Face model that takes ``past_key_values`` works (the prefix sits on the outermost module
that does: the model itself for a causal LM, the encoder model inside a BERT classifier). Sizes come from the
config (layers, key/value heads for grouped-query attention, head size). Same E (and MLP) give peft's
``prefix_tuning`` outputs (with ``positions="kept"``: AdapterHub's ``PrefixTuningConfig`` outputs on BERT), and
``generate`` with its cache equals running the full sequence without one (tests/methods/test_prompts.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from adapterkit.core.context import Setup, scoped
from adapterkit.core.errors import AdapterKitError, TargetError
from adapterkit.core.precision import master_dtype
from adapterkit.core.protocol import Site
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require
from adapterkit.core.tree import hosts
from adapterkit.methods.virtual_tokens import (
    cached_length,
    call_kwargs,
    call_parameters,
    check_room,
    config_of,
    first_of,
    outermost,
    rows_and_length,
    start_ids,
    widen_mask,
)

PROJECTIONS = ("none", "mlp")
POSITIONS = ("shifted", "kept")
INITS = ("vocab", "text", "random")


def kv_sizes(model: nn.Module, method: str) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) from the model's config."""
    config = config_of(model, method)
    layers = first_of(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = first_of(config, "num_attention_heads", "n_head", "num_heads")
    hidden = first_of(config, "hidden_size", "n_embd", "d_model")
    if not all(isinstance(v, int) for v in (layers, heads, hidden)):
        raise TargetError(f"{method}: the config of {type(model).__name__} does not give the layers, heads and "
                          "hidden size")
    kv_heads = first_of(config, "num_key_value_heads") or heads
    head_dim = first_of(config, "head_dim") or hidden // heads
    return int(layers), int(kv_heads), int(head_dim)


@register("prefix_tuning")
@dataclass(frozen=True)
class PrefixTuning(AdapterSpec):
    """n learned key/value prefixes per layer (``ak.attach(model, "p", ak.PrefixTuning(n_tokens=20))``, no targets)."""

    n_tokens: int = 20  # n, the virtual tokens
    projection: str = "none"  # "none" (train the prefix itself) or "mlp" (the paper's reparametrisation)
    hidden: int | None = None  # the MLP's hidden size (default: the key/value width, as peft)
    positions: str = "shifted"  # real tokens start at position n (peft) or keep 0..T-1 ("kept", AdapterHub)
    init: str = "vocab"  # one of INITS: the model's keys/values of n real tokens, or P ~ N(0, 1) (peft's default)
    init_ids: tuple[int, ...] = ()  # token ids for init="text"
    rewrites_call = True

    def __post_init__(self) -> None:
        require(isinstance(self.n_tokens, int) and self.n_tokens > 0,
                f"prefix_tuning: n_tokens must be a positive integer, got {self.n_tokens!r}")
        require(self.projection in PROJECTIONS,
                f"prefix_tuning: projection must be one of {PROJECTIONS}, got {self.projection!r}")
        require(self.hidden is None or self.hidden > 0, f"prefix_tuning: hidden must be > 0, got {self.hidden}")
        require(self.positions in POSITIONS,
                f"prefix_tuning: positions must be one of {POSITIONS}, got {self.positions!r}")
        require(self.init in INITS, f"prefix_tuning: init must be one of {INITS}, got {self.init!r}")
        require(self.init != "text" or len(self.init_ids) > 0,
                "prefix_tuning: init='text' needs init_ids (the token ids of the init phrase)")

    @property
    def starts_as_identity(self) -> bool:
        """Extra keys take attention weight from the first step."""
        return False

    def default_targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return outermost(model, "past_key_values", self.method)

    def check_target(self, base: nn.Module, path: str) -> None:
        kv_sizes(base, self.method)
        if self.positions == "kept" and "position_ids" not in call_parameters(base):
            raise TargetError(f"prefix_tuning: positions='kept' needs a model that takes position_ids; "
                              f"{type(base).__name__} does not")
        check_room(config_of(base, self.method), self.n_tokens, 1, 0, self.method)

    def build(self, base: nn.Module) -> nn.Module:
        return PrefixAdapter(self, base)


class PrefixAdapter(nn.Module):
    """Holds E (and the MLP) and hands the model a cache that starts with the prefix."""

    site = Site.CALL

    def __init__(self, spec: PrefixTuning, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.layers, self.kv_heads, self.head_dim = kv_sizes(base, spec.method)
        like = next(base.parameters())
        dtype, width = master_dtype(like), self.kv_heads * self.head_dim
        out = self.layers * 2 * width
        self.embedding = nn.Parameter(torch.randn(spec.n_tokens, out if spec.projection == "none" else width,
                                                  dtype=dtype, device=like.device))
        self.mlp: nn.Sequential | None = None
        if spec.projection == "mlp":
            hidden = spec.hidden or width
            self.mlp = nn.Sequential(nn.Linear(width, hidden, dtype=dtype, device=like.device), nn.Tanh(),
                                     nn.Linear(hidden, out, dtype=dtype, device=like.device))
        if spec.init != "random":
            self._start_from_real_tokens(base)

    @torch.no_grad()
    def _start_from_real_tokens(self, base: nn.Module) -> None:
        """P = the model's own keys and values for n real tokens (the paper's init, Li & Liang 2021 section 7.2: far
        better than random): one forward of the token ids with an empty cache, which every attention layer fills.
        With the MLP, its last layer starts at weight 0 and bias P, so it outputs P and learns from there."""
        from transformers.cache_utils import DynamicCache

        get = getattr(base, "get_input_embeddings", None)
        vocab = getattr(get() if callable(get) else None, "num_embeddings", None)
        if not isinstance(vocab, int):
            raise TargetError("prefix_tuning: init='vocab' / 'text' needs the model's input embedding; use "
                              "init='random'")
        n = self.spec.n_tokens
        ids = start_ids(self.spec.init, self.spec.init_ids, n, vocab, self.spec.method)
        cache = DynamicCache()
        was_training = base.training
        base.eval()
        with scoped([host for _, _, host in hosts(base)], Setup(names=())):  # the bare model: no other adapter's
            base(input_ids=ids[None].to(self.embedding.device), past_key_values=cache, use_cache=True)  # prefix
        base.train(was_training)
        if len(cache.layers) != self.layers:
            raise TargetError(f"prefix_tuning: the model filled {len(cache.layers)} cache layers, not its "
                              f"{self.layers}; use init='random'")
        kv = torch.stack([torch.stack([_filled(layer.keys), _filled(layer.values)]) for layer in cache.layers])
        # kv: (L, 2, heads_kv, n, d_h)
        flat = kv.reshape(2 * self.layers, self.kv_heads, n, self.head_dim).permute(2, 0, 1, 3).reshape(n, -1)
        if self.mlp is None:
            self.embedding.copy_(flat)
        else:
            last = self.mlp[2]
            assert isinstance(last, nn.Linear)
            last.weight.zero_()
            last.bias.copy_(flat.mean(0))  # one bias for every token: the mean real-token key/value
            self.embedding.normal_()
    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        raise TypeError("prefix_tuning rewrites the model's call; it has no per-layer forward")

    def prefix(self, rows: int, like: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per layer: keys and values, each (B, heads_kv, n, d_h)."""
        flat = self.embedding if self.mlp is None else self.mlp(self.embedding)  # (n, L * 2 * heads_kv * d_h)
        n = self.spec.n_tokens
        kv = flat.to(like.dtype).view(n, self.layers * 2, self.kv_heads, self.head_dim)
        kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, rows, -1, -1, -1)  # (2L, B, heads_kv, n, d_h)
        return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(self.layers)]

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        n, method = self.spec.n_tokens, self.spec.method
        if module.training and torch.is_grad_enabled() and getattr(module, "is_gradient_checkpointing", False):
            # transformers' checkpointed layers set past_key_values=None: the prefix would be dropped in silence
            raise AdapterKitError("prefix_tuning: gradient checkpointing makes transformers drop the KV cache, "
                                  "which carries the prefix; turn it off (model.gradient_checkpointing_disable()) "
                                  "or use prompt tuning / LoRA")
        kw = call_kwargs(module, args, kwargs)
        rows, length = rows_and_length(kw, method)
        cache = kw.get("past_key_values")
        cached = cached_length(cache)
        check_room(config_of(module, method), n, length, max(cached - n, 0), method)
        widen_mask(kw, n, method)
        if isinstance(kw.get("cache_position"), Tensor):  # the cache holds n entries before the first real token
            kw["cache_position"] = kw["cache_position"] + n
        if self.spec.positions == "shifted" and isinstance(kw.get("position_ids"), Tensor):
            kw["position_ids"] = kw["position_ids"] + n
        elif self.spec.positions == "kept" and kw.get("position_ids") is None:  # the model would count the prefix
            start = max(cached - n, 0)
            kw["position_ids"] = torch.arange(start, start + length, device=self.embedding.device).expand(rows, -1)
        if cached == 0:
            like = kw["inputs_embeds"] if kw.get("inputs_embeds") is not None else self.embedding
            kw["past_key_values"] = self._filled(cache, self.prefix(rows, like))
        return (), kw

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return output

    def _filled(self, cache: Any, prefix: list[tuple[Tensor, Tensor]]) -> Any:
        """``cache`` (an empty Cache, or None: a new DynamicCache) holding the prefix of every layer."""
        from transformers.cache_utils import Cache, DynamicCache

        if cache is None:
            cache = DynamicCache()
        elif not isinstance(cache, Cache):
            raise AdapterKitError(f"prefix_tuning: past_key_values must be a transformers Cache, got "
                                  f"{type(cache).__name__}")
        positions = torch.arange(self.spec.n_tokens, device=prefix[0][0].device)
        for layer, (keys, values) in enumerate(prefix):
            cache.update(keys, values, layer, {"cache_position": positions})
        return cache


def _filled(tensor: Tensor | None) -> Tensor:
    """A cache layer's keys or values of the one row the init ran: (heads_kv, n, d_h)."""
    assert tensor is not None  # every layer was filled (checked by the caller)
    return tensor[0]
