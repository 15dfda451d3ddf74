"""LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): train each LoRA B matrix with a learning rate
``ratio`` times that of A (the paper suggests ratio ~ 16), which makes feature learning efficient at large width.

``lora_plus_groups`` returns optimizer parameter groups with peft's ``create_loraplus_optimizer`` grouping:

* ``"embedding"``: both factors of a LoRA on an Embedding, at ``embedding_lr`` (peft's default 1e-6);
* ``"lora_b"``: every LoRA B matrix, and every other 1-D trainable tensor (biases, norm weights, DoRA's
  magnitude), at ``lr * ratio``, with weight decay;
* ``"lora_b_no_decay"``: those of them that peft never decays (biases, LayerNorm parameters), at ``lr * ratio``;
* ``"a"``: everything else (the A matrices, a classification head's weights), at ``lr``.

An adapter's B is found by its module (a LoRA factor), not by a name. Any loop takes the groups::

    optimizer = torch.optim.AdamW(lora_plus_groups(model, lr=2e-4, ratio=16))

and so does transformers' Trainer, through ``Trainer(..., optimizers=(optimizer, None))`` (the Trainer builds its
linear schedule around it), or by a subclass whose ``create_optimizer`` sets ``self.optimizer`` from these groups.
``adapterkit train --lora-plus-ratio R`` uses them (``TrainConfig.lora_plus_ratio``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adapterkit.core.errors import AdapterKitError
from adapterkit.methods.lora import LoRAConv2d, LoRAEmbedding, LoRALinear

EMBEDDING_LR = 1e-6  # peft's loraplus_lr_embedding default
_NO_DECAY = (nn.LayerNorm,)  # transformers' ALL_LAYERNORM_LAYERS: what peft's grouping never decays


def lora_plus_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float = 0.0,
                     embedding_lr: float = EMBEDDING_LR) -> list[dict[str, Any]]:
    """AdamW parameter groups over ``model``'s trainable parameters, B matrices at ``lr * ratio`` (see the module
    docstring); empty groups are left out. Raises a one-line AdapterKitError for a ratio or rate that is not
    positive, or a model with no trainable LoRA B matrix (LoRA+ would be plain AdamW)."""
    for label, value in (("ratio", ratio), ("lr", lr), ("embedding_lr", embedding_lr)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise AdapterKitError(f"lora_plus_groups: {label} must be a positive number, got {value!r}")
    role: dict[int, str] = {}  # id(param) -> group, for the tensors whose module decides
    for module in model.modules():
        if isinstance(module, LoRAEmbedding):
            role[id(module.lora_a)] = role[id(module.lora_b)] = "embedding"
        elif isinstance(module, LoRALinear | LoRAConv2d):
            role[id(module.lora_b)] = "lora_b"
        elif isinstance(module, _NO_DECAY):
            for param in module.parameters(recurse=False):
                role[id(param)] = "no_decay"
    groups: dict[str, list[nn.Parameter]] = {"a": [], "embedding": [], "lora_b": [], "lora_b_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = role.get(id(param))
        if kind == "embedding":
            groups["embedding"].append(param)
        elif kind == "lora_b" or param.ndim == 1:  # peft: every 1-D tensor trains at B's rate
            no_decay = kind == "no_decay" or "bias" in name.rsplit(".", 1)[-1]
            groups["lora_b_no_decay" if no_decay else "lora_b"].append(param)
        else:
            groups["a"].append(param)
    if not any(role.get(id(p)) == "lora_b" for p in groups["lora_b"]):
        raise AdapterKitError("lora_plus_groups: the model has no trainable LoRA B matrix (attach a LoRA and "
                              "train_only it first)")
    settings = {"a": (lr, weight_decay), "embedding": (embedding_lr, weight_decay),
                "lora_b": (lr * ratio, weight_decay), "lora_b_no_decay": (lr * ratio, 0.0)}
    return [{"params": params, "lr": settings[key][0], "weight_decay": settings[key][1], "name": key}
            for key, params in groups.items() if params]


def lora_plus_optimizer(model: nn.Module, lr: float, ratio: float, weight_decay: float = 0.0,
                        embedding_lr: float = EMBEDDING_LR, **adamw: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``lora_plus_groups`` (extra keywords, e.g. ``betas``, go to AdamW)."""
    return torch.optim.AdamW(lora_plus_groups(model, lr, ratio, weight_decay, embedding_lr), lr=lr, **adamw)
