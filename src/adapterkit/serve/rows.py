"""Rows of a batch and running them with one adapter each: the pieces both batching paths share.

A row is one prompt (or classification input) of a request: its adapter (None: the base model), token ids, the new
tokens wanted and how to pick them. ``per_row`` runs the model with ``names[b]`` on row b: adapters through a
Select plan (scoped to the model's hosts), modules an adapter saved beside its weights (a classification head, say)
by a forward hook that recomputes the rows of every adapter that saved it with that adapter's own parameters
(``torch.func.functional_call``), so a batch can mix adapters with different heads. Heads of different widths
(2 labels here, 5 there) are padded with -inf: softmax over a padded row equals softmax over the row's own labels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from adapterkit.core.context import SelectPlan, Setup, scoped
from adapterkit.core.tree import hosts
from adapterkit.serve.store import AdapterStore, UnknownAdapterError


@dataclass(frozen=True)
class Sampling:
    """How a row picks its tokens: temperature 0 is greedy (argmax); otherwise softmax(logits / temperature)
    within the top_p nucleus, drawn from the row's own generator (seeded by ``seed``, else at random). Generation
    ends before the first of ``stop`` appears in the text."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


GREEDY = Sampling()


@dataclass(frozen=True)
class Row:
    """One request row: the adapter (None: the base model), the prompt's token ids, and new tokens wanted."""

    adapter: str | None
    ids: tuple[int, ...]
    max_tokens: int = 0
    sampling: Sampling = field(default=GREEDY)


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
