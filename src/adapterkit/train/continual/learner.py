"""The learner every continual method works through: a backbone, the adapters the method attached, heads over
global classes, one training loop and the evaluation. Methods (lae.py, mos.py, ...) decide what trains when and
how predictions are made; nothing here names one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from adapterkit.core.registry import spec_from_dict
from adapterkit.core.spec import AdapterSpec
from adapterkit.core.tree import adapter_tensors
from adapterkit.inject.engine import attach, attach_at, detach
from adapterkit.inject.use import use
from adapterkit.train.continual.backbone import Backbone
from adapterkit.train.continual.stream import Examples, Stream
from adapterkit.train.settings import constructor_settings


@dataclass(frozen=True)
class ContinualConfig:
    """Per-task training: AdamW with linear decay, the same for every method (methods add their own knobs)."""

    epochs: int = 3
    lr: float = 1e-3
    head_lr: float | None = None  # None: lr
    batch_size: int = 32
    weight_decay: float = 0.0
    seed: int = 0
    eval_batch_size: int = 64


class ClassHead(nn.Module):
    """A linear head over a growing list of global classes (its columns, in the order they arrived)."""

    def __init__(self, dim: int, classes: Sequence[int] = ()) -> None:
        super().__init__()
        self.dim = dim
        self.classes: list[int] = []
        self.weight = nn.Parameter(torch.zeros(0, dim))
        self.bias = nn.Parameter(torch.zeros(0))
        self.grow(classes)

    def grow(self, classes: Sequence[int]) -> None:
        """Add columns for the classes not held yet (nn.Linear's initialisation)."""
        new = [c for c in classes if c not in self.classes]
        if not new:
            return
        fresh = nn.Linear(self.dim, len(new))
        self.weight = nn.Parameter(torch.cat([self.weight.data, fresh.weight.data]))
        self.bias = nn.Parameter(torch.cat([self.bias.data, fresh.bias.data]))
        self.classes += new

    def forward(self, features: Tensor) -> Tensor:
        return F.linear(features, self.weight, self.bias)

    def columns(self, labels: Tensor) -> Tensor:
        """Global class ids -> this head's column indices."""
        index = {c: i for i, c in enumerate(self.classes)}
        return torch.tensor([index[int(c)] for c in labels], dtype=torch.long)

    def state(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "weight": self.weight.detach().clone(),
                "bias": self.bias.detach().clone()}

    @classmethod
    def from_state(cls, dim: int, state: dict[str, Any]) -> ClassHead:
        head = cls(dim)
        head.classes = list(state["classes"])
        head.weight = nn.Parameter(state["weight"].clone())
        head.bias = nn.Parameter(state["bias"].clone())
        return head


@dataclass
class Placed:
    spec: AdapterSpec
    paths: list[str]


class Learner:
    """A backbone and the adapters on it, for one stream.

    Args:
        backbone: the frozen, adapted model and its batching (backbone.py).
        spec, targets: the adapter method the continual method uses (LoRA, a bottleneck, prefix tuning, ...).
        config: per-task training.
    """

    def __init__(self, backbone: Backbone, spec: AdapterSpec, targets: Any = None,
                 config: ContinualConfig | None = None) -> None:
        self.backbone, self.spec, self.targets = backbone, spec, targets
        self.config = config or ContinualConfig()
        self.placed: dict[str, Placed] = {}
        for param in backbone.model.parameters():
            param.requires_grad_(False)

    # ---- adapters -------------------------------------------------------------------------------------------
    def attach(self, name: str, spec: AdapterSpec | None = None, targets: Any = None) -> None:
        """A new adapter (the learner's spec and targets unless given), frozen until a method trains it."""
        spec = spec or self.spec
        paths = attach(self.backbone.model, name, spec, targets if targets is not None else self.targets)
        self.placed[name] = Placed(spec, paths)
        for param in self.params(name):
            param.requires_grad_(False)

    def detach(self, name: str) -> None:
        detach(self.backbone.model, name)
        del self.placed[name]

    def tensors(self, name: str) -> dict[str, Tensor]:
        """Adapter ``name``'s parameters and buffers, keyed by placement (shared ones once)."""
        return adapter_tensors(self.backbone.model, name)

    def params(self, name: str) -> list[nn.Parameter]:
        return [v for v in self.tensors(name).values() if isinstance(v, nn.Parameter)]

    def copy(self, source: str, target: str) -> None:
        """Overwrite adapter ``target``'s weights with ``source``'s (same spec and placements)."""
        theirs = self.tensors(source)
        with torch.no_grad():
            for key, value in self.tensors(target).items():
                value.copy_(theirs[key])

    def clone(self, source: str, target: str) -> None:
        """A new adapter ``target`` equal to ``source``, frozen."""
        placed = self.placed[source]
        attach_at(self.backbone.model, target, placed.spec, placed.paths, fresh_init=False)
        self.placed[target] = Placed(placed.spec, list(placed.paths))
        self.copy(source, target)
        for param in self.params(target):
            param.requires_grad_(False)

    def adapter_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"adapter.{n}.{k}": v.detach().clone() for n in self.placed for k, v in self.tensors(n).items()}
        meta = {n: {"spec": p.spec.to_dict(), "paths": p.paths} for n, p in self.placed.items()}
        return tensors, meta

    def load_adapter_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        for name in list(self.placed):
            self.detach(name)
        for name, record in meta.items():
            spec = spec_from_dict(record["spec"], where=f"adapter {name!r}")
            attach_at(self.backbone.model, name, spec, record["paths"], fresh_init=False)
            self.placed[name] = Placed(spec, list(record["paths"]))
            with torch.no_grad():
                for key, value in self.tensors(name).items():
                    value.copy_(tensors[f"adapter.{name}.{key}"])
            for param in self.params(name):
                param.requires_grad_(False)

    # ---- running ---------------------------------------------------------------------------------------------
    def features(self, batch: Any, adapter: str | None) -> Tensor:
        """Features with exactly ``adapter`` running (None: the bare base model)."""
        setup = () if adapter is None else (adapter,)
        with use(self.backbone.model, *setup):
            return self.backbone.features(batch)

    def batches(self, examples: Examples, size: int, shuffle: bool) -> Iterator[tuple[Any, Tensor]]:
        order = torch.randperm(len(examples)).tolist() if shuffle else list(range(len(examples)))
        for start in range(0, len(order), size):
            rows = order[start:start + size]
            yield self.backbone.collate(examples, rows), examples.labels[rows]

    @torch.no_grad()
    def map_features(self, examples: Examples, adapter: str | None) -> Tensor:
        """Features of every example (eval mode), in order."""
        self.backbone.model.eval()
        out = [self.features(batch, adapter) for batch, _ in self.batches(examples, self.config.eval_batch_size,
                                                                          False)]
        return torch.cat(out)

    def fit(self, examples: Examples, groups: list[dict[str, Any]], loss: Callable[[Any, Tensor], Tensor],
            epochs: int, desc: str, after_step: Callable[[], None] | None = None) -> list[float]:
        """AdamW over ``groups`` (param groups; "params" and optional "lr") with linear decay to 0, for ``epochs``
        over ``examples``; ``loss(batch, labels)`` computes the loss; ``after_step`` runs after every optimiser
        step (EMA, merges). Returns the loss per step."""
        groups = [g for g in groups if g["params"]]
        if not groups or epochs <= 0:
            return []
        for group in groups:
            group.setdefault("lr", self.config.lr)
        optimizer = torch.optim.AdamW(groups, weight_decay=self.config.weight_decay)
        steps_per_epoch = -(-len(examples) // self.config.batch_size)
        total = steps_per_epoch * epochs
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / total))
        self.backbone.model.train(self.backbone.train_mode)
        losses = []
        bar = tqdm(total=total, desc=desc, leave=False, disable=os.environ.get("ADAPTERKIT_NO_PROGRESS") == "1")
        for _ in range(epochs):
            for batch, labels in self.batches(examples, self.config.batch_size, True):
                value = loss(batch, labels)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                schedule.step()
                if after_step is not None:
                    with torch.no_grad():
                        after_step()
                losses.append(float(value.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        self.backbone.model.eval()
        return losses


class ContinualMethod:
    """What a continual method implements. ``learn`` trains on task t of the stream; ``predict`` gives, for a
    batch, scores over the global classes in ``columns`` (the classes seen so far); ``variants`` names the ways
    of predicting a method evaluates side by side (e.g. LAE's ensemble and its online expert alone)."""

    name = "method"
    variants: tuple[str, ...] = ("default",)
    settings: tuple[str, ...] = ("class", "domain")

    def learn(self, learner: Learner, stream: Stream, t: int) -> None:
        raise NotImplementedError

    def predict(self, learner: Learner, batch: Any, columns: list[int], variant: str) -> Tensor:
        raise NotImplementedError

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and JSON-able bookkeeping beyond the adapters (heads, prototypes, thresholds, ...)."""
        return {}, {}

    def load_state(self, learner: Learner, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        pass

    def trainable_params(self, learner: Learner) -> int:
        """Parameters that were trained (adapters and heads), counted once."""
        return sum(p.numel() for n in learner.placed for p in learner.params(n))

    def memory_bytes(self) -> int:
        """Bytes of stored bookkeeping beyond adapters and heads (prototypes, statistics, hypervectors)."""
        return 0

    def config(self) -> dict[str, Any]:
        """The constructor's arguments (a resumed stream must continue with the same settings)."""
        return constructor_settings(self)


class OneHead(ContinualMethod):
    """A method with one growing head over every class seen and one adapter that trains (``trained``); the head is
    its state, and the two are what it counts as trained (FineTune, Joint, LAE, MOS)."""

    trained = ""
    head: ClassHead | None = None

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        assert self.head is not None
        tensors, meta = head_state("head", self.head)
        return tensors, {"head": meta}

    def load_state(self, learner: Learner, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.head = head_from_state("head", learner.backbone.dim, tensors, meta["head"])

    def trainable_params(self, learner: Learner) -> int:
        return sum(p.numel() for p in learner.params(self.trained)) + head_size(self.head)


def head_state(prefix: str, head: ClassHead) -> tuple[dict[str, Tensor], dict[str, Any]]:
    state = head.state()
    return ({f"{prefix}.weight": state["weight"], f"{prefix}.bias": state["bias"]}, {"classes": state["classes"]})


def head_from_state(prefix: str, dim: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> ClassHead:
    return ClassHead.from_state(dim, {"classes": meta["classes"], "weight": tensors[f"{prefix}.weight"],
                                      "bias": tensors[f"{prefix}.bias"]})


def current_columns(head: ClassHead, classes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The head's columns of ``classes`` (a task's), and a map global class id -> position among them: what a loss
    over the current task's classes only needs (LAE, MOS)."""
    columns = head.columns(torch.tensor(list(classes)))
    position = torch.full((max(head.classes) + 1,), -1, dtype=torch.long)
    position[torch.tensor(list(classes))] = torch.arange(len(columns))
    return columns, position


def head_size(*heads: ClassHead | None) -> int:
    return sum(h.weight.numel() + h.bias.numel() for h in heads if h is not None)


def scores_in(head: ClassHead, logits: Tensor, columns: list[int], fill: float = float("-inf")) -> Tensor:
    """A head's logits placed into the ``columns`` order (classes the head lacks get ``fill``)."""
    out = logits.new_full((logits.shape[0], len(columns)), fill)
    where = {c: i for i, c in enumerate(head.classes)}
    for j, c in enumerate(columns):
        if c in where:
            out[:, j] = logits[:, where[c]]
    return out
