"""Claims that did not reproduce at 126 steps, rerun where the baseline has converged (issue 18): dev curves first.

Each run trains one method on one task with one seed under the shared protocol (tasks.Protocol: all-MiniLM-L6-v2,
a fresh classifier head trained with the adapter, batch 16, max length 64, AdamW weight decay 0.01, 6 % warmup then
linear decay) over ALL training rows (SST-2: the 6,920 shipped; SUBJ: 9,000) for ``--epochs`` epochs, and scores the
dev set every ``--evals-per-epoch``-th of an epoch: the curve shows whether the baseline has flattened. The
accuracy reported for a run is the last point (no early stopping, nothing picked on the dev set); the best point is
recorded beside it.

Methods (``methods()``, each a ``Recipe``): the float32 baselines ``lora`` (r=8 on query/value, lr 2e-3) and
``bottleneck`` (Pfeiffer, reduction 16), their 1-bit twins (the issue-4 recipe), ``seq_bn16`` (a bottleneck of
hidden 16, MoSA's size match) and ``mosa`` (4 experts over the up-projection, trained with the paper's second pass
and symmetric-KL consistency loss), ``mask_tuning`` on q/k/v/o at R-AMT's lr 8e-5 with its L2 regulariser (the
issue-4 run at 2e-3 did not train), and ``splora_pruned``: SPLoRA r=8 on the FFN trained for the epochs (written as
the ``splora`` row), then pruned in the paper's 5 % steps to 50 % of the FFN channels with 1/``--recovery-per-epoch``
epoch of recovery training after each step, exported physically smaller and scored as exported.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import _common  # noqa: F401  (offline hub)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "converged.jsonl"
FFN_NORM = r"re:.*layer\.\d+\.output\.LayerNorm"  # Pfeiffer placement: after each FFN


@dataclass(frozen=True)
class Recipe:
    """One method's setting: spec, targets, learning rate, and its paper's extras where it has them."""

    spec: Any
    targets: Any
    lr: float = 2e-3
    extra: Callable[[Any, str], Any] | None = None  # a loss term added to every step: extra(model, name)
    two_pass: bool = False  # MoSA: a second pass with other experts, the symmetric-KL consistency loss
    prune_to: float = 0.0  # SPLoRA: after the epochs, prune this share of channels in 5 % steps, recovering between


def methods() -> dict[str, Recipe]:
    import adapterkit as ak
    from adapterkit.methods.lowbit import LowBit
    from adapterkit.methods.mask_tuning import MaskTuning, mask_regularizer
    from adapterkit.methods.splora import SPLoRA

    lora, bottleneck = ak.LoRA(r=8, alpha=16), ak.SeqBottleneck(reduction_factor=16)
    return {
        "lora": Recipe(lora, ["query", "value"]),
        "lora_1bit": Recipe(LowBit(lora, bits=1), ["query", "value"]),
        "bottleneck": Recipe(bottleneck, [FFN_NORM]),
        "bottleneck_1bit": Recipe(LowBit(bottleneck, bits=1), [FFN_NORM]),
        "seq_bn16": Recipe(ak.SeqBottleneck(hidden=16), ["output.LayerNorm"]),
        "mosa": Recipe(ak.methods.MoSA(hidden=16, experts=4, split="up"), ["output.LayerNorm"], two_pass=True),
        "mask_tuning": Recipe(MaskTuning(), ["query", "key", "value", "attention.output.dense"], 8e-5,
                              extra=lambda model, name: mask_regularizer(model, name)),
        "splora_pruned": Recipe(SPLoRA(r=8), ["intermediate.dense"], prune_to=0.5),
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
    recipe = methods()[args.method]
    task = load_task(args.task)
    seed_everything(args.seed)
    model, tokenizer = load_classifier(minilm_dir(), task.num_labels)
    ak.attach(model, args.method, recipe.spec, recipe.targets)
    trainable = ak.train_only(model, args.method, also=["classifier"])
    train = encode(tokenizer, subset(task.train, args.rows, args.seed), protocol.max_length)
    dev = encode(tokenizer, subset(task.dev, args.dev_rows, 0), protocol.max_length)
    batch = protocol.batch_size
    per_epoch = math.ceil(len(train.ids) / batch)
    total, warm = per_epoch * args.epochs, max(1, int(0.06 * per_epoch * args.epochs))
    every = max(1, per_epoch // args.evals_per_epoch)
    curve: list[dict[str, float]] = []

    def score(step: int, losses: list[float], offset: int = 0) -> None:
        point = {"step": offset + step, "epoch": round((offset + step) / per_epoch, 3),
                 "dev_accuracy": accuracy(model, dev, 32, 0), "train_loss": statistics.mean(losses[-every:])}
        curve.append(point)
        print(f"{args.task} {args.method} seed {args.seed}: step {offset + step} dev {point['dev_accuracy']:.2f} "
              f"loss {point['train_loss']:.3f}", file=sys.stderr, flush=True)

    term = recipe.extra
    extra = (lambda: term(model, args.method)) if term is not None else None
    loss_of = two_pass_loss(model) if recipe.two_pass else None
    train_seconds, losses = train_steps(model, train, args.seed, total, warm, recipe.lr, batch, extra=extra,
                                        every=every, after=score, loss_of=loss_of)
    if total % every:
        score(total, losses)
    common = {"task": args.task, "seed": args.seed, "epochs": args.epochs, "rows": len(train.ids), "lr": recipe.lr,
              "batch_size": batch, "trainable_parameters": trainable, "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__}

    def result(method: str, points: list[dict[str, float]], steps: int, seconds: float) -> dict[str, Any]:
        return {"method": method, **common, "steps": steps, "dev_accuracy": points[-1]["dev_accuracy"],
                "best_dev_accuracy": max(p["dev_accuracy"] for p in points), "curve": points,
                "train_seconds": round(seconds, 1)}

    if not recipe.prune_to:
        rows = [result(args.method, curve, total, train_seconds)]
    else:  # the unpruned adapter is a row of its own; the pruned one continues from it
        unpruned = result(args.method.removesuffix("_pruned"), list(curve), total, train_seconds)
        curve.clear()
        every = max(1, per_epoch // args.recovery_per_epoch)
        pruned_steps, seconds, extras = prune_and_recover(model, args.method, train, dev, args.seed, recipe,
                                                          every, batch, lambda s, seen: score(s, seen, offset=total))
        rows = [unpruned, {**result(args.method, curve, total + pruned_steps, train_seconds + seconds),
                           "recovery_steps_per_pruning_step": every, **extras}]
        rows[1]["dev_accuracy"] = extras["exported_dev_accuracy"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def two_pass_loss(model: Any) -> Callable[[Any, Any, Any], Any]:
    """MoSA's training loss (ADDITIONAL=True, ADD_WEIGHT=0, REG_WEIGHT=1 in the reference configs): the task loss
    of one pass plus the symmetric KL between it and a second pass that draws other experts."""
    from adapterkit.methods.mosa import consistency_loss

    def loss(ids: Any, mask: Any, labels: Any) -> Any:
        first = model(input_ids=ids, attention_mask=mask, labels=labels)
        second = model(input_ids=ids, attention_mask=mask)
        return first.loss + consistency_loss(first.logits, second.logits)

    return loss


def prune_and_recover(model: Any, name: str, train: Any, dev: Any, seed: int, recipe: Recipe, every: int,
                      batch: int, score: Callable[[int, list[float]], None]) -> tuple[int, float, dict[str, Any]]:
    """SPLoRA's iterative schedule: prune 5 % more of every FFN's channels, train ``every`` steps to recover, and
    so on up to ``recipe.prune_to`` (lr decaying linearly over the phase); then export the model physically
    smaller and score the export. Returns the steps, their seconds and the export's figures."""
    from adapterkit.methods.splora import prune_channels, sparsity_schedule
    from adapterkit.train.loop import accuracy
    from lowbit_pruning import export_pruned
    from tasks import train_steps

    schedule = sparsity_schedule(recipe.prune_to, 0.05)
    total = every * len(schedule)
    prune_channels(model, name, schedule[0])

    def after(step: int, losses: list[float]) -> None:
        score(step, losses)
        if step < total:
            prune_channels(model, name, schedule[step // every])

    seconds, _ = train_steps(model, train, seed + 100, total, 1, recipe.lr, batch, every=every, after=after)
    exported, keep, gap = export_pruned(model, name, dev)
    return total, seconds, {"exported_dev_accuracy": accuracy(exported, dev, 32, 0), "export_max_abs_diff": gap,
                            "kept_channels": int(sum(int(k.sum()) for k in keep.values())),
                            "total_channels": int(sum(k.numel() for k in keep.values()))}


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


PANELS = {  # one panel per claim: the method and the baseline it is judged against
    "1-bit vs float32": ("lora", "lora_1bit", "bottleneck", "bottleneck_1bit"),
    "MoSA vs a bottleneck of its size": ("seq_bn16", "mosa"),
    "mask tuning (lr 8e-5) vs LoRA": ("lora", "mask_tuning"),
    "SPLoRA, then pruned to 50 % (5 % steps)": ("lora", "splora", "splora_pruned"),
}


def plot(groups: dict[tuple[str, str, int], list[dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for task in sorted({t for t, _, _ in groups}):
        fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey=True)
        for ax, (title, names) in zip(axes.flat, PANELS.items()):
            for (t, method, _), found in sorted(groups.items()):
                if t != task or method not in names:
                    continue
                points = min(len(r["curve"]) for r in found)
                epochs = [found[0]["curve"][i]["epoch"] for i in range(points)]
                mean = [statistics.mean(r["curve"][i]["dev_accuracy"] for r in found) for i in range(points)]
                ax.plot(epochs, mean, marker=".", label=f"{method} ({len(found)} seeds)")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("epoch")
            ax.set_ylim(75, 90)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        for ax in axes[:, 0]:
            ax.set_ylabel("dev accuracy (%), mean of seeds")
        fig.suptitle(f"{task}: dev accuracy during training (all training rows)")
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
    one.add_argument("--recovery-per-epoch", type=int, default=8,
                     help="SPLoRA: pruning steps per epoch, i.e. 1/N epoch of recovery training after each")
    one.add_argument("--rows", type=int, default=None, help="training rows (default: all; fewer for a quick check)")
    one.add_argument("--dev-rows", type=int, default=None, help="dev rows scored (default: all)")
    one.add_argument("--out", type=Path, default=RESULTS, help="results file (default results/converged.jsonl)")
    sub.add_parser("table", help="the table of results/converged.jsonl and the curve plots")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        table()


if __name__ == "__main__":
    main()
