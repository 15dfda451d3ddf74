"""Merging task adapters on real data: ``ak.combine`` of three task LoRAs on all-MiniLM-L6-v2 (issue "Adapter
arithmetic").

One LoRA (r=8, alpha=16, query/value) per task -- SST-2, SUBJ, TREC -- is trained with its own fresh head under the
shared protocol (``tasks.train_once``: 1,000 training rows, 2 epochs, batch 16, lr 2e-3, max length 64), its adapter
and head tensors kept. The three adapters are then loaded under their task names onto ONE copy of the base model,
and every merged adapter built from them with ``ak.combine`` is scored alone (``with ak.use(model, name):``) on each
task's full dev set, with that task's own trained head swapped in:

* ``cat`` 1/3 each: the exact average of the three deltas (rank 24); ``cat_sum`` 1 each: task arithmetic, lambda 1;
* ``linear`` 1/3 each: peft's factor-level mix (cross terms B_j A_k; not the delta average); ``svd``: the delta
  average truncated to rank 8;
* ``ties``, ``dare_ties``, ``ties_svd``, ``dare_ties_svd`` (rank 8): weights 1.0 each, density 0.5 -- TIES
  (Yadav et al. 2023) merges by the DISJOINT MEAN of the trimmed, sign-elected task vectors, scaled by lambda = 1
  (its default), and DARE + TIES (Yu et al. 2024) does the same after random drop-and-rescale;
* ``dare_linear``, ``magnitude_prune`` (and their ``_svd`` forms, rank 8): density 0.5, weights 1/3 each -- these
  SUM their weighted (pruned, rescaled) tensors, so 1/3 makes them an average, comparable with ``cat`` 1/3 (DARE's
  paper pairs drop-and-rescale with task arithmetic, i.e. a weighted sum).

The factor types (``linear``, ``ties``, ``dare_*``, ``magnitude_prune``) prune and mix the LoRA factors A and B
separately, as peft does; only the ``*_svd`` types apply TIES / DARE / pruning to the weight deltas, as the papers do.

Task negation (task arithmetic, Ilharco et al. 2023): ``cat`` with a negative weight: ``-trec`` alone, ``sst2 -
trec``, ``trec - sst2``, and ``sst2 + subj - trec`` against ``sst2 + subj``; next to the bare base model with each
trained head (no adapter) and the majority-class rate of each dev set (chance). Optionally (``--multitask``) one LoRA
trained jointly on the union of the three training subsets with one head per task
(``adapterkit.train.multitask``), the joint reference.

    cd benchmarks && HF_HUB_OFFLINE=1 ADAPTERKIT_NO_PROGRESS=1 PYTHONPATH=../src ../.venv/bin/python \
        combine_tasks.py --seeds 0 1 --multitask --json results/combine_tasks.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adapterkit as ak
from _common import minilm_dir
from adapterkit.cli.commands import load_classifier
from adapterkit.train.loop import Encoded, TrainConfig, accuracy, encode, seed_everything
from adapterkit.train.multitask import MultiTaskClassifier, train_multitask
from tasks import Protocol, Task, load_task, subset, train_once, with_rows

TASKS = ("sst2", "subj", "trec")
TARGETS = ["query", "value"]
PROTOCOL = with_rows(Protocol(), 1000)  # as routing_experiments / compose_transfer: 1,000 rows, 2 epochs
THIRD = 1.0 / 3.0
DENSITY, RANK = 0.5, 8

# label -> (sources, weights, how, extra combine arguments)
MERGES: dict[str, tuple[tuple[str, ...], tuple[float, ...], str, dict[str, Any]]] = {
    "cat (avg of deltas)": (TASKS, (THIRD,) * 3, "cat", {}),
    "cat_sum (task arithmetic, lambda 1)": (TASKS, (1.0,) * 3, "cat", {}),
    "linear (peft factor mix)": (TASKS, (THIRD,) * 3, "linear", {}),
    "svd (rank 8)": (TASKS, (THIRD,) * 3, "svd", {"rank": RANK}),
    "ties": (TASKS, (1.0,) * 3, "ties", {"density": DENSITY}),
    "dare_ties": (TASKS, (1.0,) * 3, "dare_ties", {"density": DENSITY}),
    "dare_linear": (TASKS, (THIRD,) * 3, "dare_linear", {"density": DENSITY}),
    "magnitude_prune": (TASKS, (THIRD,) * 3, "magnitude_prune", {"density": DENSITY}),
    "ties_svd (rank 8)": (TASKS, (1.0,) * 3, "ties_svd", {"density": DENSITY, "rank": RANK}),
    "dare_ties_svd (rank 8)": (TASKS, (1.0,) * 3, "dare_ties_svd", {"density": DENSITY, "rank": RANK}),
    "dare_linear_svd (rank 8)": (TASKS, (THIRD,) * 3, "dare_linear_svd", {"density": DENSITY, "rank": RANK}),
    "magnitude_prune_svd (rank 8)": (TASKS, (THIRD,) * 3, "magnitude_prune_svd",
                                     {"density": DENSITY, "rank": RANK}),
}
NEGATIONS: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "-trec": (("trec",), (-1.0,)),
    "sst2 - trec": (("sst2", "trec"), (1.0, -1.0)),
    "trec - sst2": (("trec", "sst2"), (1.0, -1.0)),
    "sst2 + subj": (("sst2", "subj"), (1.0, 1.0)),
    "sst2 + subj - trec": (("sst2", "subj", "trec"), (1.0, 1.0, -1.0)),
}


def train_task(task: Task, seed: int, cache: Path) -> dict[str, Any]:
    """Train (or reuse from ``cache``) the task's LoRA; saves the adapter alone and its head's tensors."""
    folder = cache / f"{task.name}-s{seed}"
    if not (folder / "result.json").is_file():
        result = train_once(task, task.name, ak.LoRA(r=8, alpha=16), TARGETS, seed, PROTOCOL)
        model = result.pop("model")
        ak.save(model, folder / "adapter", task.name, modules=())
        torch.save({k: v.detach().clone() for k, v in model.classifier.state_dict().items()}, folder / "head.pt")
        (folder / "result.json").write_text(json.dumps(result) + "\n")
    return json.loads((folder / "result.json").read_text())


def set_head(model: nn.Module, head: dict[str, torch.Tensor]) -> None:
    """Put a task's trained classifier (weight, bias) on the model."""
    out_features, in_features = head["weight"].shape
    linear = nn.Linear(in_features, out_features)
    linear.load_state_dict(head)
    model.classifier = linear.eval()
    model.config.num_labels = out_features
    model.num_labels = out_features


