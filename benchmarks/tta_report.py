"""Tables and plots of the test-time adaptation benchmark (tta_table.py) from results/tta.jsonl.

Prints markdown: mean accuracy per method (per seed, mean, first and last round), accuracy per domain in the first
and the last round, and the cost per batch against plain inference; draws tta_stream.png (accuracy along the whole
stream, mean of seeds) and tta_rounds.png (mean accuracy per round).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

NAMES = {"source": "no adaptation", "bn": "BN adaptation", "tent": "Tent, continual", "vida": "ViDA, continual",
         "nhl": "NHL, continual",
         "tent@per_domain": "Tent, reset per domain", "nhl@per_domain": "NHL, reset per domain",
         "nhl_source@per_domain": "NHL with stored BN statistics, reset per domain"}
ORDER = ("source", "bn", "nhl_source@per_domain", "tent@per_domain", "nhl@per_domain", "tent", "nhl", "vida")
MAIN_ROUNDS = 5  # the main table's stream; longer ones are keyed "<method>@<rounds>r"


def load(path: Path) -> dict[str, dict[int, dict[str, Any]]]:
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            reset = row.get("reset", "never")
            key = row["method"] if reset == "never" else f"{row['method']}@{reset}"
            key += "" if row["rounds"] == MAIN_ROUNDS else f"@{row['rounds']}r"
            runs.setdefault(key, {})[row["seed"]] = row
    return runs


def mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def round_means(row: dict[str, Any]) -> list[float]:
    rounds = sorted({s["round"] for s in row["steps"]})
    return [mean([s["accuracy"] for s in row["steps"] if s["round"] == r]) for r in rounds]


def report(path: Path, folder: Path) -> None:
    runs = load(path)
    methods = [m for m in ORDER if m in runs]
    seeds = sorted({s for m in methods for s in runs[m]})
    any_row = next(iter(runs[methods[0]].values()))
    rounds = any_row["rounds"]
    print("Source models (clean test accuracy): "
          + ", ".join(f"seed {s} {runs[methods[0]][s]['source']['clean_test_accuracy']:.1f} %"
                      for s in seeds if s in runs[methods[0]]))
    print()
    print("| method | " + " | ".join(f"seed {s}" for s in seeds) + f" | mean | round 1 | round {rounds} | "
          "last - first |")
    print("|---|" + "---|" * (len(seeds) + 4))
    for m in methods:
        per_seed = {s: mean([st["accuracy"] for st in runs[m][s]["steps"]]) for s in seeds if s in runs[m]}
        by_round = [mean([round_means(runs[m][s])[r] for s in seeds if s in runs[m]]) for r in range(rounds)]
        cells = " | ".join(f"{per_seed[s]:.1f}" if s in per_seed else "-" for s in seeds)
        print(f"| {NAMES[m]} | {cells} | **{mean(list(per_seed.values())):.1f}** | "
              f"{by_round[0]:.1f} | {by_round[-1]:.1f} | {by_round[-1] - by_round[0]:+.1f} |")
    domains = [s["domain"] for s in any_row["steps"] if s["round"] == 0]
    for r, label in ((0, "round 1"), (rounds - 1, f"round {rounds}")):
        print(f"\nAccuracy per domain, {label} (mean of {len(seeds)} seeds):\n")
        print("| method | " + " | ".join(domains) + " |")
        print("|---|" + "---|" * len(domains))
        for m in methods:
            per_domain = []
            for d in domains:
                per_domain.append(mean([st["accuracy"] for s in seeds if s in runs[m] for st in runs[m][s]["steps"]
                                   if st["round"] == r and st["domain"] == d]))
            print(f"| {NAMES[m]} | " + " | ".join(f"{c:.1f}" for c in per_domain) + " |")
    base = mean([runs["source"][s]["seconds_per_batch"] for s in runs.get("source", {})]) if "source" in runs \
        else float("nan")
    print("\nCost per batch of 32 (mean over the stream and the seeds):\n")
    print("| method | ms per batch | x plain inference | wall per run (s) |")
    print("|---|---|---|---|")
    for m in methods:
        ms = mean([runs[m][s]["seconds_per_batch"] for s in runs[m]]) * 1000
        wall = mean([runs[m][s]["wall_seconds"] for s in runs[m]])
        print(f"| {NAMES[m]} | {ms:.0f} | {ms / (base * 1000):.1f} | {wall:.0f} |")
    plot(runs, methods, seeds, folder)
    long_stream(runs, folder)


def long_stream(runs: dict[str, dict[int, dict[str, Any]]], folder: Path) -> None:
    """The longer streams (one seed): mean accuracy per round, and tta_long.png."""
    keys = [k for k in runs if k.endswith("r") and "@" in k]
    if not keys:
        return
    order = [f"{m}@{k.rsplit('@', 1)[1]}" for m in ORDER for k in keys if k.rsplit("@", 1)[0] == m]
    curves = {k: round_means(next(iter(runs[k].values()))) for k in order}
    rounds = max(len(c) for c in curves.values())
    seeds = sorted({s for k in order for s in runs[k]})
    print(f"\nLonger stream: {rounds} rounds, seed {', '.join(map(str, seeds))}; mean accuracy per round:\n")
    print("| method | " + " | ".join(str(r + 1) for r in range(rounds)) + " | last - first |")
    print("|---|" + "---|" * (rounds + 1))
    for k in order:
        c = curves[k]
        print(f"| {NAMES[k.rsplit('@', 1)[0]]} | " + " | ".join(f"{v:.1f}" for v in c) + f" | {c[-1] - c[0]:+.1f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for k in order:
        ax.plot(range(1, len(curves[k]) + 1), curves[k], marker="o", label=NAMES[k.rsplit("@", 1)[0]])
    ax.set_xlabel("round (12 corrupted domains each)")
    ax.set_xticks(range(1, rounds + 1))
    ax.set_ylabel("mean accuracy over the round (%)")
    ax.set_title(f"A longer continual stream ({rounds} rounds, seed {seeds[0]})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "tta_long.png", dpi=110)
    plt.close(fig)


def plot(runs: dict[str, dict[int, dict[str, Any]]], methods: list[str], seeds: list[int], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.8))
    any_row = next(iter(runs[methods[0]].values()))
    steps = any_row["steps"]
    for m in methods:
        curve = [mean([runs[m][s]["steps"][i]["accuracy"] for s in seeds if s in runs[m]])
                 for i in range(len(steps))]
        ax.plot(range(len(steps)), curve, marker=".", label=NAMES[m])
    per_round = len(steps) // any_row["rounds"]
    for r in range(1, any_row["rounds"]):
        ax.axvline(r * per_round - 0.5, color="grey", lw=0.6, ls=":")
    ax.set_xticks(range(0, len(steps), max(1, per_round // 4)))
    ax.set_xticklabels([steps[i]["domain"] for i in range(0, len(steps), max(1, per_round // 4))], rotation=60,
                       fontsize=7, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Continual test-time adaptation on corrupted digits, EfficientNet-Lite0 "
                 f"({any_row['rounds']} rounds, mean of {len(seeds)} seeds)")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.32))
    fig.tight_layout()
    fig.savefig(folder / "tta_stream.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for m in methods:
        ax.plot(range(1, any_row["rounds"] + 1),
                [mean([round_means(runs[m][s])[r] for s in seeds if s in runs[m]]) for r in range(any_row["rounds"])],
                marker="o", label=NAMES[m])
    ax.set_xlabel("round")
    ax.set_xticks(range(1, any_row["rounds"] + 1))
    ax.set_ylabel("mean accuracy over the round's domains (%)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(folder / "tta_rounds.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
