"""NHL: neuro-modulated Hebbian learning for fully test-time adaptation (Tang et al., CVPR 2023,
https://arxiv.org/abs/2303.00914).

Per test batch, before predicting (``adapt_then_predict``, as the paper's overview describes it):

1. Soft Hebbian learning of an early layer, unsupervised and local. With x_n the layer's input patches (rows of the
   unfolded input, D = C_in * kh * kw values each; N = batch x positions), w_k its K kernels (rows of W, (K, D)):

       u_nk = w_k . x_n                          neuron responses
       y_nk = softmax_k(u_nk / tau)              soft competition (lateral inhibition) instead of a hard winner
       dW_k = eta / N * sum_n y_nk (x_n - u_nk w_k)     the soft winner-take-all Hebbian rule (SoftHebb, Moraitis
                                                         et al. 2022, which NHL builds on), Oja-like: bounded norms

2. A neuro-modulator after that layer is tuned by the feedback signal: entropy minimisation of the output,
   back-propagated to the modulator only (the classifier and the rest stay fixed).

3. The prediction is made with the adapted model.

Both changes live in adapterkit adapters, so the base model is never edited: the Hebbian weight change is a LoRA on
the early layer whose A is the fixed identity basis (r = D, scale 1), so its B *is* the dense change dW of the
kernel (W_eff = W0 + B); the modulator is any adapter on the layers after it (default: a sequential conv
bottleneck, identity at start). Simplifications (the paper's text was not at hand beyond its overview): the
modulator's form and placement are a choice here; the update is the plain averaged rule above, without SoftHebb's
per-step normalisation of dW or an anti-Hebbian term; one Hebbian and one modulator step per batch.

Use it with ``reset="per_domain"`` (the paper adapts to one corruption at a time). The rule's fixed points are
unit-norm kernels. Pretrained kernels are far from that: EfficientNet-Lite0's stem has norms 0 to 7.8, median 2.9.
On a long unreset stream the rule drags them off the pretrained solution. On corrupted digits (benchmarks/
tta_table.py) accuracy went from 66 % in the first round to chance by the third; reset per domain it held at 68 %.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.spec import AdapterSpec
from adapterkit.core.tree import adapter_tensors
from adapterkit.inject.engine import attach, attach_at
from adapterkit.inject.use import use
from adapterkit.methods.conv_bottleneck import SeqConvBottleneck
from adapterkit.methods.lora import LoRA
from adapterkit.train.continual.stream import StreamError
from adapterkit.train.tta.method import (
    TTAMethod,
    check_norm,
    entropy,
    forward,
    freeze,
    load_optimizer_state,
    make_optimizer,
    norm_statistics,
    optimizer_state,
    restore,
    snapshot,
)

HEBB, MOD = "nhl_hebbian", "nhl_modulator"


def soft_hebbian_update(weight: Tensor, patches: Tensor, temperature: float = 1.0) -> Tensor:
    """dW / eta for kernels ``weight`` (K, D) and input patches (N, D): mean_n y_nk (x_n - u_nk w_k)."""
    u = patches @ weight.T  # (N, K)
    y = torch.softmax(u / temperature, dim=1)  # (N, K)
    return (y.T @ patches - (y * u).sum(0)[:, None] * weight) / patches.shape[0]  # (K, D)


def patches_of(layer: nn.Conv2d, x: Tensor) -> Tensor:
    """The patches a Conv2d's kernels see in its input x (B, C_in, H, W): (N, C_in*kh*kw), N = B * positions."""
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,  # type: ignore[arg-type]
                    stride=layer.stride)  # (B, D, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B*L, D)


class _Captured(Exception):
    """Stops a forward once the Hebbian layer's input is seen (nothing after it is needed)."""


