"""Low-bit (1-bit and k-bit) adapters by quantisation-aware training: "Revisiting the Parameter Efficiency of
Adapters from the Perspective of Precision Redundancy" (Jie, Wang & Deng, ICCV 2023, https://arxiv.org/abs/2307.16867).

Every weight matrix W (every parameter with 2 or more dimensions: LoRA's A and B, a bottleneck's down and up
weights) of a base adapter is replaced, in the forward, by its k-bit quantisation with a per-matrix mean and
standard deviation (the paper's ``QLinear``):

    mu = mean(W),  sigma = std(W),  W^ = (W - mu) / (sigma + 1e-5)
    q(W^) = the Lloyd-Max level of N(0, 1) whose cell holds W^     (k = 1: +-sqrt(2 / pi) = +-0.798, threshold 0)
    W_q = (q(W^).detach() + W^ - W^.detach()) * sigma + mu          straight-through estimator; mu, sigma keep grads

The float weights W are the trained latents. What is stored is the k-bit codes, bit-packed (ops/bitpack.py), and
(mu, sigma) as two float32 numbers per matrix (one tensor per adapter); biases and vectors stay float32. Loading
dequantizes, W_q = level[code] * sigma + mu, which is bit-for-bit the weight the trained quantised forward used, so
the loaded adapter gives exactly the saved one's outputs (until its latents are trained further: the stored codes
are then dropped and the latents, set to W_q, are quantised again).

Design: one spec over a named base method, ``LowBit(base=LoRA(r=8, alpha=16), bits=1)`` (Bi-LoRA) or
``LowBit(base=ParBottleneck(...), bits=1)`` (Bi-AdaptFormer's parallel bottleneck), reusing the base method's
module unchanged through ``torch.nn.utils.parametrize``. Mergeable bases stay mergeable (the merged delta is the
quantised one). As in the paper, a zero-initialised matrix (LoRA's B, a bottleneck's up projection) starts from
trunc_normal(0, 1e-3, +-2e-3) instead: with sigma = 0 the normalisation has no spread and std has no gradient,
so a low-bit adapter starts close to, not exactly at, the base model.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from adapterkit.core.protocol import Mergeable
from adapterkit.core.registry import register, spec_from_dict
from adapterkit.core.spec import AdapterSpec, require
from adapterkit.methods.lora import LoRA
from adapterkit.ops.bitpack import BitpackError, pack, unpack

EPS = 1e-5  # the paper's epsilon in (W - mu) / (sigma + eps)


@functools.cache
def lloyd_max_normal(bits: int, iterations: int = 500) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(levels, thresholds) of the minimum-MSE 2**bits-level quantiser of N(0, 1), by Lloyd's iteration.

    level_i = E[X | t_{i-1} < X <= t_i] = (phi(t_{i-1}) - phi(t_i)) / (Phi(t_i) - Phi(t_{i-1})),
    t_i = (level_i + level_{i+1}) / 2.
    """
    def pdf(t: float) -> float:
        return 0.0 if math.isinf(t) else math.exp(-t * t / 2) / math.sqrt(2 * math.pi)

    def cdf(t: float) -> float:
        return 0.5 * (1 + math.erf(t / math.sqrt(2)))

    n = 1 << bits
    levels = [-3 + 6 * (i + 0.5) / n for i in range(n)]  # uniform start on [-3, 3]
    thresholds: list[float] = []
    for _ in range(iterations):
        thresholds = [(a + b) / 2 for a, b in zip(levels[:-1], levels[1:])]
        edges = [-math.inf, *thresholds, math.inf]
        levels = [(pdf(a) - pdf(b)) / (cdf(b) - cdf(a)) for a, b in zip(edges[:-1], edges[1:])]
    return tuple(levels), tuple(thresholds)


