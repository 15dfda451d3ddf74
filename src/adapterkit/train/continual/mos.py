"""MOS: model surgery for class-incremental learning on a frozen pre-trained model (Sun et al., AAAI 2025,
https://arxiv.org/abs/2412.09441).

- One adapter learns each task, continuing from the previous task's; after every optimiser step of task t >= 1 it
  is pulled towards the mean of the stored ones: ``theta <- (1 - alpha) theta + alpha mean(theta_0..theta_{t-1})``
  (adapter merging, to curb drift). The loss is the cross-entropy over the current task's classes (earlier
  classes masked) plus ``reg`` times a uniformity loss that pushes the batch's normalised features away from the
  stored class means and each other: ``CE(M M^T / 0.8, arange)``, ``M = [class means; batch features]``.
- After task t: the adapter is stored as ``mos_task{t}``; per new class, the mean and covariance (+1e-4 I) of its
  features under that adapter; the prototype classifier's weights are the class means under the *first* adapter.
  From the second task on, the head is re-trained on features sampled from every seen class's Gaussian
  (classifier alignment).
- Prediction, self-refined adapter retrieval (training-free): guess each example's task from the prototype
  classifier on the first adapter's features; then up to ``refine_steps`` times, score with the head on the
  guessed task's adapter features and re-guess the task from that prediction, until it stops changing. The output
  is ``softmax(head logits) + softmax((T + 1) * prototype cosine logits)``. Variant ``"last"`` scores with the head
  on the last adapter alone (what retrieval is compared against).

Simplifications: AdamW for the adapter and head at one learning rate (the paper uses SGD with the head at 0.1 lr);
the alignment uses Adam for ``align_epochs`` over ``align_samples`` draws per class. Class-incremental only:
retrieval maps a predicted class to the task that brought it.
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

CURRENT = "mos_current"


def stored(t: int) -> str:
    return f"mos_task{t}"


class MOS(OneHead):
    name = "mos"
    trained = CURRENT
    variants = ("refined", "last")
    settings = ("class",)

    def __init__(self, alpha: float = 0.1, reg: float = 0.1, align_epochs: int = 30, align_samples: int = 256,
                 align_lr: float = 1e-3, refine_steps: int = 4) -> None:
        self.alpha, self.reg = alpha, reg
        self.align_epochs, self.align_samples, self.align_lr = align_epochs, align_samples, align_lr
        self.refine_steps = refine_steps
        self.head: ClassHead | None = None
        self.means: dict[int, Tensor] = {}  # class -> feature mean under its own task's adapter
        self.covs: dict[int, Tensor] = {}
        self.prototypes: dict[int, Tensor] = {}  # class -> mean feature under the first adapter
        self.task_of: dict[int, int] = {}
        self.tasks = 0

    # ---- learning --------------------------------------------------------------------------------------------
    def learn(self, learner: Learner, stream: Stream, t: int) -> None:
        task = stream[t]
        if t == 0:
            learner.attach(CURRENT)
            self.head = ClassHead(learner.backbone.dim)
        assert self.head is not None
        head = self.head
        head.grow(stream.classes_up_to(t))
        current, remap = current_columns(head, task.classes)
        old_means = torch.stack(list(self.means.values())) if self.means else None

        def loss(batch: Any, labels: Tensor) -> Tensor:
            features = learner.features(batch, CURRENT)
            value = F.cross_entropy(head(features)[:, current], remap[labels])
            if self.reg:
                rows = F.normalize(features, dim=-1)
                if old_means is not None:
                    rows = torch.cat([F.normalize(old_means, dim=-1), rows])
                similarity = rows @ rows.T / 0.8
                value = value + self.reg * F.cross_entropy(similarity, torch.arange(len(rows)))
            return value

        params = learner.params(CURRENT)
        earlier = [learner.params(stored(i)) for i in range(t)]
        mean_of_earlier = [torch.stack(group).mean(0) for group in zip(*earlier)] if earlier else []

        def merge() -> None:
            for param, mean in zip(params, mean_of_earlier):
                param.mul_(1 - self.alpha).add_(mean, alpha=self.alpha)

        for param in params:
            param.requires_grad_(True)
        head_lr = learner.config.head_lr or learner.config.lr
        learner.fit(task.train, [{"params": params}, {"params": list(head.parameters()), "lr": head_lr}], loss,
                    learner.config.epochs, f"{self.name} {task.name}", merge if earlier else None)
        for param in params:
            param.requires_grad_(False)
        learner.clone(CURRENT, stored(t))
        self._statistics(learner, stream, t)
        self.tasks = t + 1
        if t > 0:
            self._align(head)

    def _statistics(self, learner: Learner, stream: Stream, t: int) -> None:
        data = stream[t].train
        own = learner.map_features(data, stored(t))
        first = learner.map_features(data, stored(0))
        for c in stream[t].classes:
            rows = data.labels == c
            x = own[rows].double()
            centred = x - x.mean(0)
            cov = centred.T @ centred / max(len(x) - 1, 1)
            self.means[c] = x.mean(0).float()
            self.covs[c] = (cov + 1e-4 * torch.eye(cov.shape[0], dtype=cov.dtype)).float()
            self.prototypes[c] = first[rows].mean(0)
            self.task_of[c] = t

    def _align(self, head: ClassHead) -> None:
        """Re-train the head on features drawn from every seen class's Gaussian (classifier alignment)."""
        # x = mu + L z with L L^T = Sigma: one matmul per class (torch's MultivariateNormal.sample broadcasts L over
        # the samples, ~100x slower at 1,280 features)
        factors = {c: torch.linalg.cholesky(self.covs[c].double()).float() for c in head.classes}
        optimizer = torch.optim.Adam(head.parameters(), lr=self.align_lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, self.align_epochs))
        dim = head.dim
        for _ in range(self.align_epochs):
            x = torch.cat([self.means[c] + torch.randn(self.align_samples, dim) @ factors[c].T for c in head.classes])
            y = torch.arange(len(head.classes)).repeat_interleave(self.align_samples)
            order = torch.randperm(len(y))
            for start in range(0, len(y), 256):
                rows = order[start:start + 256]
                loss = F.cross_entropy(head(x[rows]), y[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            schedule.step()

    # ---- predicting ------------------------------------------------------------------------------------------
    def predict(self, learner: Learner, batch: Any, columns: list[int], variant: str) -> Tensor:
        assert self.head is not None
        head = self.head
        if variant == "last":
            return scores_in(head, head(learner.features(batch, stored(self.tasks - 1))), columns)
        features = torch.stack([learner.features(batch, stored(i)) for i in range(self.tasks)])  # (T, B, D)
        prototypes = F.normalize(torch.stack([self.prototypes[c] for c in columns]), dim=-1)
        cosine = F.normalize(features[0], dim=-1) @ prototypes.T
        task_of = torch.tensor([self.task_of[c] for c in columns])
        guess = task_of[cosine.argmax(-1)]
        rows = torch.arange(features.shape[1])
        logits = scores_in(head, head(features[guess, rows]), columns)
        for _ in range(self.refine_steps):
            again = task_of[logits.argmax(-1)]
            if bool((again == guess).all()):
                break
            guess = again
            logits = scores_in(head, head(features[guess, rows]), columns)
        return logits.softmax(-1) + (self.tasks * cosine).softmax(-1)

    # ---- state -----------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, meta = super().state()
        for c in self.means:
            tensors[f"mean.{c}"], tensors[f"cov.{c}"] = self.means[c], self.covs[c]
            tensors[f"prototype.{c}"] = self.prototypes[c]
        return tensors, {**meta, "task_of": {str(c): t for c, t in self.task_of.items()}, "tasks": self.tasks}

    def load_state(self, learner: Learner, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        super().load_state(learner, tensors, meta)
        self.task_of = {int(c): t for c, t in meta["task_of"].items()}
        self.means = {c: tensors[f"mean.{c}"] for c in self.task_of}
        self.covs = {c: tensors[f"cov.{c}"] for c in self.task_of}
        self.prototypes = {c: tensors[f"prototype.{c}"] for c in self.task_of}
        self.tasks = int(meta["tasks"])

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.means, self.covs, self.prototypes) for t in d.values())
