"""CorDA: Context-oriented Decomposition Adaptation (Yang et al., NeurIPS 2024, https://arxiv.org/abs/2406.05223),
a LoRA initialisation: ``LoRA(init="corda_ipm")`` or ``LoRA(init="corda_kpm")`` (methods/lora_init.py calls here).

Each target layer's input covariance C is collected on a few hundred calibration samples
(``adapterkit.train.calibrate.calibrate_corda`` streams them through the model once, with hooks). Then, as in
peft's ``preprocess_corda`` + ``corda_init`` (and iboing/CorDA, ``cordalib/decomposition.py``):

    C' = C + d mean(diag C) I     (d = 0.01, doubled until ||C' C'^-1 - I||_F < 0.05)
    W C' = U S V^T,   V_hat = (V^T C'^-1)^T,   so   U S V_hat^T = W  exactly
    IPM (instruction-previewed): the r LARGEST components;  KPM (knowledge-preserved): the r SMALLEST
    A = sqrt(S_r / s) V_hat_r^T (r, in),   B = U_r sqrt(S_r / s) (out, r),   W_res = W - s B A

IPM calibrates on the task (adapt the directions the task's inputs excite most); KPM calibrates on the knowledge to
keep (adapt the directions it uses least, so the principal ones stay frozen). Per sample X (its tokens, padding
left out), ``X <- X / |max(X)|`` before ``C += X^T X``; C is the mean over samples (peft normalises the same way,
with one sample per forward). After the init the adapter is a PiSSA-like residual LoRA (lora_init.py explains
saving, loading and converting it back to a plain LoRA of the original base).

The covariances wait on the layers in a weak-keyed table (freed with the layer) and each is used once: an init pops
its layer's entry, so a second CorDA init never decomposes a residual base with a covariance of the original one.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

MODES = {"corda_ipm": "ipm", "corda_kpm": "kpm"}
_WAITING: weakref.WeakKeyDictionary[nn.Module, Tensor] = weakref.WeakKeyDictionary()


@torch.no_grad()
def sample_grams(x: Tensor, mask: Tensor | None) -> list[Tensor]:
    """``X^T X`` of each sample of a (batch, tokens, features) input (``mask``: (batch, tokens), 1 = real token) or
    of a (tokens, features) one, each sample first scaled by ``1 / |max(X)|`` (peft's normalisation)."""
    x = x.detach().float()
    if x.dim() == 2:
        x = x[None]
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
        keep = mask.to(device=x.device).bool()
    peaks = torch.where(keep[..., None], x, float("-inf")).amax(dim=(1, 2)).abs()
    used = keep.any(dim=1)
    scaled = x[used] / peaks[used, None, None]
    if not torch.isfinite(scaled).all():
        raise ValueError("calibration input holds NaN or inf values (or a sample that is all zeros)")
    # one gram a sample (a batched gram rounds differently, ~1e-5 in KPM's smallest components)
    return [rows.t() @ rows for rows in (sample[real] for sample, real in zip(scaled, keep[used], strict=True))]


class Covariance:
    """The running sum of ``X^T X`` over samples of one layer's input (float32), with the sample count."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.samples = 0

    def add(self, x: Tensor, mask: Tensor | None) -> None:
        """Add the samples of an input (see ``sample_grams``)."""
        self.add_grams(sample_grams(x, mask))

    def add_grams(self, grams: list[Tensor]) -> None:
        """Add per-sample grams one by one, in order: peft's arithmetic to the last bit."""
        for gram in grams:
            self.total = gram if self.total is None else self.total + gram
            self.samples += 1

    def mean(self) -> Tensor:
        if self.total is None or self.samples == 0:
            raise ValueError("no calibration samples reached this layer")
        return self.total / self.samples


def wait(module: nn.Module, covariance: Tensor) -> None:
    """Leave ``covariance`` (in, in) on ``module`` for its next CorDA init."""
    _WAITING[module] = covariance


def waiting(module: nn.Module) -> Tensor | None:
    """The covariance left on ``module``, if any."""
    return _WAITING.get(module)


def take(module: nn.Module) -> Tensor:
    """Pop the covariance left on ``module`` (an init uses it once)."""
    return _WAITING.pop(module)


def damped(covariance: Tensor) -> tuple[Tensor, Tensor]:
    """(C', C'^-1): C plus the smallest damping d mean(diag C) I, d = 0.01 * 2^k, whose inverse is accurate."""
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    level = torch.diagonal(covariance).mean()
    damp = 0.01
    for _ in range(64):
        fixed = covariance + eye * level * damp
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            return fixed, inverse
        damp *= 2
    raise ValueError("the calibration covariance cannot be inverted even after damping")


def corda_factors(weight: Tensor, covariance: Tensor, r: int, scale: float, init: str) -> tuple[Tensor, Tensor]:
    """(A (r, in), B (out, r)) of CorDA from a float32 (out, in) weight and its input covariance (in, in)."""
    fixed, inverse = damped(covariance.to(weight.dtype))
    u, s, vh = torch.linalg.svd(weight @ fixed, full_matrices=False)
    v_hat = vh @ inverse  # (k, in): rows of V_hat^T
    chosen = slice(None, r) if MODES[init] == "ipm" else slice(-r, None)
    root = torch.sqrt(s[chosen] / scale)
    return (root[:, None] * v_hat[chosen]).contiguous(), (u[:, chosen] * root).contiguous()
