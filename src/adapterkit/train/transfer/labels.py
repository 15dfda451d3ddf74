"""Label-word distributions of a causal LM, and a LoRA fitted to given ones: the teacher, the discriminator and the
distillation of Trans-LoRA all go through here.

A task's label distribution on a text is the softmax, over its label words, of each word's answer log-probability
(the word and the turn's end token after the generation prompt, summed: gen_classify's rank scores),

    q(y | x) = softmax_y( sum_t log p(a_y,t | prompt(x), a_y,<t) ).

``fit`` trains the trainable parameters (a LoRA) to minimise the mean KL(p || q) to target distributions p over
the texts: with one-hot p it is the cross-entropy of a two-word LM classifier (the discriminator, words
"synthetic" / "real"); with the teacher's p it is distillation on the label words. Each model reads the text with
its own tokenizer: no token of one model is ever given to another, so nothing needs bridging between vocabularies.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adapterkit.core.errors import AdapterKitError
from adapterkit.train.gen_classify import Task, _answers, rank_scores
from adapterkit.train.loop import TrainConfig, adamw_with_warmup
from adapterkit.train.sft import collate, token_logprobs
from adapterkit.train.sft_data import IGNORE, Tokenized, prompt_ids


def check_words(tokenizer: Any, task: Task, where: str) -> None:
    """A one-line error unless every label word of ``task`` reads as its own tokens (no unknown token) and the
    words' answers differ, under ``tokenizer``: a word a tokenizer cannot spell cannot be scored by that model, and
    no mapping between the two vocabularies would fix it (the method maps none)."""
    answers = _answers(tokenizer, task)
    unk = getattr(tokenizer, "unk_token_id", None)
    for word, answer in zip(task.words, answers):
        if unk is not None and unk in answer:
            raise AdapterKitError(f"{where}: label word {word!r} is not in this model's vocabulary (its tokenizer "
                                  f"reads it as {tokenizer.unk_token}); choose words both models can spell; "
                                  "Trans-LoRA needs no tokenizer bridge, only text each model can read")
    if len({tuple(a) for a in answers}) < len(answers):
        raise AdapterKitError(f"{where}: label words {task.words} read as the same tokens under this tokenizer")


def distribution(model: nn.Module, tokenizer: Any, task: Task, texts: list[str], batch_size: int = 16
                 ) -> torch.Tensor:
    """(texts, labels) label-word probabilities q(y | x), without gradients."""
    return rank_scores(model, tokenizer, task, texts, batch_size).log_softmax(-1).exp()


def label_logits(model: nn.Module, tokenizer: Any, task: Task, texts: list[str]) -> torch.Tensor:
    """(texts, labels) answer log-probabilities with gradients: all labels of all texts in one forward."""
    answers = _answers(tokenizer, task)
    prompts = [prompt_ids(tokenizer, task.conversation(t, None, "").messages, "--prompt") for t in texts]
    rows = Tokenized([p + a for p in prompts for a in answers],
                     [[IGNORE] * len(p) + a for p in prompts for a in answers], [])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logp, where = token_logprobs(model, collate(rows, list(range(len(rows))), pad))
    totals = torch.zeros(len(rows), dtype=logp.dtype).index_add(0, where[:, 0], logp)
    return totals.view(len(texts), len(answers))


def mean_kl(model: nn.Module, tokenizer: Any, task: Task, texts: list[str], targets: torch.Tensor,
            batch_size: int = 16) -> float:
    """Mean KL(targets || q) over ``texts``, in nats."""
    q = distribution(model, tokenizer, task, texts, batch_size)
    p = targets.double()
    return float((p * (p.clamp_min(1e-12).log() - q.double().clamp_min(1e-12).log())).sum(1).mean())


def fit(model: nn.Module, tokenizer: Any, task: Task, texts: list[str], targets: torch.Tensor, epochs: int,
        lr: float, batch_size: int, seed: int, desc: str = "fit") -> list[float]:
    """Train what requires grad in ``model`` to minimise mean KL(targets || q) over ``texts``; the loss per step."""
    if len(texts) != len(targets):
        raise AdapterKitError(f"{desc}: {len(texts)} texts but {len(targets)} target distributions")
    if not texts:
        raise AdapterKitError(f"{desc}: no texts to train on")
    steps = epochs * math.ceil(len(texts) / batch_size)
    optimizer, schedule = adamw_with_warmup(model, TrainConfig(lr=lr, epochs=epochs, batch_size=batch_size,
                                                               head=[]), steps)
    with torch.random.fork_rng(devices=[]):  # dropout draws from a seeded stream: the same seed, the same LoRA
        torch.manual_seed(seed)
        return _fit(model, tokenizer, task, texts, targets, epochs, batch_size, seed, desc, steps, optimizer,
                    schedule)


def _fit(model: nn.Module, tokenizer: Any, task: Task, texts: list[str], targets: torch.Tensor, epochs: int,
         batch_size: int, seed: int, desc: str, steps: int, optimizer: Any, schedule: Any) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()  # as HF trains: the base's own dropout on
    bar = tqdm(total=steps, desc=desc, unit="step", dynamic_ncols=True,
               disable=os.environ.get("ADAPTERKIT_NO_PROGRESS") == "1")
    for _ in range(epochs):
        order = torch.randperm(len(texts), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            log_q = label_logits(model, tokenizer, task, [texts[i] for i in rows]).float().log_softmax(-1)
            loss = F.kl_div(log_q, targets[rows].float(), reduction="batchmean")
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    model.eval()
    return losses
