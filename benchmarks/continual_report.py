"""Tables (markdown, for RESULTS.md) and plots of benchmarks/results/continual.jsonl: per stream and method, final
and average incremental accuracy, forgetting, parameters, memory and time per seed; EAR's growth decisions; the
mean-accuracy curves and the accuracy matrices (seed 0)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from adapterkit.train.continual import plot_curves

HERE = Path(__file__).resolve().parent
ORDER = ("finetune", "joint", "lae", "mos", "ear", "lae+bottleneck", "lae+prefix", "mos+bottleneck")
LABEL = {"finetune": "sequential fine-tuning (lower bound)", "joint": "joint on all tasks so far (upper bound)",
         "lae": "LAE", "mos": "MOS", "ear": "EAR", "lae+bottleneck": "LAE, bottleneck adapter",
         "lae+prefix": "LAE, prefix tuning", "mos+bottleneck": "MOS, bottleneck adapter"}


def _cells(runs: list[dict[str, Any]], variant: str, metric: str) -> str:
    values = [r["metrics"][variant][metric] for r in runs]
    return " / ".join(f"{v:.1f}" for v in values) + (f" (**{mean(values):.1f}**)" if len(values) > 1 else "")


def _matrices(part: str, runs: dict[str, list[dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shown = [m for m in ORDER if m in runs]
    fig, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown) + 1, 2.9))
    for ax, name in zip(np.atleast_1d(axes), shown):
        record = runs[name][0]
        matrix = record["matrices"][next(iter(record["matrices"]))]
        n = len(record["task_names"])
        grid = np.full((n, n), np.nan)
        for i, row in enumerate(matrix):
            grid[i, :len(row)] = row
        ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if v < 60 else "black")
        ax.set_title(f"{name} (seed {record['seed']})", fontsize=9)
        ax.set_xticks(range(n), [str(j + 1) for j in range(n)], fontsize=7)
        ax.set_yticks(range(n), [str(i + 1) for i in range(n)], fontsize=7)
        ax.set_xlabel("tested on task", fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("after task", fontsize=8)
    fig.suptitle(f"{part}: accuracy matrices (%)", fontsize=10)
    fig.tight_layout()
    fig.savefig(HERE / f"continual_{part}_matrices.png", dpi=110)
    plt.close(fig)


def _decision(event: dict[str, Any]) -> str:
    if not event["grew"]:
        return f"kept adaptor {event['adaptor']}"
    why = "first task" if "auroc" not in event else event.get("grew_for", "detector")
    return f"grew adaptor {event['adaptor']} ({why}; {event.get('spec', '')})"


def report(path: Path) -> None:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    parts: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        parts[r["part"]][r["key"].split("/")[1]].append(r)  # the run's name ("lae+prefix"), not the method's
    for part, runs in parts.items():
        for name in runs:
            runs[name].sort(key=lambda r: r["seed"])
        first = next(iter(runs.values()))[0]
        print(f"\n### {part}: {len(first['task_names'])} tasks ({', '.join(first['task_names'])}); train rows "
              f"{first['train_rows']}, test rows {first['test_rows']}\n")
        print("| method | prediction | final acc | avg incremental acc | forgetting | trained params | stored "
              "beyond adapters | adapters kept | s / run |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in [m for m in ORDER if m in runs]:
            rs = runs[name]
            for k, variant in enumerate(rs[0]["matrices"]):
                label = LABEL[name] if k == 0 else ""
                memory = f"{rs[0]['memory_bytes'] / 1024:.0f} KiB" if k == 0 and rs[0]["memory_bytes"] else ""
                cost = [f"{rs[0]['trainable_params']:,}", memory, str(rs[0]["adapters_stored"]),
                        " / ".join(f"{r['seconds']:.0f}" for r in rs)] if k == 0 else ["", "", "", ""]
                print(f"| {label} | {'-' if variant == 'default' else variant} | {_cells(rs, variant, 'final')} | "
                      f"{_cells(rs, variant, 'average_incremental')} | {_cells(rs, variant, 'forgetting')} | "
                      f"{' | '.join(cost)} |")
        if "ear" in runs:
            print("\nEAR's decisions per task (what grew an adaptor; the detector's out-of-distribution fraction of "
                  "the task's training rows and its AUROC, new task vs earlier tasks' test rows; routing accuracy "
                  "over the tasks seen; the zero-cost proxy's choice: candidate 0 = LoRA r=4, 1 = LoRA r=8):\n")
            for r in runs["ear"]:
                steps = [f"{e['task']}: {_decision(e)}"
                         + (f" (ood {e['ood_fraction']:.2f}, AUROC {e['auroc']:.3f})" if "auroc" in e else "")
                         + f", routing {e['routing_accuracy']:.0f}%" for e in r["events"]]
                print(f"- seed {r['seed']}: " + "; ".join(steps))
        curves = {}
        for name in [m for m in ORDER if m in runs]:
            mats = [r["matrices"][next(iter(r["matrices"]))] for r in runs[name]]
            curves[name] = [[mean(m[i][j] for m in mats) for j in range(len(mats[0][i]))] for i in range(len(mats[0]))]
        plot_curves(curves, HERE / f"continual_{part}.png", f"{part}: mean accuracy on the tasks seen (mean of seeds)")
        _matrices(part, runs)
