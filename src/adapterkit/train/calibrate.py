"""Calibration for data-aware inits: stream a few hundred samples through the frozen model once, with forward hooks
on the layers an adapter will target, and leave each layer's input covariance for CorDA (methods/corda.py).

    from adapterkit.train.calibrate import calibrate_corda
    calibrate_corda(model, [{"input_ids": ids, "attention_mask": mask}, ...], targets=["q_proj", "v_proj"])
    ak.attach(model, "task", ak.LoRA(r=8, init="corda_ipm"), targets=["q_proj", "v_proj"])

IPM calibrates on the task's own inputs (instruction and answer); KPM on the knowledge to keep (e.g. general text
or a QA set the model already answers). Padding tokens (``attention_mask`` 0) are left out of the covariance.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from adapterkit.core.errors import AdapterKitError
from adapterkit.inject.select import Targets, select
from adapterkit.methods.corda import Covariance, sample_grams, wait
from adapterkit.train.loop import Encoded
from adapterkit.train.loop import batches as padded_batches


def calibrate_corda(model: nn.Module, batches: Iterable[Mapping[str, Tensor] | Tensor], targets: Targets,
                    progress: bool = True) -> dict[str, Tensor]:
    """Run ``batches`` (model keyword dicts, or input-id tensors) through ``model`` without gradients, collect the
    input covariance of every module ``targets`` selects, leave each on its module for a later
    ``LoRA(init="corda_ipm" | "corda_kpm")`` attach, and return them by module path (float32, (in, in))."""
    chosen = select(model, targets)
    sums = {path: Covariance() for path, _ in chosen}
    current: dict[str, Tensor | None] = {"mask": None}

    last: dict[str, Any] = {"input": None, "grams": None}  # q, k and v read one tensor: its grams once

    def hook_for(path: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if args and isinstance(args[0], Tensor):
                if args[0] is not last["input"]:
                    try:
                        last.update(input=args[0], grams=sample_grams(args[0], current["mask"]))
                    except ValueError as exc:
                        raise AdapterKitError(f"calibrate_corda: {path}: {exc}") from None
                sums[path].add_grams(last["grams"])
        return hook

    handles = [module.register_forward_hook(hook_for(path)) for path, module in chosen]
    was_training = model.training
    model.eval()
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(batches, total=total, desc="calibrate", unit="batch", dynamic_ncols=True,
               disable=not progress or os.environ.get("ADAPTERKIT_NO_PROGRESS") == "1")
    try:
        with torch.no_grad():
            for batch in bar:
                inputs = {"input_ids": batch} if isinstance(batch, Tensor) else dict(batch)
                inputs = {k: v for k, v in inputs.items() if k != "labels"}  # calibration needs no loss
                current["mask"] = inputs.get("attention_mask")
                model(**inputs)
                last.update(input=None, grams=None)
    finally:
        for handle in handles:
            handle.remove()
        bar.close()
        model.train(was_training)
    empty = [path for path, total_ in sums.items() if total_.samples == 0]
    if empty:
        raise AdapterKitError(f"calibrate_corda: no calibration sample reached {empty[0]} (empty batches, or a "
                              "layer the model does not run)")
    found = {path: sums[path].mean() for path, _ in chosen}
    for path, module in chosen:
        wait(module, found[path])
    return found


def id_batches(ids: list[list[int]], pad_id: int, rows: int = 256, size: int = 8) -> list[dict[str, Tensor]]:
    """The first ``rows`` token-id lists as right-padded model inputs of ``size`` rows each (empty ones skipped)."""
    kept = [seq for seq in ids if seq][:rows]
    data = Encoded(kept, torch.zeros(len(kept), dtype=torch.long))  # the training loop's padding; no labels
    return [{"input_ids": batch, "attention_mask": mask}
            for batch, mask, _ in padded_batches(data, size, list(range(len(kept))), pad_id)]
