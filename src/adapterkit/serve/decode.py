"""Iteration-level decoding of a causal LM: a running batch that rows join and leave at every step.

The batch holds its rows' KV cache (one transformers ``DynamicCache``), left-padded: column t of the cache is the
same step for every row, and a row's attention mask is 0 over the columns before its prompt. One ``step``:

1. drops rows whose request gave up or whose adapter was unloaded (it fails them with UnknownAdapterError);
2. prefills the joining rows together (left-padded prompts, their own mask and position ids) and picks each one's
   first token, then merges their cache rows into the running cache (the shorter side padded on the left);
3. runs one decode step for every running row (its last token; position = its real tokens so far) and picks the
   next tokens, each row with its own sampling parameters and generator;
4. drops the finished rows' cache rows, and the columns no remaining row attends to.

Each forward runs under ``per_row`` for exactly the rows present (one adapter each through a Select plan rebuilt
per step), with the store's lock held. A padded column is masked out of every softmax, so each row computes what it
computes alone; greedy answers equal each request run alone (tested token for token).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from adapterkit.core.errors import AdapterKitError
from adapterkit.serve.rows import Row, pad_rows, per_row
from adapterkit.serve.sequence import Sequence, pick
from adapterkit.serve.store import AdapterStore, UnknownAdapterError


class CacheLayoutError(AdapterKitError):
    """A model whose KV cache is not one plain tensor pair per layer (sliding windows, say)."""


class Running:
    """The rows being generated, their KV cache and attention mask (B, L): what one decoder step advances."""

    def __init__(self) -> None:
        self.seqs: list[Sequence] = []
        self.cache: Any = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.seqs)

    def merge(self, seqs: list[Sequence], cache: Any, mask: torch.Tensor) -> None:
        """Add rows with their own cache and mask; both sides are left-padded to the longer one's length."""
        if not self.seqs:
            self.seqs, self.cache, self.mask = list(seqs), cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(_layers(self.cache), _layers(cache), strict=True):
            mine.keys = torch.cat([_left(mine.keys, width), _left(theirs.keys, width)])  # (B, H, L, D)
            mine.values = torch.cat([_left(mine.values, width), _left(theirs.values, width)])
        self.mask = torch.cat([_left(self.mask, width), _left(mask, width)])
        self.seqs += seqs

    def keep(self, alive: list[bool]) -> None:
        """Keep the rows marked alive; drop the columns none of them attends to."""
        if all(alive):
            return
        rows = torch.tensor([b for b, keep in enumerate(alive) if keep], dtype=torch.long)
        self.seqs = [s for s, keep in zip(self.seqs, alive) if keep]
        if not self.seqs:
            self.cache, self.mask = None, torch.zeros((0, 0), dtype=torch.long)
            return
        mask = self.mask[rows]
        first = int(mask.any(0).long().argmax())  # the first column some row still attends to
        self.mask = mask[:, first:]
        for layer in _layers(self.cache):
            index = rows.to(layer.keys.device)
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]


class Decoder:
    """Runs steps of a ``Running`` batch of a causal LM whose adapters live in ``store``."""

    def __init__(self, model: Any, tokenizer: Any, store: AdapterStore) -> None:
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self.stop_ids = frozenset(_end_ids(model, tokenizer))
        self.device = next(model.parameters()).device
        forward = inspect.signature(model.forward).parameters
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}  # the prefill's last logits

    def start(self, rows: Iterable[Row]) -> list[Sequence]:
        """Generation states for ``rows`` (not yet in any batch)."""
        return [Sequence(row, self.tokenizer, self.stop_ids) for row in rows]

    @torch.no_grad()
    def step(self, batch: Running, joining: list[Sequence]) -> list[Sequence]:
        """Advance ``batch`` by one token per row, after ``joining`` rows were prefilled into it. Returns every
        row touched (joined, advanced or finished); finished rows have left the batch."""
        touched = [*batch.seqs, *joining]
        with self.store.lock:
            self._drop_unknown(touched)
            batch.keep([not s.done for s in batch.seqs])
            joining = [s for s in joining if not s.done]
            names = [s.row.adapter for s in [*batch.seqs, *joining]]
            self.store.ensure_resident(dict.fromkeys(n for n in names if n is not None))  # all, before any evicts
            if joining:
                self._prefill(batch, joining)
                batch.keep([not s.done for s in batch.seqs])
            if batch.seqs:
                self._decode(batch)
                batch.keep([not s.done for s in batch.seqs])
        return touched

    def run_to_end(self, rows: Iterable[Row]) -> list[Sequence]:
        """Generate ``rows`` as one batch that nobody joins (request-level batching; a reference run alone)."""
        seqs, batch = self.start(rows), Running()
        self.step(batch, seqs)
        while batch.seqs:
            self.step(batch, [])
        return seqs

    def _drop_unknown(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            name = seq.row.adapter
            if not seq.done and name is not None and name not in self.store.entries:
                seq.fail(UnknownAdapterError(f"adapter {name!r} was unloaded before this request finished"))

    def _prefill(self, batch: Running, joining: list[Sequence]) -> None:
        from transformers import DynamicCache

        ids, mask = pad_rows([s.row for s in joining], self.pad_id, left=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each prompt counts from 0 at its first real token
        with per_row(self.store, [s.row.adapter for s in joining]):
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                             position_ids=positions.to(self.device), past_key_values=DynamicCache(), use_cache=True,
                             **self._last_only)
        _layers(out.past_key_values)  # refuse a cache layout that rows cannot be merged into, before using it
        for seq, token in zip(joining, pick(out.logits[:, -1], joining)):
            seq.add(token)
        batch.merge(joining, out.past_key_values, mask)

    def _decode(self, batch: Running) -> None:
        last = torch.tensor([[s.tokens[-1]] for s in batch.seqs])  # (B, 1): every running row has a token
        positions = batch.mask.sum(-1, keepdim=True)  # (B, 1): the row's real tokens so far
        mask = torch.cat([batch.mask, torch.ones((len(batch), 1), dtype=torch.long)], -1)
        with per_row(self.store, [s.row.adapter for s in batch.seqs]):
            out = self.model(input_ids=last.to(self.device), attention_mask=mask.to(self.device),
                             position_ids=positions.to(self.device), past_key_values=batch.cache, use_cache=True)
        batch.cache, batch.mask = out.past_key_values, mask
        for seq, token in zip(batch.seqs, pick(out.logits[:, -1], batch.seqs)):
            seq.add(token)


def _layers(cache: Any) -> list[Any]:
    from transformers.cache_utils import DynamicLayer

    layers = list(getattr(cache, "layers", None) or [])
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers}) or [type(cache).__name__]
        raise CacheLayoutError(f"continuous batching needs a plain dynamic KV cache per layer, this model has "
                               f"{', '.join(kinds)}; serve it with --batching request")
    return layers


def _left(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` left-padded with zeros along its sequence axis (last for a mask (B, L), third for keys (B, H, L, D))."""
    missing = width - (t.shape[-1] if t.dim() == 2 else t.shape[-2])
    if missing == 0:
        return t
    return F.pad(t, (missing, 0) if t.dim() == 2 else (0, 0, missing, 0))


def _end_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end a generation: the tokenizer's end-of-text and the generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list) else {configured} if configured is not None else set()
    return ids