def score(model: nn.Module, name: str | None, heads: dict[str, Any], dev: dict[str, Encoded], pad: int
          ) -> dict[str, float]:
    """Dev accuracy of each task with its own head, running adapter ``name`` alone (None: the bare base)."""
    out = {}
    for task in TASKS:
        set_head(model, heads[task])
        with ak.use(model, *([name] if name else [])):
            out[task] = round(accuracy(model, dev[task], PROTOCOL.batch_size, pad), 2)
    out["mean"] = round(sum(out[t] for t in TASKS) / len(TASKS), 2)
    return out


def multitask(seed: int, tasks: dict[str, Task], cache: Path) -> dict[str, Any]:
    """One LoRA trained on the union of the three training subsets, one fresh head per task (cached)."""
    file = cache / f"multitask-s{seed}.json"
    if file.is_file():
        return json.loads(file.read_text())
    seed_everything(seed)
    classifier, tokenizer = load_classifier(minilm_dir(), 2)
    encoder = classifier.bert
    ak.attach(encoder, "joint", ak.LoRA(r=8, alpha=16), TARGETS)
    ak.train_only(encoder, "joint")
    model = MultiTaskClassifier(encoder, {t: tasks[t].num_labels for t in TASKS}, block=ak.Stack("joint"))
    data = {t: (subset(tasks[t].train, PROTOCOL.train_rows, seed), tasks[t].dev) for t in TASKS}
    config = TrainConfig(epochs=PROTOCOL.epochs, lr=PROTOCOL.lr, batch_size=PROTOCOL.batch_size,
                         max_length=PROTOCOL.max_length, seed=seed)
    start = time.perf_counter()
    run = train_multitask(model, tokenizer, data, config, desc="joint")
    acc = {t: round(v, 2) for t, v in run["dev_accuracy"].items()}
    acc["mean"] = round(sum(acc[t] for t in TASKS) / len(TASKS), 2)
    result = {"dev_accuracy": acc, "train_seconds": run["train_seconds"], "steps": run["steps"],
              "wall_seconds": round(time.perf_counter() - start, 1)}
    file.write_text(json.dumps(result) + "\n")
    return result


