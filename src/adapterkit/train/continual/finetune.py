"""The two bounds every continual method is measured between.

``FineTune`` (the lower bound): one adapter and one growing head trained on each task in turn, with the
cross-entropy over every class seen so far; nothing protects the earlier tasks.
``Joint`` (the upper bound): after each task, a fresh adapter and head trained on the union of all tasks so far,
which a continual learner may not do (it needs every earlier task's data).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from adapterkit.train.continual.learner import (
    ClassHead,
    Learner,
    OneHead,
    scores_in,
)
from adapterkit.train.continual.stream import Examples, Stream


class FineTune(OneHead):
    name = "finetune"
    trained = "adapter"

    def __init__(self) -> None:
        self.head: ClassHead | None = None

    def _train(self, learner: Learner, data: Examples, desc: str) -> None:
        assert self.head is not None
        head = self.head
        params = learner.params("adapter")
        for param in params:
            param.requires_grad_(True)

        def loss(batch: Any, labels: Tensor) -> Tensor:
            return F.cross_entropy(head(learner.features(batch, "adapter")), head.columns(labels))

        lr = learner.config.head_lr or learner.config.lr
        learner.fit(data, [{"params": params}, {"params": list(head.parameters()), "lr": lr}], loss,
                    learner.config.epochs, desc)
        for param in params:
            param.requires_grad_(False)

    def learn(self, learner: Learner, stream: Stream, t: int) -> None:
        if t == 0:
            learner.attach("adapter")
            self.head = ClassHead(learner.backbone.dim)
        assert self.head is not None
        self.head.grow(stream.classes_up_to(t))
        self._train(learner, stream[t].train, f"{self.name} {stream[t].name}")

    def predict(self, learner: Learner, batch: Any, columns: list[int], variant: str) -> Tensor:
        assert self.head is not None
        return scores_in(self.head, self.head(learner.features(batch, "adapter")), columns)

class Joint(FineTune):
    """Retrains from scratch on tasks 0..t after each task t (``every_task=False``: only after the last one,
    the cheaper final figure; earlier rows then reuse the untrained start and are not meaningful)."""

    name = "joint"

    def __init__(self, every_task: bool = True) -> None:
        super().__init__()
        self.every_task = every_task

    def learn(self, learner: Learner, stream: Stream, t: int) -> None:
        if not self.every_task and t < len(stream) - 1:
            if t == 0:
                learner.attach("adapter")
                self.head = ClassHead(learner.backbone.dim, stream.classes_up_to(len(stream) - 1))
            return
        if "adapter" in learner.placed:
            learner.detach("adapter")
        learner.attach("adapter")
        self.head = ClassHead(learner.backbone.dim, stream.classes_up_to(t))
        data = Examples.join([task.train for task in stream.tasks[:t + 1]])
        self._train(learner, data, f"{self.name} up to {stream[t].name}")
