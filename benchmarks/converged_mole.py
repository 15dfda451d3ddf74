"""MoLE top-1 vs a plain LoRA of the same active size on a mixed multi-task set, trained to convergence (issue 18).

The earlier run (routing_experiments.py part 3: 300 rows per task, 114 steps) ended with balanced, unspecialised
experts. Here the union of SST-2, SUBJ and TREC holds ``--rows`` training rows of each task (default 1,000: 3,000
rows, 188 steps an epoch) for ``--epochs`` epochs (default 4), and the dev accuracy of every task is scored after
each epoch (a fixed ``--dev-rows`` subset of each dev set, the same for every run), so the curves show whether the
plain LoRA has flattened. Setups, both from scratch with one fresh head per task (``MultiTaskClassifier``):

* ``lora``: one LoRA r=8 alpha 16 on the FFN projections (intermediate.dense, output.dense);
* ``mole``: MoLE top-1 over 4 such LoRAs (the same parameters active per token), Switch load-balancing loss at
  MultiTaskClassifier's aux weight 0.01.

Optimiser: the shared protocol's (``tasks.Protocol``: AdamW, batch 16, lr 2e-3, max length 64, warmup then linear
decay). Routing is read on every dev row after training: for each task, module and expert, the share of the task's
tokens routed to that expert. Reported per task: that share averaged over modules (the heat map) and its entropy in
bits (2.0 = uniform over 4 experts; 0 = one expert takes the task), and the mean over modules of the per-module
entropy (a task can be specialised within each layer while the layers disagree).

    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src:. python converged_mole.py run --setup mole --seed 0
    PYTHONPATH=../src:. python converged_mole.py table     # table, converged_mole.png, converged_mole_routing.png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import _common  # noqa: F401  (offline hub)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "converged_mole.jsonl"
TASKS = ("sst2", "subj", "trec")
FFN = [r"re:.*layer\.\d+\.intermediate\.dense", r"re:.*layer\.\d+\.output\.dense"]
EXPERTS = 4


def build(setup: str) -> tuple[Any, Any, int, Any]:
    """The classifier's encoder with the setup attached: (encoder, block, trainable in the encoder, tokenizer)."""
    import adapterkit as ak
    from adapterkit.cli.commands import load_classifier
    from tasks import minilm_dir

    classifier, tokenizer = load_classifier(minilm_dir(), 2)
    encoder = classifier.bert
    if setup == "lora":
        ak.attach(encoder, "plain", ak.LoRA(r=8, alpha=16), FFN)
        return encoder, ak.Stack("plain"), ak.train_only(encoder, "plain"), tokenizer
    names = [f"e{i}" for i in range(EXPERTS)]
    for name in names:
        ak.attach(encoder, name, ak.LoRA(r=8, alpha=16), FFN)
    ak.attach(encoder, "mole", ak.compose.MoLE(experts=EXPERTS), FFN)
    return encoder, ak.Mix(*names, name="mole"), ak.train_only(encoder, [*names, "mole"]), tokenizer


