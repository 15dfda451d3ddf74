"""MixDA's two-stage recipe (Diao et al. 2023, https://arxiv.org/abs/2306.05406) on a classifier.

Stage 1 (``train_domain``): the J domain adapters (``par_bn`` beside the FFN output projections) and the gate
(``MixDA`` combiner on the same modules) train on domain data, everything else frozen:

    L = w * L_knowledge + L_old,   L_old = sum over adapted layers of MSE(LN(m + r), LN(f + r))

``L_knowledge`` is the model's own loss on the domain batches (the paper: masked-LM cross-entropy on domain text;
with a sequence classifier, the domain's labels: a classification proxy). ``L_old`` (the paper's old-knowledge
loss, on general text) compares each adapted layer's output with the mixture against the same layer with the
frozen FFN alone, for the same layer input; it is computed as intended, not as the published code's (which traced
the mixture twice). w = 0.5 as in the paper.

Stage 2 (``train_task``): the domain adapters are frozen; a task adapter, the gate and the head train on the task
with ``Stack(Gate(domains..., name=gate), task)``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.blocks import Gate, Stack
from adapterkit.core.errors import AdapterKitError
from adapterkit.inject.engine import train_only
from adapterkit.inject.use import use
from adapterkit.train.data import TextTable
from adapterkit.train.loop import TrainConfig, accuracy, adamw_with_warmup, batches, encode, run_training


class WithBlock(nn.Module):
    """``model`` run inside ``use(model, block)``; the block's auxiliary losses join the returned loss."""

    def __init__(self, model: nn.Module, block: Any, aux_weight: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.block = block
        self.aux_weight = aux_weight

    def forward(self, **batch: Any) -> Any:
        with use(self.model, self.block) as routing:
            out = self.model(**batch)
        if getattr(out, "loss", None) is not None and routing.losses:
            out.loss = out.loss + self.aux_weight * routing.aux_loss()
        return out


def _old_knowledge_hooks(model: nn.Module, sublayers: Sequence[str], losses: list[torch.Tensor]) -> list[Any]:
    """Hooks that add MSE(layer output, the same layer with its bare FFN projection) to ``losses``."""
    modules = dict(model.named_modules())
    handles = []
    for path in sublayers:
        module = modules.get(path)
        dense, norm = getattr(module, "dense", None), getattr(module, "LayerNorm", None)
        if module is None or not isinstance(dense, nn.Module) or not isinstance(norm, nn.Module):
            raise AdapterKitError(f"MixDA old-knowledge loss: {path!r} is not an FFN output sub-layer with .dense "
                                  "and .LayerNorm (BERT / RoBERTa 'layer.i.output')")

        def hook(mod: nn.Module, args: tuple, out: torch.Tensor, dense: Any = dense, norm: Any = norm) -> None:
            with torch.no_grad():  # .forward skips the adapters' hooks: the frozen FFN alone, the same input
                original = norm.forward(dense.forward(args[0]) + args[1])
            losses.append(F.mse_loss(out, original))
        handles.append(module.register_forward_hook(hook))
    return handles


def train_domain(model: nn.Module, tokenizer: Any, domains: Sequence[str], gate: str, knowledge: TextTable,
                 old: TextTable, sublayers: Sequence[str], config: TrainConfig, knowledge_weight: float = 0.5
                 ) -> dict[str, Any]:
    """Stage 1: train ``domains`` and ``gate`` (and ``config.head``) on ``knowledge`` with the old-knowledge loss
    on ``old`` at ``sublayers`` (the FFN output sub-layers the gate sits in). Returns the loss history."""
    trainable = train_only(model, [*domains, gate], also=config.head)
    block = Gate(*domains, name=gate)
    pad_id = tokenizer.pad_token_id or 0
    know, general = encode(tokenizer, knowledge, config.max_length), encode(tokenizer, old, config.max_length)
    steps = -(-len(know.ids) // config.batch_size) * config.epochs
    optimizer, schedule = adamw_with_warmup(model, config, steps)
    generator = torch.Generator().manual_seed(config.seed)
    history: dict[str, list[float]] = {"knowledge": [], "old": []}
    model.train()
    start = time.perf_counter()
    for _ in range(config.epochs):
        order = torch.randperm(len(know.ids), generator=generator).tolist()
        old_order = torch.randint(len(general.ids), (len(order),), generator=generator).tolist()
        old_batches = batches(general, config.batch_size, old_order, pad_id)
        for (ids, mask, labels), (old_ids, old_mask, _) in zip(batches(know, config.batch_size, order, pad_id),
                                                               old_batches):
            with use(model, block):
                loss_k = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                layer_losses: list[torch.Tensor] = []
                handles = _old_knowledge_hooks(model, sublayers, layer_losses)
                try:
                    model(input_ids=old_ids, attention_mask=old_mask)
                finally:
                    for handle in handles:
                        handle.remove()
            loss_old = torch.stack(layer_losses).sum()
            (knowledge_weight * loss_k + loss_old).backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            history["knowledge"].append(loss_k.item())
            history["old"].append(loss_old.item())
    seconds = time.perf_counter() - start
    dev = accuracy(WithBlock(model, block), know, config.batch_size, pad_id)  # fit of the proxy objective
    return {"trainable_parameters": trainable, "train_seconds": round(seconds, 1), "history": history,
            "knowledge_train_accuracy": dev}


def train_task(model: nn.Module, tokenizer: Any, domains: Sequence[str], gate: str, task_adapter: str,
               train: TextTable, dev: TextTable, config: TrainConfig) -> dict[str, Any]:
    """Stage 2: frozen ``domains``; ``task_adapter``, ``gate`` and ``config.head`` train on the task with
    ``Stack(Gate(*domains, name=gate), task_adapter)``. Returns dev accuracy and the trainable parameter count."""
    trainable = train_only(model, [task_adapter, gate], also=config.head)
    block = Stack(Gate(*domains, name=gate), task_adapter)
    history, seconds = run_training(WithBlock(model, block), tokenizer, train, dev, config, desc="mixda stage 2")
    return {"dev_accuracy": history["dev_accuracy"][-1], "trainable_parameters": trainable,
            "train_seconds": round(seconds, 1), "history": history}