class Hebbian(TTAMethod):
    """Neuro-modulated Hebbian learning (NHL).

    Args:
        layer: path of the early convolution learned by the Hebbian rule (a Conv2d with groups 1), e.g.
            EfficientNet-Lite0's "_conv_stem".
        modulator_targets: where the neuro-modulator goes (e.g. "_bn0", the BatchNorm after the stem).
        modulator: its spec (default SeqConvBottleneck(reduction_factor=4), identity at start).
        eta: Hebbian learning rate; temperature: tau of the soft competition.
        lr, optimizer: the modulator's entropy update.
        norm: BatchNorm statistics, "batch" or "source"; keep: adapters already on the model that run under NHL.
    """

    name = "nhl"
    order = "adapt_then_predict"

    def __init__(self, layer: str, modulator_targets: Any, modulator: AdapterSpec | None = None, eta: float = 1e-3,
                 temperature: float = 1.0, lr: float = 1e-3, optimizer: str = "adam", norm: str = "batch",
                 keep: Sequence[str] = ()) -> None:
        check_norm(norm)
        for what, value in (("eta", eta), ("temperature", temperature), ("lr", lr)):
            if not value > 0:
                raise StreamError(f"nhl: {what} must be > 0, got {value}")
        self.layer, self.modulator_targets = layer, modulator_targets
        self.modulator = modulator or SeqConvBottleneck(reduction_factor=4.0)
        self.eta, self.temperature, self.lr, self.optimizer = eta, temperature, lr, optimizer
        self.norm, self.keep = norm, tuple(keep)

    def setup(self, model: nn.Module) -> None:
        self.model = model
        freeze(model)
        modules = dict(model.named_modules())
        base = modules.get(self.layer)
        if not isinstance(base, nn.Conv2d) or base.groups != 1:
            found = "no module" if base is None else f"a {type(base).__name__}"
            if isinstance(base, nn.Conv2d):
                found = f"a grouped Conv2d (groups {base.groups})"
            raise StreamError(f"nhl: layer {self.layer!r} must be a Conv2d with groups 1 (an early convolution); "
                              f"this model has {found} there")
        self.base = base
        width = base.weight[0].numel()  # D
        attach_at(model, HEBB, LoRA(r=width, alpha=float(width)), [self.layer], fresh_init=False)
        self.hebbian = adapter_tensors(model, HEBB)
        factor_a, factor_b = (self.hebbian[f"{self.layer}/{k}"] for k in ("lora_a", "lora_b"))
        with torch.no_grad():
            factor_a.copy_(torch.eye(width, dtype=factor_a.dtype).reshape(factor_a.shape))  # A = I: B is dW
            factor_b.zero_()
        for value in self.hebbian.values():
            value.requires_grad_(False)  # learned by the Hebbian rule, not by gradients
        self.change = factor_b  # (K, D, 1, 1)
        attach(model, MOD, self.modulator, self.modulator_targets)
        self.mod = adapter_tensors(model, MOD)
        params = [v for v in self.mod.values() if isinstance(v, nn.Parameter)]
        for param in params:
            param.requires_grad_(True)
        self.opt = make_optimizer(params, self.optimizer, self.lr)

    @property
    def _running(self) -> tuple[str, ...]:
        return (*self.keep, HEBB, MOD)

    def layer_input(self, x: Tensor) -> Tensor:
        """The Hebbian layer's input for ``x`` (a forward stopped at that layer)."""
        seen: list[Tensor] = []

        def grab(_module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.append(args[0])
            raise _Captured

        handle = self.base.register_forward_pre_hook(grab)
        try:
            with torch.no_grad(), norm_statistics(self.model, self.norm), use(self.model, *self._running):
                self.model(x)
        except _Captured:
            pass
        finally:
            handle.remove()
        if not seen:
            raise StreamError(f"nhl: the forward never reached layer {self.layer!r}")
        return seen[0]

    def weight(self) -> Tensor:
        """The layer's effective kernels W0 + dW as (K, D)."""
        k = self.base.weight.shape[0]
        return (self.base.weight.detach() + self.change.detach().reshape(self.base.weight.shape)).reshape(k, -1)

    def step(self, x: Tensor) -> Tensor:
        patches = patches_of(self.base, self.layer_input(x))  # (N, D)
        with torch.no_grad():
            delta = soft_hebbian_update(self.weight(), patches.to(self.change.dtype), self.temperature)
            self.change.add_(delta.reshape(self.change.shape), alpha=self.eta)
        loss = entropy(forward(self.model, x, self.norm, self._running)).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            return forward(self.model, x, self.norm, self._running)

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, meta = optimizer_state("opt", self.opt)
        return {**snapshot("hebbian", self.hebbian), **snapshot("modulator", self.mod), **tensors}, {"opt": meta}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        restore("hebbian", self.hebbian, tensors)
        restore("modulator", self.mod, tensors)
        load_optimizer_state("opt", self.opt, tensors, meta["opt"])
