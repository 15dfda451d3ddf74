"""Tent: fully test-time adaptation by entropy minimisation (Wang et al., ICLR 2021,
https://arxiv.org/abs/2006.10726).

For each test batch x, with BatchNorm normalising by the batch's own statistics:

    y = f(x; gamma, beta)                       logits with the current norm affine parameters
    L = mean_b H(softmax(y_b)),   H(p) = -sum_c p_c log p_c
    (gamma, beta) <- optimizer step on L        only the affine parameters of the normalisation layers move

The prediction is the output of the same forward the loss is taken on (``predict_then_adapt``, as Tent's code
returns it): the update serves the next batch. The model's adapters (``keep``) run, frozen; everything else is
frozen too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from adapterkit.train.continual.stream import StreamError
from adapterkit.train.tta.method import (
    TTAMethod,
    check_norm,
    entropy,
    forward,
    freeze,
    load_optimizer_state,
    make_optimizer,
    norm_affine,
    optimizer_state,
    restore,
    snapshot,
)


class Tent(TTAMethod):
    """Entropy minimisation of the normalisation layers' affine parameters.

    Args:
        lr: learning rate (Tent: Adam 1e-3 on CIFAR-10-C, SGD 2.5e-4 on ImageNet-C).
        optimizer: "adam" or "sgd" (momentum 0.9).
        steps: updates per batch (Tent: 1).
        norm: "batch" (Tent: the batch's statistics) or "source".
        keep: adapters already on the model that run (frozen) under Tent.
    """

    name = "tent"
    order = "predict_then_adapt"

    def __init__(self, lr: float = 1e-3, optimizer: str = "adam", steps: int = 1, norm: str = "batch",
                 keep: Sequence[str] = ()) -> None:
        check_norm(norm)
        if not isinstance(steps, int) or steps < 1:
            raise StreamError(f"tent: steps must be a positive integer, got {steps!r}")
        if lr <= 0:
            raise StreamError(f"tent: lr must be > 0, got {lr}")
        self.lr, self.optimizer, self.steps, self.norm, self.keep = lr, optimizer, steps, norm, tuple(keep)

    def setup(self, model: nn.Module) -> None:
        self.model = model
        freeze(model)
        self.params = norm_affine(model)
        if not self.params:
            raise StreamError("tent: the model has no normalisation layer with affine parameters to adapt")
        for param in self.params.values():
            param.requires_grad_(True)
        self.opt = make_optimizer(list(self.params.values()), self.optimizer, self.lr)

    def step(self, x: Tensor) -> Tensor:
        predicted: Tensor | None = None
        for _ in range(self.steps):
            logits = forward(self.model, x, self.norm, self.keep)
            loss = entropy(logits).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            predicted = logits.detach() if predicted is None else predicted
        assert predicted is not None
        return predicted

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, meta = optimizer_state("opt", self.opt)
        return {**snapshot("norm", dict(self.params)), **tensors}, {"opt": meta}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        restore("norm", dict(self.params), tensors)
        load_optimizer_state("opt", self.opt, tensors, meta["opt"])

