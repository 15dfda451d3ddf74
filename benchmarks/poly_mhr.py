"""Poly vs MHR vs one shared LoRA in multi-task training, then few-shot adaptation to a held-out task.

Stage 1 (multi-task): all-MiniLM-L6-v2 (AutoModel) with one head per task (``MultiTaskClassifier``), trained on
the shuffled union of SST-2, SUBJ and TREC subsets with (a) one shared LoRA, (b) Poly (n_splits=1) and
(c) MHR (n_splits=8): m=4 LoRA skills of the shared LoRA's rank on query/value, a task id per example.
Stage 2 (few-shot, held-out MR): a fresh head plus (a) a LoRA from scratch, (b) the multi-task shared LoRA
fine-tuned, (c) MHR-z (a fresh routing row over the frozen MHR skills), (d) MHR-mu (MHR's skills averaged into one
LoRA, fine-tuned), and optionally the same z / mu from Poly.

Learning rates follow mttl (Caccia et al. 2023): routing logits 0.1 without weight decay; adapters and
heads 2e-3 (mttl: 1e-3; the shared protocol's rate, as for every table in RESULTS.md), batch 16, 64 tokens.
Nothing is tuned on the dev sets reported. The multi-task pools drop every sentence shared with the held-out dev
set (``--keep-overlap`` keeps them, as the runs before 2026-12-02 did). Usage:
    PYTHONPATH=../src ADAPTERKIT_NO_PROGRESS=1 python poly_mhr.py [--seeds 0 1] [--rows 1000] [--shots 128]
(one process per seed with --seeds N --threads 1, then --summarise, merges the per-seed files)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging

import adapterkit as ak
from _common import minilm_dir
from adapterkit.compose.poly import PolyRouter
from adapterkit.train import poly_tools
from adapterkit.train.loop import encode, seed_everything
from adapterkit.train.multitask import MultiTaskClassifier, evaluate_multitask, task_batches
from adapterkit.train.routing_plot import plot_task_routing
from tasks import SPLIT_SEED, load_task, subset, without_overlap

TASKS = ("sst2", "subj", "trec")
HELD_OUT = "mr"
TARGETS = ["query", "value"]
SKILL = ak.LoRA(r=8, alpha=16.0)
SKILLS, SPLITS = 4, 8
LR, ROUTER_LR = 2e-3, 0.1
BATCH, MAX_LENGTH = 16, 64  # the shared protocol's (tasks.Protocol); the first runs used 32 / 32
OUT = Path(__file__).resolve().parent / "results"


def _encoder(seed: int) -> torch.nn.Module:
    seed_everything(seed)
    logging.set_verbosity_error()
    return AutoModel.from_pretrained(minilm_dir())


def train(model: MultiTaskClassifier, tables: list[Any], devs: list[Any], epochs: int, seed: int, pad: int,
          curve_every: int = 0) -> dict[str, Any]:
    """AdamW, warmup 6% then linear decay; router logits in their own group (mttl's lr 0.1, no decay). With
    ``curve_every`` the mean dev accuracy is also scored after every such epoch (and the last): the dev curve."""
    routers = {id(p) for m in model.modules() if isinstance(m, PolyRouter) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in routers], "lr": LR, "weight_decay": 0.01},
              {"params": [p for p in params if id(p) in routers], "lr": ROUTER_LR, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]])
    rows = [(t, r) for t, table in enumerate(tables) for r in range(len(table.ids))]
    total = math.ceil(len(rows) / BATCH) * epochs
    warm = max(1, int(0.06 * total))
    decay = max(1, total - warm)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warm, (total - s) / decay))
    order = random.Random(seed)
    model.train()
    seconds, curve = 0.0, []
    for epoch in range(epochs):
        order.shuffle(rows)
        start = time.perf_counter()
        for ids, mask, task_ids, labels in task_batches(tables, rows, BATCH, pad):
            out = model(ids, mask, task_ids, labels)
            out.loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        if curve_every and ((epoch + 1) % curve_every == 0 or epoch + 1 == epochs):
            curve.append(round(statistics.mean(evaluate_multitask(model, devs, 64, pad).values()), 2))
    accuracy = evaluate_multitask(model, devs, 64, pad)
    return {"dev_accuracy": {k: round(v, 2) for k, v in accuracy.items()},
            "mean_accuracy": round(statistics.mean(accuracy.values()), 2), "train_seconds": round(seconds, 1),
            "trainable": sum(p.numel() for p in params), "steps": total, "curve": curve, "curve_every": curve_every}


def multitask(kind: str, seed: int, data: dict[str, Any], pad: int, epochs: int, curve_every: int = 0
              ) -> tuple[dict[str, Any], Any, Any]:
    encoder = _encoder(seed)
    if kind == "lora":
        ak.attach(encoder, "shared", SKILL, TARGETS)
        ak.train_only(encoder, "shared")
        ak.activate(encoder, "shared")
        block = None
    else:
        block = poly_tools.attach_poly(encoder, kind, SKILL, TARGETS, n_tasks=len(TASKS), n_skills=SKILLS,
                               n_splits=1 if kind == "poly" else SPLITS)
        ak.train_only(encoder, [kind, *block.children])
    model = MultiTaskClassifier(encoder, {t: data[t]["labels"] for t in TASKS}, block=block)
    result = train(model, [data[t]["train"] for t in TASKS], [data[t]["dev"] for t in TASKS], epochs, seed, pad,
                   curve_every)
    return result, encoder, block


def few_shot(kind: str, source: Any, seed: int, data: dict[str, Any], pad: int, epochs: int, curve_every: int = 0
             ) -> dict[str, Any]:
    """Adapt to the held-out task; ``source`` is (encoder, block) of a multi-task run (None: from scratch)."""
    seed_everything(seed)
    block = None
    if kind == "lora-scratch":
        encoder = _encoder(seed)
        ak.attach(encoder, "lora", SKILL, TARGETS)
        ak.train_only(encoder, "lora")
        ak.activate(encoder, "lora")
    else:
        encoder, trained = copy.deepcopy(source[0]), source[1]
        if kind == "shared-lora-ft":
            ak.train_only(encoder, "shared")
        elif kind.endswith("-z"):
            block = poly_tools.mhr_z(encoder, trained, "z")
            ak.train_only(encoder, "z")
        else:  # "-mu"
            poly_tools.mhr_mu(encoder, trained, "mu")
            ak.train_only(encoder, "mu")
            ak.activate(encoder, "mu")
    model = MultiTaskClassifier(encoder, {HELD_OUT: data[HELD_OUT]["labels"]}, block=block)
    shots = data[HELD_OUT]
    result = train(model, [shots["train"]], [shots["dev"]], epochs, seed, pad, curve_every)
    return {"dev_accuracy": result["dev_accuracy"][HELD_OUT], "trainable": result["trainable"],
            "train_seconds": result["train_seconds"], "curve": result["curve"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rows", type=int, default=1000, help="training rows per multi-task task")
    parser.add_argument("--dev-rows", type=int, default=300, help="dev rows per multi-task task (fixed subset)")
    parser.add_argument("--shots", type=int, default=128, help="training rows of the held-out task")
    parser.add_argument("--fs-epochs", type=int, default=8)
    parser.add_argument("--mt-epochs", type=int, default=2)
    parser.add_argument("--poly-few-shot", choices=["skip", "run"], default="skip",
                        help="also adapt the Poly model with z / mu (MHR always)")
    parser.add_argument("--fs-dev-rows", type=int, default=500, help="dev rows of the held-out task (fixed subset)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", choices=["lora", "poly", "mhr"], default=["lora", "poly", "mhr"],
                        help="multi-task methods to train (the few-shot rows of a missing one are skipped)")
    parser.add_argument("--curve-every", type=int, default=0,
                        help="score the dev sets after every N epochs too (0: only at the end)")
    parser.add_argument("--tag", default="poly_mhr", help="results file stem (results/<tag>.seed<S>.json)")
    parser.add_argument("--keep-overlap", action="store_true",
                        help="keep multi-task training rows whose sentence is also in the held-out dev set (the runs "
                             "before 2026-12-02 did: about 300 of MR's 500 dev rows are SST-2 training sentences)")
    parser.add_argument("--summarise", action="store_true", help="only merge results/poly_mhr.seed*.json")
    args = parser.parse_args()
    if args.summarise:
        summarise(args.tag)
        return
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    pad = tokenizer.pad_token_id or 0
    tasks = {name: load_task(name) for name in (*TASKS, HELD_OUT)}
    devs = {name: subset(task.dev, args.fs_dev_rows if name == HELD_OUT else args.dev_rows, SPLIT_SEED)
            for name, task in tasks.items()}
    pools = {name: task.train for name, task in tasks.items()}
    dropped: dict[str, int] = {}
    if not args.keep_overlap:  # SST-2 and SUBJ's subjective half are Rotten Tomatoes sentences, like MR
        pools.update({name: without_overlap(pools[name], devs[HELD_OUT].texts) for name in TASKS})
        dropped = {name: len(tasks[name].train.labels) - len(pools[name].labels) for name in TASKS}
        print("multi-task rows shared with the held-out dev set, dropped:", dropped, flush=True)
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        data = {}
        for name, task in tasks.items():
            rows = args.shots if name == HELD_OUT else args.rows
            dev = devs[name]
            data[name] = {"train": encode(tokenizer, subset(pools[name], rows, seed), MAX_LENGTH),
                          "dev": encode(tokenizer, dev, MAX_LENGTH), "labels": task.num_labels}
        trained = {}
        for kind in args.kinds:
            result, encoder, block = multitask(kind, seed, data, pad, args.mt_epochs, args.curve_every)
            trained[kind] = (encoder, block)
            runs.append({"stage": "multitask", "method": kind, "seed": seed, **result})
            print(time.strftime("%H:%M:%S"), json.dumps(runs[-1]), flush=True)
            if kind == "mhr" and seed == args.seeds[0]:
                plot_task_routing(poly_tools.task_routing(encoder, "mhr"), OUT / f"{args.tag}_routing.png", list(TASKS),
                                  f"MHR (seed {seed}) after multi-task training")
        plans = [("lora-scratch", None), ("shared-lora-ft", trained.get("lora")), ("mhr-z", trained.get("mhr")),
                 ("mhr-mu", trained.get("mhr"))]
        if args.poly_few_shot == "run":
            plans += [("poly-z", trained.get("poly")), ("poly-mu", trained.get("poly"))]
        for kind, source in plans:
            if kind != "lora-scratch" and source is None:
                continue
            result = few_shot(kind, source, seed, data, pad, args.fs_epochs, args.curve_every)
            runs.append({"stage": "few-shot", "method": kind, "seed": seed, **result})
            print(time.strftime("%H:%M:%S"), json.dumps(runs[-1]), flush=True)
    OUT.mkdir(exist_ok=True)
    config = {"tasks": TASKS, "held_out": HELD_OUT, "targets": TARGETS, "skill": SKILL.to_dict(), "skills": SKILLS,
              "mhr_splits": SPLITS, "lr": LR, "router_lr": ROUTER_LR, "batch": BATCH, "max_length": MAX_LENGTH,
              **vars(args), **({"dropped_overlap": dropped} if dropped else {})}
    name = f"{args.tag}.seed{'-'.join(map(str, args.seeds))}.json"
    (OUT / name).write_text(json.dumps({"config": config, "runs": runs}, indent=1))
    summarise(args.tag)


def summarise(tag: str = "poly_mhr") -> None:
    """Merge every results/<tag>.seed*.json into results/<tag>.json with means per method."""
    parts = [json.loads(p.read_text()) for p in sorted(OUT.glob(f"{tag}.seed*.json"))]
    runs = [r for part in parts for r in part["runs"]]
    summary: dict[str, Any] = {}
    for stage, key in (("multitask", "mean_accuracy"), ("few-shot", "dev_accuracy")):
        for method in dict.fromkeys(r["method"] for r in runs if r["stage"] == stage):
            values = [r[key] for r in runs if r["stage"] == stage and r["method"] == method]
            summary[f"{stage}/{method}"] = {"mean": round(statistics.mean(values), 2), "per_seed": values}
    config = {k: v for k, v in parts[0]["config"].items() if k not in ("seeds", "summarise")} if parts else {}
    (OUT / f"{tag}.json").write_text(json.dumps({"config": config, "summary": summary, "runs": runs}, indent=1))
    print(json.dumps(summary, indent=1))
    if any(r.get("curve") for r in runs):
        plot_curves(runs, OUT.parent / f"{tag}_curves.png")


def plot_curves(runs: list[dict[str, Any]], path: Path) -> None:
    """Dev accuracy per epoch, one line per run: the multi-task mean (left) and the few-shot held-out task (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours: dict[str, Any] = {}
    titles = ("multi-task: mean dev accuracy of SST-2 / SUBJ / TREC", f"few-shot on {HELD_OUT.upper()}")
    for ax, stage, title in zip(axes, ("multitask", "few-shot"), titles):
        for run in (r for r in runs if r["stage"] == stage and r.get("curve")):
            colour = colours.setdefault(run["method"], f"C{len(colours)}")
            curve = run["curve"]
            ax.plot(range(1, len(curve) + 1), curve, color=colour, alpha=1.0 if run["seed"] == 0 else 0.55,
                    linestyle="-" if run["seed"] == 0 else "--", label=f"{run['method']} (seed {run['seed']})")
        ax.set(title=title, xlabel="epoch", ylabel="dev accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
