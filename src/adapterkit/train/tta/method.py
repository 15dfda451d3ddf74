"""What every test-time adaptation method shares: the method contract, the model's logits, the normalisation
statistics it runs with, the entropy, and state helpers (adapter weights, chosen parameters, an optimizer).

A method sees a batch of inputs and nothing else: ``step(x)`` adapts on ``x`` and returns the logits it predicts
for ``x``. Whether the prediction comes before or after the update is the method's (``order``), as in its paper.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from adapterkit.core.host import HOST_ATTR
from adapterkit.inject.use import use
from adapterkit.train.continual.stream import StreamError
from adapterkit.train.settings import constructor_settings

NORMS = ("batch", "source")  # BatchNorm statistics: the test batch's own (Tent, BN adaptation) or the stored ones
ORDERS = ("predict_then_adapt", "adapt_then_predict")
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d)


class TTAMethod:
    """The contract. ``setup(model)`` attaches the method's adapters and chooses what it trains (once, before the
    stream); ``step(x)`` adapts on one unlabeled batch and returns its logits; ``state`` / ``load_state`` hold
    everything that changes during the stream (weights, optimizer moments, counters), so that a stream resumed
    from a saved state, or reset to the start, continues exactly."""

    name = "method"
    order = "predict_then_adapt"

    def setup(self, model: nn.Module) -> None:
        raise NotImplementedError

    def step(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {}, {}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        pass

    def config(self) -> dict[str, Any]:
        """The constructor's arguments (a resumed stream must continue with the same settings)."""
        return constructor_settings(self)


class Source(TTAMethod):
    """No adaptation: the model as it is. ``norm="batch"`` normalises with each test batch's statistics (BN
    adaptation, Schneider et al. 2020, https://arxiv.org/abs/2006.16971), the usual second baseline."""

    name = "source"

    def __init__(self, norm: str = "source", keep: Sequence[str] = ()) -> None:
        check_norm(norm)
        self.norm, self.keep = norm, tuple(keep)

    def setup(self, model: nn.Module) -> None:
        self.model = model
        freeze(model)

    @torch.no_grad()
    def step(self, x: Tensor) -> Tensor:
        return forward(self.model, x, self.norm, self.keep)


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise StreamError(f"norm={norm!r}: use 'batch' (each test batch's statistics) or 'source' (the stored ones)")


def freeze(model: nn.Module) -> None:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)


def logits_of(output: Any) -> Tensor:
    """A model's output as logits: a tensor, or an object / dict with ``logits`` (transformers)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise StreamError(f"the model returned {type(output).__name__}; test-time adaptation needs logits (a tensor "
                          "or an output with .logits)")
    return logits


@contextlib.contextmanager
def norm_statistics(model: nn.Module, norm: str) -> Iterator[None]:
    """Inside, BatchNorm layers normalise with the batch's own statistics (``"batch"``) and leave their stored
    statistics untouched (no running update, no counter); with ``"source"`` nothing changes."""
    if norm == "source":
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    before = [(m.training, m.track_running_stats) for m in layers]
    for m in layers:
        m.train(True)
        m.track_running_stats = False  # with stored buffers still present: batch statistics, and no update
    try:
        yield
    finally:
        for m, (training, track) in zip(layers, before):
            m.train(training)
            m.track_running_stats = track


def forward(model: nn.Module, x: Tensor, norm: str, setup: Sequence[Any] = ()) -> Tensor:
    """Logits of ``model`` on ``x`` with ``setup`` (adapter names or one block) running (none: as it is)."""
    with norm_statistics(model, norm), use(model, *setup) if setup else contextlib.nullcontext():
        return logits_of(model(x))


def entropy(logits: Tensor) -> Tensor:
    """H(p) = -sum_c p_c log p_c per row, p = softmax(logits)."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


# ---- state -----------------------------------------------------------------------------------------------------
def snapshot(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v.detach().clone().contiguous() for k, v in tensors.items()}


def restore(prefix: str, live: dict[str, Tensor], saved: dict[str, Tensor]) -> None:
    """Copy ``saved`` (as ``snapshot`` wrote it) into the ``live`` tensors in place; a missing key is an error."""
    with torch.no_grad():
        for key, value in live.items():
            stored = saved.get(f"{prefix}.{key}")
            if stored is None or stored.shape != value.shape:
                raise StreamError(f"saved state has no tensor {prefix}.{key} of shape {tuple(value.shape)}")
            value.copy_(stored)


def optimizer_state(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer's moments as tensors and its groups (JSON): what ``load_optimizer_state`` puts back."""
    full = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, values in full["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}.{index}.{key}"] = value.detach().clone().contiguous()
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": full["param_groups"], "plain": plain}


def load_optimizer_state(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor],
                         meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(index), {})[name] = value.clone()
    for index, values in meta["plain"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def make_optimizer(params: list[nn.Parameter], kind: str, lr: float) -> torch.optim.Optimizer:
    """Adam (Tent's CIFAR setting, ViDA's CIFAR one) or SGD with momentum 0.9 (their ImageNet settings)."""
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise StreamError(f"optimizer={kind!r}: use 'adam' or 'sgd'")


def norm_affine(model: nn.Module) -> dict[str, nn.Parameter]:
    """The affine parameters (weight, bias) of every normalisation layer, by name (adapters' own layers skipped)."""
    found: dict[str, nn.Parameter] = {}
    for path, module in model.named_modules():
        if isinstance(module, NORM_TYPES) and HOST_ATTR not in path.split("."):
            for key in ("weight", "bias"):
                param = getattr(module, key, None)
                if isinstance(param, nn.Parameter):
                    found[f"{path}.{key}"] = param
    return found


def symmetric_cross_entropy(student: Tensor, teacher: Tensor) -> Tensor:
    """ViDA's / CoTTA's consistency loss per row: -1/2 sum p_t log p_s - 1/2 sum p_s log p_t (teacher detached)."""
    teacher = teacher.detach()
    return (-0.5 * (teacher.softmax(-1) * student.log_softmax(-1)).sum(-1)
            - 0.5 * (student.softmax(-1) * teacher.log_softmax(-1)).sum(-1))
