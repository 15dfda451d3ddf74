"""Supervised fine-tuning of a causal LM with one adapter: length-grouped batches, loss on the assistant tokens
only, dev loss / perplexity and a few greedy generations per epoch, everything written to the output folder.

Batches are drawn the way HF's ``group_by_length`` draws them: the shuffled examples are cut into mega-batches of
``GROUP`` batches, each sorted by length and cut into batches, and the batch order is shuffled again; rows of a
batch then have similar lengths, so little compute goes to padding (the padding share is reported).

The loss is token-weighted: the summed cross-entropy of every assistant token of a batch over their count, so a
long answer weighs more than a short one, as HF's own causal-LM loss does within a batch. Only the positions that
carry a label go through the output layer (a 49k-word vocabulary costs as much as a fifth of a small model).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adapterkit.core.files import atomic_write
from adapterkit.core.host import host_of
from adapterkit.core.spec import AdapterSpec
from adapterkit.inject.engine import attach, train_only
from adapterkit.inject.quantize import quantize_base
from adapterkit.inject.state import save
from adapterkit.train.checkpoint import load_checkpoint, save_checkpoint
from adapterkit.train.loop import TrainConfig, adamw_with_warmup, check_writable, compute_setup, training_hooks
from adapterkit.train.sft_data import IGNORE, Conversation, Tokenized, prompt_ids

GROUP = 50  # batches per length-sorted mega-batch (HF's LengthGroupedSampler uses 50 too)


@dataclass
class SFTConfig(TrainConfig):
    """A causal-LM run's settings: TrainConfig's, with causal-LM defaults, plus the per-epoch generations."""

    epochs: int = 1
    lr: float = 2e-4
    batch_size: int = 8
    max_length: int = 512
    head: list[str] = field(default_factory=list)  # nothing beside the adapter trains by default
    samples: int = 4  # dev prompts answered greedily after each epoch
    max_new_tokens: int = 64


@dataclass(frozen=True)
class Batch:
    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor

    @property
    def tokens(self) -> int:
        """Tokens that carry a label (the next-token targets of the loss)."""
        return int((self.labels[:, 1:] != IGNORE).sum())


def length_grouped(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Batches of example indices: shuffled, sorted by length within mega-batches, batch order shuffled."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    mega = batch_size * GROUP
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        group = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def collate(data: Tokenized, rows: list[int], pad_id: int) -> Batch:
    """Rows padded on the right to the longest; padding is masked out and carries no label."""
    width = max(len(data.ids[i]) for i in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for row, i in enumerate(rows):
        n = len(data.ids[i])
        ids[row, :n] = torch.tensor(data.ids[i])
        labels[row, :n] = torch.tensor(data.labels[i])
        mask[row, :n] = 1
    return Batch(ids, mask, labels)


def padding_share(data: Tokenized, batches: list[list[int]]) -> float:
    """Share of the batches' token slots that are padding."""
    real = sum(len(data.ids[i]) for rows in batches for i in rows)
    slots = sum(len(rows) * max(len(data.ids[i]) for i in rows) for rows in batches)
    return 1.0 - real / max(slots, 1)


def _direct_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder body, output layer) where logits are exactly head(body(...).last_hidden_state); None otherwise
    (a model that rescales or caps its logits, or has no such parts, is run whole, and so is one with an adapter on
    its own call, such as prompt or prefix tuning, which runs only when the model itself is called)."""
    if host_of(model) is not None:
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, key, None) for key in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(body, nn.Module):  # Gemma3ForCausalLM names "language_model" but holds its body as .model
        get_body = getattr(model, "get_decoder", None)
        body = get_body() if callable(get_body) else None
        body = body if isinstance(body, nn.Module) and body is not model else None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return (body, head) if isinstance(body, nn.Module) and isinstance(head, nn.Module) else None


def token_logprobs(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each labelled next token, the (row, position) of each), in one forward."""
    targets = batch.labels[:, 1:]
    where = (targets != IGNORE).nonzero(as_tuple=True)
    parts = _direct_head(model)
    if parts is not None:
        hidden = parts[0](input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).last_hidden_state
        logits = parts[1](hidden[:, :-1][where])
    else:
        logits = model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits[:, :-1][where]
    logp = -F.cross_entropy(logits.float(), targets[where], reduction="none")
    return logp, torch.stack(where, dim=1)


def _micro(batch: Batch, parts: int) -> Iterator[Batch]:
    for chunk in torch.arange(batch.ids.shape[0]).chunk(parts):
        if len(chunk):
            yield Batch(batch.ids[chunk], batch.mask[chunk], batch.labels[chunk])


