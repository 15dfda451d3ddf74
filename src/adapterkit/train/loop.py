"""A lean training loop for sequence classification with one adapter: AdamW, linear warmup/decay,
dynamic padding, a progress bar, dev accuracy per epoch, and everything written to the output folder."""

from __future__ import annotations

import importlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from adapterkit.core.errors import AdapterKitError
from adapterkit.core.files import atomic_write
from adapterkit.core.spec import AdapterSpec
from adapterkit.core.tree import adapter_names, placements
from adapterkit.inject.engine import attach, train_only
from adapterkit.inject.quantize import quantize_base
from adapterkit.inject.state import save
from adapterkit.train.checkpoint import load_checkpoint, save_checkpoint
from adapterkit.train.data import TextTable
from adapterkit.train.distributed import Parallel
from adapterkit.train.lora_plus import lora_plus_groups
from adapterkit.train.recompute import checkpoint_kwargs


@dataclass
class TrainConfig:
    """Everything a run needs besides the model and data; written to run.json."""

    epochs: int = 3
    lr: float = 5e-4
    batch_size: int = 32
    max_length: int = 64
    max_steps: int | None = None
    warmup: float = 0.06  # fraction of steps with linearly rising learning rate
    weight_decay: float = 0.01
    seed: int = 0
    head: list[str] = field(default_factory=lambda: ["classifier"])  # trained with the adapter, saved with it
    grad_accum: int = 1  # split each batch into this many micro-batches (same result, less activation memory)
    gradient_checkpointing: bool | str = False  # recompute in backward (HF models): True/"full" or "selective"
    precision: str = "fp32"  # "fp32", or "bf16" autocast (adapter weights stay float32 masters)
    checkpoint_every: int | None = None  # write a resumable checkpoint every N optimizer steps
    parallel: str = "ddp"  # with several processes: "ddp" (replicate the model) or "fsdp" (shard it)
    quantize: str | None = None  # "nf4" or "fp4": QLoRA, the frozen base's Linear layers in 4 bits (bitsandbytes)
    lora_plus_ratio: float | None = None  # LoRA+: LoRA B matrices train at lr * ratio (train/lora_plus.py)


@dataclass
class Encoded:
    """A tokenised table, kept unpadded; batches pad to their longest row."""

    ids: list[list[int]]
    labels: torch.Tensor


def encode(tokenizer: Any, table: TextTable, max_length: int) -> Encoded:
    """Tokenise once, truncating to ``max_length``."""
    if table.pairs is None:
        enc = tokenizer(table.texts, truncation=True, max_length=max_length)
    else:
        enc = tokenizer(table.texts, table.pairs, truncation=True, max_length=max_length)
    return Encoded(enc["input_ids"], torch.tensor(table.labels))


