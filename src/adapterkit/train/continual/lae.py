"""LAE: Learning, Accumulation and Ensemble with any parameter-efficient module (Gao et al., ICCV 2023,
https://arxiv.org/abs/2303.10070).

- Learning: an *online* adapter learns the current task; the loss is the cross-entropy over the current task's
  classes only (the head's columns of earlier tasks are left out). From the second task on, the adapter stays
  frozen for the first ``freeze_epochs`` epochs so the new head columns catch up first ("adaptation speed
  calibration").
- Accumulation: an *offline* adapter, created at the start of the second task as a copy of the online one,
  follows it by an exponential moving average after every optimiser step:
  ``theta_off <- m theta_off + (1 - m) theta_on``.
- Ensemble: ``p(x) = max(softmax(f_on(x)), softmax(f_off(x)))`` element-wise, then the argmax. Both experts share
  the head.

Works with any adapter spec (LoRA, bottleneck, prefix / prompt tuning): the online and offline experts are two
adapters with the same spec and placements. Simplifications: the paper's compensatory prefix calibration
(renormalising the attention mass on the prefix) is not applied; the paper's momentum 0.9999 assumes thousands of
steps per task, so ``momentum`` is a parameter (the benchmarks scale it to their shorter streams); the frozen
epochs and the rest run as two optimiser schedules rather than one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from adapterkit.train.continual.learner import (
    ClassHead,
    Learner,
    OneHead,
    current_columns,
    scores_in,
)
from adapterkit.train.continual.stream import Stream

ONLINE, OFFLINE = "lae_online", "lae_offline"


class LAE(OneHead):
    name = "lae"
    trained = ONLINE
    variants = ("ensemble", "online", "offline")

    def __init__(self, momentum: float = 0.999, freeze_epochs: int = 1) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LAE momentum={momentum}: needs 0 <= momentum < 1")
        self.momentum, self.freeze_epochs = momentum, freeze_epochs
        self.head: ClassHead | None = None

    def learn(self, learner: Learner, stream: Stream, t: int) -> None:
        if t == 0:
            learner.attach(ONLINE)
            self.head = ClassHead(learner.backbone.dim)
        elif OFFLINE not in learner.placed:
            learner.clone(ONLINE, OFFLINE)
        assert self.head is not None
        head = self.head
        head.grow(stream.classes_up_to(t))
        current, remap = current_columns(head, stream[t].classes)

        def loss(batch: Any, labels: Tensor) -> Tensor:
            logits = head(learner.features(batch, ONLINE))[:, current]
            return F.cross_entropy(logits, remap[labels])

        online = learner.params(ONLINE)
        offline, on_tensors = learner.params(OFFLINE) if OFFLINE in learner.placed else [], online
        m = self.momentum

        def accumulate() -> None:
            for off, on in zip(offline, on_tensors):
                off.mul_(m).add_(on, alpha=1 - m)

        head_group = {"params": list(head.parameters()), "lr": learner.config.head_lr or learner.config.lr}
        epochs, frozen = learner.config.epochs, (min(self.freeze_epochs, learner.config.epochs) if t > 0 else 0)
        desc = f"{self.name} {stream[t].name}"
        learner.fit(stream[t].train, [head_group], loss, frozen, desc + " (head)", accumulate if offline else None)
        for param in online:
            param.requires_grad_(True)
        learner.fit(stream[t].train, [{"params": online}, head_group], loss, epochs - frozen, desc,
                    accumulate if offline else None)
        for param in online:
            param.requires_grad_(False)

    def predict(self, learner: Learner, batch: Any, columns: list[int], variant: str) -> Tensor:
        assert self.head is not None
        experts = {"online": (ONLINE,), "offline": (OFFLINE,), "ensemble": (ONLINE, OFFLINE)}[variant]
        experts = tuple(e for e in experts if e in learner.placed) or (ONLINE,)  # task 0: no offline expert yet
        probs = [scores_in(self.head, self.head(learner.features(batch, e)), columns).softmax(-1) for e in experts]
        return torch.stack(probs).amax(0)