def usage(model: Any, tokenizer: Any, data: dict[str, tuple[Any, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per task and module: the share of the task's dev tokens (all rows, real tokens only) routed to each expert."""
    from adapterkit.train.loop import encode
    from adapterkit.train.multitask import task_batches

    encoded = [encode(tokenizer, dev, 64) for _, dev in data.values()]
    out: dict[str, dict[str, list[float]]] = {}
    model.eval()
    for index, task in enumerate(data):
        counts: dict[str, torch.Tensor] = {}
        rows = [(index, r) for r in range(len(encoded[index].ids))]
        for ids, mask, tasks, _ in task_batches(encoded, rows, 64, tokenizer.pad_token_id or 0):
            with torch.no_grad():
                routing = model(ids, mask, tasks).routing
            for path, weights in routing.weights["mole"].items():
                chosen = (weights[mask.bool()] > 0).float().sum(0)  # (K,) tokens per expert
                counts[path] = counts.get(path, torch.zeros_like(chosen)) + chosen
        out[task] = {path: (c / c.sum()).tolist() for path, c in counts.items()}
    return out


def entropy_bits(shares: list[float]) -> float:
    return -sum(p * math.log2(p) for p in shares if p > 0)


def run(args: argparse.Namespace) -> None:
    from adapterkit.train.loop import TrainConfig, seed_everything
    from adapterkit.train.multitask import MultiTaskClassifier, train_multitask
    from routing_experiments import union
    from tasks import Protocol, load_task

    rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()] if args.out.exists() else []
    if any((r["setup"], r["seed"], r["rows_per_task"], r["epochs"]) == (args.setup, args.seed, args.rows, args.epochs)
           for r in rows):
        print(f"{args.setup} seed {args.seed}: already in {args.out}", file=sys.stderr)
        return
    torch.set_num_threads(1)
    protocol = Protocol()
    seed_everything(args.seed)
    data = union(args.seed, args.rows, args.dev_rows)
    encoder, block, trainable, tokenizer = build(args.setup)
    model = MultiTaskClassifier(encoder, {t: load_task(t).num_labels for t in TASKS}, block=block)
    config = TrainConfig(epochs=args.epochs, lr=protocol.lr, batch_size=protocol.batch_size,
                         max_length=protocol.max_length, seed=args.seed)
    result = train_multitask(model, tokenizer, data, config, desc=f"{args.setup} s{args.seed}")
    curves = result["history"]["dev_accuracy"]
    row: dict[str, Any] = {
        "setup": args.setup, "seed": args.seed, "rows_per_task": args.rows, "epochs": args.epochs,
        "dev_rows_per_task": args.dev_rows, "steps": result["steps"], "lr": protocol.lr, "trainable_encoder": trainable,
        "dev_accuracy": result["dev_accuracy"], "mean_dev_accuracy": statistics.mean(result["dev_accuracy"].values()),
        "curve": [statistics.mean(curves[t][e] for t in TASKS) for e in range(args.epochs)], "task_curves": curves,
        "final_aux_loss": result["history"]["aux_loss"][-1], "train_seconds": result["train_seconds"],
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    if args.setup == "mole":
        shares = usage(model, tokenizer, data)
        row["usage"] = shares
        row["task_usage"] = {t: [statistics.mean(v[k] for v in s.values()) for k in range(EXPERTS)]
                             for t, s in shares.items()}
        row["task_entropy_bits"] = {t: entropy_bits(v) for t, v in row["task_usage"].items()}
        row["module_entropy_bits"] = {t: statistics.mean(entropy_bits(v) for v in s.values())
                                      for t, s in shares.items()}
    print(json.dumps({k: v for k, v in row.items() if k not in ("usage", "task_curves")}), file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def table() -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: (r["setup"], r["seed"]))
    print("| setup | seed | steps | trainable (encoder) | " + " | ".join(TASKS) + " | mean | curve (mean per epoch) "
          "| train s |")
    print("|---|---|---|---|" + "---|" * len(TASKS) + "---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['seed']} | {r['steps']} | {r['trainable_encoder']:,} | "
              + " | ".join(f"{r['dev_accuracy'][t]:.1f}" for t in TASKS) + f" | **{r['mean_dev_accuracy']:.2f}** | "
              + " / ".join(f"{v:.1f}" for v in r["curve"]) + f" | {r['train_seconds']:.0f} |")
    mole = [r for r in rows if r["setup"] == "mole"]
    if mole:
        print("\n| seed | task | expert usage (share of tokens, mean over modules) | entropy, bits (of the mean) "
              "| entropy, bits (mean per module) |")
        print("|---|---|---|---|---|")
        for r in mole:
            for t in TASKS:
                print(f"| {r['seed']} | {t} | " + " / ".join(f"{v:.2f}" for v in r["task_usage"][t])
                      + f" | {r['task_entropy_bits'][t]:.2f} | {r['module_entropy_bits'][t]:.2f} |")
    plot(rows)


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adapterkit.train.routing_plot import draw

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        ax.plot(range(1, len(r["curve"]) + 1), r["curve"], marker=".", label=f"{r['setup']} seed {r['seed']}",
                linestyle="-" if r["setup"] == "mole" else "--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean dev accuracy over SST-2 / SUBJ / TREC (%)")
    ax.set_title("MoLE top-1 vs plain LoRA on the mixed set")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "converged_mole.png", dpi=110)
    plt.close(fig)
    panels = []
    experts = [f"expert {k}" for k in range(EXPERTS)]
    for r in (r for r in rows if r["setup"] == "mole"):  # tasks x experts per seed; modules x experts for seed 0
        matrix = torch.tensor([r["task_usage"][t] for t in TASKS])
        panels.append((f"seed {r['seed']}: tasks x experts (share of tokens, mean over modules)", matrix, list(TASKS),
                       experts, "expert"))
        for t in TASKS if r["seed"] == min(m["seed"] for m in rows if m["setup"] == "mole") else ():
            paths = list(r["usage"][t])
            short = [p.split("layer.")[-1] for p in paths]
            panels.append((f"seed {r['seed']}, {t}: modules x experts", torch.tensor([r["usage"][t][p] for p in paths]),
                           short, experts, "expert"))
    if panels:
        draw(panels, HERE / "converged_mole_routing.png", "MoLE top-1 of 4: expert usage by task (dev tokens)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="train one setup with one seed on the union, with its per-epoch dev curve")
    one.add_argument("--setup", choices=("lora", "mole"), required=True)
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--rows", type=int, default=1000, help="training rows of each task (default 1000)")
    one.add_argument("--epochs", type=int, default=4)
    one.add_argument("--dev-rows", type=int, default=500, help="fixed dev rows of each task (default 500)")
    one.add_argument("--out", type=Path, default=RESULTS, help="results file (default results/converged_mole.jsonl)")
    sub.add_parser("table", help="the table of results/converged_mole.jsonl, the curves and the routing heat map")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        table()


if __name__ == "__main__":
    main()