def batches(data: Encoded, size: int, order: list[int], pad_id: int):
    """Yield (input_ids, attention_mask, labels) padded to the batch's longest row."""
    for start in range(0, len(order), size):
        rows = order[start:start + size]
        width = max(len(data.ids[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(rows):
            seq = data.ids[i]
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        yield ids, mask, data.labels[rows]


@torch.no_grad()
def accuracy(model: nn.Module, data: Encoded, batch_size: int, pad_id: int) -> float:
    """Share of correct argmax predictions, in percent."""
    was_training = model.training
    model.eval()
    correct = 0
    for ids, mask, labels in batches(data, batch_size * 2, list(range(len(data.ids))), pad_id):
        correct += int((model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return 100.0 * correct / max(len(data.ids), 1)


def check_writable(out: Path) -> None:
    """Fail now, not after an hour of training, if ``out`` cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # per process: data-parallel ranks probe at once
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise AdapterKitError(f"--out {out} cannot be written: {exc.strerror or exc}") from None


def seed_everything(seed: int) -> None:
    """Seed Python and torch (the classifier head's init and the adapter's init depend on it)."""
    random.seed(seed)
    torch.manual_seed(seed)


def adamw_with_warmup(model: nn.Module, config: TrainConfig, total: int
                      ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the parameters that require grad, with linear warmup (``config.warmup`` of ``total`` steps)
    then linear decay to 0: the one schedule every training loop here uses. With ``config.lora_plus_ratio``, the
    parameters are in LoRA+ groups (B matrices at lr * ratio; the schedule scales every group alike)."""
    params: Any = [p for p in model.parameters() if p.requires_grad]
    if config.lora_plus_ratio is not None:
        params = lora_plus_groups(model, config.lr, config.lora_plus_ratio, config.weight_decay)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warm = max(1, int(config.warmup * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    return optimizer, schedule


def compute_setup(model: nn.Module, config: TrainConfig) -> torch.autocast:
    """Turn on ``config``'s gradient checkpointing on ``model``; returns the autocast context of its precision
    (bf16, or a disabled one for fp32). Every training loop here calls it once before its first step."""
    if config.gradient_checkpointing:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if not callable(enable):
            raise AdapterKitError("gradient checkpointing needs a transformers model (gradient_checkpointing_enable)")
        policy = "full" if config.gradient_checkpointing is True else str(config.gradient_checkpointing)
        enable(gradient_checkpointing_kwargs=checkpoint_kwargs(policy))
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16,
                          enabled=config.precision == "bf16")


class TrainingHooks(Protocol):
    """Callbacks a method needs around each optimizer step (e.g. a rank allocator and its regulariser)."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to each micro-batch's loss (None: nothing)."""
        ...

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after ``optimizer.step()``, before ``zero_grad`` (the gradients are still there); ``step`` counts
        optimizer steps from 0."""
        ...


def training_hooks(model: nn.Module, total_steps: int) -> list[TrainingHooks]:
    """The hooks of every trainable adapter of ``model`` whose spec names some: a spec class's ``training_hooks``
    ClassVar, ``"module:factory"`` (code of the train floor), is called as ``factory(model, name, total_steps)``."""
    found: list[TrainingHooks] = []
    for name in adapter_names(model):
        adapters = [host.adapter(name) for _, _, host in placements(model, name)]
        target = getattr(type(adapters[0].spec), "training_hooks", "")
        if target and any(p.requires_grad for a in adapters for p in a.parameters()):
            module, _, factory = target.partition(":")
            found.append(getattr(importlib.import_module(module), factory)(model, name, total_steps))
    return found


def _micro_batches(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, parts: int, dist: Parallel):
    """This process's rows of a global batch, in ``parts`` micro-batches, each with its weight in the batch mean."""
    rows = ids.shape[0]
    for chunk in dist.rows(torch.arange(rows)).chunk(parts):
        if len(chunk):
            yield ids[chunk], mask[chunk], labels[chunk], len(chunk) / rows


def run_training(model: nn.Module, tokenizer: Any, train: TextTable, dev: TextTable, config: TrainConfig,
                 desc: str = "train", checkpoint: Path | None = None, resume: bool = False,
                 dist: Parallel | None = None) -> tuple[dict[str, list], float]:
    """Train every parameter that requires grad; returns the history and the training seconds.

    With ``checkpoint`` and ``config.checkpoint_every``, the full training state is written there every N steps
    (atomically); ``resume`` continues from it, giving the same result as an uninterrupted run.
    """
    pad_id = tokenizer.pad_token_id or 0
    train_enc, dev_enc = encode(tokenizer, train, config.max_length), encode(tokenizer, dev, config.max_length)
    steps_per_epoch = math.ceil(len(train_enc.ids) / config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    dist = dist or Parallel(config.parallel)
    if dist.sharded and config.checkpoint_every:
        raise AdapterKitError("resumable checkpoints are not supported with --parallel fsdp yet; use ddp")
    hooks = training_hooks(model, total)  # e.g. AdaLoRA's rank allocation; they hold the adapters' own parameters
    if hooks and dist.sharded:
        raise AdapterKitError("an adapter here needs training callbacks (rank allocation), which --parallel fsdp "
                              "does not support; use ddp")
    dist.shard(model)  # FSDP replaces the parameters with shards: before the optimizer takes them
    optimizer, schedule = adamw_with_warmup(model, config, total)
    generator = torch.Generator().manual_seed(config.seed)
    history: dict[str, list] = {"step": [], "loss": [], "epoch": [], "epoch_step": [], "dev_accuracy": []}
    progress: dict[str, Any] = {"step": 0, "epoch": 1, "batch": 0, "seconds": 0.0, "history": history}
    if resume and checkpoint is not None and checkpoint.exists():
        progress, epoch_rng = load_checkpoint(checkpoint, model, optimizer, schedule)
        history = progress["history"]
        generator.set_state(epoch_rng)
    autocast = compute_setup(model, config)
    runner, optimizer = dist.prepare(model, optimizer)  # runner: the model, or its DDP wrapper
    model.train()
    bar = tqdm(total=total, initial=progress["step"], desc=desc, unit="step", dynamic_ncols=True,
               disable=os.environ.get("ADAPTERKIT_NO_PROGRESS") == "1" or not dist.is_main)
    while progress["epoch"] <= config.epochs and progress["step"] < total:
        epoch_rng = generator.get_state()  # saved in checkpoints: the epoch's order can be drawn again
        order = torch.randperm(len(train_enc.ids), generator=generator).tolist()
        start = time.perf_counter()
        for index, (ids, mask, labels) in enumerate(batches(train_enc, config.batch_size, order, pad_id)):
            if index < progress["batch"] or progress["step"] >= total:
                continue  # batches done before the checkpoint we resumed from
            value = 0.0
            for m_ids, m_mask, m_labels, weight in _micro_batches(ids, mask, labels, config.grad_accum, dist):
                with autocast:
                    loss = runner(input_ids=m_ids, attention_mask=m_mask, labels=m_labels).loss
                for hook in hooks:
                    extra = hook.extra_loss(model)
                    loss = loss if extra is None else loss + extra
                loss = loss * weight
                (loss * dist.loss_scale()).backward()
                value += loss.detach().item()
            value = dist.sum(value)  # the global batch's mean loss
            optimizer.step()
            schedule.step()
            for hook in hooks:
                hook.after_step(model, progress["step"])
            optimizer.zero_grad(set_to_none=True)
            progress["step"] += 1
            progress["batch"] = index + 1
            history["step"].append(progress["step"])
            history["loss"].append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", epoch=progress["epoch"])
            if checkpoint is not None and config.checkpoint_every and progress["step"] % config.checkpoint_every == 0:
                progress["seconds"] += time.perf_counter() - start
                start = time.perf_counter()
                if dist.is_main:  # parameters are replicated: one writer suffices
                    save_checkpoint(checkpoint, model, optimizer, schedule, progress, epoch_rng)
        progress["seconds"] += time.perf_counter() - start  # training time only, not evaluation
        dev_acc = accuracy(model, dev_enc, config.batch_size, pad_id)
        history["epoch"].append(progress["epoch"])
        history["epoch_step"].append(progress["step"])
        history["dev_accuracy"].append(dev_acc)
        if dist.is_main:
            bar.write(f"epoch {progress['epoch']}: dev accuracy {dev_acc:.2f}")
        progress["epoch"] += 1
        progress["batch"] = 0
    bar.close()
    return history, progress["seconds"]


def fit(model: nn.Module, tokenizer: Any, name: str, spec: AdapterSpec, targets: Any, train: TextTable,
        dev: TextTable, config: TrainConfig, out: Path, extra_record: dict[str, Any] | None = None,
        resume: bool = False) -> dict:
    """Attach ``spec`` as ``name``, train it with the head, evaluate per epoch, save to ``out``; returns metrics.

    Checkpoints (``config.checkpoint_every``) go to ``out/checkpoint.safetensors``; ``resume`` continues from it.
    """
    check_writable(out)
    if config.quantize:  # QLoRA: the frozen Linear layers go to 4 bits; the head stays float and trains
        quantize_base(model, config.quantize, keep=config.head)
    attach(model, name, spec, targets)
    trainable = train_only(model, name, also=config.head)
    dist = Parallel(config.parallel)
    history, seconds = run_training(model, tokenizer, train, dev, config, desc=f"train {name}",
                                    checkpoint=out / "checkpoint.safetensors", resume=resume, dist=dist)
    metrics = {
        "dev_accuracy": history["dev_accuracy"][-1],
        "best_dev_accuracy": max(history["dev_accuracy"]),
        "trainable_parameters": trainable,
        "train_seconds": round(seconds, 1),
        "steps": history["step"][-1] if history["step"] else 0,
        "history": history,
    }
    with dist.full_weights(model):  # every process gathers (FSDP); the main process writes
        if dist.is_main:
            save(model, out / "adapter", name, modules=tuple(config.head))
    if not dist.is_main:
        dist.barrier()
        return metrics
    record = {"config": asdict(config), "method": spec.to_dict(), **(extra_record or {})}
    atomic_write(out / "metrics.json", (json.dumps(metrics, indent=1) + "\n").encode())
    atomic_write(out / "run.json", (json.dumps(record, indent=2) + "\n").encode())
    from adapterkit.train.plots import training_curve

    training_curve(history, out / "training_curve.png", title=f"{spec.method} on {record.get('data', 'data')}")
    dist.barrier()
    return metrics
