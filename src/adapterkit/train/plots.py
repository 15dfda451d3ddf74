"""Training curves as PNG (matplotlib, headless)."""

from __future__ import annotations

import io
from pathlib import Path

from adapterkit.core.files import atomic_write


def training_curve(history: dict[str, list], path: Path, title: str) -> None:
    """Loss per step (raw and smoothed), dev loss per epoch where the history has it (causal-LM runs: same axis,
    same units) and dev accuracy per epoch on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = history["step"], history["loss"]
    window = max(1, len(losses) // 50)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, losses, color="#9ecae1", linewidth=0.8, label="loss")
    ax.plot(steps, smooth, color="#08519c", linewidth=1.6, label=f"loss (mean of {window})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if history.get("dev_loss"):
        ax.plot(history["epoch_step"], history["dev_loss"], "s--", color="#31a354", label="dev loss")
        ax.set_ylabel("loss")
    if history["epoch"] and history.get("dev_accuracy"):
        ax2 = ax.twinx()
        xs = history["epoch_step"]
        ax2.plot(xs, history["dev_accuracy"], "o-", color="#d94801", label="dev accuracy")
        ax2.set_ylabel("dev accuracy (%)")
        for x, y in zip(xs, history["dev_accuracy"]):
            ax2.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_title(title)
    handles: list = []
    labels: list[str] = []
    for axis in fig.axes:  # one legend for both axes, where the curves usually are not
        h, lab = axis.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    ax.legend(handles, labels, loc="lower left", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
