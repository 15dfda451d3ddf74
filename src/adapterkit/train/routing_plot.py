"""Heat maps of routing weights as PNG (matplotlib, headless).

* ``plot_routing``: what token-level routers (Route, Gate, Fuse, Scale) reported in one forward, from the
  ``Routing`` record ``use`` yields: one panel per combiner and expert, layers (rows) x tokens (columns). A
  combiner's weights at a module are read as (B, T, K) per token, (B, K) per example or (K,) for the whole batch.
* ``plot_task_routing``: a Poly router's weights for every task (``poly_tools.task_routing``): tasks x skills
  averaged over modules and heads, then one panel per task with modules x skills.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from adapterkit.core.context import Routing
from adapterkit.core.errors import AdapterKitError
from adapterkit.core.files import atomic_write

Panel = tuple[str, Tensor, list[str], list[str], str]  # title, matrix (rows, cols), row labels, col labels, x label


def _short(paths: Sequence[str]) -> list[str]:
    """Module paths without their common leading parts ("encoder.layer.0...query" -> "0.attention.self.query")."""
    split = [p.split(".") for p in paths]
    common = 0
    while len(paths) > 1 and all(len(s) > common + 1 and s[common] == split[0][common] for s in split):
        common += 1
    return [".".join(s[common:]) for s in split]


def token_panels(routing: Routing, example: int = 0, tokens: Sequence[str] | None = None,
                 combiners: Sequence[str] | None = None) -> list[Panel]:
    """One (layers x tokens) matrix per combiner and expert, or (layers x experts) for per-example weights."""
    names = list(routing.weights) if combiners is None else list(combiners)
    panels: list[Panel] = []
    for name in names:
        if name not in routing.weights:
            raise AdapterKitError(f"plot_routing: combiner {name!r} reported nothing (reported: "
                                  f"{sorted(routing.weights) or 'none'})")
        paths = list(routing.weights[name])
        per_path = [routing.weights[name][p].detach().float().cpu() for p in paths]
        ndims = {w.dim() for w in per_path}
        if len(ndims) != 1 or not ndims <= {1, 2, 3}:
            raise AdapterKitError(f"plot_routing: {name!r} reported weights of shapes "
                                  f"{sorted({tuple(w.shape) for w in per_path})}; expected (B, T, K), (B, K) or (K,)")
        rows = _short(paths)
        ndim = ndims.pop()
        if ndim == 3:
            if example >= per_path[0].shape[0]:
                raise AdapterKitError(f"plot_routing: example {example} is not in the batch of "
                                      f"{per_path[0].shape[0]}")
            stacked = torch.stack([w[example] for w in per_path])  # (L, T, K)
            count = stacked.shape[1]
            cols = list(tokens) if tokens is not None and len(tokens) == count else [str(i) for i in range(count)]
            for expert in range(stacked.shape[2]):
                panels.append((f"{name}: expert {expert}", stacked[:, :, expert], rows, cols, "token"))
        else:
            stacked = torch.stack([w[example] if ndim == 2 else w for w in per_path])  # (L, K)
            panels.append((name, stacked, rows, [str(i) for i in range(stacked.shape[1])], "expert"))
    if not panels:
        raise AdapterKitError("plot_routing: the routing record is empty; read it after a forward inside use(...)")
    return panels


def task_panels(table: dict[str, Tensor], tasks: Sequence[str] | None = None) -> list[Panel]:
    """Tasks x skills (mean over modules and heads), then modules x skills for each task (mean over heads)."""
    if not table:
        raise AdapterKitError("plot_task_routing: no routing weights (is the router attached?)")
    paths = list(table)
    weights = torch.stack([table[p].float() for p in paths])  # (L, T, Q, S)
    count, skills = weights.shape[1], weights.shape[3]
    names = list(tasks) if tasks is not None else [f"task {i}" for i in range(count)]
    if len(names) != count:
        raise AdapterKitError(f"plot_task_routing: {len(names)} task names for {count} tasks")
    cols = [f"skill {s}" for s in range(skills)]
    per_head = weights.mean(2)  # (L, T, S)
    panels: list[Panel] = [("all modules (mean)", per_head.mean(0), names, cols, "skill")]
    rows = _short(paths)
    for index, task in enumerate(names):
        panels.append((task, per_head[:, index], rows, cols, "skill"))
    return panels


def draw(panels: Sequence[Panel], path: str | Path, title: str) -> Path:
    """Write the panels as one PNG, one heat map per row, and return ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widest = max(p[1].shape[1] for p in panels)
    heights = [max(1.6, 0.28 * p[1].shape[0] + 0.9) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(min(22.0, 3.5 + 0.42 * widest), sum(heights) + 0.6),
                             dpi=100, squeeze=False, gridspec_kw={"height_ratios": heights})
    for ax, (name, matrix, rows, cols, xlabel) in zip(axes[:, 0], panels):
        image = ax.imshow(matrix.numpy(), aspect="auto", cmap="viridis", vmin=0.0,
                          vmax=max(1e-6, float(matrix.max())))
        ax.set_title(name, fontsize=9)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=60 if xlabel == "token" else 0)
        ax.set_xlabel(xlabel, fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    out = Path(path)
    atomic_write(out, buffer.getvalue())
    return out


def plot_routing(routing: Routing, path: str | Path, example: int = 0, tokens: Sequence[str] | None = None,
                 combiners: Sequence[str] | None = None) -> Path:
    """Heat maps of the weights token-level routers reported (``combiners``: which; default all) for ``example``."""
    return draw(token_panels(routing, example, tokens, combiners), path, f"routing weights, example {example}")


def plot_task_routing(table: dict[str, Tensor], path: str | Path, tasks: Sequence[str] | None = None,
                      name: str = "task routing") -> Path:
    """Heat maps of a Poly router's weights per task, from ``poly_tools.task_routing(model, router)``."""
    return draw(task_panels(table, tasks), path, f"{name}: routing weights per task")
