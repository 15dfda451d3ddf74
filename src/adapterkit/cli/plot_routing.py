"""``adapterkit plot-routing``: load a model with its adapters and combiners, draw what its block routes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from adapterkit.core.errors import AdapterKitError
from adapterkit.inject.use import use
from adapterkit.train.poly_tools import task_routing
from adapterkit.train.routing_plot import plot_routing, plot_task_routing


def plot_model_routing(model: Any, block: Any, path: str | Path, tokenizer: Any = None, text: str | None = None,
                       task_id: int = 0, tasks: Sequence[str] | None = None) -> list[Path]:
    """Everything ``block`` routes: TaskRoute routers from their weights, others from one forward on ``text``.

    The token-level plot goes to ``path``; TaskRoute plots go there too when they are all there is, else to
    ``<stem>-<router>.png`` beside it. Returns the files written.
    """
    out = Path(path)
    learned = block.combiners()
    by_task = [name for b, name in learned if b.kind == "task_route"]
    others = [name for b, name in learned if b.kind != "task_route"]
    if not learned:
        raise AdapterKitError("plot-routing: the block has no learned block (Route, Gate, TaskRoute, ...) to plot")
    written: list[Path] = []
    if others:
        if tokenizer is None or text is None:
            raise AdapterKitError("plot-routing: token-level routers need a tokenizer and a text to run")
        encoded = tokenizer(text, return_tensors="pt")
        with torch.no_grad(), use(model, block, task_ids=[task_id] if by_task else None) as routing:
            model(**encoded)
        labels = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
        written.append(plot_routing(routing, out, tokens=labels, combiners=others))
    for name in by_task:
        target = out if not others and len(by_task) == 1 else out.with_name(f"{out.stem}-{name}{out.suffix}")
        written.append(plot_task_routing(task_routing(model, name), target, tasks, name))
    return written
