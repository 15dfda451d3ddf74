"""Trans-LoRA: move a task LoRA from a source base model to a different target base without the task's data.

Wang et al., "Trans-LoRA: towards data-free Transferable Parameter Efficient Finetuning", NeurIPS 2024
(https://arxiv.org/abs/2405.17258). Only a few seed examples of the task are kept. The pipeline:

1. **synthetic prompts**: the target model writes prompts from few-shot requests over the seeds (synth.py);
2. **discriminator**: a fresh LoRA on the *source* model, an LM classifier trained to answer "real" for real
   task text (the seeds plus any real unlabeled text) and "synthetic" for prompts the source base writes the same
   way, L_disc = CE(M_s + phi(x), y in {real, synthetic}) (the two answers ranked against each other);
3. **filter**: keep the target's prompts the discriminator rates real, P(real | x) >= threshold, most real-like
   first, up to ``keep`` (``filter="none"``: the first ``keep`` prompts, the ablation);
4. **teacher**: the source model with its task LoRA labels each kept prompt with its label-word distribution p(y|x);
5. **distillation** into a fresh LoRA on the target: mean KL(p || q_t) on the label words (labels.py).

For free text (no label words) the teacher answers each kept prompt greedily and the target's LoRA is fine-tuned on
those answers (sequence-level KD, the paper's L_KD = -sum_t log p_t(y_t | x, y_<t)): ``distill_text``.
Tokenizers are never bridged: each model reads the same *text* with its own tokenizer, so a source and a target
with unrelated vocabularies transfer as well as two that share one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from adapterkit.core.errors import AdapterKitError
from adapterkit.core.spec import AdapterSpec
from adapterkit.inject.engine import attach, detach, set_active, train_only
from adapterkit.train.gen_classify import Task
from adapterkit.train.transfer.labels import check_words, distribution, fit, mean_kl
from adapterkit.train.transfer.synth import SynthConfig, Synthetic, synthesize

__all__ = ["DISC_PROMPT", "FILTERS", "Synthetic", "SynthConfig", "TransferConfig", "Transferred", "discriminate",
           "distill_text", "keep_real", "transfer"]
DISC_PROMPT = "Is this text a real example or a synthetic one? Answer with one word.\n\n{text}"
FILTERS = ("discriminator", "none")
DISC = "trans_lora_disc"  # the discriminator's adapter name on the source model (detached after filtering)


@dataclass(frozen=True)
class TransferConfig:
    """Sizes and schedules of one transfer (the synthetic requests' own settings are in ``synth``)."""

    synthetic: int = 200  # prompts the target writes (the pool the filter chooses from)
    keep: int = 100  # prompts kept for distillation, at most
    filter: str = "discriminator"  # or "none": the first ``keep`` prompts, unfiltered
    threshold: float = 0.5  # P(real) a prompt needs to pass the filter
    disc_synthetic: int = 64  # prompts the source base writes as the discriminator's "synthetic" examples
    disc_words: tuple[str, str] = ("synthetic", "real")
    disc_epochs: int = 2
    disc_lr: float = 5e-4
    epochs: int = 3  # distillation
    lr: float = 5e-4
    batch_size: int = 8
    seed: int = 0
    synth: SynthConfig = field(default_factory=SynthConfig)

    def __post_init__(self) -> None:
        if self.filter not in FILTERS:
            raise AdapterKitError(f"--filter must be one of {', '.join(FILTERS)}, got {self.filter!r}")
        for name in ("synthetic", "keep", "disc_synthetic", "disc_epochs", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise AdapterKitError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.threshold < 1:
            raise AdapterKitError(f"--threshold must be in [0, 1), got {self.threshold}")


@dataclass
class Transferred:
    """What a transfer produced: the kept prompts with their scores and the teacher's labels, and its record."""

    pool: list[str]  # the target's synthetic prompts, in the order written
    p_real: list[float] | None  # the discriminator's P(real) of each pool prompt (None without the filter)
    kept: list[str]
    teacher: torch.Tensor  # (kept, labels) the teacher's label-word distributions
    record: dict[str, Any]


def discriminate(source: nn.Module, tokenizer: Any, real: list[str], synthetic: list[str], pool: list[str],
                 spec: AdapterSpec, targets: Any, config: TransferConfig) -> list[float]:
    """Train a discriminator LoRA on ``source`` (real -> "real", synthetic -> "synthetic", the smaller side repeated
    to balance them) and return P(real) of each ``pool`` text; the LoRA is detached again before returning."""
    if not real or not synthetic:
        raise AdapterKitError("the discriminator needs real and synthetic examples (got "
                              f"{len(real)} real, {len(synthetic)} synthetic)")
    task = Task(DISC_PROMPT, list(config.disc_words))
    check_words(tokenizer, task, "--source (discriminator words)")
    size = max(len(real), len(synthetic))
    texts = [real[i % len(real)] for i in range(size)] + [synthetic[i % len(synthetic)] for i in range(size)]
    labels = torch.tensor([1] * size + [0] * size)
    with torch.random.fork_rng(devices=[]):  # the LoRA's init from the seed; the caller's stream untouched
        torch.manual_seed(config.seed)
        attach(source, DISC, spec, targets)
    try:
        train_only(source, DISC)
        set_active(source, [DISC])
        fit(source, tokenizer, task, texts, torch.nn.functional.one_hot(labels, 2).float(), config.disc_epochs,
            config.disc_lr, config.batch_size, config.seed, desc="discriminator")
        scores = distribution(source, tokenizer, task, pool, 2 * config.batch_size)[:, 1]
    finally:
        detach(source, DISC)
    return [float(s) for s in scores]


def keep_real(texts: list[str], p_real: list[float], threshold: float, keep: int) -> list[str]:
    """The texts with P(real) >= ``threshold``, most real-like first (ties in written order), at most ``keep``."""
    order = sorted(range(len(texts)), key=lambda i: (-p_real[i], i))
    return [texts[i] for i in order if p_real[i] >= threshold][:keep]


def transfer(source: nn.Module, source_tokenizer: Any, teacher: str, target: nn.Module, target_tokenizer: Any,
             task: Task, seeds: list[str], spec: AdapterSpec, source_targets: Any, target_targets: Any,
             config: TransferConfig, real: list[str] | None = None, name: str = "transferred",
             made: Synthetic | None = None) -> Transferred:
    """Trans-LoRA for generative classification: the source model with its LoRA ``teacher`` attached teaches a
    fresh ``spec`` LoRA called ``name`` on ``target`` (attached and trained in place) through synthetic prompts
    the target writes from ``seeds``. ``real``: more real unlabeled task text for the discriminator's "real"
    side. ``made``: a pool the target already wrote (``synthesize`` with these seeds and ``config.synth``), so a
    filter and its ablation can choose from the same prompts. The teacher's labels and the student's KL to them
    before and after are in the record."""
    check_words(source_tokenizer, task, "--source")
    check_words(target_tokenizer, task, "--target")
    times: dict[str, float] = {}
    started = time.perf_counter()
    if made is None:
        made = synthesize(target, target_tokenizer, seeds, config.synthetic, config.synth, config.seed, "--target")
        times["synthesize"] = time.perf_counter() - started
    if not made.texts:
        raise AdapterKitError(f"--target wrote no usable prompt in {made.generated} tries ({made.dropped}); loosen "
                              "the length limits or give more seeds")
    record: dict[str, Any] = {"seeds": len(seeds), "real_unlabeled": len(real or []), "generated": made.generated,
                              "pool": len(made.texts), "dropped": made.dropped, "filter": config.filter}
    p_real: list[float] | None = None
    if config.filter == "discriminator":
        started = time.perf_counter()
        set_active(source, [])  # the source *base* writes the discriminator's negatives, as the paper's M_s does
        negatives = synthesize(source, source_tokenizer, seeds, config.disc_synthetic, config.synth,
                               config.seed + 1, "--source")
        p_real = discriminate(source, source_tokenizer, list(seeds) + list(real or []), negatives.texts,
                              made.texts, spec, source_targets, config)
        kept = keep_real(made.texts, p_real, config.threshold, config.keep)
        times["discriminator"] = time.perf_counter() - started
        record["disc_negatives"] = len(negatives.texts)
        if not kept:
            raise AdapterKitError(f"the discriminator rated none of {len(made.texts)} synthetic prompts real "
                                  f"(highest P(real) {max(p_real):.3f} < --threshold {config.threshold}); lower "
                                  "--threshold or give more real text")
    else:
        kept = made.texts[:config.keep]
    record["kept"] = len(kept)
    started = time.perf_counter()
    set_active(source, [teacher])
    labels = distribution(source, source_tokenizer, task, kept, 2 * config.batch_size)
    times["teacher"] = time.perf_counter() - started
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        attach(target, name, spec, target_targets)
    train_only(target, name)
    record["kl_before"] = mean_kl(target, target_tokenizer, task, kept, labels, 2 * config.batch_size)
    losses = fit(target, target_tokenizer, task, kept, labels, config.epochs, config.lr, config.batch_size,
                 config.seed, desc="distill")
    record["kl_after"] = mean_kl(target, target_tokenizer, task, kept, labels, 2 * config.batch_size)
    times["distill"] = time.perf_counter() - started
    record.update({"losses": losses, "seconds": {k: round(v, 2) for k, v in times.items()},
                   "config": asdict(config)})
    return Transferred(made.texts, p_real, kept, labels, record)


def distill_text(source: nn.Module, source_tokenizer: Any, target: nn.Module, target_tokenizer: Any,
                 prompts: list[str], spec: AdapterSpec, targets: Any, sft: Any, max_new_tokens: int = 64,
                 name: str = "transferred") -> dict[str, Any]:
    """Free text: the source model (its LoRA active) answers each prompt greedily, and a fresh ``spec`` LoRA on
    ``target`` is fine-tuned on those answers (sequence-level KD; ``sft`` is an SFTConfig). Returns run_sft's
    result with the teacher's answers."""
    from adapterkit.train.sft import generate, run_sft
    from adapterkit.train.sft_data import Conversation, prompt_ids, render

    asked = [[{"role": "user", "content": p}] for p in prompts]
    answers = generate(source, source_tokenizer, [prompt_ids(source_tokenizer, m, "--source") for m in asked],
                       max_new_tokens)
    convs = [Conversation([*m, {"role": "assistant", "content": a}], f"synthetic prompt {i + 1}")
             for i, (m, a) in enumerate(zip(asked, answers)) if a.strip()]
    if not convs:
        raise AdapterKitError(f"the teacher answered none of {len(prompts)} prompts (all answers empty)")
    data = render(target_tokenizer, convs, sft.max_length, getattr(target, "config", None))
    attach(target, name, spec, targets)
    train_only(target, name)
    result = run_sft(target, target_tokenizer, data, data, sft)
    return {**result, "answers": answers}
