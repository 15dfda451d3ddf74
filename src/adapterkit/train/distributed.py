"""Data-parallel training, used only when launched with several processes.

`accelerate launch` or `torchrun --nproc_per_node N` sets WORLD_SIZE; each process takes every N-th row of each
global batch. Two ways to share the model:

* ``ddp``: every process holds the whole model; accelerate wraps it for DDP (gloo on CPU, NCCL on GPU).
* ``fsdp``: torch's FSDP2 (``fully_shard``) shards every transformer block -- the frozen base weights and the
  adapters inside it -- across processes, and the rest at the root. Saving gathers full tensors first, so adapter
  files are complete (peft users get empty files under FSDP / ZeRO-3).

A single process never imports accelerate, so the common path pays nothing for it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class Parallel:
    """This process's place in the run: rank, world size, and the few collective operations the loop needs."""

    def __init__(self, mode: str = "ddp") -> None:
        if mode not in MODES:
            raise ValueError(f"parallel mode {mode!r} is unknown (known: {', '.join(MODES)})")
        self.mode = mode
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

    @property
    def sharded(self) -> bool:
        """True when the model's weights are sharded across processes (FSDP)."""
        return self._accelerator is not None and self.mode == "fsdp"

    def shard(self, model: nn.Module) -> nn.Module:
        """Shard the model across processes (FSDP; before the optimizer is built, which must see the shards)."""
        if not self.sharded:
            return model
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """Wrap for DDP when distributed; the caller keeps using its own model object for saving."""
        if self._accelerator is None or self.sharded:
            return model, optimizer
        return self._accelerator.prepare(model, optimizer)

    @contextlib.contextmanager
    def full_weights(self, model: nn.Module) -> Iterator[None]:
        """Inside the block the adapters and the trained modules hold full, ordinary parameters (gathered from the
        shards under FSDP), so saving writes complete tensors; every process must enter it.

        The frozen base stays sharded: gathering it would need the whole model in one process.
        """
        if not self.sharded:
            yield
            return
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        for module in model.modules():  # the root stays unsharded after a forward: back to shards everywhere
            if isinstance(module, FSDPModule):
                module.reshard()
        swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        for module in model.modules():
            inside_host = any(p is module or _has_descendant(p, module) for p in _hosts(model))
            for name, param in list(module._parameters.items()):
                if isinstance(param, DTensor) and (param.requires_grad or inside_host):
                    full = nn.Parameter(param.full_tensor().detach().clone(), requires_grad=param.requires_grad)
                    swapped.append((module, name, param))
                    module._parameters[name] = full
        try:
            yield
        finally:
            for module, name, param in swapped:
                module._parameters[name] = param

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
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


MODES = ("ddp", "fsdp")


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: the items of its largest ModuleList (encoder.layer, model.layers, h)."""
    lists: list[nn.ModuleList] = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    sizes = [len(m._modules) for m in lists]
    return list(lists[sizes.index(max(sizes))]) if lists else []


def _hosts(model: nn.Module) -> list[nn.Module]:
    from adapterkit.core.host import Host

    return [m for m in model.modules() if isinstance(m, Host)]


def _has_descendant(root: nn.Module, module: nn.Module) -> bool:
    return any(m is module for m in root.modules())
