"""ViDA: homeostatic visual domain adapters for continual test-time adaptation (Liu, Yang et al., ICLR 2024,
https://arxiv.org/abs/2306.04344; code: github.com/Yangsenqiao/vida).

Two adapters on the same layers, run together: a low-rank one (r = 1) that keeps domain-shared knowledge and a
high-rank one (r = 128) that takes domain-specific knowledge,

    y = W0 x + b + lambda_low * B1 A1 x + lambda_high * B2 A2 x

Homeostatic knowledge allotment sets the two scales per batch from the teacher's uncertainty over N augmented
copies of the batch:

    u = 0.1 * mean(Var_aug(teacher logits))                       (variance over the N copies, unbiased)
    u >= theta:  lambda_high = 1 + u,  lambda_low = 1 - u         (uncertain: lean on the domain-specific adapter)
    u <  theta:  lambda_low  = 1 + u,  lambda_high = 1 - u

(the same scales on student and teacher; the reference code sets only lambda_low, a bug: both are set here).
The student learns from its EMA teacher by symmetric cross-entropy on the clean batch,

    L = mean_b [ -1/2 sum_c p_t log p_s - 1/2 sum_c p_s log p_t ],    then    theta_T <- a theta_T + (1 - a) theta_S

and the prediction is the teacher's output on the clean batch before the update (``predict_then_adapt``).

Here the two adapters are adapterkit adapters (any PARALLEL or OUTPUT spec: LoRA, a conv bottleneck, ...) on the
same ``targets``; the teacher is a second pair of adapters on the same layers, so student and teacher share the
frozen backbone. The scales are an ``Average`` block's weights. Simplifications: only the adapters train (the
reference also moves the backbone at a tiny learning rate); no source warm-up of the adapters (the reference ships
warmed-up "source ViDA" weights); the augmentations are a small pure-torch set (random translation and scale,
contrast and brightness jitter, Gaussian noise) in place of CoTTA's torchvision pipeline; init A ~ N(0, 1/r)
(LoRA's "gaussian") instead of the code's std 1/r^2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.blocks import Average, Stack
from adapterkit.core.spec import AdapterSpec
from adapterkit.core.tree import adapter_tensors
from adapterkit.inject.engine import attach, attach_at
from adapterkit.methods.lora import LoRA
from adapterkit.train.continual.stream import StreamError
from adapterkit.train.tta.method import (
    TTAMethod,
    check_norm,
    forward,
    freeze,
    load_optimizer_state,
    make_optimizer,
    optimizer_state,
    restore,
    snapshot,
    symmetric_cross_entropy,
)

LOW, HIGH, LOW_T, HIGH_T = "vida_low", "vida_high", "vida_low_ema", "vida_high_ema"


def homeostatic_scales(uncertainty: float, threshold: float) -> tuple[float, float]:
    """(lambda_low, lambda_high) from the teacher's uncertainty u (see the module docstring)."""
    if uncertainty >= threshold:
        return 1.0 - uncertainty, 1.0 + uncertainty
    return 1.0 + uncertainty, 1.0 - uncertainty


def uncertainty(logits: Tensor, scale: float = 0.1) -> float:
    """u = scale * mean over (example, class) of the variance across the N augmented copies; logits: (N, B, C)."""
    return scale * float(logits.var(dim=0).mean())


@torch.no_grad()
def ema_update(teacher: dict[str, Tensor], student: dict[str, Tensor], alpha: float) -> None:
    """theta_T <- alpha theta_T + (1 - alpha) theta_S, in place, key by key."""
    for key, value in teacher.items():
        value.mul_(alpha).add_(student[key].detach(), alpha=1.0 - alpha)


def augment(x: Tensor) -> Tensor:
    """A random view of a batch of images (B, C, H, W): translation by up to 1/16 of the size, scale 0.9..1.1,
    contrast 0.8..1.2 around each image's mean, brightness +-0.1, Gaussian noise (std 0.01). Global RNG."""
    b = x.shape[0]
    scale = torch.empty(b).uniform_(0.9, 1.1)
    shift = torch.empty(b, 2).uniform_(-1 / 8, 1 / 8)  # grid units: the image spans [-1, 1]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = 1 / scale, 1 / scale, shift
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    view = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    mean = view.mean(dim=(1, 2, 3), keepdim=True)
    contrast = torch.empty(b, 1, 1, 1).uniform_(0.8, 1.2).to(x)
    brightness = torch.empty(b, 1, 1, 1).uniform_(-0.1, 0.1).to(x)
    return (view - mean) * contrast + mean + brightness + 0.01 * torch.randn(x.shape).to(x)


