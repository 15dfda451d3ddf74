"""Conformer-convolution adapters (Cappellazzo et al., "Parameter-Efficient Transfer Learning of Audio Spectrogram
Transformers", MLSP 2024, https://arxiv.org/abs/2312.03694; the block is Conformer's convolution module, Gulati et
al. 2020, https://arxiv.org/abs/2005.08100), on a token sequence z: (B, T, d):

    C(z) = Dropout(W_2 SiLU(Norm(DWConv_k(GLU(W_1 z + b_1)))) + b_2)
        W_1: (2r, d_in) pointwise (a 1x1 Conv1d over tokens), GLU(a | b) = a * sigmoid(b) over the 2r channels,
        DWConv_k: depthwise Conv1d(r, r, k, groups=r) over tokens, Norm: BatchNorm1d(r) (norm="batch", the paper)
        or LayerNorm(r) per token (norm="layer"), W_2: (d_out, r) pointwise;  r = round(d_in / reduction_factor)

    sequential ("seq_conformer"):  y = f(x) + s C(f(x))         on a sub-layer's output f(x) (the paper's
        "apply_residual" form); on a post-norm target (a LayerNorm ending a BERT sub-layer) y = LN(x + s C(LN(x))),
        the adapter output re-entering the norm as seq_bn does (``parts``)
    parallel ("par_conformer"):    y = f(x) + s C(x)            beside a sub-layer, from its input x

The paper's best setting: parallel beside the FFN, reduction_factor 96, kernel 31 (r = 8 on d = 768, ~19.5k
parameters per adapter: 2r(d_in + 1) + r(k + 1) + 2r + d_out(r + 1)). W_2 and b_2 start at zero (init "zero_up"),
so the adapted model starts as the base model; the other layers keep PyTorch's default init. (The repository's
Bottleneck adapter zeroes both projections, so only b_up ever learns; init "petl_ast" is the code's own conformer
init, PyTorch's default everywhere, which does not start as the base model.) The code's input LayerNorm is computed
and then discarded (``out = self.lnorm(x); out = x.transpose(...)``), so there is none here.

Placements (targets; the host hands an adapter its module's first input x and first output element):

    PETL-AST                    BERT / MiniLM (post-norm)                     Llama (GPT-2: "attn", "mlp")
    sequential MHSA             seq, "attention.output.dense"                 seq, "self_attn"
    sequential FFN              seq, r"re:.*\\.layer\\.\\d+\\.output\\.dense"     seq, "mlp"
    parallel MHSA               par, "attention.self"                         par, "self_attn"
    parallel FFN                par, "intermediate"                           par, "mlp"

On a pre-norm decoder every row is the paper's equation (x = LN z, out = the sub-layer's output before the
residual). BERT's attention and FFN are not single modules, so its parallel placements sit beside their first half:
``attention.self`` gets the layer input h and returns the context, ``intermediate`` gets the attention output a and
returns GELU(W_i a); the delta then reaches the residual through the frozen output projection, LN(h + MHSA(h) +
W_o C(h)) and LN(a + FFN(a) + W_2f C(a)). W_o and W_2f have full row rank, so this spans the paper's function class
(par on "intermediate" has d_out = 4d: r(4d + 1) more parameters in W_2). The sequential rows match the paper on
the dense before the residual; ``attention.output.LayerNorm`` / ``output.LayerNorm`` give AdapterHub's post-norm
form instead. Note the suffix "output.dense" alone also matches ``attention.output.dense``.

Sequences and padding. The convolution mixes neighbouring tokens: padding="same" (odd k: k // 2 each side, the
paper) lets token t see tokens t +- k // 2, which leaks the future on a causal LM; padding="causal" (k - 1 on the
left) keeps a decoder causal. A kernel longer than the sequence is an error at forward time (generate with a KV
cache feeds one token per step, which no convolution over tokens can adapt: generate without the cache). The
adapter does not see the attention mask: real tokens within the kernel's reach of padding read the padding's
hidden states, and norm="batch" in training mode computes its statistics over every token of the batch, padding
included (and so updates the running statistics used in eval with them). For padded batches prefer norm="layer",
which normalises each token on its own, and sequences padded to one fixed length. Not mergeable (non-linear).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.errors import AdapterKitError, TargetError
from adapterkit.core.host import host_of
from adapterkit.core.layers import io_sizes, is_norm, tensor
from adapterkit.core.precision import as_compute, master_dtype
from adapterkit.core.protocol import Site
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require
from adapterkit.methods.bottleneck import OnOutput

NORMS = ("batch", "layer")
PADDINGS = ("same", "causal")
INITS = ("zero_up", "petl_ast")


@dataclass(frozen=True)
class _ConformerSpec(AdapterSpec):
    reduction_factor: float = 96.0  # r = round(d_in / reduction_factor) (the paper's "reduction rate")
    hidden: int | None = None  # explicit r; overrides reduction_factor
    kernel_size: int = 31  # k of the depthwise convolution
    norm: str = "batch"  # "batch" (BatchNorm1d over batch and tokens, the paper) or "layer" (per token)
    padding: str = "same"  # "same" (k // 2 each side; odd k) or "causal" (k - 1 on the left, for decoders)
    dropout: float = 0.0  # on the adapter output (the paper: 0)
    scaling: float = 1.0  # s, the output scale
    init: str = "zero_up"  # "zero_up" (W_2 = 0: identity at start) or "petl_ast" (PyTorch default everywhere)

    def __post_init__(self) -> None:
        name = self.method
        require(self.reduction_factor > 0, f"{name}: reduction_factor must be > 0, got {self.reduction_factor}")
        require(self.hidden is None or self.hidden > 0, f"{name}: hidden must be a positive integer, got "
                f"{self.hidden!r}")
        require(self.kernel_size > 0, f"{name}: kernel_size must be a positive integer, got {self.kernel_size}")
        require(self.norm in NORMS, f"{name}: norm must be one of {NORMS}, got {self.norm!r}")
        require(self.padding in PADDINGS, f"{name}: padding must be one of {PADDINGS}, got {self.padding!r}")
        require(self.padding != "same" or self.kernel_size % 2 == 1,
                f"{name}: kernel_size {self.kernel_size} is even; padding='same' needs an odd kernel (a centre "
                "token), or use padding='causal'")
        require(0.0 <= self.dropout < 1.0, f"{name}: dropout must be in [0, 1), got {self.dropout}")
        require(self.scaling > 0, f"{name}: scaling must be > 0, got {self.scaling}")
        require(self.init in INITS, f"{name}: init must be one of {INITS}, got {self.init!r}")

    @property
    def starts_as_identity(self) -> bool:
        """Only the zero_up init leaves the model unchanged at attach time."""
        return self.init == "zero_up"

    def channels(self, size: int) -> int:
        """r for an input of ``size`` features."""
        return self.hidden or round(size / self.reduction_factor)

    def _check_size(self, base: nn.Module, path: str, size: int) -> None:
        if size <= 0:
            raise TargetError(f"{self.method} cannot find the feature size of {path} ({type(base).__name__})")
        r = self.channels(size)
        if r < 1:
            raise TargetError(f"{self.method}: reduction_factor {self.reduction_factor} leaves round({size} / "
                              f"{self.reduction_factor}) = 0 channels at {path}; use a smaller one or hidden=")
        if r > size:
            raise TargetError(f"{self.method}: {r} channels exceed the feature size {size} of {path}")


class ConvModule(nn.Module):
    """C(z): pointwise d_in -> 2r, GLU, depthwise k, norm, SiLU, pointwise r -> d_out, dropout."""

    def __init__(self, spec: _ConformerSpec, base: nn.Module, size_in: int, size_out: int) -> None:
        super().__init__()
        self.spec = spec
        self._base = (base,)  # tuple: not a submodule; names the module path in errors
        like = next(base.parameters())
        r, k = spec.channels(size_in), spec.kernel_size
        kwargs: dict[str, Any] = {"dtype": master_dtype(like), "device": like.device}
        self.pointwise_in = nn.Linear(size_in, 2 * r, **kwargs)  # == Conv1d(d_in, 2r, 1), same default init
        self.depthwise = nn.Conv1d(r, r, k, groups=r, **kwargs)  # padded in forward (same or causal)
        self.norm: nn.Module = nn.BatchNorm1d(r, **kwargs) if spec.norm == "batch" else nn.LayerNorm(r, **kwargs)
        self.pointwise_out = nn.Linear(r, size_out, **kwargs)
        self.pad = ((k - 1) // 2, k // 2) if spec.padding == "same" else (k - 1, 0)  # (left, right) over tokens
        if spec.init == "zero_up":
            nn.init.zeros_(self.pointwise_out.weight)
            nn.init.zeros_(self.pointwise_out.bias)

    def _fail(self, what: str) -> AdapterKitError:
        host = host_of(self._base[0])
        return AdapterKitError(f"{self.spec.method} at {host.path if host else '?'!r}: {what}")

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() != 3:
            raise self._fail(f"needs a (batch, tokens, features) sequence, got shape {tuple(z.shape)}")
        k, tokens = self.spec.kernel_size, z.shape[1]
        if k > tokens:
            raise self._fail(f"kernel_size {k} is longer than the sequence ({tokens} tokens); use kernel_size <= "
                             f"{tokens} (generate with a KV cache passes one token per step: turn the cache off)")
        h = F.glu(F.linear(z, as_compute(self.pointwise_in.weight, z), as_compute(self.pointwise_in.bias, z)))
        h = F.pad(h.transpose(1, 2), self.pad)  # (B, r, T + k - 1)
        h = F.conv1d(h, as_compute(self.depthwise.weight, h), as_compute(tensor(self.depthwise, "bias"), h),
                     groups=h.shape[1])  # (B, r, T)
        dtype = self.pointwise_out.weight.dtype  # the norm runs in the master dtype (r channels: cheap)
        if self.spec.norm == "batch":
            h = self.norm(h.to(dtype)).transpose(1, 2)  # (B, T, r)
        else:
            h = self.norm(h.transpose(1, 2).to(dtype))  # (B, T, r)
        h = F.silu(h.to(z.dtype))
        out = F.linear(h, as_compute(self.pointwise_out.weight, h), as_compute(self.pointwise_out.bias, h))
        return F.dropout(out, self.spec.dropout, self.training) * self.spec.scaling  # (B, T, d_out)


@register("seq_conformer")
@dataclass(frozen=True)
class SeqConformer(_ConformerSpec):
    """Sequential conformer adapter on a sub-layer's output."""

    def check_target(self, base: nn.Module, path: str) -> None:
        self._check_size(base, path, io_sizes(base)[1])

    def build(self, base: nn.Module) -> nn.Module:
        return SequentialConformer(self, base)


