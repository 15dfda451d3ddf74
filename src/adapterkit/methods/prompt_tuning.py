"""Prompt tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691): n learned embeddings before the input.

    E' = [P ; E(x)]          P: (n, d) trained, E the model's frozen input embedding, x the T input tokens
    mask' = [1_n ; mask]     labels' = [-100_n ; labels]

The model runs on the n + T embeddings; what the caller sees is its output with the n virtual positions removed
from the logits (methods/virtual_tokens.py says why and how the call is rewritten). In ``generate`` the prompt
goes in once, at the prefill; the KV cache then holds it.

Init (peft's ``prompt_tuning_init``): "vocab" copies the embeddings of n tokens drawn from the vocabulary
(peft's SAMPLE_VOCAB, the better start on small models), "random" draws P ~ N(0, 1) (an ``nn.Embedding``'s
default, peft's RANDOM), "text" copies the embeddings of ``init_ids`` (peft's TEXT: token ids of a phrase such as
"Classify the sentiment", repeated or cut to n). Same P gives peft's ``prompt_tuning`` outputs
(tests/methods/test_prompts.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from adapterkit.core.errors import TargetError
from adapterkit.core.precision import master_dtype
from adapterkit.core.protocol import Site
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require
from adapterkit.methods.virtual_tokens import (
    cached_length,
    call_kwargs,
    check_room,
    config_of,
    outermost,
    pad_left,
    rows_and_length,
    start_ids,
    strip_logits,
    widen_mask,
)

INITS = ("vocab", "random", "text")


def input_embeddings(model: nn.Module, method: str) -> nn.Module:
    """The model's input embedding (``get_input_embeddings``, the Hugging Face interface)."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if not isinstance(embedding, nn.Module) or not hasattr(embedding, "weight"):
        raise TargetError(f"{method}: {type(model).__name__} has no input embedding (get_input_embeddings)")
    return embedding


@dataclass(frozen=True)
class _PromptSpec(AdapterSpec):
    n_tokens: int = 20  # n, the virtual tokens
    rewrites_call = True

    def __post_init__(self) -> None:
        require(isinstance(self.n_tokens, int) and self.n_tokens > 0,
                f"{self.method}: n_tokens must be a positive integer, got {self.n_tokens!r}")

    @property
    def starts_as_identity(self) -> bool:
        """Extra tokens change what the model attends to from the first step."""
        return False

    def default_targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return outermost(model, "inputs_embeds", self.method)

    def check_target(self, base: nn.Module, path: str) -> None:
        input_embeddings(base, self.method)
        check_room(config_of(base, self.method), self.n_tokens, 1, 0, self.method)


@register("prompt_tuning")
@dataclass(frozen=True)
class PromptTuning(_PromptSpec):
    """n learned input embeddings (``ak.attach(model, "p", ak.PromptTuning(n_tokens=20))``, no targets)."""

    init: str = "vocab"  # one of INITS
    init_ids: tuple[int, ...] = ()  # token ids for init="text"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.init in INITS, f"prompt_tuning: init must be one of {INITS}, got {self.init!r}")
        require(self.init != "text" or len(self.init_ids) > 0,
                "prompt_tuning: init='text' needs init_ids (the token ids of the init phrase)")

    def build(self, base: nn.Module) -> nn.Module:
        return PromptAdapter(self, LearnedPrompt(self, input_embeddings(base, self.method)))


class LearnedPrompt(nn.Module):
    """P itself: (n, d)."""

    def __init__(self, spec: PromptTuning, embedding: nn.Module) -> None:
        super().__init__()
        weight = embedding.weight
        assert isinstance(weight, Tensor)  # input_embeddings checked it
        vocab = weight.shape[0]
        with torch.no_grad():
            if spec.init == "random":
                start = torch.randn(spec.n_tokens, weight.shape[1], device=weight.device)
            else:
                ids = start_ids(spec.init, spec.init_ids, spec.n_tokens, vocab, spec.method)
                start = embedding(ids.to(weight.device)).float()
        self.weight = nn.Parameter(start.to(master_dtype(weight)))

    def forward(self, rows: int) -> Tensor:
        return self.weight.unsqueeze(0).expand(rows, -1, -1)  # (B, n, d)


class PromptAdapter(nn.Module):
    """Rewrites the call: n virtual embeddings from ``prompt`` (a module mapping rows -> (B, n, d)) go first."""

    site = Site.CALL

    def __init__(self, spec: _PromptSpec, prompt: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.prompt = prompt
        self._prepended: dict[int, int] = {}  # id of a rewritten call's kwargs -> virtual positions to strip

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        raise TypeError(f"{self.spec.method} rewrites the model's call; it has no per-layer forward")

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        n, method = self.spec.n_tokens, self.spec.method
        kw = call_kwargs(module, args, kwargs)
        rows, length = rows_and_length(kw, method)
        cached = cached_length(kw.get("past_key_values"))
        check_room(config_of(module, method), n, length, cached, method)
        widen_mask(kw, n, method)
        kw.pop("cache_position", None)  # the model numbers the n + T positions itself, as peft has it
        kw["position_ids"] = None
        if cached == 0:  # the first call of a sequence: the prompt goes in (later steps find it in the cache)
            embeds = kw.get("inputs_embeds")
            if embeds is None:
                embeds = input_embeddings(module, method)(kw["input_ids"])
            kw["input_ids"] = None
            kw["inputs_embeds"] = torch.cat([self.prompt(rows).to(embeds.dtype), embeds], dim=1)  # (B, n + T, d)
            if "labels" in kw:
                kw["labels"] = pad_left(kw["labels"], n, -100, length)
            if kw.get("token_type_ids") is not None:
                kw["token_type_ids"] = pad_left(kw["token_type_ids"], n, 0, length)
            if len(self._prepended) > 64:  # calls that raised never reached after(): forget them
                self._prepended.clear()
            self._prepended[id(kw)] = n
        return (), kw

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        n = self._prepended.pop(id(kwargs), 0)
        return strip_logits(output, n) if n else output