@torch.no_grad()
def dev_loss(model: nn.Module, data: Tokenized, batch_size: int, pad_id: int) -> dict[str, float]:
    """Token-weighted mean loss over the assistant tokens of ``data``, and its perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))  # little padding; order does not matter
    for start in range(0, len(order), batch_size):
        logp, _ = token_logprobs(model, collate(data, order[start:start + batch_size], pad_id))
        total -= float(logp.sum())
        count += logp.numel()
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
             temperature: float | None = None, top_p: float | None = None) -> list[str]:
    """Continuations of token prompts (left-padded into one batch), decoded without special tokens: greedy, or
    sampled at ``temperature`` (nucleus ``top_p``) when one is given."""
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    lm: Any = model  # a transformers model: generate() is not on nn.Module
    sampled = temperature is not None
    out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=sampled,
                      temperature=temperature, top_p=top_p if sampled else None, top_k=0 if sampled else None,
                      pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


def sample_prompts(tokenizer: Any, conversations: list[Conversation], count: int
                   ) -> list[tuple[list[dict[str, str]], str, list[int]]]:
    """(messages before the last answer, that answer, prompt tokens) of the first ``count`` conversations."""
    chosen = []
    for conv in conversations[:count]:
        last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
        context = conv.messages[:last]
        chosen.append((context, conv.messages[last]["content"], prompt_ids(tokenizer, context, conv.where)))
    return chosen


def write_samples(model: nn.Module, tokenizer: Any, samples: list[tuple[list[dict[str, str]], str, list[int]]],
                  max_new_tokens: int, path: Path) -> None:
    answers = generate(model, tokenizer, [s[2] for s in samples], max_new_tokens)
    lines = [json.dumps({"messages": m, "reference": ref, "generated": gen}, ensure_ascii=False)
             for (m, ref, _), gen in zip(samples, answers)]
    atomic_write(path, ("\n".join(lines) + "\n").encode())


EpochHook = Callable[[nn.Module, int], dict[str, float]]


def run_sft(model: nn.Module, tokenizer: Any, train: Tokenized, dev: Tokenized, config: SFTConfig,
            out: Path | None = None, samples: list | None = None, on_epoch: EpochHook | None = None,
            resume: bool = False) -> dict[str, Any]:
    """Train every parameter that requires grad on ``train``; evaluate on ``dev`` after each epoch.

    Writes ``samples-epoch-N.jsonl`` (greedy answers to ``samples``) and, with ``config.checkpoint_every``,
    ``checkpoint.safetensors`` to ``out``; ``resume`` continues from that checkpoint with the same result as an
    uninterrupted run. ``on_epoch(model, epoch)`` adds metrics per epoch (e.g. a classification accuracy).
    Returns the history and training statistics.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    hooks = training_hooks(model, total)  # e.g. AdaLoRA's rank allocation (train/loop.py)
    optimizer, schedule = adamw_with_warmup(model, config, total)
    generator = torch.Generator().manual_seed(config.seed)
    history: dict[str, list] = {"step": [], "loss": [], "epoch": [], "epoch_step": [], "dev_accuracy": [],
                                "dev_loss": [], "dev_perplexity": []}
    stats = {"real_tokens": 0, "slots": 0, "label_tokens": 0}
    progress: dict[str, Any] = {"step": 0, "epoch": 1, "batch": 0, "seconds": 0.0, "history": history,
                                "stats": stats}
    checkpoint = out / "checkpoint.safetensors" if out is not None else None
    if resume and checkpoint is not None and checkpoint.exists():
        progress, epoch_rng = load_checkpoint(checkpoint, model, optimizer, schedule)
        history, stats = progress["history"], progress["stats"]
        generator.set_state(epoch_rng)
    autocast = compute_setup(model, config)
    model.train()
    bar = tqdm(total=total, initial=progress["step"], desc="train", unit="step", dynamic_ncols=True,
               disable=os.environ.get("ADAPTERKIT_NO_PROGRESS") == "1")
    lengths = [len(ids) for ids in train.ids]
    while progress["epoch"] <= config.epochs and progress["step"] < total:
        epoch_rng = generator.get_state()  # saved in checkpoints: the epoch's batches can be drawn again
        plan = length_grouped(lengths, config.batch_size, generator)
        start = time.perf_counter()
        for index, rows in enumerate(plan):
            if index < progress["batch"] or progress["step"] >= total:
                continue  # batches done before the checkpoint we resumed from
            batch = collate(train, rows, pad_id)
            count = max(batch.tokens, 1)
            value = 0.0
            for part in _micro(batch, config.grad_accum):
                with autocast:
                    logp, _ = token_logprobs(model, part)
                loss = -logp.sum() / count  # token-weighted over the whole batch, whatever the split
                for hook in hooks:  # a regulariser counts once a batch: each micro-batch gets its share
                    extra = hook.extra_loss(model)
                    loss = loss if extra is None else loss + extra * (part.tokens / count)
                loss.backward()
                value += float(loss.detach())
            optimizer.step()
            schedule.step()
            for hook in hooks:
                hook.after_step(model, progress["step"])
            optimizer.zero_grad(set_to_none=True)
            progress["step"] += 1
            progress["batch"] = index + 1
            stats["real_tokens"] += int(batch.mask.sum())
            stats["slots"] += batch.mask.numel()
            stats["label_tokens"] += batch.tokens
            history["step"].append(progress["step"])
            history["loss"].append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", epoch=progress["epoch"])
            if checkpoint is not None and config.checkpoint_every and progress["step"] % config.checkpoint_every == 0:
                progress["seconds"] += time.perf_counter() - start
                start = time.perf_counter()
                save_checkpoint(checkpoint, model, optimizer, schedule, progress, epoch_rng)
        progress["seconds"] += time.perf_counter() - start  # training time only, not evaluation
        _evaluate_epoch(model, tokenizer, dev, config, progress, out, samples, on_epoch, bar)
        progress["epoch"] += 1
        progress["batch"] = 0
    bar.close()
    return {"history": history, "seconds": progress["seconds"], "stats": stats}


