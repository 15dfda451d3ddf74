"""Multi-task part of modular_table.py: SST-2 + SUBJ + TREC on all-MiniLM-L6-v2 with one head per task.

Every variant runs through ``MultiTaskClassifier`` (the same pooled-output heads), 1,000 seeded rows per task,
2 epochs, batch 16, lr 2e-3, all adapters Pfeiffer-placed (after each layer's FFN, reduction factor 16):

    per-task adapters   one bottleneck per task, each trained on its own task alone (VL-Adapter's "multiple
                        adapters": with a frozen encoder and per-task heads, training them together is training them
                        apart)
    one adapter         one bottleneck set trained on the mixed tasks (VL-Adapter's "single adapter")
    one adapter, tied   the same, with its weights also tied across the 6 layers (methods/shared.py)
    Hyperformer         one hypernetwork generating every layer's bottleneck from task and layer embeddings
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

TASKS = ("sst2", "subj", "trec")
FFN_NORM = r"re:.*\.layer\.\d+\.output\.LayerNorm"


def variants() -> dict[str, tuple[Callable[[], Any], float | None]]:
    """name -> (spec factory, learning rate; None: the protocol's 2e-3)."""
    import adapterkit as ak

    def hyper() -> Any:
        return ak.methods.Hyperformer(n_tasks=len(TASKS), reduction_factor=16)

    return {"one adapter (all tasks)": (lambda: ak.SeqBottleneck(reduction_factor=16), None),
            "one adapter, tied across layers": (lambda: ak.methods.Shared(ak.SeqBottleneck(reduction_factor=16)),
                                                None),
            "Hyperformer": (hyper, None),
            "Hyperformer @ lr 1e-3 (VL-Adapter's)": (hyper, 1e-3)}


def _train(spec: Any, tasks: dict[str, Any], seed: int, lr: float | None = None) -> dict[str, Any]:
    import adapterkit as ak
    from adapterkit.cli.commands import load_classifier
    from adapterkit.train.loop import TrainConfig, seed_everything
    from adapterkit.train.multitask import MultiTaskClassifier, train_multitask
    from tasks import Protocol, minilm_dir, subset

    protocol = Protocol(train_rows=1000, epochs=2)
    seed_everything(seed)
    classifier, tokenizer = load_classifier(minilm_dir(), 2)
    encoder = classifier.bert
    ak.attach(encoder, "a", spec, [FFN_NORM])
    ak.train_only(encoder, "a")
    adapter = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    model = MultiTaskClassifier(encoder, {t: tasks[t].num_labels for t in tasks})
    data = {t: (subset(tasks[t].train, protocol.train_rows, seed), tasks[t].dev) for t in tasks}
    config = TrainConfig(epochs=protocol.epochs, lr=lr or protocol.lr, batch_size=protocol.batch_size,
                         max_length=protocol.max_length, seed=seed)
    run = train_multitask(model, tokenizer, data, config, desc="multi-task")
    losses = run["history"]["loss"]
    return {"dev_accuracy": {t: round(v, 2) for t, v in run["dev_accuracy"].items()}, "lr": config.lr,
            "adapter_parameters": adapter, "train_seconds": round(run["train_seconds"], 1), "steps": run["steps"],
            "loss_first25": round(sum(losses[:25]) / 25, 4), "loss_last25": round(sum(losses[-25:]) / 25, 4)}


def run_multitask(done: set[str], append: Callable[[dict[str, Any]], None], seeds: tuple[int, ...],
                  take: Callable[[], bool]) -> None:
    import adapterkit as ak
    from tasks import load_task

    tasks = {t: load_task(t) for t in TASKS}
    jobs: list[tuple[str, Callable[[], Any], dict[str, Any], float | None]] = [
        (f"per-task adapter ({t})", lambda: ak.SeqBottleneck(reduction_factor=16), {t: tasks[t]}, None)
        for t in TASKS]
    jobs += [(name, factory, tasks, lr) for name, (factory, lr) in variants().items()]
    for seed in seeds:
        for name, factory, chosen, lr in jobs:
            key = f"multitask/{name}/{seed}"
            if key in done:
                continue
            if not take():
                return
            start = time.perf_counter()
            result = _train(factory(), chosen, seed, lr)
            result.update(key=key, part="multitask", method=name, seed=seed,
                          wall_seconds=round(time.perf_counter() - start, 1))
            append(result)
            print(result, flush=True)
