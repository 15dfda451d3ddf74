"""EAR: Encoder-Adaptor-Reconfigurator for continual learning at the edge (Daniels et al. 2023,
https://arxiv.org/abs/2308.02084).

A frozen encoder; an out-of-distribution detector on its features decides, task by task, whether the stream has
shifted; on a shift a new adaptor (an adapter plus its own head) is grown, chosen among candidate architectures by a
zero-cost proxy; otherwise the adaptor the data is routed to keeps learning. At inference each example is routed to
the adaptor whose memory it matches best and classified by it. Nothing of the stream's examples is stored.

- Detector (hyperdimensional computing): ``h(x) = sign(P f(x))`` with a fixed random bipolar projection ``P``
  (``dims`` x feature size, from ``seed``) of the frozen encoder's features (not centred: centring on the first
  task's mean made a two-class task's class vectors antipodal, so anything far away matched one of them; measured
  on TREC -> AG News, AUROC 0.55 centred vs 0.98 not); a class hypervector is
  the sum of its training examples' ``h``; an adaptor's score of x is ``max_c cos(h(x), H_c)`` over its classes;
  x is in distribution for the adaptor if the score reaches the adaptor's threshold, the ``quantile`` of its own
  training examples' scores. A task shifts the stream when at least ``shift_fraction`` of its training examples
  are in distribution for no adaptor. With ``grow="auto"`` a task whose labels include classes no adaptor knows
  grows one too (a class-incremental stream says so itself; the detector misses new classes of the same domain,
  e.g. new TREC question types); ``grow="detector"`` leaves it to the detector alone. Each decision is recorded
  in ``events`` with the detector's AUROC (the new task's test examples against the earlier tasks' test examples)
  and the routing accuracy (evaluation only, no decision reads them).
- Growth: with several ``candidates`` (adapter specs), each is scored on one batch by the gradient norm of the
  loss per square root of its parameter count (the "grad_norm" zero-cost proxy, normalised so size alone does not
  win); the best is grown.
- Routing: argmax over adaptors of the score; the routed adaptor's head predicts among its classes.

Simplifications: the paper's adaptors are shallow networks on the encoder's features, searched by zero-shot NAS
over architectures; here they are adapterkit adapters inside the encoder (any spec), chosen among a given list.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from adapterkit.core.spec import AdapterSpec
from adapterkit.train.continual.learner import (
    ClassHead,
    ContinualMethod,
    Learner,
    head_from_state,
    head_size,
    head_state,
    scores_in,
)
from adapterkit.train.continual.stream import Examples, Stream


def adaptor(k: int) -> str:
    return f"ear_adaptor{k}"


def auroc(inside: Tensor, outside: Tensor) -> float:
    """Probability that an outside example scores lower than an inside one (ties count half)."""
    diff = inside.view(-1, 1) - outside.view(1, -1)
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


class EAR(ContinualMethod):
    name = "ear"
    variants = ("routed",)

    def __init__(self, candidates: Sequence[AdapterSpec] | None = None, dims: int = 4096, quantile: float = 0.05,
                 shift_fraction: float = 0.5, grow: str = "auto", seed: int = 0) -> None:
        if not 0.0 < shift_fraction <= 1.0 or not 0.0 <= quantile < 1.0:
            raise ValueError(f"EAR: shift_fraction={shift_fraction} must be in (0, 1], quantile={quantile} in [0, 1)")
        if grow not in ("auto", "detector"):
            raise ValueError(f"EAR: grow={grow!r}: use 'auto' (the detector, or classes no adaptor knows) or "
                             "'detector'")
        self.candidates, self.grow = list(candidates or []), grow
        self.dims, self.quantile, self.shift_fraction, self.seed = dims, quantile, shift_fraction, seed
        self.memory: list[dict[int, Tensor]] = []  # per adaptor: class -> hypervector sum
        self.thresholds: list[float] = []
        self.heads: list[ClassHead] = []
        self.events: list[dict[str, Any]] = []
        self._drawn: Tensor | None = None  # the projection, regenerated from the seed (not saved)

    # ---- the detector ----------------------------------------------------------------------------------------
    def _projection(self, dim: int) -> Tensor:
        """P, drawn from ``seed`` once and kept (every batch the detector scores reads it)."""
        if self._drawn is None or self._drawn.shape[1] != dim:
            g = torch.Generator().manual_seed(self.seed)
            self._drawn = torch.randint(0, 2, (self.dims, dim), generator=g).float() * 2 - 1
        return self._drawn

    def _encode(self, features: Tensor) -> Tensor:
        return torch.sign(features @ self._projection(features.shape[1]).T)

    def _scores(self, codes: Tensor) -> Tensor:
        """(adaptors, N): each adaptor's best class similarity."""
        out = []
        for classes in self.memory:
            stack = F.normalize(torch.stack(list(classes.values())), dim=-1)
            out.append((F.normalize(codes, dim=-1) @ stack.T).amax(-1))
        return torch.stack(out)

    # ---- learning --------------------------------------------------------------------------------------------
    def learn(self, learner: Learner, stream: Stream, t: int) -> None:
        task = stream[t]
        base = learner.map_features(task.train, None)
        codes = self._encode(base)
        event: dict[str, Any] = {"task": task.name}
        if self.memory:
            scores = self._scores(codes)
            known = (scores >= torch.tensor(self.thresholds).view(-1, 1)).any(0)
            event["ood_fraction"] = round(1 - float(known.double().mean()), 4)
            earlier = Examples.join([stream[j].test for j in range(t)])
            inside = self._scores(self._encode(learner.map_features(earlier, None))).amax(0)
            outside = self._scores(self._encode(learner.map_features(task.test, None))).amax(0)
            event["auroc"] = round(auroc(inside, outside), 4)
            event["detector_shift"] = shifted = event["ood_fraction"] >= self.shift_fraction
            unknown = set(task.classes) - {c for memory in self.memory for c in memory}
            if self.grow == "auto" and unknown and not shifted:  # the labels say what the detector missed
                shifted, event["grew_for"] = True, "new classes"
        else:
            shifted = True
        if shifted:
            k = len(self.heads)
            spec, label = self._search(learner, task.train, task.classes)
            learner.attach(adaptor(k), spec)
            self.heads.append(ClassHead(learner.backbone.dim, task.classes))
            self.memory.append({})
            self.thresholds.append(1.0)
            event["spec"] = label
        else:
            k = Counter(scores.argmax(0).tolist()).most_common(1)[0][0]
            self.heads[k].grow(task.classes)
        event.update(grew=shifted, adaptor=k)
        self._train(learner, k, task.train, f"{self.name} {task.name}")
        for c in task.classes:
            rows = codes[task.train.labels == c].sum(0)
            self.memory[k][c] = self.memory[k].get(c, torch.zeros(self.dims)) + rows
        own = self._scores(codes)[k]
        self.thresholds[k] = min(self.thresholds[k], float(torch.quantile(own, self.quantile)))
        event["routing_accuracy"] = round(self._routing_accuracy(learner, stream, t), 2)
        self.events.append(event)

    @torch.no_grad()
    def _routing_accuracy(self, learner: Learner, stream: Stream, t: int) -> float:
        """Percent of the test examples of tasks 0..t routed to an adaptor that knows their class (a report; no
        decision reads it)."""
        seen = Examples.join([stream[j].test for j in range(t + 1)])
        routes = self._scores(self._encode(learner.map_features(seen, None))).argmax(0)
        right = [int(label) in self.memory[int(k)] for k, label in zip(routes, seen.labels)]
        return 100.0 * sum(right) / len(right)

    def _loss(self, learner: Learner, name: str, head: ClassHead, batch: Any, labels: Tensor) -> Tensor:
        return F.cross_entropy(head(learner.features(batch, name)), head.columns(labels))

    def _train(self, learner: Learner, k: int, data: Examples, desc: str) -> None:
        head, params = self.heads[k], learner.params(adaptor(k))
        for param in params:
            param.requires_grad_(True)
        lr = learner.config.head_lr or learner.config.lr
        learner.fit(data, [{"params": params}, {"params": list(head.parameters()), "lr": lr}],
                    lambda b, y: self._loss(learner, adaptor(k), head, b, y), learner.config.epochs, desc)
        for param in params:
            param.requires_grad_(False)

    def _search(self, learner: Learner, data: Examples, classes: Sequence[int]) -> tuple[AdapterSpec, str]:
        """The candidate with the largest gradient norm per sqrt(parameters) on one batch (zero-cost proxy)."""
        if len(self.candidates) < 2:
            spec = self.candidates[0] if self.candidates else learner.spec
            return spec, spec.method
        batch, labels = next(learner.batches(data, learner.config.batch_size, False))
        best: tuple[float, int] = (-1.0, 0)
        for i, spec in enumerate(self.candidates):
            learner.attach("ear_probe", spec)
            params = learner.params("ear_probe")
            for param in params:
                param.requires_grad_(True)
            loss = self._loss(learner, "ear_probe", ClassHead(learner.backbone.dim, classes), batch, labels)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            norm = sum(float((g.double() ** 2).sum()) for g in grads if g is not None) ** 0.5
            size = sum(p.numel() for p in params)
            learner.detach("ear_probe")
            best = max(best, (float(norm) / size ** 0.5, -i))
        chosen = self.candidates[-best[1]]
        return chosen, f"candidate {-best[1]} ({chosen.method})"

    # ---- predicting ------------------------------------------------------------------------------------------
    def route(self, learner: Learner, batch: Any) -> Tensor:
        return self._scores(self._encode(learner.features(batch, None))).argmax(0)

    def predict(self, learner: Learner, batch: Any, columns: list[int], variant: str) -> Tensor:
        routes = self.route(learner, batch)
        out = torch.full((len(routes), len(columns)), float("-inf"))
        for k in routes.unique().tolist():
            rows = (routes == k).nonzero().flatten().tolist()
            part = learner.backbone.take(batch, rows)
            head = self.heads[k]
            out[rows] = scores_in(head, head(learner.features(part, adaptor(k))), columns)
        return out

    # ---- state -----------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors: dict[str, Tensor] = {}
        heads = []
        for k, head in enumerate(self.heads):
            part, meta = head_state(f"head{k}", head)
            tensors.update(part)
            heads.append(meta)
            for c, vector in self.memory[k].items():
                tensors[f"memory{k}.{c}"] = vector
        classes = [list(m) for m in self.memory]
        return tensors, {"heads": heads, "classes": classes, "thresholds": self.thresholds, "events": self.events}

    def load_state(self, learner: Learner, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        dim = learner.backbone.dim
        self.heads = [head_from_state(f"head{k}", dim, tensors, m) for k, m in enumerate(meta["heads"])]
        self.memory = [{c: tensors[f"memory{k}.{c}"] for c in cs} for k, cs in enumerate(meta["classes"])]
        self.thresholds = list(meta["thresholds"])
        self.events = list(meta["events"])

    def trainable_params(self, learner: Learner) -> int:
        adaptors = sum(p.numel() for k in range(len(self.heads)) for p in learner.params(adaptor(k)))
        return adaptors + head_size(*self.heads)

    def memory_bytes(self) -> int:
        """Hypervectors (int16 would hold them); the projection is regenerated from its seed."""
        return sum(len(m) for m in self.memory) * self.dims * 2

