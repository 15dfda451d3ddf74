"""Issue 4, part A: LT-SFT, MoSA and AdapterBit against LoRA and a bottleneck adapter, on SST-2 and SUBJ.

    cd benchmarks && PYTHONPATH=../src ADAPTERKIT_NO_PROGRESS=1 python sparse_methods.py

Every row follows tasks.Protocol (all-MiniLM-L6-v2, seeded 2,000-row subset, 2 epochs, batch 16, max length 64,
AdamW lr 2e-3) except where noted: LT-SFT's phase 1 is a full fine-tune of the target weights for ``--phase1-epochs``
at lr 5e-5 (the paper's lr; 2e-3 is an adapter lr), then its sparse phase follows the protocol. Results are merged
into results/sparse_methods.json after each run, so an interrupted sweep keeps what it measured.

Also measured: LT-SFT composition (a "domain" diff trained on SUBJ, then an SST-2 task diff trained with the domain
diff applied; both applied together) and the inference time of the applied diffs against the base model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _common import minilm_dir
from tasks import Protocol, load_task, stored_bytes, subset, train_once

RESULTS = Path(__file__).resolve().parent / "results" / "sparse_methods.json"
LTSFT_TARGETS = ["query", "key", "value", "dense"]  # every Linear of the encoder (and the pooler)


def specs() -> dict[str, tuple[Any, list[str]]]:
    """Row name -> (spec, targets). Bottleneck hidden 16 on 6 layers (76,128 parameters) is the size closest to
    LoRA r=8 on query/value (73,728); LT-SFT keeps K = 73,728 entries."""
    import adapterkit as ak

    return {
        "lora": (ak.LoRA(r=8, alpha=16), ["query", "value"]),
        "seq_bn": (ak.SeqBottleneck(hidden=16), ["output.LayerNorm"]),
        "mosa": (ak.methods.MoSA(hidden=16, experts=4, split="up"), ["output.LayerNorm"]),
        "lt_sft": (ak.methods.LTSFT(k=73_728), LTSFT_TARGETS),
        # both sub-layer ends (attention and FFN) of each layer
        "adapterbit": (ak.methods.AdapterBit(), ["output.dense"]),
    }


def train_lt_sft(task: Any, name: str, seed: int, protocol: Protocol, phase1_epochs: int,
                 apply_first: Path | None = None, out: Path | None = None) -> dict[str, Any]:
    """LT-SFT under the protocol: lottery_ticket around run_training, phase 1 at lr 5e-5, phase 2 as the protocol.

    ``apply_first``: a saved diff merged into the model before training (the domain diff of the composition run).
    """
    import adapterkit as ak
    from adapterkit.cli.commands import load_classifier
    from adapterkit.methods.lt_sft import lottery_ticket
    from adapterkit.train.loop import TrainConfig, run_training, seed_everything

    seed_everything(seed)
    model, tokenizer = load_classifier(minilm_dir(), task.num_labels)
    if apply_first is not None:
        ak.load(model, apply_first, name="domain")
        ak.merge(model, "domain")
    spec, targets = specs()["lt_sft"]
    ak.attach(model, name, spec, targets)
    ak.train_only(model, name, also=["classifier"])
    train = subset(task.train, protocol.train_rows, seed)
    common = dict(batch_size=protocol.batch_size, max_length=protocol.max_length, seed=seed)
    phases = iter([TrainConfig(epochs=phase1_epochs, lr=5e-5, **common),
                   TrainConfig(epochs=protocol.epochs, lr=protocol.lr, **common)])
    log: list[tuple[dict, float]] = []
    lottery_ticket(model, name, lambda: log.append(run_training(model, tokenizer, train, task.dev, next(phases))))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        folder = out or Path(tmp)
        ak.save(model, folder / name, name)
        size = stored_bytes(folder / name)
    return {"task": task.name, "seed": seed, "dev_accuracy": log[1][0]["dev_accuracy"][-1],
            "phase1_dev_accuracy": log[0][0]["dev_accuracy"][-1], "trainable_parameters": trainable,
            "stored_bytes": size, "train_seconds": round(log[0][1] + log[1][1], 1),
            "phase1_seconds": round(log[0][1], 1), "model": model, "tokenizer": tokenizer}


def _save(results: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


def table(args: argparse.Namespace, results: dict[str, Any]) -> None:
    protocol = Protocol(train_rows=args.rows)
    for task_name in args.tasks:
        task = load_task(task_name)
        for method in args.methods:
            for seed in args.seeds:
                key = f"{task_name}/{method}/{seed}"
                if key in results["runs"]:
                    continue
                if method == "lt_sft":
                    run = train_lt_sft(task, "task", seed, protocol, args.phase1_epochs)
                    run.pop("tokenizer")
                else:
                    spec, targets = specs()[method]
                    run = train_once(task, method, spec, targets, seed, protocol)
                run.pop("model")
                # the head is trained by every row and saved apart; count the adapter alone
                run["adapter_parameters"] = run["trainable_parameters"] - (384 + 1) * task.num_labels
                results["runs"][key] = run
                print(key, {k: v for k, v in run.items() if k not in ("task", "seed")}, flush=True)
                _save(results)


def _median_ms(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@torch.no_grad()
def compose(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Domain diff (SUBJ) + task diff (SST-2, trained with the domain diff applied), applied together."""
    import adapterkit as ak
    from adapterkit.cli.commands import load_classifier
    from adapterkit.train.loop import accuracy, encode

    protocol = Protocol(train_rows=args.rows)
    seed = args.seeds[0]
    sst2 = load_task("sst2")
    with tempfile.TemporaryDirectory() as tmp, torch.enable_grad():
        folder = Path(tmp)
        domain = train_lt_sft(load_task("subj"), "domain", seed, protocol, args.phase1_epochs, out=folder)
        # the domain diff is trained exactly as the table's LT-SFT row on SUBJ: record it as that row too
        run = {k: v for k, v in domain.items() if k not in ("model", "tokenizer")}
        results["runs"][f"subj/lt_sft/{seed}"] = {**run, "adapter_parameters": run["trainable_parameters"] - 2 * 385}
        _save(results)
        task = train_lt_sft(sst2, "task", seed, protocol, args.phase1_epochs, apply_first=folder / "domain")
    model, tokenizer = task["model"], task["tokenizer"]  # domain merged, task attached (unmerged)
    dev = encode(tokenizer, sst2.dev, protocol.max_length)
    pad = tokenizer.pad_token_id or 0
    ids = dev.ids[:32]
    width = max(len(r) for r in ids)
    batch = torch.full((32, width), pad)
    mask = torch.zeros((32, width), dtype=torch.long)
    for row, seq in enumerate(ids):
        batch[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
    model.eval()
    unmerged = model(input_ids=batch, attention_mask=mask).logits
    acc_unmerged = accuracy(model, dev, 32, pad)
    ak.merge(model, "task")  # now theta0 + phi_domain + phi_task in the weights
    merged = model(input_ids=batch, attention_mask=mask).logits
    acc_both = accuracy(model, dev, 32, pad)
    ak.unmerge(model, "domain")  # the task diff alone on the base (it was trained on top of the domain diff)
    acc_task_only = accuracy(model, dev, 32, pad)
    ak.merge(model, "domain")
    base, _ = load_classifier(minilm_dir(), 2)
    base.eval()

    def alternate(models: dict[str, Any]) -> dict[str, float]:
        timings: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(args.rounds):  # alternate, so load from other jobs hits every model alike
            for label, m in models.items():
                timings[label].append(_median_ms(lambda m=m: m(input_ids=batch, attention_mask=mask), 3))
        return {k: round(statistics.median(v), 2) for k, v in timings.items()}

    kept = alternate({"base": base, "applied": model})  # hosts kept: revertible with ak.unmerge
    ak.detach(model, keep_merged=True)  # the bare module tree with both diffs baked into the weights
    baked = alternate({"base": base, "applied": model})
    results["compose"] = {
        "seed": seed, "domain_task": "subj", "task": "sst2",
        "domain_dev_accuracy_subj": domain["dev_accuracy"],
        "sst2_dev_accuracy_task_diff_alone_on_base": acc_task_only,
        "sst2_dev_accuracy_domain_plus_task": acc_both,
        "sst2_dev_accuracy_domain_merged_task_unmerged": acc_unmerged,
        "max_abs_logit_diff_merged_vs_unmerged": float((merged - unmerged).abs().max()),
        "inference_ms_applied_hosts_kept": kept, "ratio_applied_hosts_kept": round(kept["applied"] / kept["base"], 3),
        "inference_ms_applied_detached": baked, "ratio_applied_detached": round(baked["applied"] / baked["base"], 3),
        "inference_batch": [32, width], "rounds": args.rounds,
    }
    print("compose", json.dumps(results["compose"], indent=1), flush=True)
    _save(results)


def markdown(results: dict[str, Any]) -> str:
    """The table of RESULTS.md from the JSON: one row per task and method, seeds as columns."""
    runs = results["runs"]
    lines = ["| task | method | adapter params | stored bytes | dev acc seed 0 | dev acc seed 1 | mean | "
             "train s (per seed) |", "|---|---|---|---|---|---|---|---|"]
    for task in ("sst2", "subj"):
        for method in specs():
            got = [runs.get(f"{task}/{method}/{seed}") for seed in (0, 1)]
            done = [r for r in got if r]
            if not done:
                continue
            accs = [f"{r['dev_accuracy']:.2f}" if r else "-" for r in got]
            mean = statistics.mean(r["dev_accuracy"] for r in done)
            secs = " / ".join(f"{r['train_seconds']:.0f}" for r in done)
            lines.append(f"| {task} | {method} | {done[0]['adapter_parameters']:,} | {done[0]['stored_bytes']:,} | "
                         f"{accs[0]} | {accs[1]} | {mean:.2f} | {secs} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2", "subj"])
    parser.add_argument("--methods", nargs="+", default=list(specs()))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--rows", type=int, default=Protocol().train_rows)
    parser.add_argument("--phase1-epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--skip", nargs="*", default=[], choices=["table", "compose"])
    parser.add_argument("--fresh", action="store_true", help="discard earlier results in the JSON")
    parser.add_argument("--report", action="store_true", help="print the markdown table of the saved results")
    args = parser.parse_args()
    if args.report:
        print(markdown(json.loads(RESULTS.read_text())))
        return
    results: dict[str, Any] = {"runs": {}}
    if RESULTS.exists() and not args.fresh:
        results = json.loads(RESULTS.read_text())
    results["protocol"] = {**Protocol(train_rows=args.rows).__dict__, "lt_sft_phase1_epochs": args.phase1_epochs,
                           "lt_sft_phase1_lr": 5e-5, "torch": torch.__version__,
                           "date": time.strftime("%Y-%m-%d", time.gmtime())}
    if "table" not in args.skip:
        table(args, results)
    if "compose" not in args.skip:
        compose(args, results)


if __name__ == "__main__":
    main()
