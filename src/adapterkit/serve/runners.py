"""What one batch does on the model: greedy completions or classification, one adapter per row.

A batch runs the model once under a Select plan (one adapter per row, None for the base model), with the store's
lock held so no adapter is detached under it. Modules an adapter saved beside its weights (a classification head,
say) are applied per row too: while the batch runs, a forward hook on each such module recomputes the rows of
every adapter that saved it with that adapter's own parameters (``torch.func.functional_call``), so a batch can
mix adapters with different heads. Heads of different widths (2 labels here, 5 there) are padded with -inf:
softmax over a padded row equals softmax over the row's own labels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from adapterkit.core.context import SelectPlan, Setup, scoped
from adapterkit.core.tree import hosts
from adapterkit.serve.store import AdapterStore, UnknownAdapterError


@dataclass(frozen=True)
class Row:
    """One request row: the adapter (None: the base model), the prompt's token ids, and new tokens wanted."""

    adapter: str | None
    ids: tuple[int, ...]
    max_tokens: int = 0


def with_known_adapters(store: AdapterStore, rows: Sequence[Row],
                        run: Callable[[Sequence[Row]], list[Any]]) -> list[Any]:
    """``run`` on the rows whose adapter is still loaded; the others (unloaded while they queued) get the
    UnknownAdapterError as their result, so one unload never fails a whole batch."""
    with store.lock:
        errors: dict[int, Exception] = {}
        for b, row in enumerate(rows):
            if row.adapter is not None and row.adapter not in store.entries:
                errors[b] = UnknownAdapterError(f"adapter {row.adapter!r} was unloaded before this request ran")
        kept = [row for b, row in enumerate(rows) if b not in errors]
        done = iter(run(kept) if kept else [])
        return [errors[b] if b in errors else next(done) for b in range(len(rows))]


@contextlib.contextmanager
def per_row(store: AdapterStore, names: Sequence[str | None]) -> Iterator[None]:
    """Inside the block the model runs ``names[b]`` on row b: adapters through Select, saved modules by hook.

    The caller holds ``store.lock``; the adapters are made resident here.
    """
    store.ensure_resident(n for n in names if n is not None)
    groups: dict[str, list[tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {}
    for name in dict.fromkeys(n for n in names if n is not None):
        rows = torch.tensor([b for b, n in enumerate(names) if n == name])
        for path, params in store.get(name).modules.items():
            groups.setdefault(path, []).append((rows, params))
    handles = [store.module(path).register_forward_hook(_row_hook(path, found)) for path, found in groups.items()]
    try:
        with scoped([host for _, _, host in hosts(store.model)], Setup(select=SelectPlan(tuple(names)))):
            yield
    finally:
        for handle in handles:
            handle.remove()


def _row_hook(path: str, groups: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> Any:
    inside = [False]  # functional_call calls the module again, hooks included: that inner call passes through

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if inside[0]:
            return None
        if not args or not isinstance(output, torch.Tensor):
            raise RuntimeError(f"saved module {path} must take one tensor and return one to be served per row")
        x = args[0]
        pieces = []
        inside[0] = True
        try:
            for rows, params in groups:
                rows = rows.to(x.device)
                pieces.append((rows, functional_call(module, params, (x[rows],))))
        finally:
            inside[0] = False
        width = max([output.shape[-1], *(p.shape[-1] for _, p in pieces)])
        result = _pad(output, width)
        for rows, piece in pieces:
            result = result.index_copy(0, rows, _pad(piece.to(result.dtype), width))
        return result
    return hook


def pad_rows(rows: Sequence[Row], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of the rows' prompts, padded to the longest. Left padding (for generation)
    puts every row's last prompt token in the last column; generate derives positions from the mask, so a padded
    row computes what it computes alone."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(width - len(row.ids), width) if left else slice(0, len(row.ids))
        ids[b, span] = torch.tensor(row.ids)
        mask[b, span] = 1
    return ids, mask


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    # -inf: these columns are logits of labels the row's head does not have (softmax gives them 0)
    return t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]), value=float("-inf"))


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
    """Greedy decoding for a batch of prompts: left-padded, one adapter per row, one ``generate`` call."""

    kind = "completions"

    def __init__(self, model: Any, tokenizer: Any, store: AdapterStore) -> None:
        self.model, self.tokenizer, self.store = model, tokenizer, store  # model: a transformers causal LM
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self.eos_id = tokenizer.eos_token_id
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def _run(self, rows: Sequence[Row]) -> list[dict[str, Any]]:
        """One result per row: text, finish_reason ("stop" at end-of-text, else "length"), token counts."""
        ids, mask = pad_rows(rows, self.pad_id, left=True)
        width = ids.shape[1]
        with self.store.lock, per_row(self.store, [r.adapter for r in rows]):
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=max(r.max_tokens for r in rows), do_sample=False, num_beams=1,
                                      pad_token_id=self.pad_id, eos_token_id=self.eos_id)
        results = []
        for b, row in enumerate(rows):
            new = out[b, width:width + row.max_tokens].tolist()
            finish = "length"
            if self.eos_id is not None and self.eos_id in new:
                new, finish = new[:new.index(self.eos_id)], "stop"
            results.append({"text": self.tokenizer.decode(new, skip_special_tokens=True), "finish_reason": finish,
                            "prompt_tokens": len(row.ids), "completion_tokens": len(new), "token_ids": new})
        return results


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
