"""Compacter and Compacter++: bottleneck adapters whose projections are PHM layers, sums of Kronecker products
(Karimi Mahabadi, Henderson and Ruder 2021, https://arxiv.org/abs/2106.04647).

    PHM layer:   y = x H + b,   H = sum_{i=1..n} A_i ⊗ B_i   (in, out),   A_i: (n, n),  B_i: (in/n, out/n)
                 B_i = s_i t_i^T with s_i: (in/n, k), t_i: (k, out/n)        k = phm_rank ("fast" weights)
    adapter:     A(h) = s * PHM_up(act(PHM_down(h)))                         hidden = d // reduction_factor
    placement:   as the sequential bottleneck (bottleneck.py): y = f(x) + A(f(x)) on a sub-layer's output, or
                 y = LN(x + A(LN(x))) on a post-norm target (the adapter output re-enters the norm)

The rules A = (A_1 .. A_n), one (n, n, n) tensor, are the "shared slow weights": with ``rule="shared"`` one tensor
serves the down and up projections of every placement of one ``attach`` (AdapterHub's ``shared_phm_rule``); it
lives in the first placement's module (``build_all``), the others borrow it, so it is saved once and tied again on
load. ``rule="layer"`` gives each PHM layer its own A. ``phm_rank=None`` keeps each B_i full (the PHM-Adapter).

Compacter and Compacter++ are one spec with two placements (AdapterHub's ``CompacterConfig`` and
``CompacterPlusPlusConfig`` differ only in ``mh_adapter`` / ``original_ln_before``, i.e. where the adapter sits):

    Compacter   (Houlsby, "double_seq_bn"): after attention and after the FFN, on the projection before the
                residual and norm. BERT / MiniLM: ``targets=["output.dense"]`` (attention.output.dense and output.dense)
    Compacter++ (Pfeiffer, "seq_bn"): after the FFN only, on its post-norm.
                BERT / MiniLM: ``targets=[r"re:.*layer\\.\\d+\\.output\\.LayerNorm"]``; pre-norm models: ``["mlp"]``

With the defaults (n = 4, k = 1, reduction factor 32, GELU, the rule shared) the outputs equal AdapterHub's
``CompacterConfig()`` / ``CompacterPlusPlusConfig()`` for the same weights (tests/methods/test_compacter.py).
Init as AdapterHub: A ~ N(0, phm_init_range), b = 0, the factors of B per ``w_init``. AdapterHub's
``hypercomplex_nonlinearity="glorot-uniform"`` in fact draws Glorot-normal (its ``init_W`` tests the string for
truth first), so the default here is "glorot-normal". Not mergeable (the adapter is non-linear).

Left out of AdapterHub's options: a factorized rule (factorized_phm_rule), B shared across layers (shared_W_phm),
learn_phm (its train_adapter makes the shared rule trainable anyway), phm_bias=False, phm_c_init="uniform" and
learned / channel scaling. With rule="layer" AdapterHub draws each A from N(0, 0.01) whatever phm_init_range says;
here phm_init_range holds for both rules. On ``output.dense`` (Compacter) the model's own dropout follows the
adapter, where AdapterHub's adapter reads the dropped-out projection: the same in eval mode, not in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.errors import TargetError
from adapterkit.core.layers import io_sizes
from adapterkit.core.precision import master_dtype
from adapterkit.core.registry import register
from adapterkit.core.spec import AdapterSpec, require
from adapterkit.methods.bottleneck import ACTIVATIONS, OnOutput

RULES = ("shared", "layer")
W_INITS = ("glorot-normal", "glorot-uniform", "normal")


@register("compacter")
@dataclass(frozen=True)
class Compacter(AdapterSpec):
    """Spec of a Compacter adapter (AdapterHub ``BnConfig`` names in comments); placement by targets."""

    reduction_factor: float = 32.0  # hidden = d // reduction_factor, as AdapterHub (floor)
    phm_dim: int = 4  # n: Kronecker terms; must divide d and the hidden size
    phm_rank: int | None = 1  # k: rank of each B_i (factorized_phm_W); None: full B_i (factorized_phm_W=False)
    rule: str = "shared"  # "shared": one A for every layer (shared_phm_rule=True); "layer": one per PHM layer
    activation: str = "gelu"  # non_linearity, one of bottleneck.ACTIVATIONS
    w_init: str = "glorot-normal"  # init of B's factors (hypercomplex_nonlinearity): see the module docstring
    phm_init_range: float = 1e-4  # std of A's normal init (phm_c_init="normal"), and of B's under w_init="normal"
    scaling: float = 1.0  # s, the output scale
    dropout: float = 0.0  # on the adapter's output

    def __post_init__(self) -> None:
        require(self.reduction_factor > 0, f"{self.method}: reduction_factor must be > 0, got {self.reduction_factor}")
        require(self.phm_dim > 0, f"{self.method}: phm_dim must be a positive integer, got {self.phm_dim}")
        require(self.phm_rank is None or self.phm_rank > 0,
                f"{self.method}: phm_rank must be a positive integer (or None for full B_i), got {self.phm_rank}")
        require(self.rule in RULES, f"{self.method}: rule must be one of {RULES}, got {self.rule!r}")
        require(self.activation in ACTIVATIONS,
                f"{self.method}: activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        require(self.w_init in W_INITS, f"{self.method}: w_init must be one of {W_INITS}, got {self.w_init!r}")
        require(self.phm_init_range > 0, f"{self.method}: phm_init_range must be > 0, got {self.phm_init_range}")
        require(self.scaling > 0, f"{self.method}: scaling must be > 0, got {self.scaling}")
        require(0.0 <= self.dropout < 1.0, f"{self.method}: dropout must be in [0, 1), got {self.dropout}")

    @property
    def starts_as_identity(self) -> bool:
        """False: A and B start small but non-zero, as in AdapterHub (the change is tiny, not exactly zero)."""
        return False

    def hidden(self, size: int) -> int:
        """The bottleneck size for a feature size ``size``."""
        return max(1, int(size // self.reduction_factor))

    def check_target(self, base: nn.Module, path: str) -> None:
        size = io_sizes(base)[1]
        if size <= 0:
            raise TargetError(f"{self.method} cannot find the feature size of {path} ({type(base).__name__})")
        hidden, n = self.hidden(size), self.phm_dim
        if size % n:
            raise TargetError(f"{self.method}: phm_dim={n} does not divide the feature size {size} of {path}")
        if hidden % n:
            raise TargetError(f"{self.method}: phm_dim={n} does not divide the hidden size {hidden} (= {size} // "
                              f"reduction_factor {self.reduction_factor:g}) of {path}")

    def build(self, base: nn.Module) -> nn.Module:
        return self.build_all([base])[0]

    def build_all(self, bases: list[nn.Module]) -> list[nn.Module]:
        """One adapter per placement; with rule="shared" the first holds A and the others borrow it."""
        modules: list[CompacterAdapter] = []
        for base in bases:
            modules.append(CompacterAdapter(self, base, modules[0] if modules and self.rule == "shared" else None))
        return list(modules)


def new_rule(spec: Compacter, like: Tensor) -> nn.Parameter:
    """A = (A_1 .. A_n), (n, n, n), drawn N(0, phm_init_range)."""
    n = spec.phm_dim
    return nn.Parameter(torch.empty(n, n, n, dtype=like.dtype, device=like.device).normal_(0.0, spec.phm_init_range))


def kron_sum(rule: Tensor, blocks: Tensor) -> Tensor:
    """H = sum_i A_i ⊗ B_i: rule (n, n, n), blocks (n, p, q) -> (n p, n q)."""
    n, p, q = blocks.shape
    return torch.einsum("ijk,iab->jakb", rule, blocks).reshape(n * p, n * q)  # H[j p + a, k q + b]


def _factor(spec: Compacter, shape: tuple[int, int, int], like: Tensor) -> nn.Parameter:
    """One (n, rows, cols) stack of B_i or of its factors, each slice drawn by ``w_init`` (AdapterHub's init_W)."""
    weight = torch.empty(shape, dtype=like.dtype, device=like.device)
    for block in weight:
        if spec.w_init == "glorot-normal":
            nn.init.xavier_normal_(block)
        elif spec.w_init == "glorot-uniform":
            nn.init.xavier_uniform_(block)
        else:
            block.normal_(0.0, spec.phm_init_range)
    return nn.Parameter(weight)


class PHMLinear(nn.Module):
    """y = x H + b with H = sum_i A_i ⊗ B_i; A comes from outside (shared) unless this layer owns one."""

    def __init__(self, spec: Compacter, size_in: int, size_out: int, like: Tensor) -> None:
        super().__init__()
        n, rank = spec.phm_dim, spec.phm_rank
        p, q = size_in // n, size_out // n
        # B_i = w_left[i] @ w_right[i] (factorized_phm_W), or w[i] itself; AdapterHub's order: left, then right
        self.w_left = _factor(spec, (n, p, rank), like) if rank is not None else None
        self.w_right = _factor(spec, (n, rank, q), like) if rank is not None else None
        self.w = _factor(spec, (n, p, q), like) if rank is None else None
        self.bias = nn.Parameter(torch.zeros(size_out, dtype=like.dtype, device=like.device))
        self.phm_rule = new_rule(spec, like) if spec.rule == "layer" else None

    def blocks(self) -> Tensor:
        """B = (B_1 .. B_n), (n, in/n, out/n)."""
        if self.w is not None:
            return self.w
        assert self.w_left is not None and self.w_right is not None
        return torch.bmm(self.w_left, self.w_right)  # (n, p, k) @ (n, k, q) -> (n, p, q)

    def weight(self, rule: Tensor | None = None) -> Tensor:
        """H (in, out), in the master dtype; ``rule``: the shared A (None: this layer's own)."""
        rule = self.phm_rule if rule is None else rule
        assert rule is not None  # a layer-rule layer owns one, a shared-rule layer is always given one
        blocks = self.blocks()
        return kron_sum(rule.to(blocks.device, blocks.dtype), blocks)

    def forward(self, h: Tensor, rule: Tensor | None = None) -> Tensor:
        weight = self.weight(rule).to(h.device, h.dtype)  # cast the small H, never the activations
        return F.linear(h, weight.t(), self.bias.to(h.device, h.dtype))  # (..., out) = h H + b


class CompacterAdapter(OnOutput):
    """y = f(x) + s PHM_up(act(PHM_down(f(x)))), or LN(x + s A(LN(x))) on a post-norm target."""

    def __init__(self, spec: Compacter, base: nn.Module, owner: CompacterAdapter | None = None) -> None:
        super().__init__()
        self.spec = spec
        first = next(base.parameters())
        like = torch.empty(0, dtype=master_dtype(first), device=first.device)  # the masters' dtype and device
        size = io_sizes(base)[1]
        self.down = PHMLinear(spec, size, spec.hidden(size), like)
        self.act = ACTIVATIONS[spec.activation]()
        self.up = PHMLinear(spec, spec.hidden(size), size, like)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None
        self._on(base)
        # rule="shared": the first placement owns A; the others reference it (a tuple: not registered twice)
        self._owner: tuple[CompacterAdapter, ...] = (owner,) if owner is not None else ()
        self.phm_rule = new_rule(spec, like) if spec.rule == "shared" and owner is None else None

    def rule(self) -> Tensor | None:
        """The shared A this adapter uses (None with rule="layer": each PHM layer has its own)."""
        return self._owner[0].phm_rule if self._owner else self.phm_rule

    def block(self, h: Tensor) -> Tensor:
        """s A(h), (..., d)."""
        rule = self.rule()
        out = self.up(self.act(self.down(h, rule)), rule) * self.spec.scaling  # (..., hidden) -> (..., d)
        return self.dropout(out) if self.dropout is not None else out

    def change(self, h: Tensor) -> Tensor:
        return self.block(h)
