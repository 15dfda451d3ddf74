"""Multi-task classification: one encoder, one head per task, a task id per example, mixed batches.

The blocks that route by task (TaskRoute) or learn from several tasks at once (Route, Fuse, ...) need batches whose
rows belong to different tasks. ``MultiTaskClassifier`` runs its encoder inside ``use(encoder, block,
task_ids=...)`` and scores each row with its own task's head; ``train_multitask`` trains on the shuffled union of
the tasks' training sets and reports each task's dev accuracy.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from adapterkit.core.errors import AdapterKitError
from adapterkit.core.tree import hosts
from adapterkit.inject.use import use
from adapterkit.train.data import TextTable
from adapterkit.train.loop import Encoded, TrainConfig, adamw_with_warmup, encode


@dataclass
class MultiTaskOutput:
    """Loss (with the blocks' auxiliary losses), logits padded to the largest label count (-inf beyond a row's
    own labels), and what the block's routers reported."""

    loss: Tensor | None
    logits: Tensor
    routing: Any


class MultiTaskClassifier(nn.Module):
    """An encoder (an HF ``AutoModel``) with one linear head per task on its pooled output.

    Args:
        encoder: the (adapted) encoder; its adapters and the block's combiners are what train, with the heads.
        num_labels: task name -> number of classes, in task-id order.
        block: the composition block to run the encoder with (None: the encoder's active adapters); either way each
            row's task id reaches ``use(..., task_ids=)``, for task routing and task-conditioned adapters.
        aux_weight: weight of the block's auxiliary losses (e.g. load balancing) in the training loss.
    """

    def __init__(self, encoder: nn.Module, num_labels: dict[str, int], block: Any = None, aux_weight: float = 0.01,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if not num_labels:
            raise AdapterKitError("MultiTaskClassifier needs at least one task")
        hidden = getattr(getattr(encoder, "config", None), "hidden_size", None)
        if not isinstance(hidden, int):
            raise AdapterKitError("MultiTaskClassifier: the encoder has no config.hidden_size")
        self.encoder = encoder
        self.tasks = list(num_labels)
        self.num_labels = dict(num_labels)
        self.heads = nn.ModuleDict({task: nn.Linear(hidden, n) for task, n in num_labels.items()})
        self.dropout = nn.Dropout(dropout)
        self.block = block
        self.aux_weight = aux_weight

    def pooled(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The encoder's pooled sentence vector (its pooler when it has one, else the masked mean)."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)  # (B, T, 1)
            pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)
        return pooled  # (B, H)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, task_ids: Tensor, labels: Tensor | None = None
                ) -> MultiTaskOutput:
        """Score each row with its task's head; ``labels`` adds the mean cross-entropy (+ auxiliary losses)."""
        task_ids = torch.as_tensor(task_ids, device=input_ids.device)
        if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= len(self.tasks)):
            raise AdapterKitError(f"task ids must lie in 0..{len(self.tasks) - 1} ({', '.join(self.tasks)})")
        if self.block is not None:
            context = use(self.encoder, self.block, task_ids=task_ids, token_mask=attention_mask)
        else:  # the active adapters, told each row's task (read by adapters such as Hyperformer's hypernetwork)
            context = use(self.encoder, *active_adapters(self.encoder), task_ids=task_ids)
        with context as routing:
            pooled = self.dropout(self.pooled(input_ids, attention_mask))
        width = max(int(n) for n in self.num_labels.values())
        logits = pooled.new_full((len(task_ids), width), float("-inf"))
        loss = pooled.new_zeros(()) if labels is not None else None
        for index, task in enumerate(self.tasks):
            rows = (task_ids == index).nonzero().squeeze(1)
            if not rows.numel():
                continue
            scores = self.heads[task](pooled[rows])  # (rows, labels of this task)
            logits = logits.index_copy(0, rows, F.pad(scores, (0, width - scores.shape[1]), value=float("-inf")))
            if labels is not None and loss is not None:
                loss = loss + F.cross_entropy(scores, labels[rows], reduction="sum")
        if loss is not None:
            loss = loss / max(1, len(task_ids))
            if routing is not None and self.aux_weight:
                loss = loss + self.aux_weight * routing.aux_loss().to(loss.device)
        return MultiTaskOutput(loss, logits, routing)


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters that run on ``model`` outside any ``use`` block, in order."""
    return list(dict.fromkeys(name for _, _, host in hosts(model) for name in host.active))


def _union(encoded: list[Encoded]) -> list[tuple[int, int]]:
    return [(task, row) for task, table in enumerate(encoded) for row in range(len(table.ids))]


def task_batches(encoded: list[Encoded], rows: list[tuple[int, int]], size: int, pad_id: int
                 ) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """(ids, mask, task ids, labels) batches of ``size`` (task, row) pairs, each padded to its longest row."""
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        width = max(len(encoded[t].ids[r]) for t, r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (t, r) in enumerate(chunk):
            seq = encoded[t].ids[r]
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
        tasks = torch.tensor([t for t, _ in chunk])
        labels = torch.stack([encoded[t].labels[r] for t, r in chunk])
        yield ids, mask, tasks, labels


@torch.no_grad()
def evaluate_multitask(model: MultiTaskClassifier, encoded: list[Encoded], batch_size: int, pad_id: int
                       ) -> dict[str, float]:
    """Dev accuracy (percent) of each task."""
    was_training = model.training
    model.eval()
    scores = {}
    for index, task in enumerate(model.tasks):
        rows = [(index, r) for r in range(len(encoded[index].ids))]
        correct = 0
        for ids, mask, tasks, labels in task_batches(encoded, rows, batch_size, pad_id):
            correct += int((model(ids, mask, tasks).logits.argmax(-1) == labels).sum())
        scores[task] = 100.0 * correct / max(1, len(rows))
    model.train(was_training)
    return scores


def train_multitask(model: MultiTaskClassifier, tokenizer: Any, tasks: dict[str, tuple[TextTable, TextTable]],
                    config: TrainConfig, desc: str = "multi-task") -> dict[str, Any]:
    """Train every parameter of ``model`` that requires grad on the shuffled union of the tasks.

    ``tasks`` maps each task of ``model.tasks`` (same order) to its (train, dev) tables. Returns the loss history,
    per-task dev accuracy after each epoch (``dev_accuracy[task]``), and the training seconds.
    """
    if list(tasks) != model.tasks:
        raise AdapterKitError(f"train_multitask: tasks {list(tasks)} must match the model's heads {model.tasks}")
    pad_id = tokenizer.pad_token_id or 0
    train_enc = [encode(tokenizer, train, config.max_length) for train, _ in tasks.values()]
    dev_enc = [encode(tokenizer, dev, config.max_length) for _, dev in tasks.values()]
    rows = _union(train_enc)
    total = math.ceil(len(rows) / config.batch_size) * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    if not any(p.requires_grad for p in model.parameters()):
        raise AdapterKitError("train_multitask: nothing to train (call ak.train_only on the encoder first)")
    optimizer, schedule = adamw_with_warmup(model, config, total)
    generator = torch.Generator().manual_seed(config.seed)
    history: dict[str, Any] = {"step": [], "loss": [], "aux_loss": [], "dev_accuracy": {t: [] for t in model.tasks}}
    seconds, step = 0.0, 0
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True,
               disable=os.environ.get("ADAPTERKIT_NO_PROGRESS") == "1")
    model.train()
    for _ in range(config.epochs):
        order = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
        start = time.perf_counter()
        for ids, mask, task_ids, labels in task_batches(train_enc, order, config.batch_size, pad_id):
            if step >= total:
                break
            out = model(ids, mask, task_ids, labels)
            assert out.loss is not None
            out.loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history["step"].append(step)
            history["loss"].append(out.loss.item())
            history["aux_loss"].append(out.routing.aux_loss().item() if out.routing is not None else 0.0)
            bar.update(1)
            bar.set_postfix(loss=f"{out.loss.item():.4f}")
        seconds += time.perf_counter() - start
        for task, acc in evaluate_multitask(model, dev_enc, config.batch_size, pad_id).items():
            history["dev_accuracy"][task].append(acc)
    bar.close()
    return {"history": history, "dev_accuracy": {t: v[-1] for t, v in history["dev_accuracy"].items()},
            "train_seconds": round(seconds, 1), "steps": step}
