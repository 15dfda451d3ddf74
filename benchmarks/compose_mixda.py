"""MixDA's two-stage recipe vs a single task adapter on all-MiniLM-L6-v2 (issue 3, experiment 5).

Domain: movie reviews. Stage 1 (once, seed 0): one domain adapter (par_bn beside the FFN output projection of
layers 2 and 3 -- the paper adapts layers 7 and 11 of 24; the same depth fractions of 6 layers -- reduction 16 of
the 4d-wide input, GELU, scaling 1) and the MixDA gate (hidden 384 = d: the paper's 768 for d = 1024, scaled down)
train on MR. The paper's knowledge loss is masked-LM cross-entropy on domain text; MiniLM ships no MLM head, so
the knowledge loss here is a classification proxy: MR's sentiment labels through a temporary head. The
old-knowledge loss runs on CoLA's training sentences (general English; their labels are not used).
Stage 2 (seeds 0 and 1): on SST-2, the domain adapter frozen, a Pfeiffer task adapter (seq_bn, reduction 16), the
gate and a fresh head train with Stack(Gate(domain), task); the baseline is the same task adapter alone
(tasks.train_once). Protocol: the shared one (tasks.Protocol) on 1,000 training rows: 2 epochs, batch 16, lr 2e-3,
max length 64; accuracy on the full SST-2 dev set after the last epoch; nothing tuned on it.

    python compose_mixda.py            # stage 1 if missing, then every missing stage-2 / baseline run
    python compose_mixda.py table      # results/compose_mixda.json and the markdown table
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from _common import minilm_dir
from tasks import Protocol, load_task, subset, train_once, with_rows

RESULTS = Path(__file__).resolve().parent / "results"
STAGE_ONE = RESULTS / "mixda_stage1"
RUNS = RESULTS / "compose_mixda_runs"
# The shared protocol on 1,000 rows, full dev set (a first run used 500 rows, max length 40 and 500 dev rows)
PROTOCOL = with_rows(Protocol(), 1000)
DEV_ROWS, DEV_SEED = None, 12345  # None: the whole dev set, the same for every method and seed


def task_for(name: str) -> Any:
    """The task with its fixed dev subset."""
    task = load_task(name)
    return replace(task, dev=subset(task.dev, DEV_ROWS, DEV_SEED))
LAYERS = (2, 3)
FFN_OUT = [rf"re:.*layer\.({'|'.join(map(str, LAYERS))})\.output\.dense"]
SUBLAYERS = [f"bert.encoder.layer.{i}.output" for i in LAYERS]
PFEIFFER = [r"re:.*layer\.\d+\.output\.LayerNorm"]
SEEDS = (0, 1)


def config(seed: int) -> Any:
    from adapterkit.train.loop import TrainConfig

    return TrainConfig(epochs=PROTOCOL.epochs, lr=PROTOCOL.lr, batch_size=PROTOCOL.batch_size,
                       max_length=PROTOCOL.max_length, seed=seed)


def stage_one() -> None:
    """Domain adapter + gate on MR (classification proxy) with the old-knowledge loss on CoLA sentences."""
    import adapterkit as ak
    from adapterkit.cli.commands import load_classifier
    from adapterkit.train.loop import seed_everything
    from adapterkit.train.mixda import train_domain

    if (STAGE_ONE / "gate" / "adapter.json").is_file():
        return
    seed_everything(0)
    domain, old = task_for("mr"), task_for("cola")
    model, tokenizer = load_classifier(minilm_dir(), domain.num_labels)
    ak.attach(model, "movies", ak.ParBottleneck(reduction_factor=16, scaling=1.0, activation="gelu"), FFN_OUT)
    ak.attach(model, "gate", ak.compose.MixDA(domains=1, hidden=384), FFN_OUT)
    result = train_domain(model, tokenizer, ["movies"], "gate", subset(domain.train, PROTOCOL.train_rows, 0),
                          subset(old.train, PROTOCOL.train_rows, 0), SUBLAYERS, config(0))
    ak.save(model, STAGE_ONE / "movies", "movies")
    ak.save(model, STAGE_ONE / "gate", "gate")
    history = result.pop("history")
    result["first_last_losses"] = {k: [round(v[0], 4), round(v[-1], 4)] for k, v in history.items()}
    print(json.dumps(result), flush=True)
    (STAGE_ONE / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")


def stage_two(seed: int) -> dict[str, Any]:
    import adapterkit as ak
    from adapterkit.cli.commands import load_classifier
    from adapterkit.train.loop import seed_everything
    from adapterkit.train.mixda import train_task

    task = task_for("sst2")
    seed_everything(seed)
    model, tokenizer = load_classifier(minilm_dir(), task.num_labels)
    ak.load(model, STAGE_ONE / "movies")
    ak.load(model, STAGE_ONE / "gate")
    ak.attach(model, "task", ak.SeqBottleneck(reduction_factor=16), PFEIFFER)
    result = train_task(model, tokenizer, ["movies"], "gate", "task", subset(task.train, PROTOCOL.train_rows, seed),
                        task.dev, config(seed))
    result.pop("history")
    return {"method": "mixda", "seed": seed, **result}


def baseline(seed: int) -> dict[str, Any]:
    import adapterkit as ak

    result = train_once(task_for("sst2"), "task", ak.SeqBottleneck(reduction_factor=16), PFEIFFER, seed, PROTOCOL)
    result.pop("model")
    return {"method": "single_adapter", **result}


def main(methods: list[str]) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    for item in methods:  # "method" (every seed) or "method-seed"
        method, _, only = item.partition("-")
        for seed in [int(only)] if only else SEEDS:
            file = RUNS / f"{method}-{seed}.json"
            if file.is_file():
                continue
            if method == "mixda":
                stage_one()
            row = stage_two(seed) if method == "mixda" else baseline(seed)
            print(json.dumps(row), flush=True)
            file.write_text(json.dumps(row, indent=1) + "\n")


def table() -> None:
    rows = [json.loads(f.read_text()) for f in sorted(RUNS.glob("*.json"))]
    stage = json.loads((STAGE_ONE / "metrics.json").read_text()) if (STAGE_ONE / "metrics.json").is_file() else {}
    record = {"protocol": {**PROTOCOL.__dict__, "domain": "mr (classification proxy)", "old": "cola sentences",
                           "task": "sst2", "layers": list(LAYERS)},
              "stage_one": stage, "machine": "2-core CPU dev machine shared with other jobs", "runs": rows}
    (RESULTS / "compose_mixda.json").write_text(json.dumps(record, indent=1) + "\n")
    print("| method | trainable in stage 2 (incl. head) | SST-2 dev acc, seed 0 / 1 | mean |")
    print("|---|---|---|---|")
    for method in ("single_adapter", "mixda"):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seed"])
        if mine:
            accs = [r["dev_accuracy"] for r in mine]
            print(f"| {method} | {mine[0]['trainable_parameters']:,} | {' / '.join(f'{a:.1f}' for a in accs)} | "
                  f"{sum(accs) / len(accs):.2f} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1:] == ["table"]:
        table()
    else:
        main(sys.argv[1:] or ["single_adapter", "mixda"])
