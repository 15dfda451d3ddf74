"""MixDA's two-stage recipe (Diao et al. 2023, https://arxiv.org/abs/2306.05406) on a classifier.

Stage 1 (``train_domain``): the J domain adapters (``par_bn`` beside the FFN output projections) and the gate
(``MixDA`` combiner on the same modules) train on domain data, everything else frozen:

    L = w * L_knowledge + L_old,   L_old = sum over adapted layers of MSE(LN(m + r), LN(f + r))

``L_knowledge`` is the model's own loss on the domain batches (the paper: masked-LM cross-entropy on domain text;
with a sequence classifier, the domain's labels: a classification proxy). ``L_old`` (the paper's old-knowledge
loss, on general text) compares each adapted layer's output with the mixture against the same layer with the
frozen FFN alone, for the same layer input; it is computed as intended, not as the published code's (which traced
the mixture twice). w = 0.5 as in the paper. ``old_knowledge_hooks`` also serves a pre-norm decoder, whose
knowledge loss is its causal-LM loss (benchmarks/mixda_llm.py runs stage 1 that way; ``train_domain`` itself
takes a sequence classifier).

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
from adapterkit.core.host import host_of
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


def old_knowledge_hooks(model: nn.Module, sublayers: Sequence[str], losses: list[torch.Tensor]) -> list[Any]:
    """Hooks that add MSE(layer output, the same layer with its bare FFN projection) to ``losses``, one term per
    sub-layer and forward; remove the returned handles after the forward.

    A sub-layer is either a post-norm FFN output block with ``.dense`` and ``.LayerNorm`` (BERT / RoBERTa
    ``layer.i.output``: LN(m + r) against LN(f + r)), or a pre-norm block holding exactly one gated projection (a
    Llama-style decoder layer, ``model.layers.i``, gated at its ``mlp.down_proj``). A pre-norm block's output is the
    residual sum h = r + m, with the bare projection h - m + f; what the next layer reads is that sum normalised,
    so the two are compared RMS-normalised (without a learned gain): MSE(rms(h), rms(h - m + f)), the post-norm
    form's counterpart, on the same scale (an unnormalised MSE grows with the residual stream's size)."""
    modules = dict(model.named_modules())
    handles = []
    for path in sublayers:
        module = modules.get(path)
        dense, norm = getattr(module, "dense", None), getattr(module, "LayerNorm", None)
        gated = [] if module is None else [m for m in module.modules() if m is not module and _holds_gate(m)]
        if module is not None and isinstance(dense, nn.Module) and isinstance(norm, nn.Module):
            handles.append(module.register_forward_hook(_post_norm_hook(dense, norm, losses)))
        elif len(gated) == 1:
            handles += _pre_norm_hooks(module, gated[0], losses)
        else:
            raise AdapterKitError(f"MixDA old-knowledge loss: {path!r} is not an FFN output sub-layer: give the block "
                                  "with .dense and .LayerNorm (BERT / RoBERTa 'layer.i.output') or a pre-norm decoder "
                                  f"layer holding one gated projection (it holds {len(gated)})")
    return handles


def _holds_gate(module: nn.Module) -> bool:
    host = host_of(module)
    return host is not None and any(host.adapter(n).spec.role == "gate" for n in host.names())


def _post_norm_hook(dense: nn.Module, norm: nn.Module, losses: list[torch.Tensor]) -> Any:
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        with torch.no_grad():  # .forward skips the adapters' hooks: the frozen FFN alone, the same input
            original = norm.forward(dense.forward(args[0]) + args[1])
        losses.append(F.mse_loss(out, original))
    return hook


def _pre_norm_hooks(block: Any, projection: nn.Module, losses: list[torch.Tensor]) -> list[Any]:
    outputs: dict[str, torch.Tensor] = {}

    def at_projection(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        # registered after the host's hook, so ``out`` is the mixture m; .forward skips the hooks: the bare f
        with torch.no_grad():
            outputs["change"] = module.forward(*args) - out

    def at_block(module: nn.Module, args: tuple, out: Any) -> None:
        hidden = out[0] if isinstance(out, tuple) else out
        original = (hidden + outputs.pop("change")).detach()  # h - m + f: the same layer with the bare projection
        losses.append(F.mse_loss(_rms(hidden), _rms(original)))

    return [projection.register_forward_hook(at_projection), block.register_forward_hook(at_block)]


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)


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
                handles = old_knowledge_hooks(model, sublayers, layer_losses)
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
