"""LLaMA-Adapter's adaption prompts (Zhang et al. 2023, https://arxiv.org/abs/2303.16199): n learned prompt tokens
that the attention of each of the top L layers also attends to, through a zero-initialised gate.

    attn'_l(x) = attn_l(x) + W_o concat_h[ g_{l,h} softmax(q_h K_{l,h}^T * s) V_{l,h} ]     s = 1 / sqrt(d_h)
    q = RoPE(W_q x)        K_l = W_k P_l,  V_l = W_v P_l        P_l: (n, d) trained, N(0, 1) at init
                                                             g_l: one gate per head, 0 at init

The prompt's scores get their own softmax (in float32), apart from the tokens' (the paper's Eq. 8), so the layer's
own attention is left as it is and the prompt part is added to its output; with g = 0 the model is unchanged. The
prompt has no position: its keys carry no RoPE (as in the paper's code and peft). ``gate="head"`` keeps one gate per
head as the paper's code does; ``gate="scalar"`` one per layer, as peft's ``adaption_prompt``. The gate is used as
it is (the paper's Eq. 8 and peft; the paper's code applies tanh to it).

Placement: the adapter sits on the attention modules themselves (a CALL adapter: it sees the attention's whole
call) and places itself on the last ``layers`` modules named ``attention`` (peft's ``adapter_layers`` and
``target_modules``). It finds everything by interface: the projections are the children named by ``q_proj`` ..
``o_proj`` (a fused query/key/value projection such as GPT-2's ``c_attn`` is named three times; ``o_proj=""`` adds
the prompt part without an output projection, as peft does on GPT-2), the head size is the module's ``head_dim``,
the score scale its ``scaling`` (else 1/sqrt(d_h)) and the rotary angles the ``position_embeddings`` (cos, sin) the
layer is called with (absent, as on GPT-2: no rotation). The query is recomputed from the attention's input, as peft
does, since the attention does not return it. Nothing is cached: during ``generate`` each new token's query meets
the same prompt keys. Same P and g give peft's outputs, losses and gradients (tests/methods/test_adaption_prompt.py).
Not covered: query/key norms (Qwen3, Gemma 3) and partial rotary (Phi, GPT-NeoX) are not reproduced in the query.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.errors import AdapterKitError, TargetError
from adapterkit.core.host import HOST_ATTR
from adapterkit.core.layers import io_sizes
from adapterkit.core.precision import as_compute, master_dtype
from adapterkit.core.protocol import Site
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require
from adapterkit.methods.virtual_tokens import call_kwargs, first_of

GATES = ("head", "scalar")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@register("adaption_prompt")
@dataclass(frozen=True)
class AdaptionPrompt(AdapterSpec):
    """Gated adaption prompts in the top ``layers`` attention modules, no targets:
    ``ak.attach(model, "a", ak.methods.AdaptionPrompt(adapter_len=10, layers=8))``."""

    rewrites_call = True  # a CALL adapter on the attention: one setting per batch (no Select, no per-request serving)

    adapter_len: int = 10  # n, the prompt tokens per layer
    layers: int | None = None  # L, the top attention modules that get a prompt (None: all of them)
    attention: str = "self_attn"  # the attention modules' name ("attn" on GPT-2)
    q_proj: str = "q_proj"  # the attention's child projections ("c_attn" three times on GPT-2)
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"  # "" adds the prompt part unprojected (peft on GPT-2)
    gate: str = "head"  # one of GATES

    def __post_init__(self) -> None:
        require(isinstance(self.adapter_len, int) and self.adapter_len > 0,
                f"adaption_prompt: adapter_len must be a positive integer, got {self.adapter_len!r}")
        require(self.layers is None or self.layers > 0, f"adaption_prompt: layers must be > 0, got {self.layers}")
        require(self.gate in GATES, f"adaption_prompt: gate must be one of {GATES}, got {self.gate!r}")
        for field in ("attention", *_PROJECTIONS):
            value = getattr(self, field)
            require(_NAME.fullmatch(value) is not None or (field == "o_proj" and value == ""),
                    f"adaption_prompt: {field} must be a module name (letters, digits, '_', dots), got {value!r}")

    def default_targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        found = [(path, module) for path, module in model.named_modules()
                 if HOST_ATTR not in path.split(".") and (path == self.attention
                                                          or path.endswith("." + self.attention))]
        if not found:
            raise TargetError(f"adaption_prompt: no module of this {type(model).__name__} is named "
                              f"{self.attention!r}; set attention= to its attention modules' name")
        if self.layers is not None and self.layers > len(found):
            raise TargetError(f"adaption_prompt: layers={self.layers} exceeds the {len(found)} attention modules "
                              f"({self.attention!r}) of this {type(model).__name__}")
        return found[-(self.layers or len(found)):]

    def check_target(self, base: nn.Module, path: str) -> None:
        sizes(self, base, path)

    def build(self, base: nn.Module) -> nn.Module:
        return AdaptionAdapter(self, base)


def child(spec: AdaptionPrompt, base: nn.Module, field: str, path: str) -> nn.Module:
    """The attention's projection named by ``spec.<field>``."""
    name = getattr(spec, field)
    try:
        return base.get_submodule(name)
    except AttributeError:
        raise TargetError(f"adaption_prompt: {path or 'the model'} ({type(base).__name__}) has no child {name!r} "
                          f"({field}); the targets must be attention modules with query/key/value/output "
                          "projections (set attention= and the *_proj names)") from None