def _evaluate_epoch(model: nn.Module, tokenizer: Any, dev: Tokenized, config: SFTConfig, progress: dict[str, Any],
                    out: Path | None, samples: list | None, on_epoch: EpochHook | None, bar: Any) -> None:
    history, epoch = progress["history"], progress["epoch"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = dev_loss(model, dev, 2 * config.batch_size, pad_id)  # no activations kept: twice the rows
    extra = on_epoch(model, epoch) if on_epoch is not None else {}
    history["epoch"].append(epoch)
    history["epoch_step"].append(progress["step"])
    history["dev_loss"].append(scores["loss"])
    history["dev_perplexity"].append(scores["perplexity"])
    if "accuracy" in extra:
        history["dev_accuracy"].append(extra["accuracy"])
    for key, value in extra.items():
        if key != "accuracy":
            history.setdefault(f"dev_{key}", []).append(value)
    shown = "".join(f"  dev {k} {v:.2f}" for k, v in extra.items())
    bar.write(f"epoch {epoch}: dev loss {scores['loss']:.4f}  perplexity {scores['perplexity']:.2f}{shown}")
    if out is not None and samples:
        write_samples(model, tokenizer, samples, config.max_new_tokens, out / f"samples-epoch-{epoch}.jsonl")


def fit_sft(model: nn.Module, tokenizer: Any, spec: AdapterSpec, targets: Any, train: Tokenized, dev: Tokenized,
            config: SFTConfig, out: Path, record: dict[str, Any], samples: list | None = None,
            on_epoch: EpochHook | None = None, resume: bool = False, name: str = "adapter") -> dict[str, Any]:
    """Attach ``spec`` as ``name``, fine-tune it, save adapter, metrics.json, run.json and the curve to ``out``."""
    check_writable(out)
    if config.quantize:  # QLoRA: the frozen Linear layers in 4 bits (the output layer stays float)
        quantize_base(model, config.quantize, keep=config.head)
    attach(model, name, spec, targets)
    trainable = train_only(model, name, also=config.head)
    result = run_sft(model, tokenizer, train, dev, config, out, samples, on_epoch, resume)
    history, stats = result["history"], result["stats"]
    metrics: dict[str, Any] = {
        "dev_loss": history["dev_loss"][-1],
        "dev_perplexity": history["dev_perplexity"][-1],
        "trainable_parameters": trainable,
        "train_seconds": round(result["seconds"], 1),
        "steps": history["step"][-1] if history["step"] else 0,
        "train_examples": len(train),
        "dev_examples": len(dev),
        "truncated_examples": train.truncated + dev.truncated,
        "dropped_examples": len(train.dropped) + len(dev.dropped),
        "padding_share": round(1 - stats["real_tokens"] / max(stats["slots"], 1), 4),
        "trained_tokens": stats["real_tokens"],
        "label_tokens": stats["label_tokens"],
        "history": history,
    }
    if history["dev_accuracy"]:
        metrics["dev_accuracy"] = history["dev_accuracy"][-1]
        metrics["best_dev_accuracy"] = max(history["dev_accuracy"])
    for key in ("dev_exact_match",):
        if history.get(key):
            metrics[key] = history[key][-1]
    save(model, out / "adapter", name, modules=tuple(config.head))
    full = {"task": "causal-lm", **record, "config": asdict(config), "method": spec.to_dict()}
    atomic_write(out / "metrics.json", (json.dumps(metrics, indent=1) + "\n").encode())
    atomic_write(out / "run.json", (json.dumps(full, indent=2) + "\n").encode())
    from adapterkit.train.plots import training_curve

    training_curve(history, out / "training_curve.png", title=f"{spec.method} on {record.get('data', 'data')}")
    return metrics
