"""Generative classification: a labelled table as chat examples (the answer is the label's word), scored by rank.

Each row becomes a conversation: the user turn is ``prompt`` with the row's text in its ``{text}`` slot, the
assistant turn is the label's word. Accuracy is rank classification: every label's answer (its word and the turn's
end token, the tokens the model is trained on) is scored after the generation prompt, and the label with the highest
total log-probability wins; all labels of a batch of examples go through one forward. Greedy exact match (what the
model would actually answer) is reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapterkit.core.errors import AdapterKitError
from adapterkit.train.data import TextTable
from adapterkit.train.sft import collate, generate, token_logprobs
from adapterkit.train.sft_data import IGNORE, Conversation, Tokenized, assistant_spans, prompt_ids

DEFAULT_PROMPT = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\n{text}"
SST2_WORDS = {"0": "negative", "1": "positive"}


@dataclass(frozen=True)
class Task:
    """How a table's rows become conversations: the prompt (with a ``{text}`` slot) and one word per label."""

    prompt: str
    words: list[str]  # index = class id, as read_table numbers the labels

    def __post_init__(self) -> None:
        if "{text}" not in self.prompt:
            raise AdapterKitError(f"--prompt must hold a {{text}} slot for the example's text, got {self.prompt!r}")
        try:
            self.prompt.format(text="")
        except (KeyError, IndexError, ValueError) as exc:
            raise AdapterKitError(f"--prompt {self.prompt!r}: only {{text}} may appear in braces (write {{{{ and "
                                  f"}}}} for literal ones): {exc}") from None
        if len(set(self.words)) != len(self.words) or not all(w.strip() for w in self.words):
            raise AdapterKitError(f"--label-words must be distinct and non-empty, got {self.words}")

    def conversation(self, text: str, label: int | None, where: str) -> Conversation:
        messages = [{"role": "user", "content": self.prompt.format(text=text)}]
        if label is not None:
            messages.append({"role": "assistant", "content": self.words[label]})
        return Conversation(messages, where)


def label_words(labels: list[str], given: str | None) -> list[str]:
    """The answer word of each label: ``given`` (comma-separated, in label order), SST-2's 0/1 as negative /
    positive, otherwise the label names themselves."""
    if given:
        words = [w.strip() for w in given.split(",")]
        if len(words) != len(labels):
            raise AdapterKitError(f"--label-words names {len(words)} word(s) for {len(labels)} labels "
                                  f"({', '.join(labels)}); give one per label, in that order")
        return words
    if labels == ["0", "1"]:
        return [SST2_WORDS[label] for label in labels]
    return list(labels)


def conversations(task: Task, table: TextTable, where: str, lines: list[int] | None = None) -> list[Conversation]:
    """Every row of ``table`` as a training conversation; errors name ``where`` (the file) and the row's line
    (``lines``, as read_rows numbers them) or its row number."""
    if table.pairs is not None:
        raise AdapterKitError("generative classification takes single texts; --pair-column is not supported")
    spots = [f"{where}:{line}" for line in lines] if lines else [f"{where}: row {i + 1}" for i in
                                                                  range(len(table.texts))]
    return [task.conversation(text, label, spot) for text, label, spot in zip(table.texts, table.labels, spots)]


def _answers(tokenizer: Any, task: Task) -> list[list[int]]:
    """Each label's answer tokens after the generation prompt (the same for every text: checked on one)."""
    answers = []
    for label in range(len(task.words)):
        ids, spans = assistant_spans(tokenizer, task.conversation("x", label, "--label-words"))
        answers.append(ids[spans[0][0]:spans[0][1]])
    return answers


@torch.no_grad()
def rank_scores(model: nn.Module, tokenizer: Any, task: Task, texts: list[str], batch_size: int = 16
                ) -> torch.Tensor:
    """(examples, labels) total log-probability of each label's answer, one forward per ``batch_size`` examples."""
    was_training = model.training
    model.eval()
    answers = _answers(tokenizer, task)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = torch.empty(len(texts), len(answers))
    for start in range(0, len(texts), batch_size):
        prompts = [prompt_ids(tokenizer, task.conversation(t, None, "").messages, "--prompt")
                   for t in texts[start:start + batch_size]]
        rows = Tokenized([p + a for p in prompts for a in answers],
                         [[IGNORE] * len(p) + a for p in prompts for a in answers], [])
        logp, where = token_logprobs(model, collate(rows, list(range(len(rows))), pad))
        totals = torch.zeros(len(rows)).index_add_(0, where[:, 0], logp.float())
        scores[start:start + len(prompts)] = totals.view(len(prompts), len(answers))
    model.train(was_training)
    return scores


def evaluate(model: nn.Module, tokenizer: Any, task: Task, table: TextTable, batch_size: int = 16,
             exact_match: bool = True) -> dict[str, float]:
    """Rank-classification accuracy and greedy exact match, in percent, over a labelled table."""
    scores = rank_scores(model, tokenizer, task, table.texts, batch_size)
    gold = torch.tensor(table.labels)
    result = {"accuracy": 100.0 * float((scores.argmax(1) == gold).float().mean())}
    if exact_match:
        longest = max(len(a) for a in _answers(tokenizer, task)) + 2
        hits = 0
        for start in range(0, len(table.texts), batch_size):
            texts = table.texts[start:start + batch_size]
            prompts = [prompt_ids(tokenizer, task.conversation(t, None, "").messages, "--prompt") for t in texts]
            said = generate(model, tokenizer, prompts, longest)
            hits += sum(s.strip().lower() == task.words[y].strip().lower()
                        for s, y in zip(said, table.labels[start:start + batch_size]))
        result["exact_match"] = 100.0 * hits / max(len(table.texts), 1)
    return result
