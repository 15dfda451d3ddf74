"""Data-parallel training through accelerate, used only when launched with several processes.

`accelerate launch` or `torchrun --nproc_per_node N` sets WORLD_SIZE; then the model is wrapped for DDP (gloo on
CPU, NCCL on GPU) and each process takes every N-th row of each global batch. A single process never imports
accelerate, so the common path pays nothing for it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn


class Parallel:
    """This process's place in the run: rank, world size, and the few collective operations the loop needs."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        self._accelerator: Any = None
        if self.world > 1:
            from accelerate import Accelerator

            self._accelerator = Accelerator(cpu=not torch.cuda.is_available())
            self.rank = self._accelerator.process_index

    @property
    def is_main(self) -> bool:
        """True on the process that prints, saves and checkpoints."""
        return self.rank == 0

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """Wrap for DDP when distributed; the caller keeps using its own model object for saving."""
        if self._accelerator is None:
            return model, optimizer
        return self._accelerator.prepare(model, optimizer)

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This process's share of a global batch's row indices."""
        return rows[self.rank::self.world]

    def loss_scale(self) -> int:
        """DDP averages gradients over processes; scaling each local loss by the world size undoes that."""
        return self.world

    def sum(self, value: float) -> float:
        """Sum of ``value`` over processes."""
        if self._accelerator is None:
            return value
        total = self._accelerator.reduce(torch.tensor([value], device=self._accelerator.device), "sum")
        return float(total.item())

    def barrier(self) -> None:
        """Wait for every process (e.g. before reading what the main process wrote)."""
        if self._accelerator is not None:
            self._accelerator.wait_for_everyone()
