"""One table for issue 4 from the two experiment scripts' results (same protocol, same seeds, same dev sets).

    python issue4_table.py      # reads results/sparse_methods.json and results/lowbit_pruning_all_<seed>.json
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("sst2", "subj")
SEEDS = (0, 1)
LABELS = {"lora": "LoRA r=8 q,v float32", "seq_bn": "seq_bn rf=16 (both LayerNorms)",
          "mosa": "MoSA, same size as seq_bn", "lt_sft": "LT-SFT, K = LoRA's size", "adapterbit": "AdapterBit"}


def rows() -> dict[str, dict[tuple[str, int], dict]]:
    """Method label -> (task, seed) -> run record."""
    table: dict[str, dict[tuple[str, int], dict]] = defaultdict(dict)
    sparse = RESULTS / "sparse_methods.json"
    if sparse.exists():
        for key, run in json.loads(sparse.read_text())["runs"].items():
            task, method, seed = key.split("/")
            table[LABELS.get(method, method)][(task, int(seed))] = run
    for seed in SEEDS:
        path = RESULTS / f"lowbit_pruning_all_{seed}.json"
        if path.exists():
            for run in json.loads(path.read_text())["runs"]:
                table[run["row"]][(run["task"], run["seed"])] = run
    return table


def main() -> None:
    print("| method | trainable (with head) | stored bytes (adapter) | SST-2 s0 / s1 | SST-2 mean | SUBJ s0 / s1 "
          "| SUBJ mean | train s (mean) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, runs in rows().items():
        first = next(iter(runs.values()))
        cells = []
        for task in TASKS:
            accs = [runs[(task, s)]["dev_accuracy"] for s in SEEDS if (task, s) in runs]
            shown = " / ".join(f"{runs[(task, s)]['dev_accuracy']:.1f}" if (task, s) in runs else "-" for s in SEEDS)
            cells += [shown, f"{mean(accs):.2f}" if len(accs) == len(SEEDS) else "-"]
        seconds = [r.get("train_seconds", 0.0) for r in runs.values()]
        print(f"| {label} | {first.get('trainable_parameters', 0):,} | {first.get('stored_bytes', 0):,} | "
              f"{' | '.join(cells)} | {mean(seconds):.0f} |")


if __name__ == "__main__":
    main()
