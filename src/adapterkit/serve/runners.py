"""What one batch does on the model: completions or classification, one adapter per row.

A batch runs under a Select plan (one adapter per row, None for the base model; serve/rows.py ``per_row``), with
the store's lock held so no adapter is detached under it. CompletionRunner generates a batch that nobody joins
(request-level batching, and the reference "this request alone"): the decoder of serve/decode.py run to its
longest row. The server's default path for causal LMs is the continuous scheduler (serve/scheduler.py) over the
same decoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from adapterkit.serve.decode import Decoder
from adapterkit.serve.rows import GREEDY, Row, Sampling, pad_rows, per_row, with_known_adapters
from adapterkit.serve.store import AdapterStore

__all__ = ["GREEDY", "ClassifyRunner", "CompletionRunner", "Row", "Sampling", "pad_rows", "per_row",
           "with_known_adapters"]


class _Runner:
    """What both runners share: tokenising a request, and refusing unknown adapters before a batch runs."""

    tokenizer: Any
    store: AdapterStore

    def encode(self, text: str) -> tuple[int, ...]:
        """Token ids of a prompt or input text (with the tokenizer's special tokens)."""
        return tuple(self.tokenizer(text)["input_ids"])

    def __call__(self, rows: Sequence[Row]) -> list[Any]:
        """One result per row (see ``_run``)."""
        return with_known_adapters(self.store, rows, self._run)

    def _run(self, rows: Sequence[Row]) -> list[dict[str, Any]]:
        raise NotImplementedError


class CompletionRunner(_Runner):
    """Completions for a batch of prompts: prefilled together, decoded until the longest row is done."""

    kind = "completions"

    def __init__(self, model: Any, tokenizer: Any, store: AdapterStore) -> None:
        self.model, self.tokenizer, self.store = model, tokenizer, store  # model: a transformers causal LM
        self.decoder = Decoder(model, tokenizer, store)

    def chat_template(self) -> str | None:
        """The tokenizer's chat template (None: the model has none)."""
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) and template else None

    def _run(self, rows: Sequence[Row]) -> list[Any]:
        """One result per row: text, finish_reason ("stop" at end-of-text or a stop string, else "length"),
        token counts and ids; an exception for a row that failed alone (its adapter was unloaded)."""
        return [s.error if s.error is not None else s.result() for s in self.decoder.run_to_end(rows)]


class ClassifyRunner(_Runner):
    """Class probabilities for a batch of texts (right-padded), each row through its adapter and its own head."""

    kind = "classify"

    def __init__(self, model: nn.Module, tokenizer: Any, store: AdapterStore) -> None:
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device = next(model.parameters()).device
        id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
        self.base_labels = [str(id2label[i]) for i in sorted(id2label)]

    @torch.no_grad()
    def _run(self, rows: Sequence[Row]) -> list[dict[str, Any]]:
        """One result per row: {"label", "probabilities": {label: p}, "prompt_tokens"}."""
        ids, mask = pad_rows(rows, self.pad_id, left=False)
        with self.store.lock, per_row(self.store, [r.adapter for r in rows]):
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            labels = [self._labels(r.adapter) for r in rows]  # read under the lock: the entry may be unloaded next
        results = []
        for b, row in enumerate(rows):
            own = logits[b][torch.isfinite(logits[b])].float()  # drop the -inf padding of narrower heads
            probs = own.softmax(-1).tolist()
            own_labels = labels[b]
            names = own_labels if own_labels and len(own_labels) == len(probs) else [f"LABEL_{i}" for i in
                                                                                     range(len(probs))]
            best = max(range(len(probs)), key=probs.__getitem__)
            results.append({"label": names[best], "probabilities": dict(zip(names, probs)),
                            "prompt_tokens": len(row.ids)})
        return results

    def _labels(self, adapter: str | None) -> list[str] | None:
        if adapter is None:
            return self.base_labels or None
        return self.store.get(adapter).labels
