"""Issue 4, part B: 1-bit adapters vs float32 twins, mask tuning, SPLoRA unpruned and pruned to 50 % FFN channels.

    cd benchmarks && PYTHONPATH=../src ADAPTERKIT_NO_PROGRESS=1 python lowbit_pruning.py [--tasks ...] [--seeds ...]
    python lowbit_pruning.py --report      # merge results/lowbit_pruning_<task>_<seed>.json, print the table

Every row trains with tasks.Protocol's setting (all-MiniLM-L6-v2, batch 16, max length 64, AdamW lr 2e-3, 6 %
warmup then linear decay, weight decay 0.01) with the classifier head; --rows/--epochs/--dev-rows shrink it when the
machine cannot afford the default (2,000 rows, 2 epochs, the full dev set); RESULTS.md says what was run. The papers'
own schedules (Bi-LoRA: lr 1e-3, 100 epochs; R-AMT: lr 8e-5, 30 epochs; SPLoRA: 20-50 recovery epochs per step) do
not fit any budget here. Mask tuning adds its L2 regulariser to the loss (its own loop, same optimiser and schedule).
SPLoRA pruned continues from the unpruned run: 5 pruning steps of 10 % of each FFN's intermediate channels, each
followed by --recovery steps of training, then the model is exported physically smaller (channels removed) and
scored as exported. Stored bytes: the saved adapter folder alone (no head). Inference: the pruned export vs the
merged unpruned model (same architecture as the base), batch 32 x 64 tokens, same process, alternating, median.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

import adapterkit as ak
from adapterkit.methods.lowbit import LowBit
from adapterkit.methods.mask_tuning import MaskTuning, mask_regularizer, masked_fraction
from adapterkit.methods.splora import SPLoRA, kept_channels, prune_channels, shrink, sparsity_schedule
from adapterkit.train.loop import accuracy, batches, encode, seed_everything
from tasks import Protocol, load_task, minilm_dir, stored_bytes, subset, train_once, train_steps

RESULTS = Path(__file__).resolve().parent / "results"
PROTOCOL = Protocol()  # replaced from the command line
ROUNDS = 15
RECOVERY = 6  # training steps after each pruning step (--recovery)
LORA = ak.LoRA(r=8, alpha=16)
FFN_NORM = r"re:.*layer\.\d+\.output\.LayerNorm"  # Pfeiffer placement: after each FFN
BOTTLENECK = ak.SeqBottleneck(reduction_factor=16)
ROWS: dict[str, tuple[Any, Any]] = {  # the claims' pairs first: a run cut short still answers them
    "LoRA r=8 float32": (LORA, ["query", "value"]),
    "LoRA r=8 1-bit": (LowBit(LORA, bits=1), ["query", "value"]),
    "SPLoRA r=8 FFN, unpruned": (SPLoRA(r=8), ["intermediate.dense"]),
    "bottleneck rf=16 float32": (BOTTLENECK, [FFN_NORM]),
    "bottleneck rf=16 1-bit": (LowBit(BOTTLENECK, bits=1), [FFN_NORM]),
    "mask tuning (q,k,v,o)": (MaskTuning(), ["query", "key", "value", "attention.output.dense"]),
}


def mask_tuning_run(task: Any, name: str, spec: Any, targets: Any, seed: int) -> dict[str, Any]:
    from adapterkit.cli.commands import load_classifier

    seed_everything(seed)
    model, tokenizer = load_classifier(minilm_dir(), task.num_labels)
    ak.attach(model, name, spec, targets)
    trainable = ak.train_only(model, name, also=["classifier"])
    table = subset(task.train, PROTOCOL.train_rows, seed)
    total = math.ceil(len(table.labels) / PROTOCOL.batch_size) * PROTOCOL.epochs
    seed_everything(seed)
    seconds, _ = train_steps(model, encode(tokenizer, table, PROTOCOL.max_length), seed, total,
                             max(1, int(0.06 * total)), PROTOCOL.lr, PROTOCOL.batch_size,
                             extra=lambda: mask_regularizer(model, name))
    dev = encode(tokenizer, task.dev, PROTOCOL.max_length)
    with tempfile.TemporaryDirectory() as tmp:
        ak.save(model, Path(tmp) / "a", name)
        size = stored_bytes(Path(tmp) / "a")
    return {"dev_accuracy": accuracy(model, dev, 64, 0), "trainable_parameters": trainable, "stored_bytes": size,
            "train_seconds": round(seconds, 1), "masked_fraction": masked_fraction(model, name)}


def merged_copy(model: Any, name: str) -> Any:
    """A plain model with adapter ``name`` folded in (the copy keeps nothing of adapterkit)."""
    plain = copy.deepcopy(model)
    ak.merge(plain, name)
    ak.detach(plain, name, keep_merged=True)
    return plain


def time_forward(models: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Median forward milliseconds of each model, alternating between them each round."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for _ in range(2):
            for model in models.values():
                model(input_ids=ids, attention_mask=mask)
        for _ in range(ROUNDS):
            for key, model in models.items():
                start = time.perf_counter()
                model(input_ids=ids, attention_mask=mask)
                times[key].append(1000 * (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in times.items()}


def export_pruned(model: Any, name: str, dev: Any) -> tuple[Any, dict[str, torch.Tensor], float]:
    """The SPLoRA-adapted ``model`` merged, detached and physically shrunk to its kept channels; returns it, the
    kept-channel masks, and its max |logit gap| to the masked model on 32 dev rows (the export must be exact)."""
    keep = kept_channels(model, name)
    exported = merged_copy(model, name)
    shrink(exported, keep)
    ids, mask, _ = next(batches(dev, 32, list(range(32)), 0))
    with torch.no_grad():
        gap = float((exported(input_ids=ids, attention_mask=mask).logits
                     - model(input_ids=ids, attention_mask=mask).logits).abs().max())
    return exported, keep, gap


def splora_runs(task: Any, seed: int, timing: bool) -> list[dict[str, Any]]:
    """Unpruned SPLoRA (train_once), then the iterative schedule to 50 %, then the physically pruned export."""
    spec, targets = ROWS["SPLoRA r=8 FFN, unpruned"]
    dense = train_once(task, "sp", spec, targets, seed, PROTOCOL)
    model = dense.pop("model")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    schedule = sparsity_schedule(0.5, 0.1)
    table = subset(task.train, PROTOCOL.train_rows, seed + 100)  # the same rows, another order
    total = RECOVERY * len(schedule)
    seed_everything(seed)
    prune_channels(model, "sp", schedule[0])  # then RECOVERY steps after each pruning step

    def prune_next(step: int, _: list[float]) -> None:
        if step < total:
            prune_channels(model, "sp", schedule[step // RECOVERY])

    seconds, _ = train_steps(model, encode(tokenizer, table, PROTOCOL.max_length), seed, total, 1, PROTOCOL.lr,
                             PROTOCOL.batch_size, every=RECOVERY, after=prune_next)
    masked_dev = encode(tokenizer, task.dev, PROTOCOL.max_length)
    with tempfile.TemporaryDirectory() as tmp:
        ak.save(model, Path(tmp) / "a", "sp")
        size = stored_bytes(Path(tmp) / "a")
    exported, keep, gap = export_pruned(model, "sp", masked_dev)
    pruned = {"dev_accuracy": accuracy(exported, masked_dev, 64, 0),
              "trainable_parameters": dense["trainable_parameters"],
              "stored_bytes": size, "train_seconds": round(dense["train_seconds"] + seconds, 1),
              "recovery_seconds": round(seconds, 1), "kept_channels": int(sum(int(k.sum()) for k in keep.values())),
              "total_channels": int(sum(k.numel() for k in keep.values())), "export_max_abs_diff": gap}
    if timing:
        unpruned = merged_copy(all_channels(model), "sp")
        long_ids = torch.randint(1000, 20000, (32, 64), generator=torch.Generator().manual_seed(0))
        ms = time_forward({"unpruned": unpruned, "pruned": exported}, long_ids, torch.ones_like(long_ids))
        pruned["inference_ms"] = ms
        pruned["speedup"] = ms["unpruned"] / ms["pruned"]
        print(f"inference batch 32 x 64: unpruned {ms['unpruned']:.1f} ms, pruned {ms['pruned']:.1f} ms, "
              f"ratio {pruned['speedup']:.2f}x", flush=True)
    return [{**dense, "row": "SPLoRA r=8 FFN, unpruned"}, {**pruned, "row": "SPLoRA r=8 FFN, pruned 50 %"}]


def all_channels(model: Any) -> Any:
    """The same model with every channel kept: the cost of the unpruned architecture."""
    plain = copy.deepcopy(model)
    for path, _ in kept_channels(plain, "sp").items():
        plain.get_submodule(path).adapterkit.adapter("sp").keep.fill_(True)
    return plain


def sizes() -> None:
    """Trainable parameters and stored bytes of every row right after attach: neither depends on training."""
    from adapterkit.cli.commands import load_classifier

    out = {}
    for row, (spec, targets) in ROWS.items():
        model, _ = load_classifier(minilm_dir(), 2)
        ak.attach(model, "a", spec, targets)
        trainable = ak.train_only(model, "a", also=["classifier"])
        with tempfile.TemporaryDirectory() as tmp:
            ak.save(model, Path(tmp) / "a", "a")
            out[row] = {"trainable_parameters": trainable, "stored_bytes": stored_bytes(Path(tmp) / "a")}
        print(row, out[row], flush=True)
    (RESULTS / "lowbit_pruning_sizes.json").write_text(json.dumps(out, indent=1) + "\n")


def report() -> None:
    """Merge results/lowbit_pruning_<task>_<seed>.json into lowbit_pruning.json and print the markdown table."""
    parts = sorted(RESULTS.glob("lowbit_pruning_*_*.json"))
    records = [json.loads(p.read_text()) for p in parts if "smoke" not in p.name]
    runs = [run for record in records for run in record["runs"]]
    merged = {**{k: v for k, v in records[0].items() if k != "runs"}, "runs": runs}
    (RESULTS / "lowbit_pruning.json").write_text(json.dumps(merged, indent=1) + "\n")
    tasks = sorted({r["task"] for r in runs}, key=["sst2", "subj"].index)
    seeds = sorted({r["seed"] for r in runs})
    head = " | ".join(f"{t} s{s}" for t in tasks for s in seeds)
    print(f"| method | trainable | stored bytes | {head} | " + " | ".join(f"{t} mean" for t in tasks) + " | train s |")
    print("|---" * (4 + len(tasks) * (len(seeds) + 1)) + "|")
    for row in [*ROWS, "SPLoRA r=8 FFN, pruned 50 %"]:
        mine = [r for r in runs if r["row"] == row]
        if not mine:
            continue
        acc = {(r["task"], r["seed"]): r["dev_accuracy"] for r in mine}
        cells = [f"{acc[(t, s)]:.1f}" if (t, s) in acc else "-" for t in tasks for s in seeds]
        means = [statistics.mean(v) if (v := [acc[(t, s)] for s in seeds if (t, s) in acc]) else None for t in tasks]
        size = statistics.median(r["stored_bytes"] for r in mine)
        train = statistics.mean(r["train_seconds"] for r in mine)
        print(f"| {row} | {mine[0]['trainable_parameters']:,} | {size:,.0f} | {' | '.join(cells)} | "
              + " | ".join("-" if m is None else f"{m:.2f}" for m in means) + f" | {train:.0f} |")
    for r in runs:
        if "speedup" in r:
            ms = r["inference_ms"]
            print(f"- {r['task']} seed {r['seed']}: unpruned {ms['unpruned']:.0f} ms, pruned {ms['pruned']:.0f} ms, "
                  f"{r['speedup']:.2f}x; kept {r['kept_channels']}/{r['total_channels']} FFN channels; export vs "
                  f"masked max |diff| {r['export_max_abs_diff']:.1e}")


def main() -> None:
    global PROTOCOL, RECOVERY, ROUNDS
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", nargs="+", default=["sst2", "subj"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--rows", type=int, default=PROTOCOL.train_rows, help="training rows per run")
    parser.add_argument("--epochs", type=int, default=PROTOCOL.epochs)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--dev-rows", type=int, default=None, help="score on this many dev rows (a fixed subset)")
    parser.add_argument("--recovery", type=int, default=RECOVERY, help="training steps after each pruning step")
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds (alternating, median)")
    parser.add_argument("--out", default="lowbit_pruning.json", help="file name under benchmarks/results")
    parser.add_argument("--smoke", action="store_true", help="64 training rows, 100 dev rows: checks the script")
    parser.add_argument("--sizes", action="store_true", help="trainable parameters and stored bytes, no training")
    parser.add_argument("--only", nargs="+", default=None, help="run only the rows starting with these words")
    parser.add_argument("--report", action="store_true", help="merge results/lowbit_pruning_*_*.json, print a table")
    args = parser.parse_args()
    if args.report or args.sizes:
        sizes() if args.sizes else report()
        return
    PROTOCOL = Protocol(train_rows=64, epochs=1) if args.smoke else Protocol(train_rows=args.rows, epochs=args.epochs)
    RECOVERY, ROUNDS = args.recovery, args.rounds
    if args.threads:
        torch.set_num_threads(args.threads)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("lowbit_pruning_smoke.json" if args.smoke else args.out)
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        for name in args.tasks:
            task = load_task(name)
            if args.smoke or args.dev_rows:
                task = replace(task, dev=subset(task.dev, 100 if args.smoke else args.dev_rows, 0))
            for row, (spec, targets) in ROWS.items():
                if args.only and not any(row.startswith(word) for word in args.only):
                    continue
                if row.startswith("SPLoRA"):
                    results = splora_runs(task, seed, timing=(seed == args.seeds[0]))
                elif row.startswith("mask"):
                    results = [{**mask_tuning_run(task, "m", spec, targets, seed), "row": row}]
                else:
                    result = train_once(task, "a", spec, targets, seed, PROTOCOL)
                    result.pop("model")
                    results = [{**result, "row": row}]
                for result in results:
                    result.update(task=name, seed=seed)
                    runs.append(result)
                    print(json.dumps({k: v for k, v in result.items() if k != "inference_ms"}), flush=True)
                record = {"protocol": PROTOCOL.__dict__, "recovery_steps": RECOVERY, "dev_rows": args.dev_rows,
                          "timing_rounds": ROUNDS, "runs": runs}
                out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
