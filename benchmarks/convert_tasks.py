"""Converting adapters to LoRA on real data: ``ak.to_lora`` of a trained DoRA, IA3 and LT-SFT on SST-2.

Each source adapter is trained with its own fresh head under the shared protocol of ``tasks.py`` (all-MiniLM-L6-v2,
1,000 training rows, 2 epochs, batch 16, lr 2e-3, max length 64):

* DoRA r=8 (alpha 16) on query/value (``tasks.train_once``);
* IA3 as in the paper / peft: output scaling of key and value, input scaling of the FFN down-projection
  (``layer.N.output.dense``) -- one adapter, two specs (``attach_at(..., specs=...)``), trained with the head by
  ``run_training``;
* LT-SFT K = 73,728 on every Linear (``sparse_methods.train_lt_sft``: phase 1 one epoch at lr 5e-5, phase 2 as the
  protocol).

Each is then converted with ``ak.to_lora(model, name, rank)`` at ranks 4, 8, 16, 32; a source whose delta also
changes a bias (IA3 output scaling on biased layers, an LT-SFT diff holding bias entries) is converted with
``bias="drop"`` (the dropped bias change counts in that module's error). Reported per rank: the mean and max of the
per-module relative Frobenius error, and the SST-2 dev accuracy of the converted LoRA run alone
(``with ak.use(model, new_name):``) with the source's head, next to the source's own accuracy.

    cd benchmarks && HF_HUB_OFFLINE=1 ADAPTERKIT_NO_PROGRESS=1 PYTHONPATH=../src ../.venv/bin/python \
        convert_tasks.py --json results/convert_tasks.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adapterkit as ak
from _common import minilm_dir
from adapterkit.arith.convert import ConvertError
from adapterkit.cli.commands import load_classifier
from adapterkit.inject.engine import attach_at
from adapterkit.train.loop import TrainConfig, accuracy, encode, run_training, seed_everything
from combine_tasks import PROTOCOL
from sparse_methods import train_lt_sft
from tasks import load_task, subset, train_once

RANKS = (4, 8, 16, 32)
METHODS = ("dora", "ia3", "lt_sft")


def train_ia3(task: Any, name: str, seed: int) -> dict[str, Any]:
    """IA3 (peft's layout): key/value outputs scaled, FFN down-projection inputs scaled; trained with the head."""
    seed_everything(seed)
    model, tokenizer = load_classifier(minilm_dir(), task.num_labels)
    paths = [p for p, _ in model.named_modules() if re.search(r"attention\.self\.(key|value)$", p)]
    ffn = [p for p, _ in model.named_modules() if re.search(r"layer\.\d+\.output\.dense$", p)]
    attach_at(model, name, ak.IA3(), paths + ffn, specs={p: ak.IA3(position="input") for p in ffn})
    ak.train_only(model, name, also=["classifier"])
    config = TrainConfig(epochs=PROTOCOL.epochs, lr=PROTOCOL.lr, batch_size=PROTOCOL.batch_size,
                         max_length=PROTOCOL.max_length, seed=seed)
    start = time.perf_counter()
    history, seconds = run_training(model, tokenizer, subset(task.train, PROTOCOL.train_rows, seed), task.dev, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"dev_accuracy": history["dev_accuracy"][-1], "trainable_parameters": trainable,
            "train_seconds": round(seconds, 1), "wall_seconds": round(time.perf_counter() - start, 1),
            "model": model, "targets": {"output": paths, "input": ffn}}


def train_source(method: str, task: Any, seed: int) -> dict[str, Any]:
    if method == "dora":
        return train_once(task, method, ak.DoRA(r=8, alpha=16), ["query", "value"], seed, PROTOCOL)
    if method == "ia3":
        return train_ia3(task, method, seed)
    run = train_lt_sft(task, method, seed, PROTOCOL, phase1_epochs=1)
    run.pop("tokenizer")
    return run


def convert(model: nn.Module, name: str, dev: Any, pad: int) -> dict[str, Any]:
    """Source accuracy, then per rank: to_lora errors (mean / max over modules) and the converted LoRA's accuracy."""
    with ak.use(model, name):
        out: dict[str, Any] = {"source_dev_accuracy": accuracy(model, dev, PROTOCOL.batch_size, pad), "ranks": {}}
    bias = "refuse"
    for rank in RANKS:
        new = f"{name}_lora{rank}"
        tick = time.perf_counter()
        try:
            errors = ak.to_lora(model, name, rank, new_name=new, bias=bias)
        except ConvertError as exc:
            if "bias" not in str(exc) or bias == "drop":
                raise
            print(f"  {name}: refused with bias='refuse' ({exc}); using bias='drop'", flush=True)
            bias = "drop"
            errors = ak.to_lora(model, name, rank, new_name=new, bias=bias)
        convert_s = time.perf_counter() - tick
        with ak.use(model, new):
            acc = accuracy(model, dev, PROTOCOL.batch_size, pad)
        values = list(errors.values())
        worst = max(errors, key=errors.get)
        out["ranks"][str(rank)] = {"error_mean": sum(values) / len(values), "error_max": max(values),
                                   "error_max_module": worst, "dev_accuracy": acc, "modules": len(values),
                                   "convert_seconds": round(convert_s, 2), "errors": errors}
        ak.detach(model, new)
        print(f"  {name} rank {rank}: error mean {out['ranks'][str(rank)]['error_mean']:.4f} max {max(values):.4f} "
              f"({worst}); dev {acc:.2f} ({convert_s:.1f} s convert)", flush=True)
    out["bias"] = bias
    return out


def print_table(runs: dict[str, Any]) -> None:
    print("\n| source | source acc | " + " | ".join(f"r={r} err mean / max | r={r} acc" for r in RANKS)
          + " |\n|---|---|" + "---|---|" * len(RANKS))
    for method, run in runs.items():
        cells = [f"{run['source_dev_accuracy']:.2f}"]
        for r in RANKS:
            x = run["ranks"][str(r)]
            cells += [f"{x['error_mean']:.3f} / {x['error_max']:.3f}", f"{x['dev_accuracy']:.2f}"]
        print(f"| {method} (bias={run['bias']}) | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("results/convert_tasks.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    task = load_task("sst2")
    results: dict[str, Any] = {"protocol": vars(PROTOCOL),
                               "task": "sst2", "seed": args.seed, "ranks": list(RANKS),
                               "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                           "threads": torch.get_num_threads()},
                               "date": datetime.now(UTC).isoformat(timespec="seconds"), "runs": {}}
    if args.json.is_file():  # resume: keep finished methods
        old = json.loads(args.json.read_text())
        results["runs"] = {k: v for k, v in old.get("runs", {}).items() if k in args.methods}
    for method in args.methods:
        if method in results["runs"]:
            continue
        start = time.perf_counter()
        run = train_source(method, task, args.seed)
        model = run.pop("model")
        model.eval()
        _, tokenizer = load_classifier(minilm_dir(), task.num_labels)  # the tokenizer (train_once keeps its own)
        tokenizer_pad = tokenizer.pad_token_id or 0
        dev = encode(tokenizer, task.dev, PROTOCOL.max_length)
        print(f"{method}: trained, dev {run['dev_accuracy']:.2f} ({run.get('wall_seconds', run.get('train_seconds'))}"
              " s)", flush=True)
        out = convert(model, method, dev, tokenizer_pad)
        out["training"] = run
        out["wall_seconds"] = round(time.perf_counter() - start, 1)
        results["runs"][method] = out
        args.json.parent.mkdir(exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        del model
    print_table(results["runs"])


if __name__ == "__main__":
    main()
