"""Claims that did not reproduce at 126 steps, rerun where the baseline has converged (issue 18): dev curves first.

Each run trains one method on one task with one seed under the shared protocol (tasks.Protocol: all-MiniLM-L6-v2,
a fresh classifier head trained with the adapter, batch 16, max length 64, AdamW weight decay 0.01, 6 % warmup then
linear decay) over ALL training rows (SST-2: the 6,920 shipped; SUBJ: 9,000) for ``--epochs`` epochs, and scores the
dev set every ``--evals-per-epoch``-th of an epoch: the curve shows whether the baseline has flattened. The
accuracy reported for a run is the last point (no early stopping, nothing picked on the dev set); the best point is
recorded beside it.

Methods (``METHODS``): the float32 baselines ``lora`` (r=8 on query/value, lr 2e-3) and ``bottleneck`` (Pfeiffer,
reduction 16), their 1-bit twins (the issue-4 recipe), ``seq_bn16`` (a bottleneck of hidden 16, MoSA's size match)
and ``mosa`` (4 experts over the up-projection), and ``mask_tuning`` on q/k/v/o at R-AMT's lr 8e-5 with its L2
regulariser (the issue-4 run at 2e-3 did not train).

    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src:. python converged.py run --task sst2 --method lora --seed 0
    OMP_NUM_THREADS=1 PYTHONPATH=../src:. python converged.py table      # the table and converged_<task>.png

A run already in results/converged.jsonl (same task, method, seed, epochs) is skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import _common  # noqa: F401  (offline hub)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "converged.jsonl"
FFN_NORM = r"re:.*layer\.\d+\.output\.LayerNorm"  # Pfeiffer placement: after each FFN


def methods() -> dict[str, tuple[Any, Any, float, Callable[[Any, str], Any] | None]]:
    """name -> (spec, targets, learning rate, extra loss(model, name) or None)."""
    import adapterkit as ak
    from adapterkit.methods.lowbit import LowBit
    from adapterkit.methods.mask_tuning import MaskTuning, mask_regularizer

    lora, bottleneck = ak.LoRA(r=8, alpha=16), ak.SeqBottleneck(reduction_factor=16)
    return {
        "lora": (lora, ["query", "value"], 2e-3, None),
        "lora_1bit": (LowBit(lora, bits=1), ["query", "value"], 2e-3, None),
        "bottleneck": (bottleneck, [FFN_NORM], 2e-3, None),
        "bottleneck_1bit": (LowBit(bottleneck, bits=1), [FFN_NORM], 2e-3, None),
        "seq_bn16": (ak.SeqBottleneck(hidden=16), ["output.LayerNorm"], 2e-3, None),
        "mosa": (ak.methods.MoSA(hidden=16, experts=4, split="up"), ["output.LayerNorm"], 2e-3, None),
        "mask_tuning": (MaskTuning(), ["query", "key", "value", "attention.output.dense"], 8e-5,
                        lambda model, name: mask_regularizer(model, name)),
    }


def done(path: Path) -> set[tuple[str, str, int, int]]:
    if not path.exists():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["task"], r["method"], r["seed"], r["epochs"]) for r in rows}


def run(args: argparse.Namespace) -> None:
    import adapterkit as ak
    from adapterkit.cli.commands import load_classifier
    from adapterkit.train.loop import accuracy, encode, seed_everything
    from tasks import Protocol, load_task, minilm_dir, subset, train_steps

    key = (args.task, args.method, args.seed, args.epochs)
    if key in done(args.out):
        print(f"{key}: already in {args.out}", file=sys.stderr)
        return
    torch.set_num_threads(1)
    protocol = Protocol()
    spec, targets, lr, extra = methods()[args.method]
    task = load_task(args.task)
    seed_everything(args.seed)
    model, tokenizer = load_classifier(minilm_dir(), task.num_labels)
    ak.attach(model, args.method, spec, targets)
    trainable = ak.train_only(model, args.method, also=["classifier"])
    train = encode(tokenizer, subset(task.train, args.rows, args.seed), protocol.max_length)
    dev = encode(tokenizer, task.dev, protocol.max_length)
    batch = protocol.batch_size
    per_epoch = math.ceil(len(train.ids) / batch)
    total, warm = per_epoch * args.epochs, max(1, int(0.06 * per_epoch * args.epochs))
    every = max(1, per_epoch // args.evals_per_epoch)
    curve: list[dict[str, float]] = []

    def score(step: int, losses: list[float]) -> None:
        point = {"step": step, "epoch": round(step / per_epoch, 3), "dev_accuracy": accuracy(model, dev, 32, 0),
                 "train_loss": statistics.mean(losses[-every:])}
        curve.append(point)
        print(f"{args.task} {args.method} seed {args.seed}: step {step}/{total} dev {point['dev_accuracy']:.2f} "
              f"loss {point['train_loss']:.3f}", file=sys.stderr, flush=True)

    loss_of = (lambda: extra(model, args.method)) if extra is not None else None
    train_seconds, losses = train_steps(model, train, args.seed, total, warm, lr, batch, extra=loss_of, every=every,
                                        after=score)
    if total % every:
        score(total, losses)
    row = {"task": args.task, "method": args.method, "seed": args.seed, "epochs": args.epochs, "rows": len(train.ids),
           "steps": total, "lr": lr, "batch_size": batch, "trainable_parameters": trainable,
           "dev_accuracy": curve[-1]["dev_accuracy"], "best_dev_accuracy": max(p["dev_accuracy"] for p in curve),
           "curve": curve, "train_seconds": round(train_seconds, 1), "date": time.strftime("%Y-%m-%d"),
           "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def table() -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    print("| task | method | epochs (steps) | seeds | last dev per seed | mean | best point | train s per run |")
    print("|---|---|---|---|---|---|---|---|")
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"], r["epochs"]), []).append(r)
    for (task, method, epochs), found in sorted(groups.items()):
        found.sort(key=lambda r: r["seed"])
        last = [r["dev_accuracy"] for r in found]
        print(f"| {task} | {method} | {epochs} ({found[0]['steps']}) | {len(found)} | "
              + " / ".join(f"{v:.2f}" for v in last) + f" | **{statistics.mean(last):.2f}** | "
              f"{statistics.mean(r['best_dev_accuracy'] for r in found):.2f} | "
              f"{statistics.mean(r['train_seconds'] for r in found):.0f} |")
    plot(groups)


def plot(groups: dict[tuple[str, str, int], list[dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for task in sorted({t for t, _, _ in groups}):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for (t, method, _), found in sorted(groups.items()):
            if t != task:
                continue
            points = min(len(r["curve"]) for r in found)
            epochs = [found[0]["curve"][i]["epoch"] for i in range(points)]
            mean = [statistics.mean(r["curve"][i]["dev_accuracy"] for r in found) for i in range(points)]
            ax.plot(epochs, mean, marker=".", label=f"{method} ({len(found)} seeds)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("dev accuracy (%)")
        ax.set_title(f"{task}: dev accuracy during training (all rows)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(HERE / f"converged_{task}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="one method, task and seed, with its dev curve")
    one.add_argument("--task", choices=("sst2", "subj"), required=True)
    one.add_argument("--method", choices=sorted(methods()), required=True)
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--epochs", type=int, default=3)
    one.add_argument("--evals-per-epoch", type=int, default=4)
    one.add_argument("--rows", type=int, default=None, help="training rows (default: all; fewer for a quick check)")
    one.add_argument("--out", type=Path, default=RESULTS, help="results file (default results/converged.jsonl)")
    sub.add_parser("table", help="the table of results/converged.jsonl and the curve plots")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        table()


if __name__ == "__main__":
    main()