class Quantizer(nn.Module):
    """The parametrization W -> W_q (STE), plus the stored form (codes, (mu, sigma)) and its exact inverse."""

    levels: Tensor  # (2**k,) float64
    thresholds: Tensor  # (2**k - 1,) float64
    pinned_codes: Tensor | None
    pinned_stats: Tensor | None

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        levels, thresholds = lloyd_max_normal(bits)
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float64), persistent=False)  # (2**k,)
        self.register_buffer("thresholds", torch.tensor(thresholds, dtype=torch.float64), persistent=False)
        # Codes and stats loaded from a file, valid while the latent is unchanged (its version counter).
        self.register_buffer("pinned_codes", None, persistent=False)
        self.register_buffer("pinned_stats", None, persistent=False)
        self.pinned_version = -1

    def _pinned(self, w: Tensor) -> bool:
        return self.pinned_codes is not None and self.pinned_version == w._version

    def encode(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """(codes, stats=(mu, sigma)) of the latent ``w``: what is stored."""
        if self._pinned(w):
            return self.pinned_codes, self.pinned_stats  # type: ignore[return-value]
        with torch.no_grad():
            mu, sigma = w.mean(), w.std()
            codes = torch.bucketize((w - mu) / (sigma + EPS), self.thresholds.to(w.dtype))
        return codes, torch.stack([mu, sigma])

    def decode(self, codes: Tensor, stats: Tensor) -> Tensor:
        """W_q = level[code] * sigma + mu (the same arithmetic as the quantised forward)."""
        return self.levels.to(stats.dtype)[codes] * stats[1] + stats[0]

    def pin(self, codes: Tensor, stats: Tensor, w: Tensor) -> None:
        """Use these stored codes while the latent ``w`` (already set to their decoding) is not trained."""
        self.pinned_codes, self.pinned_stats, self.pinned_version = codes, stats, w._version

    def forward(self, w: Tensor) -> Tensor:
        if self._pinned(w):
            return self.decode(self.pinned_codes, self.pinned_stats) + (w - w.detach())  # type: ignore[arg-type]
        mu, sigma = w.mean(), w.std()
        w_hat = (w - mu) / (sigma + EPS)
        q = self.levels.to(w.dtype)[torch.bucketize(w_hat.detach(), self.thresholds.to(w.dtype))]
        return (q + (w_hat - w_hat.detach())) * sigma + mu  # value q * sigma + mu; gradient straight through


@register("lowbit")
@dataclass(frozen=True)
class LowBit(AdapterSpec):
    """Spec of a k-bit quantisation-aware adapter over a base method (Bi-LoRA, Bi-AdaptFormer)."""

    base: AdapterSpec = LoRA(r=8, alpha=16.0)  # the adapter whose weight matrices are quantised
    bits: int = 1  # bits per stored weight, 1..8

    def __post_init__(self) -> None:
        if isinstance(self.base, dict):  # from JSON or the CLI's -p base={...}
            object.__setattr__(self, "base", spec_from_dict(self.base, where=f"{self.method}.base"))
        require(isinstance(self.base, AdapterSpec) and not isinstance(self.base, LowBit),
                f"{self.method}: base must be another method's spec, e.g. LoRA(r=8), got {self.base!r}")
        require(isinstance(self.bits, int) and 1 <= self.bits <= 8,
                f"{self.method}: bits must be 1..8, got {self.bits!r}")

    @property
    def starts_as_identity(self) -> bool:
        """Zero-initialised matrices start near zero, not at zero (see the module docstring)."""
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "base": self.base.to_dict(), "bits": self.bits}

    def check_target(self, base: nn.Module, path: str) -> None:
        self.base.check_target(base, path)

    def build(self, base: nn.Module) -> nn.Module:
        inner = self.base.build(base)
        cls = MergeableLowBitAdapter if isinstance(inner, Mergeable) else LowBitAdapter
        return cls(self, inner)


class LowBitAdapter(nn.Module):
    """A base adapter whose weight matrices run quantised; stores codes, not floats (the ``Packed`` contract)."""

    def __init__(self, spec: LowBit, inner: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.site = inner.site
        self.inner = inner
        self.quantized: list[tuple[str, str]] = []  # (module path in inner, parameter name)
        for path, module in list(inner.named_modules()):
            for pname, param in list(module.named_parameters(recurse=False)):
                if param.dim() < 2:
                    continue
                if not param.detach().any():  # sigma = 0 has no spread to binarise: the paper's small init
                    with torch.no_grad():
                        nn.init.trunc_normal_(param, std=1e-3, a=-2e-3, b=2e-3)
                parametrize.register_parametrization(module, pname, Quantizer(spec.bits))
                self.quantized.append((path, pname))

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        return self.inner(x, base_out)

    def _latent(self, path: str, pname: str) -> tuple[Tensor, Quantizer]:
        owner: Any = self.inner.get_submodule(path)
        holder = owner.parametrizations[pname]  # a ParametrizationList: .original and the Quantizer
        return holder.original, holder[0]

    def packed_state(self) -> dict[str, Tensor]:
        """k-bit codes (packed) per quantised matrix, their (mu, sigma) in one (matrices, 2) tensor, the rest as is."""
        latents = {id(self._latent(p, n)[0]) for p, n in self.quantized}
        state = {k: v for k, v in self.inner.state_dict(keep_vars=True).items() if id(v) not in latents}
        stats = []
        for path, pname in self.quantized:
            latent, quantizer = self._latent(path, pname)
            codes, pair = quantizer.encode(latent)
            state[f"{path}.{pname}.codes" if path else f"{pname}.codes"] = pack(codes, self.spec.bits)
            stats.append(pair)
        state["stats"] = torch.stack(stats)  # (matrices, 2): one tensor, not one per matrix, keeps the file small
        return {k: v.detach() for k, v in state.items()}

    @torch.no_grad()
    def load_packed(self, state: dict[str, Tensor]) -> None:
        """Dequantize the stored codes into the latents and pin them (exact outputs); copy the rest."""
        expected = self.packed_state()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"missing tensors {missing[:3]}")
        for key, value in expected.items():
            if value.dtype != torch.uint8 and tuple(state[key].shape) != tuple(value.shape):
                raise ValueError(f"tensor {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")
        own = self.inner.state_dict(keep_vars=True)
        for key in expected:
            if key in own:
                own[key].copy_(state[key])
        for index, (path, pname) in enumerate(self.quantized):
            latent, quantizer = self._latent(path, pname)
            key = f"{path}.{pname}.codes" if path else f"{pname}.codes"
            try:
                codes = unpack(state[key], self.spec.bits, tuple(latent.shape)).to(latent.device)
            except BitpackError as exc:
                raise ValueError(f"tensor {key}: {exc}") from None
            stats = state["stats"][index].to(latent.device, latent.dtype)
            latent.copy_(quantizer.decode(codes, stats))
            quantizer.pin(codes, stats, latent)


class MergeableLowBitAdapter(LowBitAdapter):
    """Low-bit form of a mergeable base (LoRA): merges the quantised delta, s * B_q A_q."""

    def merge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        inner: Any = self.inner  # a Mergeable adapter (checked in LowBit.build)
        return inner.merge(weight, bias)

    def unmerge(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        inner: Any = self.inner
        return inner.unmerge(weight, bias)
