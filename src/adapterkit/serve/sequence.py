"""One row being generated: its tokens, its text as the client sees it, and when it is done.

The text is the decoded list of all new tokens (decoding the whole list, not token by token, is what keeps a
multi-byte character split over two byte-level tokens whole). What may be sent so far is that text up to where it
is settled: never while it ends in U+FFFD (an incomplete character; the next token completes it), and never the
tail that could still be the start of a stop string (it may turn out to be one, and a stop string is never sent).
A stop string cuts the text before it, wherever the tokens split it; end-of-text ends the row without being part
of it.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch

from adapterkit.serve.rows import Row

INCOMPLETE = "\ufffd"  # what a tokenizer decodes a cut multi-byte character to


@dataclass(eq=False)
class Sequence:
    """A row's generation state; ``finish`` is None while it runs, then "stop", "length" or an exception."""

    row: Row
    tokenizer: Any = field(repr=False)
    stop_ids: frozenset[int] = frozenset()
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` handed out by ``take``
    finish: str | None = None
    error: Exception | None = None
    cancelled: bool = False  # the request gave up: drop the row at the next step
    generator: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        sampling = self.row.sampling
        if sampling.temperature > 0:  # a row's own stream: what it draws is the same whatever shares its batch
            self.generator = torch.Generator()
            if sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(sampling.seed % 2**64)

    @property
    def done(self) -> bool:
        """Whether the row has finished (or failed, or was cancelled)."""
        return self.finish is not None or self.error is not None or self.cancelled

    def add(self, token: int) -> None:
        """Take the next token: end-of-text, a stop string or the token budget may finish the row."""
        if token in self.stop_ids:
            self.finish = "stop"
            return
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = _first_stop(self.text, self.row.sampling.stop, self.sent)
        if cut is not None:
            self.text, self.finish = self.text[:cut], "stop"
        elif len(self.tokens) >= self.row.max_tokens:
            self.finish = "length"

    def fail(self, error: Exception) -> None:
        """End the row with ``error`` (its request gets the error)."""
        self.error = error

    def take(self) -> str:
        """The text settled since the last call ("" if none)."""
        end = len(self.text) if self.finish is not None else self._settled()
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def _settled(self) -> int:
        if self.text.endswith(INCOMPLETE):
            return self.sent
        return len(self.text) - _stop_prefix(self.text, self.row.sampling.stop)

    def result(self) -> dict[str, Any]:
        """The finished row as the endpoints answer it."""
        return {"text": self.text, "finish_reason": self.finish, "prompt_tokens": len(self.row.ids),
                "completion_tokens": len(self.tokens), "token_ids": list(self.tokens)}


def _first_stop(text: str, stops: Seq[str], sent: int) -> int | None:
    """Where the earliest stop string begins in ``text`` (None: nowhere). Text already sent held none."""
    found = [i for i in (text.find(s, max(0, sent - len(s) + 1)) for s in stops) if i >= 0]
    return min(found) if found else None


def _stop_prefix(text: str, stops: Seq[str]) -> int:
    """The length of the longest end of ``text`` that begins some stop string (it must wait)."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def pick(logits: torch.Tensor, rows: Seq[Sequence]) -> list[int]:
    """The next token of each row from its last logits (B, V): argmax for greedy rows, else a draw from the row's
    temperature-scaled softmax within its top_p nucleus, with the row's own generator."""
    chosen = logits.argmax(-1).tolist()
    for b, seq in enumerate(rows):
        sampling = seq.row.sampling
        if sampling.temperature <= 0:
            continue
        probs = torch.softmax(logits[b].float().cpu() / sampling.temperature, -1)  # (V,)
        if sampling.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            before = ordered.cumsum(-1) - ordered  # mass of the tokens ranked above each one
            ordered = ordered.masked_fill(before >= sampling.top_p, 0.0)  # the first token always stays
            probs = torch.zeros_like(probs).scatter_(0, order, ordered)
        chosen[b] = int(torch.multinomial(probs, 1, generator=seq.generator))
    return chosen
