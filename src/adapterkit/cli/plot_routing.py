"""``adapterkit plot-routing``: load a model with its adapters and combiners, draw what its block routes."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import adapterkit as ak
from adapterkit.cli.common import default_model_dir
from adapterkit.core.errors import AdapterKitError
from adapterkit.core.tree import hosts
from adapterkit.inject.use import use
from adapterkit.train.poly_tools import task_routing
from adapterkit.train.routing_plot import plot_routing, plot_task_routing


def _role(model: Any, name: str) -> str:
    """What the combiner attached as ``name`` learns (its spec's role); "" when no combiner has that name."""
    found = [host.adapter(name) for _, _, host in hosts(model) if name in host.names()]
    return str(getattr(found[0].spec, "role", "")) if found else ""


def plot_model_routing(model: Any, block: Any, path: str | Path, tokenizer: Any = None, text: str | None = None,
                       task_id: int = 0, tasks: Sequence[str] | None = None) -> list[Path]:
    """Everything ``block`` routes: task routers (Poly / MHR) from their weights, others from one forward on ``text``.

    The token-level plot goes to ``path``; task-routing plots go there too when they are all there is, else to
    ``<stem>-<router>.png`` beside it. Returns the files written.
    """
    out = Path(path)
    learned = block.combiners()
    by_task = [name for _, name in learned if _role(model, name) == "task_route"]
    others = [name for _, name in learned if _role(model, name) != "task_route"]
    if not learned:
        raise AdapterKitError("plot-routing: the block has no learned block (Mix) to plot")
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


def _routing_model(model_dir: str, adapters: list[str]) -> Any:
    """The base model the adapters were saved on: the bare encoder, or a classifier when they target one."""
    from transformers import AutoModel, AutoModelForSequenceClassification
    from transformers.utils import logging

    if not Path(model_dir, "config.json").is_file():
        raise AdapterKitError(f"--model {model_dir}: not a Hugging Face model folder (no config.json)")
    logging.set_verbosity_error()
    model = AutoModel.from_pretrained(model_dir)
    record, tensors = ak.read(adapters[0])
    if record["targets"][0] in dict(model.named_modules()):
        return model
    heads = [t for k, t in tensors.items() if k.startswith("module.") and k.endswith(".weight")]
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=heads[0].shape[0] if heads else 2)


def cmd_plot_routing(args: argparse.Namespace) -> int:
    """Load the model, adapters and combiners, and write the heat maps of ``--block``'s routing."""
    text = args.block
    if text.endswith(".json"):
        try:
            text = Path(text).read_text()
        except OSError as exc:
            raise AdapterKitError(f"--block {args.block}: cannot read ({exc.strerror or exc})") from None
    try:
        block = ak.block_from_dict(json.loads(text), where="--block")
    except json.JSONDecodeError as exc:
        raise AdapterKitError(f"--block: not valid JSON ({exc})") from None
    model_dir = args.model or default_model_dir()
    model = _routing_model(model_dir, args.adapter).eval()
    for folder in args.adapter:
        ak.load(model, folder)
    tokenizer = None
    if any(_role(model, name) != "task_route" for _, name in block.combiners()):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    written = plot_model_routing(model, block, args.out, tokenizer, args.text, args.task_id, tasks)
    print("routing heat map written to " + ", ".join(str(p) for p in written))
    return 0