def run_seed(seed: int, tasks: dict[str, Task], cache: Path, with_multitask: bool) -> dict[str, Any]:
    start = time.perf_counter()
    trained = {}
    for name in TASKS:
        trained[name] = train_task(tasks[name], seed, cache)
        print(f"seed {seed}: trained {name}: dev {trained[name]['dev_accuracy']:.2f} "
              f"({trained[name]['wall_seconds']} s)", flush=True)
    model, tokenizer = load_classifier(minilm_dir(), 2)
    model.eval()
    pad = tokenizer.pad_token_id or 0
    for name in TASKS:
        ak.load(model, cache / f"{name}-s{seed}" / "adapter")
    heads = {name: torch.load(cache / f"{name}-s{seed}" / "head.pt") for name in TASKS}
    dev = {t: encode(tokenizer, tasks[t].dev, PROTOCOL.max_length) for t in TASKS}
    rows: dict[str, dict[str, float]] = {"base model (no adapter)": score(model, None, heads, dev, pad)}
    print(f"seed {seed}: base {rows['base model (no adapter)']}", flush=True)
    for name in TASKS:  # each single adapter with every head; its own task is the upper reference
        rows[f"single {name}"] = score(model, name, heads, dev, pad)
        print(f"seed {seed}: single {name} {rows[f'single {name}']}", flush=True)
        if abs(rows[f"single {name}"][name] - trained[name]["dev_accuracy"]) > 0.2:
            print(f"  WARNING: {name} scored {rows[f'single {name}'][name]} on the shared model, "
                  f"{trained[name]['dev_accuracy']:.2f} right after training", flush=True)
    rows["oracle (own adapter per task)"] = {t: rows[f"single {t}"][t] for t in TASKS}
    rows["oracle (own adapter per task)"]["mean"] = round(sum(rows[f"single {t}"][t] for t in TASKS) / 3, 2)
    merges = {}
    for label, (sources, weights, how, extra) in {**MERGES, **{k: (s, w, "cat", {}) for k, (s, w)
                                                                in NEGATIONS.items()}}.items():
        name = f"m{len(merges)}"
        tick = time.perf_counter()
        ak.combine(model, list(sources), list(weights), how=how, name=name, seed=seed, **extra)
        rows[label] = score(model, name, heads, dev, pad)
        ak.detach(model, name)
        merges[label] = {"sources": list(sources), "weights": [round(w, 4) for w in weights], "how": how, **extra}
        print(f"seed {seed}: {label} {rows[label]} ({time.perf_counter() - tick:.1f} s)", flush=True)
    out: dict[str, Any] = {"seed": seed, "single_task_training": trained, "dev_accuracy": rows, "merges": merges}
    if with_multitask:
        out["multitask"] = multitask(seed, tasks, cache)
        print(f"seed {seed}: multitask {out['multitask']}", flush=True)
    out["wall_seconds"] = round(time.perf_counter() - start, 1)
    return out


def print_table(runs: list[dict[str, Any]]) -> None:
    """Markdown table: mean over the seeds run (per-seed values in brackets when more than one)."""
    print(f"\nseeds {[r['seed'] for r in runs]}; dev accuracy (%), each task with its own head")
    print("| adapter | " + " | ".join(TASKS) + " | mean |\n|---|" + "---|" * (len(TASKS) + 1))
    labels = list(runs[0]["dev_accuracy"])
    table = {label: [r["dev_accuracy"][label] for r in runs] for label in labels}
    if all("multitask" in r for r in runs):
        table["multi-task LoRA (joint, 3 heads)"] = [r["multitask"]["dev_accuracy"] for r in runs]
    for label, per_seed in table.items():
        cells = []
        for col in (*TASKS, "mean"):
            values = [s[col] for s in per_seed]
            cell = f"{sum(values) / len(values):.1f}"
            cells.append(cell + (f" ({', '.join(f'{v:.1f}' for v in values)})" if len(values) > 1 else ""))
        print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--multitask", action="store_true", help="also train the joint multi-task LoRA")
    parser.add_argument("--cache", default="/tmp/adapterkit_combine_tasks_cache",
                        help="trained task LoRAs and heads (reused when present)")
    parser.add_argument("--json", default=None, help="write every number here")
    parser.add_argument("--table", nargs="*", default=None, help="only print the table of these JSON files")
    args = parser.parse_args()
    if args.table is not None:
        runs = [run for f in args.table for run in json.loads(Path(f).read_text())["runs"]]
        print_table(runs)
        return
    torch.set_num_threads(2)
    tasks = {t: load_task(t) for t in TASKS}
    chance = {t: round(100.0 * max(Counter(tasks[t].dev.labels).values()) / len(tasks[t].dev.labels), 2)
              for t in TASKS}
    print(f"dev rows {({t: len(tasks[t].dev.labels) for t in TASKS})}; majority class (chance) {chance}", flush=True)
    record: dict[str, Any] = {
        "protocol": {**PROTOCOL.__dict__, "lora": "r=8 alpha=16 query/value", "density": DENSITY, "rank": RANK,
                     "model": "all-MiniLM-L6-v2", "dev": "full dev sets"},
        "machine": f"2-core CPU, torch {torch.__version__} ({platform.machine()}), 2 threads",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "chance_majority_class": chance, "runs": []}
    for seed in args.seeds:
        record["runs"].append(run_seed(seed, tasks, Path(args.cache), args.multitask))
        if args.json:  # after each seed: a partial record survives an interrupted run
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print_table(record["runs"])


if __name__ == "__main__":
    main()
