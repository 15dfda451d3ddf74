"""Continual learning with adapters: sequential fine-tuning (lower bound), joint training (upper bound), LAE, MOS
and EAR on class-incremental streams, 2 seeds, one JSONL record per run (a rerun skips what is done).

Streams: TREC's 6 classes as 3 tasks of 2 and AG News's 4 classes as 2 tasks of 2 on all-MiniLM-L6-v2 (LoRA r=8 on
query/value, mean-pooled features); digits 0-9 as 5 tasks of 2 on EfficientNet-Lite0 (ImageNet weights; LoRA on
the pointwise convolutions); and EAR's shift check (a domain-incremental stream: TREC classes 0/1, more of the
same, then AG News's World/Sports as labels 0/1, a real change of input distribution).

    OMP_NUM_THREADS=1 PYTHONPATH=../src:. python continual_table.py trec|agnews|digits|shift|pet [--limit 1]
    python continual_table.py table           # the tables for RESULTS.md and the plots
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

import adapterkit as ak
from _common import append_record, done_keys, minilm_dir
from adapterkit.train import continual as cl

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "continual.jsonl"
METHODS = ("finetune", "joint", "lae", "mos", "ear")
SEEDS = (0, 1)
DATA_SEED = 12345  # which training rows each stream uses: the same for every method and seed


# Part "pet": the same TREC stream with the papers' other adapter kinds (LAE: adapter and prefix; MOS: adapter).
# The bottleneck is Pfeiffer's (after each FFN's post-norm); the prefix keeps BERT's positions, 10 tokens (LAE's).
PET = {"lae+bottleneck": (ak.SeqBottleneck(reduction_factor=16), [r"re:.*layer\.\d+\.output\.LayerNorm"], 1e-3),
       "lae+prefix": (ak.methods.PrefixTuning(n_tokens=10, positions="kept"), None, 1e-2),
       "mos+bottleneck": (ak.SeqBottleneck(reduction_factor=16), [r"re:.*layer\.\d+\.output\.LayerNorm"], 1e-3)}


def method(name: str, steps_per_task: int) -> cl.ContinualMethod:
    name = name.split("+")[0]
    if name == "lae":  # the paper's 0.9999 spans ~10k steps; here the EMA's time constant is one task's steps
        return cl.LAE(momentum=round(1 - 1 / steps_per_task, 4), freeze_epochs=1)
    if name == "mos":
        return cl.MOS()
    if name == "ear":
        return cl.EAR(candidates=[ak.LoRA(r=4, alpha=8), ak.LoRA(r=8, alpha=16)])
    return {"finetune": cl.FineTune, "joint": cl.Joint}[name]()


def _per_class(texts: list[str], labels: list[int], per_class: int) -> tuple[list[str], list[int]]:
    order = list(range(len(labels)))
    random.Random(DATA_SEED).shuffle(order)
    kept: dict[int, int] = {}
    rows = []
    for i in order:
        if kept.get(labels[i], 0) < per_class:
            kept[labels[i]] = kept.get(labels[i], 0) + 1
            rows.append(i)
    return [texts[i] for i in rows], [labels[i] for i in rows]


def text_backbone() -> cl.TextBackbone:
    from transformers import AutoModel, AutoTokenizer

    return cl.TextBackbone(AutoModel.from_pretrained(minilm_dir()).eval(), AutoTokenizer.from_pretrained(minilm_dir()))


def _agnews(split: str) -> tuple[list[str], list[int]]:
    names = ["World", "Sports", "Business", "Sci/Tech"]
    lines = (HERE / "data" / "ag_news" / f"{split}.tsv").read_text(encoding="utf-8").split("\n")[1:]
    rows = [line.split("\t", 1) for line in lines if line.strip()]
    return [text for _, text in rows], [names.index(label) for label, _ in rows]


def stream_for(part: str, backbone: Any) -> cl.Stream:
    from tasks import load_task

    if part == "trec":
        task = load_task("trec")
        train = backbone.encode(*_per_class(task.train.texts, task.train.labels, 250))
        test = backbone.encode(task.dev.texts, task.dev.labels)
        return cl.Stream.class_incremental(train, test, [[0, 1], [2, 3], [4, 5]],
                                           ["DESC+ENTY", "ABBR+HUM", "LOC+NUM"])
    if part == "agnews":
        train = backbone.encode(*_per_class(*_agnews("train"), 250))
        test = backbone.encode(*_agnews("test"))
        return cl.Stream.class_incremental(train, test, [[0, 1], [2, 3]], ["World+Sports", "Business+Sci/Tech"])
    if part == "shift":
        task = load_task("trec")
        texts, labels = _per_class(task.train.texts, task.train.labels, 500)
        pairs = [(t, y) for t, y in zip(texts, labels) if y in (0, 1)]
        first, second = pairs[0::2], pairs[1::2]
        dev = [(t, y) for t, y in zip(task.dev.texts, task.dev.labels) if y in (0, 1)]
        news = [(t, y) for t, y in zip(*_per_class(*_agnews("train"), 250)) if y in (0, 1)]
        news_test = [(t, y) for t, y in zip(*_agnews("test")) if y in (0, 1)]

        def ex(rows: list[tuple[str, int]]) -> cl.Examples:
            return backbone.encode([t for t, _ in rows], [y for _, y in rows])

        return cl.Stream([cl.Task("TREC 0/1", ex(first), ex(dev[0::2])),
                          cl.Task("TREC 0/1 again", ex(second), ex(dev[1::2])),
                          cl.Task("AG News 0/1", ex(news), ex(news_test))], "domain")
    if part == "digits":
        from vision import digits

        train_x, train_y, test_x, test_y = digits(DIGIT_SIZE)
        return cl.Stream.class_incremental(cl.Examples(train_x, train_y), cl.Examples(test_x, test_y),
                                           [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]])
    raise ValueError(part)


DIGIT_SIZE = 64  # vision_check.py: LoRA on digits 94.7-97.8% at 32-96 px; 64 keeps a 2x2 map at the end


def learner_for(part: str, seed: int, name: str = "") -> tuple[cl.Learner, cl.Stream]:
    if part == "digits":
        from adapterkit.models.efficientnet_lite import POINTWISE, load_efficientnet_lite0

        model = load_efficientnet_lite0().eval()
        backbone: Any = cl.ImageBackbone(model, 1280)
        stream = stream_for(part, backbone)
        config = cl.ContinualConfig(epochs=5, lr=2e-3, head_lr=5e-3, batch_size=32, seed=seed)
        return cl.Learner(backbone, ak.LoRA(r=8, alpha=16), POINTWISE, config), stream
    backbone = text_backbone()
    stream = stream_for("trec" if part == "pet" else part, backbone)
    spec, targets, lr = PET[name] if part == "pet" else (ak.LoRA(r=8, alpha=16), ["query", "value"], 1e-3)
    config = cl.ContinualConfig(epochs=3, lr=lr, head_lr=5e-3, batch_size=16, seed=seed)
    return cl.Learner(backbone, spec, targets, config), stream


def run(part: str, name: str, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    learner, stream = learner_for(part, seed, name)
    steps = -(-len(stream[0].train) // learner.config.batch_size) * learner.config.epochs
    chosen = method(name, steps)
    began = time.perf_counter()
    result = cl.run_stream(chosen, learner, stream)
    return {"key": f"{part}/{name}/{seed}", "part": part, "method": name, "seed": seed,
            "seconds": round(time.perf_counter() - began, 1), "config": chosen.config(),
            "train_rows": [len(t.train) for t in stream.tasks], "test_rows": [len(t.test) for t in stream.tasks],
            "adapters_stored": len(learner.placed), **result.to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["trec", "agnews", "digits", "shift", "pet", "table"])
    parser.add_argument("--limit", type=int, help="stop after this many runs; exit code 3 when none was left")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    if args.part == "table":
        from continual_report import report

        report(RESULTS)
        return
    names = {"shift": ["ear"], "pet": list(PET)}.get(args.part, args.methods.split(","))
    todo = [(n, s) for s in SEEDS for n in names if f"{args.part}/{n}/{s}" not in done_keys(RESULTS)]
    if not todo:
        sys.exit(3)
    for name, seed in todo[:args.limit]:
        record = run(args.part, name, seed)
        append_record(RESULTS, record)
        main_variant = next(iter(record["metrics"]))
        print(json.dumps({"key": record["key"], "seconds": record["seconds"],
                          **{k: round(v, 2) for k, v in record["metrics"][main_variant].items()}}), flush=True)


if __name__ == "__main__":
    main()
