"""QLoRA on real data: LoRA on the float32 base vs LoRA on a 4-bit NF4 base (``TrainConfig.quantize``).

all-MiniLM-L6-v2 on SST-2 under the shared protocol (``tasks.Protocol``: batch 16, lr 2e-3, 2 epochs, max length
64; ``--rows`` seeded training rows, full dev set), LoRA r=8 on query/value plus the classifier head. Each run is
its own process (peak RSS per run). Reported: dev accuracy, the base model's stored bytes (its Linear layers in 4
bits, embeddings and head in float32) and the median training step.

    cd benchmarks && PYTHONPATH=../src python qlora.py --seeds 0 1 --json results/qlora.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {"LoRA, float32 base": None, "QLoRA, NF4 base": "nf4"}


def one(quantize: str | None, seed: int, rows: int) -> dict:
    import torch

    import adapterkit as ak
    from _common import minilm_dir, peak_rss_mb
    from adapterkit.cli.commands import load_classifier
    from adapterkit.inject.quantize import parameter_bytes
    from adapterkit.train.loop import TrainConfig, fit, seed_everything
    from tasks import Protocol, load_task, subset

    torch.set_num_threads(1)
    task, protocol = load_task("sst2"), Protocol()
    seed_everything(seed)
    model, tokenizer = load_classifier(minilm_dir(), task.num_labels)
    config = TrainConfig(epochs=protocol.epochs, lr=protocol.lr, batch_size=protocol.batch_size,
                         max_length=protocol.max_length, seed=seed, quantize=quantize)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = fit(model, tokenizer, "sst2", ak.LoRA(r=8, alpha=16), ["query", "value"],
                      subset(task.train, rows, seed), task.dev, config, Path(tmp) / "run")
    stored, logical = parameter_bytes(model)
    adapter = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".adapterkit." in n)
    steps = metrics["steps"]
    return {"seed": seed, "dev_accuracy": metrics["dev_accuracy"], "steps": steps,
            "ms_per_step": round(1000 * metrics["train_seconds"] / max(steps, 1), 1),
            "base_bytes": stored - adapter, "base_float32_bytes": logical - adapter,
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", nargs=2, metavar=("QUANTIZE", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        quantize = None if args.one[0] == "none" else args.one[0]
        print(json.dumps(one(quantize, int(args.one[1]), args.rows)))
        return
    results: dict[str, list[dict]] = {}
    for label, quantize in VARIANTS.items():
        for seed in args.seeds:
            run = subprocess.run([sys.executable, __file__, "--one", quantize or "none", str(seed),
                                  "--rows", str(args.rows)], capture_output=True, text=True, check=True)
            results.setdefault(label, []).append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(label, results[label][-1], flush=True)
    print("\n| base | base model bytes | dev acc per seed | mean | ms / step | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for label, runs in results.items():
        accs = [r["dev_accuracy"] for r in runs]
        print(f"| {label} | {runs[0]['base_bytes']:,} (float32: {runs[0]['base_float32_bytes']:,}) | "
              f"{' / '.join(f'{a:.2f}' for a in accs)} | {statistics.mean(accs):.2f} | "
              f"{statistics.median(r['ms_per_step'] for r in runs):.0f} | "
              f"{max(r['peak_rss_mb'] for r in runs):.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