class SequentialConformer(OnOutput):
    """y = f(x) + s C(f(x)), or LN(x + s C(LN(x))) on a post-norm target."""

    def __init__(self, spec: SeqConformer, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        size = io_sizes(base)[1]
        self.block = ConvModule(spec, base, size, size)
        self._on(base)

    def change(self, h: Tensor) -> Tensor:
        return self.block(h)


@register("par_conformer")
@dataclass(frozen=True)
class ParConformer(_ConformerSpec):
    """Parallel conformer adapter beside a sub-layer (the paper's best placement: beside the FFN)."""

    def check_target(self, base: nn.Module, path: str) -> None:
        if is_norm(base):
            raise TargetError(f"par_conformer: {path} is a normalisation layer; target the sub-layer (e.g. the mlp) "
                              "instead")
        size_in, size_out = io_sizes(base)
        self._check_size(base, path, size_in)
        if size_out <= 0:
            raise TargetError(f"par_conformer cannot find the output size of {path} ({type(base).__name__})")

    def build(self, base: nn.Module) -> nn.Module:
        return ParallelConformer(self, base)


class ParallelConformer(nn.Module):
    """Delta s C(x) added to the sub-layer's output."""

    site = Site.PARALLEL

    def __init__(self, spec: ParConformer, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.block = ConvModule(spec, base, *io_sizes(base))

    def forward(self, x: Tensor, base_out: Tensor | None) -> Tensor:
        return self.block(x)