class ViDA(TTAMethod):
    """Low- and high-rank adapters mixed by homeostatic scales, mean teacher with EMA.

    Args:
        targets: the layers both adapters go on (ViDA: every Linear of the attention; on a CNN, e.g. the pointwise
            convolutions).
        low, high: the two adapter specs (default LoRA r=1 and r=128, scale 1, Gaussian A, zero B).
        lr, optimizer: the student's update (ViDA CIFAR: Adam 1e-5 after a source warm-up).
        ema: the teacher's EMA factor alpha (0.999).
        threshold: theta of the homeostatic rule (0.2); augmentations: N copies (10); uncertainty_scale: 0.1.
        norm: BatchNorm statistics, "batch" or "source"; keep: adapters already on the model that run under ViDA's.
    """

    name = "vida"
    order = "predict_then_adapt"

    def __init__(self, targets: Any, low: AdapterSpec | None = None, high: AdapterSpec | None = None,
                 lr: float = 1e-4, optimizer: str = "adam", ema: float = 0.999, threshold: float = 0.2,
                 augmentations: int = 10, uncertainty_scale: float = 0.1, norm: str = "batch",
                 keep: Sequence[str] = ()) -> None:
        check_norm(norm)
        if not 0.0 <= ema <= 1.0:
            raise StreamError(f"vida: ema must be in [0, 1], got {ema}")
        if not isinstance(augmentations, int) or augmentations < 2:
            raise StreamError(f"vida: augmentations must be an integer >= 2 (a variance needs two copies), got "
                              f"{augmentations!r}")
        if lr <= 0:
            raise StreamError(f"vida: lr must be > 0, got {lr}")
        self.targets = targets
        self.low = low or LoRA(r=1, alpha=1.0, init="gaussian")
        self.high = high or LoRA(r=128, alpha=128.0, init="gaussian")
        self.lr, self.optimizer, self.ema, self.threshold = lr, optimizer, ema, threshold
        self.augmentations, self.uncertainty_scale, self.norm, self.keep = augmentations, uncertainty_scale, norm, \
            tuple(keep)
        self.scales = (1.0, 1.0)

    def setup(self, model: nn.Module) -> None:
        self.model = model
        freeze(model)
        for student, teacher, spec in ((LOW, LOW_T, self.low), (HIGH, HIGH_T, self.high)):
            paths = attach(model, student, spec, self.targets)
            attach_at(model, teacher, spec, paths, fresh_init=False)
        self.student = {**_keyed("low", adapter_tensors(model, LOW)), **_keyed("high", adapter_tensors(model, HIGH))}
        self.teacher = {**_keyed("low", adapter_tensors(model, LOW_T)),
                        **_keyed("high", adapter_tensors(model, HIGH_T))}
        with torch.no_grad():
            for key, value in self.teacher.items():
                value.copy_(self.student[key])
                value.requires_grad_(False)
        params = [v for v in self.student.values() if isinstance(v, nn.Parameter)]
        for param in params:
            param.requires_grad_(True)
        self.opt = make_optimizer(params, self.optimizer, self.lr)
        self.scales = (1.0, 1.0)

    def _setup(self, low: str, high: str) -> tuple[Any, ...]:
        mix = Average(low, high, weights=self.scales)
        return (Stack(*self.keep, mix),) if self.keep else (mix,)

    def teacher_logits(self, x: Tensor) -> Tensor:
        return forward(self.model, x, self.norm, self._setup(LOW_T, HIGH_T))

    def student_logits(self, x: Tensor) -> Tensor:
        return forward(self.model, x, self.norm, self._setup(LOW, HIGH))

    def step(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or not x.is_floating_point():
            raise StreamError(f"vida: the uncertainty estimate augments images (B, C, H, W); got a "
                              f"{tuple(x.shape)} {x.dtype} batch")
        with torch.no_grad():
            views = torch.stack([self.teacher_logits(augment(x)) for _ in range(self.augmentations)])  # (N, B, C)
            self.scales = homeostatic_scales(uncertainty(views, self.uncertainty_scale), self.threshold)
            teacher = self.teacher_logits(x)
        loss = symmetric_cross_entropy(self.student_logits(x), teacher).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        ema_update(self.teacher, self.student, self.ema)
        return teacher

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, meta = optimizer_state("opt", self.opt)
        return ({**snapshot("student", self.student), **snapshot("teacher", self.teacher), **tensors},
                {"opt": meta, "scales": list(self.scales)})

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        restore("student", self.student, tensors)
        restore("teacher", self.teacher, tensors)
        load_optimizer_state("opt", self.opt, tensors, meta["opt"])
        low, high = meta["scales"]
        self.scales = (float(low), float(high))


def _keyed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}/{k}": v for k, v in tensors.items()}
