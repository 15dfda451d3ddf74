"""The low-rank family on real data at (about) LoRA's trainable-parameter budget, 2 seeds (issue 13).

Part ``minilm``: all-MiniLM-L6-v2 on SST-2, SUBJ and TREC dev, the shared protocol of benchmarks/tasks.py (1,000
seeded training rows, 2 epochs, batch 16, lr 2e-3, nothing tuned on these dev sets). Every method sits on query and
value except SNNK and its bottleneck twin (both on each attention-output and FFN-output dense, SNNK's placement).
Part ``smollm2``: SmolLM2-135M-Instruct, SST-2 as generative classification (benchmarks/gen_classify.py's recipe:
r=16 on all seven projections, 600 rows, one epoch, lr 5e-4), reporting dev accuracy on 256 rows, the task's
held-out SFT loss, and the base model's own ability before vs after: its loss on 96 held-out Alpaca Libre answers
(general instructions, never trained on) -- how much each init forgets.

CorDA calibration: IPM on 256 rows of the task's own training data; KPM on 256 Alpaca Libre conversations
(general text, disjoint from the 96 held out for the forgetting measure): the knowledge to keep.

Every finished run is appended to results/lowrank_table.jsonl (keyed part/task/method/seed) and skipped on a
rerun, so the work can be split over two processes and resumed:

    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src:. python lowrank_table.py minilm --worker 0/2
    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src:. python lowrank_table.py minilm --worker 1/2
    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src:. python lowrank_table.py smollm2
    cd benchmarks && PYTHONPATH=../src:. python lowrank_table.py table          # the markdown tables
    cd benchmarks && PYTHONPATH=../src:. python lowrank_table.py plot           # lowrank_init_loss.png
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (offline hub)
from _common import append_record, done_keys

RESULTS = Path(__file__).resolve().parent / "results" / "lowrank_table.jsonl"
QV = ["query", "value"]
DENSE = ["output.dense"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEEDS = (0, 1)
CALIBRATION_ROWS = 256
STEPS = 126  # MiniLM: 1,000 rows / batch 16 = 63 steps an epoch, 2 epochs


def _adalora(r: int, target: int, total: int) -> Any:
    from adapterkit.core.registry import spec_from_dict

    return spec_from_dict({"method": "adalora", "init_r": r, "target_r": target, "tinit": total // 10,
                           "tfinal": total // 4, "deltaT": 5, "total_step": total})


def minilm_methods() -> dict[str, tuple[Any, list[str], dict[str, Any], str | None]]:
    """name -> (spec, targets, extra TrainConfig fields, CorDA calibration: None, "task" or "general")."""
    import adapterkit as ak
    from adapterkit.methods.hydra import Hydra
    from adapterkit.methods.loha import LoHa
    from adapterkit.methods.lokr import LoKr
    from adapterkit.methods.oft import OFT
    from adapterkit.methods.snnk import SNNK
    from adapterkit.methods.vera import VeRA

    return {
        "LoRA r=8": (ak.LoRA(r=8, alpha=16), QV, {}, None),
        "LoRA+ r=8 (ratio 16)": (ak.LoRA(r=8, alpha=16), QV, {"lora_plus_ratio": 16.0}, None),
        "PiSSA r=8": (ak.LoRA(r=8, alpha=16, init="pissa"), QV, {}, None),
        "OLoRA r=8": (ak.LoRA(r=8, alpha=16, init="olora"), QV, {}, None),
        "CorDA IPM r=8": (ak.LoRA(r=8, alpha=16, init="corda_ipm"), QV, {}, "task"),
        "CorDA KPM r=8": (ak.LoRA(r=8, alpha=16, init="corda_kpm"), QV, {}, "general"),
        "AdaLoRA 12->8": (lambda: _adalora(12, 8, STEPS), QV, {}, None),
        "VeRA r=256": (VeRA(r=256), QV, {}, None),
        "LoHa r=4": (LoHa(r=4, alpha=8), QV, {}, None),
        "LoKr r=8": (LoKr(r=8, alpha=8), QV, {}, None),
        "OFT block 32": (OFT(block_size=32), QV, {}, None),
        "Hydra 4+4": (Hydra(r_par=4, r_seq=4), QV, {}, None),
        "SNNK m=16": (SNNK(features=16), DENSE, {}, None),
        "bottleneck rf=16 (SNNK's place)": (ak.SeqBottleneck(reduction_factor=16), DENSE, {}, None),
    }


def _done() -> set[str]:
    return done_keys(RESULTS)


def _append(record: dict[str, Any]) -> None:
    append_record(RESULTS, record)


def _general(tokenizer: Any, chat: bool, model_config: Any = None) -> tuple[list[list[int]], Any]:
    """General text: (token ids of 256 calibration conversations, 96 held-out conversations rendered for a loss)."""
    from adapterkit.train.sft_data import read_conversations, render, shipped_alpaca

    convs = read_conversations(shipped_alpaca())
    calib, held = convs[:CALIBRATION_ROWS], convs[-96:]
    if not chat:  # MiniLM: the instruction and its answer as plain text
        texts = [" ".join(m["content"] for m in c.messages) for c in calib]
        return tokenizer(texts, truncation=True, max_length=64)["input_ids"], None
    return render(tokenizer, calib, 256, model_config).ids, render(tokenizer, held, 256, model_config)


def _calibrator(kind: str | None, targets: list[str], task_ids: Any, chat: bool) -> Any:
    if kind is None:
        return None

    def prepare(model: Any, tokenizer: Any) -> None:
        from adapterkit.train.calibrate import calibrate_corda, id_batches

        ids = task_ids(tokenizer) if kind == "task" else _general(tokenizer, chat, model.config)[0]
        calibrate_corda(model, id_batches(ids, tokenizer.pad_token_id or 0, rows=CALIBRATION_ROWS), targets,
                        progress=False)
    return prepare


def run_minilm(worker: int, workers: int, only: list[str] | None, lr: float | None = None,
               tasks: tuple[str, ...] = ("sst2", "subj", "trec")) -> None:
    from adapterkit.train.loop import encode
    from tasks import Protocol, load_task, subset, train_once

    protocol = Protocol(train_rows=1000, epochs=2)
    jobs = [(task, name, seed) for task in tasks for name in minilm_methods()
            for seed in SEEDS if not only or name in only]
    done = _done()
    for index, (task_name, name, seed) in enumerate(jobs):
        label = name if lr is None else f"{name} @ lr {lr:g}"
        key = f"minilm/{task_name}/{label}/{seed}"
        if index % workers != worker or key in done:
            continue
        spec, targets, fields, calibration = minilm_methods()[name]
        try:
            spec = spec() if callable(spec) else spec
        except Exception as exc:  # noqa: BLE001  (a method not landed yet: say so, go on)
            print(f"skip {key}: {exc}", flush=True)
            continue
        task = load_task(task_name)
        rows = subset(task.train, protocol.train_rows, seed)
        prepare = _calibrator(calibration, targets, lambda tok, rows=rows: encode(tok, rows, 64).ids, chat=False)
        result = train_once(task, "m", spec, targets, seed, protocol, lr=lr, config_fields=fields, prepare=prepare)
        result.pop("model")
        losses = result.pop("loss_history")
        result.update(key=key, part="minilm", method=label, loss_first25=round(statistics.mean(losses[:25]), 4),
                      loss_last25=round(statistics.mean(losses[-25:]), 4),
                      loss_curve=[round(v, 4) for v in losses])
        _append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "loss_curve"}), flush=True)


def smollm2_methods() -> dict[str, tuple[Any, str | None]]:
    import adapterkit as ak

    return {"LoRA r=16": (ak.LoRA(r=16, alpha=32), None),
            "PiSSA r=16": (ak.LoRA(r=16, alpha=32, init="pissa"), None),
            "CorDA IPM r=16": (ak.LoRA(r=16, alpha=32, init="corda_ipm"), "task"),
            "CorDA KPM r=16": (ak.LoRA(r=16, alpha=32, init="corda_kpm"), "general")}


def _general_loss(model: Any, held: Any, pad_id: int) -> float:
    from adapterkit.train.sft import dev_loss

    return round(dev_loss(model, held, 16, pad_id)["loss"], 4)


def run_smollm2(only: list[str] | None, rows: int, dev_rows: int, lr: float | None = None) -> None:
    import adapterkit as ak
    from adapterkit.models import load_pretrained
    from adapterkit.train import gen_classify
    from adapterkit.train.loop import seed_everything
    from adapterkit.train.sft import SFTConfig, dev_loss, run_sft
    from adapterkit.train.sft_data import render
    from gen_classify import _tables

    done = _done()
    if "smollm2/sst2/base/0" not in done and (not only or "base" in only):  # the zero-shot base: accuracy,
        # the task's loss and the general loss
        model, tok = load_pretrained("smollm2", task="causal-lm")
        train_table, dev_table, labels = _tables(rows, dev_rows, 0)
        task = gen_classify.Task(gen_classify.DEFAULT_PROMPT, gen_classify.label_words(labels, None))
        dev = render(tok, gen_classify.conversations(task, dev_table, "dev"), 160, model.config)
        held = _general(tok, True, model.config)[1]
        scores = gen_classify.evaluate(model, tok, task, dev_table, batch_size=32)
        record = {"key": "smollm2/sst2/base/0", "part": "smollm2", "method": "base (zero-shot)", "seed": 0,
                  "accuracy": round(scores["accuracy"], 2),
                  "task_loss": round(dev_loss(model, dev, 16, tok.pad_token_id or 0)["loss"], 4),
                  "general_loss": _general_loss(model, held, tok.pad_token_id or 0)}
        _append(record)
        print(json.dumps(record), flush=True)
    for name, (spec, calibration) in smollm2_methods().items():
        label = name if lr is None else f"{name} @ lr {lr:g}"
        for seed in SEEDS if lr is None else SEEDS[:1]:
            key = f"smollm2/sst2/{label}/{seed}"
            if (only and name not in only) or key in done:
                continue
            seed_everything(seed)
            model, tok = load_pretrained("smollm2", task="causal-lm")
            pad = tok.pad_token_id or 0
            train_table, dev_table, labels = _tables(rows, dev_rows, seed)
            task = gen_classify.Task(gen_classify.DEFAULT_PROMPT, gen_classify.label_words(labels, None))
            train = render(tok, gen_classify.conversations(task, train_table, "train"), 160, model.config)
            dev = render(tok, gen_classify.conversations(task, dev_table, "dev"), 160, model.config)
            held = _general(tok, True, model.config)[1]
            start = time.perf_counter()
            prepare = _calibrator(calibration, PROJECTIONS, lambda _tok, train=train: train.ids, chat=True)
            if prepare is not None:
                prepare(model, tok)
            ak.attach(model, "t", spec, PROJECTIONS)
            ak.train_only(model, "t")
            setup = time.perf_counter() - start
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            one_row = type(dev)(dev.ids[:1], dev.labels[:1], dev.where[:1])  # run_sft's per-epoch loss: negligible
            config = SFTConfig(epochs=1, lr=lr or 5e-4, batch_size=16, max_length=160, seed=seed, samples=0)
            trained = run_sft(model, tok, train, one_row, config)
            losses = trained["history"]["loss"]
            scores = gen_classify.evaluate(model, tok, task, dev_table, batch_size=32)
            with tempfile.TemporaryDirectory() as tmp:
                ak.save(model, Path(tmp) / "a", "t")
                stored = sum(f.stat().st_size for f in (Path(tmp) / "a").rglob("*") if f.is_file())
            record = {"key": key, "part": "smollm2", "method": label, "seed": seed, "trainable_parameters": trainable,
                      "stored_bytes": stored, "init_seconds": round(setup, 1),
                      "train_seconds": round(trained["seconds"], 1), "steps": len(losses),
                      "loss_first10": round(statistics.mean(losses[:10]), 4),
                      "loss_last10": round(statistics.mean(losses[-10:]), 4),
                      "accuracy": round(scores["accuracy"], 2),
                      "task_loss": round(dev_loss(model, dev, 16, pad)["loss"], 4),
                      "general_loss": _general_loss(model, held, pad), "loss_curve": [round(v, 4) for v in losses]}
            _append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "loss_curve"}), flush=True)


def table() -> None:
    runs = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    by: dict[tuple[str, str], dict[tuple[str, int], dict]] = {}
    for r in runs:
        task = r["key"].split("/")[1]
        by.setdefault((r["part"], r["method"]), {})[(task, r["seed"])] = r
    print("| method | trainable (with head) | stored bytes | SST-2 s0 / s1 | SUBJ s0 / s1 | TREC s0 / s1 | mean | "
          "loss steps 1-25 / 102-126 (SST-2) | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (part, method), cells in by.items():
        if part != "minilm":
            continue
        first = next(iter(cells.values()))
        shown, means = [], []
        for task in ("sst2", "subj", "trec"):
            accs = [cells[(task, s)]["dev_accuracy"] for s in SEEDS if (task, s) in cells]
            shown.append(" / ".join(f"{a:.1f}" for a in accs) or "-")
            means += accs
        sst = [cells[("sst2", s)] for s in SEEDS if ("sst2", s) in cells]
        loss = (f"{statistics.mean(c['loss_first25'] for c in sst):.3f} / "
                f"{statistics.mean(c['loss_last25'] for c in sst):.3f}") if sst else "-"
        seconds = statistics.mean(c["train_seconds"] for c in cells.values())
        print(f"| {method} | {first['trainable_parameters']:,} | {first['stored_bytes']:,} | {' | '.join(shown)} | "
              f"{statistics.mean(means):.2f} | {loss} | {seconds:.0f} |")
    print("\n| SmolLM2 method | trainable | accuracy s0 / s1 | task dev loss | general loss (base -> after) | "
          "loss steps 1-10 / last 10 | init s | train s |")
    print("|---|---|---|---|---|---|---|---|")
    base = by.get(("smollm2", "base (zero-shot)"), {}).get(("sst2", 0))
    for (part, method), cells in by.items():
        if part != "smollm2":
            continue
        runs_ = list(cells.values())
        accs = " / ".join(f"{r['accuracy']:.2f}" for r in runs_)
        general = statistics.mean(r["general_loss"] for r in runs_)
        shift = f"{general:.4f}"
        if base and method != base["method"]:
            shift = f"{base['general_loss']:.4f} -> {general:.4f}"
        curve = (f"{statistics.mean(r['loss_first10'] for r in runs_):.3f} / "
                 f"{statistics.mean(r['loss_last10'] for r in runs_):.3f}") if "loss_first10" in runs_[0] else "-"
        print(f"| {method} | {runs_[0].get('trainable_parameters', 0):,} | {accs} | "
              f"{statistics.mean(r['task_loss'] for r in runs_):.4f} | {shift} | {curve} | "
              f"{statistics.mean(r.get('init_seconds', 0) for r in runs_):.1f} | "
              f"{statistics.mean(r.get('train_seconds', 0) for r in runs_):.0f} |")


INITS = ("LoRA r=8", "PiSSA r=8", "OLoRA r=8", "CorDA IPM r=8", "CorDA KPM r=8")


def plot(out: Path) -> None:
    """Training loss per step (mean of the seeds, 10-step moving average) of LoRA and the inits from the base
    weight, one panel per MiniLM task: the "converges faster" claims as curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(line) for line in RESULTS.read_text().splitlines() if '"minilm"' in line]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, task in zip(axes, ("sst2", "subj", "trec"), strict=True):
        for method in INITS:
            curves = [r["loss_curve"] for r in runs if r["method"] == method and r["task"] == task]
            if not curves:
                continue
            mean = [statistics.mean(v) for v in zip(*curves, strict=True)]
            smooth = [statistics.mean(mean[max(0, i - 9):i + 1]) for i in range(len(mean))]
            axis.plot(range(1, len(smooth) + 1), smooth, label=method)
        axis.set_title(f"MiniLM {task.upper()}: train loss (2 seeds, 10-step mean)")
        axis.set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["minilm", "smollm2", "table", "plot"])
    parser.add_argument("--worker", default="0/1", help="I/N: run every N-th job starting at I (default 0/1)")
    parser.add_argument("--only", nargs="+", default=None, metavar="METHOD",
                        help="these method names only (smollm2: 'base' for the zero-shot row)")
    parser.add_argument("--lr", type=float, default=None, help="another learning rate than the protocol's (minilm "
                        "2e-3, smollm2 5e-4; rows are labelled with it; smollm2: seed 0 only)")
    parser.add_argument("--tasks", nargs="+", default=["sst2", "subj", "trec"], help="minilm: these tasks")
    parser.add_argument("--rows", type=int, default=600, help="SmolLM2 training rows (default 600)")
    parser.add_argument("--dev-rows", type=int, default=256, help="SmolLM2 dev rows (default 256)")
    parser.add_argument("--results", default=None, help="JSONL of runs (default results/lowrank_table.jsonl)")
    args = parser.parse_args()
    if args.results:
        RESULTS = Path(args.results)
    random.seed(0)
    if args.part == "minilm":
        worker, workers = map(int, args.worker.split("/"))
        run_minilm(worker, workers, args.only, args.lr, tuple(args.tasks))
    elif args.part == "smollm2":
        run_smollm2(args.only, args.rows, args.dev_rows, args.lr)
    elif args.part == "plot":
        plot(Path(__file__).resolve().parent / "lowrank_init_loss.png")
    else:
        table()


if __name__ == "__main__":
    main()