def sizes(spec: AdaptionPrompt, base: nn.Module, path: str) -> tuple[int, int, int, int]:
    """(hidden, heads, key/value heads, head size) of the attention ``base``; one-line errors otherwise."""
    projections = [child(spec, base, f, path) for f in _PROJECTIONS if getattr(spec, f)]
    head_dim = getattr(base, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise TargetError(f"adaption_prompt: {path} ({type(base).__name__}) has no head_dim; the targets must be "
                          "attention modules")
    hidden, q_width = io_sizes(projections[0])
    kv_width = io_sizes(projections[1])[1]
    fused = spec.q_proj == spec.k_proj == spec.v_proj  # [q ; k ; v] from one projection (GPT-2's c_attn)
    if not fused and len({spec.q_proj, spec.k_proj, spec.v_proj}) < 3:
        raise TargetError(f"adaption_prompt: q_proj, k_proj and v_proj must be three projections or one fused one, "
                          f"got {spec.q_proj!r}, {spec.k_proj!r}, {spec.v_proj!r}")
    if fused:
        config = getattr(base, "config", None)
        heads = first_of(config, "num_attention_heads", "n_head") if config is not None else None
        total, q_width = q_width, (heads if isinstance(heads, int) else hidden // head_dim) * head_dim
        kv_width = (total - q_width) // 2
    heads, kv_heads = q_width // head_dim, kv_width // head_dim
    if hidden <= 0 or kv_heads <= 0 or q_width % head_dim or kv_width % head_dim or heads % kv_heads:
        raise TargetError(f"adaption_prompt: cannot read the heads of {path} ({type(base).__name__}): query width "
                          f"{q_width}, key width {kv_width}, head_dim {head_dim}")
    return hidden, heads, kv_heads, head_dim


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the last dim: the rotary form of Llama, Mistral, Qwen, Gemma."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class AdaptionAdapter(nn.Module):
    """P_l and g_l of one attention module; adds the gated prompt attention to the module's output."""

    site = Site.CALL

    def __init__(self, spec: AdaptionPrompt, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        hidden, self.heads, self.kv_heads, self.head_dim = sizes(spec, base, "")
        like = next(base.parameters())
        dtype = master_dtype(like)
        self.prompt = nn.Parameter(torch.randn(spec.adapter_len, hidden, dtype=dtype, device=like.device))
        self.gate = nn.Parameter(torch.zeros(self.heads if spec.gate == "head" else 1, dtype=dtype,
                                             device=like.device))

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        raise TypeError("adaption_prompt rewrites the attention's call; it has no per-tensor forward")

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs

    def _projected(self, module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, T, H d_h) from the input, K and V (n, H_kv d_h) from the prompt."""
        spec, kv = self.spec, self.kv_heads * self.head_dim
        prompt = as_compute(self.prompt, x)
        if spec.q_proj == spec.k_proj:  # fused [q ; k ; v]
            fused = module.get_submodule(spec.q_proj)
            q = fused(x)[..., : self.heads * self.head_dim]
            _, k, v = fused(prompt).split([self.heads * self.head_dim, kv, kv], dim=-1)
            return q, k, v
        return (module.get_submodule(spec.q_proj)(x), module.get_submodule(spec.k_proj)(prompt),
                module.get_submodule(spec.v_proj)(prompt))

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        kw = call_kwargs(module, args, kwargs)
        x = kw.get("hidden_states")
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(x, Tensor) or not isinstance(out, Tensor):
            raise AdapterKitError(f"adaption_prompt: {type(module).__name__} was called without hidden_states or "
                                  "returned no tensor; the targets must be attention modules")
        rows, length = x.shape[:2]
        heads, n, d_h = self.heads, self.spec.adapter_len, self.head_dim
        q, k, v = self._projected(module, x)
        q = q.view(rows, length, heads, d_h).transpose(1, 2)  # (B, H, T, d_h)
        angles = kw.get("position_embeddings")
        if angles is not None:
            cos, sin = angles
            if cos.shape[-1] != d_h:
                raise AdapterKitError(f"adaption_prompt: the rotary angles cover {cos.shape[-1]} of {d_h} head dims "
                                      "(partial rotary), which this method does not reproduce")
            q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
        repeat = heads // self.kv_heads  # grouped-query attention: each key/value head serves `repeat` heads
        k = k.view(n, self.kv_heads, d_h).transpose(0, 1).repeat_interleave(repeat, dim=0)  # (H, n, d_h)
        v = v.view(n, self.kv_heads, d_h).transpose(0, 1).repeat_interleave(repeat, dim=0)  # (H, n, d_h)
        scale = getattr(module, "scaling", None)
        scores = q @ k.transpose(-1, -2).to(q.dtype) * (scale if isinstance(scale, float) else d_h ** -0.5)
        upcast = torch.promote_types(scores.dtype, torch.float32)  # half precision: softmax in float32, as peft
        weights = F.softmax(scores, dim=-1, dtype=upcast).to(q.dtype)  # (B, H, T, n)
        weights = as_compute(self.gate, weights).view(1, -1, 1, 1) * weights
        mixed = (weights @ v.to(q.dtype)).transpose(1, 2).reshape(rows, length, heads * d_h)  # (B, T, H d_h)
        if self.spec.o_proj:
            mixed = module.get_submodule(self.spec.o_proj)(mixed)
        new = out + mixed.to(out.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new
