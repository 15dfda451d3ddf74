"""Continual-learning metrics over the accuracy matrix, and its plot.

``matrix[i][j]`` is the accuracy (percent) on task j's test set after learning tasks 0..i (j <= i): row i is the
evaluation after task i, so the matrix is lower-triangular. The metrics are the standard ones (Chaudhry et al.
2018 for forgetting; Lopez-Paz & Ranzato 2017 for backward transfer; Rebuffi et al. 2017 for the average
incremental accuracy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

Matrix = list[list[float]]


def final_average(matrix: Matrix) -> float:
    """Mean accuracy over all tasks after the last one."""
    return sum(matrix[-1]) / len(matrix[-1])


def average_incremental(matrix: Matrix) -> float:
    """Mean over time of the mean accuracy on the tasks seen so far."""
    return sum(sum(row) / len(row) for row in matrix) / len(matrix)


def forgetting(matrix: Matrix) -> float:
    """Mean over the earlier tasks of (best accuracy before the last task) - (accuracy at the end); 0 for one task."""
    last = len(matrix) - 1
    if last == 0:
        return 0.0
    drops = [max(matrix[i][j] for i in range(j, last)) - matrix[last][j] for j in range(last)]
    return sum(drops) / len(drops)


def backward_transfer(matrix: Matrix) -> float:
    """Mean over the earlier tasks of (accuracy at the end) - (accuracy right after learning it); negative when
    learning later tasks hurt earlier ones."""
    last = len(matrix) - 1
    if last == 0:
        return 0.0
    return sum(matrix[last][j] - matrix[j][j] for j in range(last)) / last


def summary(matrix: Matrix) -> dict[str, float]:
    return {"final": final_average(matrix), "average_incremental": average_incremental(matrix),
            "forgetting": forgetting(matrix), "backward_transfer": backward_transfer(matrix)}


def plot_matrix(matrix: Matrix, task_names: list[str], path: Path, title: str) -> None:
    """A heat map of the accuracy matrix (rows: after task i; columns: tested on task j), numbers in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(task_names)
    grid = np.full((len(matrix), n), np.nan)
    for i, row in enumerate(matrix):
        grid[i, :len(row)] = row
    fig, ax = plt.subplots(figsize=(1.1 * n + 2.2, 0.8 * len(matrix) + 1.6))
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", color="white" if value < 60 else "black",
                    fontsize=9)
    ax.set_xticks(range(n), task_names, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix)), [f"after {name}" for name in task_names[:len(matrix)]])
    ax.set_xlabel("tested on")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy %")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(results: dict[str, Any], path: Path, title: str) -> None:
    """Average accuracy over the tasks seen so far, after each task, one line per method (``results``: label ->
    accuracy matrix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, matrix in results.items():
        ax.plot(range(1, len(matrix) + 1), [sum(r) / len(r) for r in matrix], marker="o", label=label)
    longest = max((len(m) for m in results.values()), default=1)
    ax.set_xticks(range(1, longest + 1))
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("mean accuracy on tasks seen %")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
