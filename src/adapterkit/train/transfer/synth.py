"""Synthetic task prompts written by a model from a few seed examples (Trans-LoRA's data-free step).

Each request shows the model ``shown`` seed examples (a seeded draw, in a seeded order) as a bulleted list in one
user turn and asks for one more; the answer is sampled (temperature, nucleus), its first non-empty line that is not a
preamble kept, bullets and quotes stripped. An answer is dropped when it is shorter than ``min_words`` or longer than
``max_words`` words, repeats a seed, or repeats an earlier answer (compared case- and whitespace-insensitively).
Requests are batched (left-padded) and drawn in rounds until ``count`` prompts are kept or ``max_rounds`` rounds
are spent; the torch sampler is seeded per round, so the same seed gives the same prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapterkit.core.errors import AdapterKitError
from adapterkit.train.sft import generate
from adapterkit.train.sft_data import prompt_ids

BULLETS = "-*•>\"'`“”‘’ \t"


@dataclass(frozen=True)
class SynthConfig:
    """How synthetic prompts are asked for and which answers are kept."""

    describe: str = "Here are some examples of texts:"  # the line before the seed list
    shown: int = 3  # seed examples per request
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 48
    min_words: int = 3
    max_words: int = 60
    batch_size: int = 8  # requests per generate call
    max_rounds: int = 0  # 0: 4x the rounds ``count`` would need if every answer were kept

    def __post_init__(self) -> None:
        for name in ("shown", "max_new_tokens", "min_words", "batch_size"):
            if getattr(self, name) < 1:
                raise AdapterKitError(f"synthetic prompts: {name} must be at least 1, got {getattr(self, name)}")
        if self.max_words < self.min_words:
            raise AdapterKitError(f"synthetic prompts: max_words {self.max_words} is below min_words "
                                  f"{self.min_words}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise AdapterKitError(f"synthetic prompts: temperature must be > 0 and top_p in (0, 1], got "
                                  f"{self.temperature}, {self.top_p}")


@dataclass
class Synthetic:
    """The kept prompts and what was dropped, by reason."""

    texts: list[str]
    generated: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"short": 0, "long": 0, "duplicate": 0})


def request(seeds: list[str], config: SynthConfig, rng: random.Random) -> list[dict[str, str]]:
    """One few-shot request: ``config.shown`` seeds (drawn by ``rng``) as a list, and the ask for one more."""
    chosen = rng.sample(seeds, min(config.shown, len(seeds)))
    listing = "\n".join(f"- {text}" for text in chosen)
    return [{"role": "user", "content": f"{config.describe}\n\n{listing}\n\nWrite one new example in the same "
                                        "style and on the same topic. Reply with the example only."}]


def clean(answer: str) -> str:
    """The answer's first non-empty line that is not a preamble (a line ending in ':', as in "Here is a new
    example:"), bullets and quotes stripped, whitespace collapsed."""
    for line in answer.splitlines():
        text = " ".join(line.strip(BULLETS).split())
        if text and not text.endswith(":"):
            return text
    return ""


def _key(text: str) -> str:
    return " ".join(text.casefold().split())


def sample(model: nn.Module, tokenizer: Any, prompts: list[list[int]], config: SynthConfig) -> list[str]:
    """Sampled continuations of token prompts (left-padded into one batch), decoded without special tokens."""
    return generate(model, tokenizer, prompts, config.max_new_tokens, config.temperature, config.top_p)


def synthesize(model: nn.Module, tokenizer: Any, seeds: list[str], count: int, config: SynthConfig,
               seed: int = 0, where: str = "--target") -> Synthetic:
    """Up to ``count`` distinct synthetic prompts written by ``model`` from ``seeds`` (see the module docstring)."""
    if not seeds:
        raise AdapterKitError("synthetic prompts need at least one seed example")
    if count < 1:
        raise AdapterKitError(f"synthetic prompts: count must be at least 1, got {count}")
    if not getattr(tokenizer, "chat_template", None):
        raise AdapterKitError(f"{where}: the tokenizer has no chat template; synthetic prompts are asked for in a "
                              "chat turn (use an instruct model)")
    rng = random.Random(seed)
    seen = {_key(s) for s in seeds}
    result = Synthetic([])
    rounds = config.max_rounds or 4 * -(-count // config.batch_size)
    for round_ in range(rounds):
        if len(result.texts) >= count:
            break
        prompts = [prompt_ids(tokenizer, request(seeds, config, rng), where) for _ in range(config.batch_size)]
        with torch.random.fork_rng(devices=[]):  # the sampler's own stream: the same seed, the same prompts
            torch.manual_seed(seed * 100_003 + round_)
            answers = sample(model, tokenizer, prompts, config)
        for answer in answers:
            result.generated += 1
            text = clean(answer)
            words = len(text.split())
            reason = ("short" if words < config.min_words else "long" if words > config.max_words
                      else "duplicate" if _key(text) in seen else "")
            if reason:
                result.dropped[reason] += 1
                continue
            seen.add(_key(text))
            if len(result.texts) < count:
                result.texts.append(text)
    return result
