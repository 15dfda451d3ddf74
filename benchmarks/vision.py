"""Small image data for the vision benchmarks, offline: the handwritten digits as EfficientNet-Lite0 inputs.

``digits(size)`` is scikit-learn's ``load_digits``: 1,797 grayscale 8 x 8 images (values 0..16) of the digits 0..9,
the test part of UCI's "Optical Recognition of Handwritten Digits" (optdigits; Alpaydin & Kaynak 1998,
https://archive.ics.uci.edu/dataset/80, licensed CC BY 4.0), shipped inside scikit-learn. The split is fixed: a
stratified 80 / 20 split drawn with ``seed_split`` (12345), 1,437 train and 360 test images, each class kept in
proportion. Images are scaled to [0, 1], upscaled bilinearly to ``size`` x ``size``, repeated to 3 channels and
mapped to [-1, 1] (``adapterkit.models.efficientnet_lite.to_model_input``).

``corrupt`` / ``corruption_domains`` make test-time adaptation streams from them: Gaussian noise, blur, contrast and
pixelation at severities 1..5 (below).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

SEED_SPLIT = 12345


class Split(NamedTuple):
    """Train and test images (N, 3, size, size) float32 in [-1, 1] and labels (N,) int64 in 0..9."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def digits(size: int, seed_split: int = SEED_SPLIT) -> Split:
    """The digits at ``size`` x ``size``, split 80 / 20 (stratified, ``seed_split``): see the module docstring."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from adapterkit.models.efficientnet_lite import to_model_input

    data = load_digits()
    images = torch.from_numpy(data.images).float() / 16.0  # (1797, 8, 8) in [0, 1]
    labels = torch.from_numpy(data.target).long()  # (1797,)
    train, test = train_test_split(torch.arange(len(labels)).numpy(), test_size=0.2, random_state=seed_split,
                                   stratify=labels.numpy())
    train, test = torch.from_numpy(train), torch.from_numpy(test)
    pictures = to_model_input(images[:, None], size)  # (1797, 3, size, size) in [-1, 1]
    return Split(pictures[train], labels[train], pictures[test], labels[test])


# ---- corruptions (test-time adaptation streams) ------------------------------------------------------------------
# In the spirit of ImageNet-C (Hendrycks & Dietterich 2019, https://arxiv.org/abs/1903.12261): four corruptions at
# severities 1..5, applied to images in [-1, 1] (as ``digits`` gives them) and computed in [0, 1], pure torch,
# deterministic (the noise from a generator seeded with ``seed``). Sizes are fractions of the image side, so a
# severity means the same at any input size (ImageNet-C's values are in pixels at 224):
#   gaussian_noise  x + N(0, sigma^2),              sigma = 0.08, 0.12, 0.18, 0.26, 0.38          (ImageNet-C's)
#   blur            Gaussian blur,                  sigma = 1, 2, 3, 4.5, 6 % of the side
#   contrast        (x - mean) * c + mean per image, c = 0.4, 0.3, 0.2, 0.1, 0.05                   (ImageNet-C's)
#   pixelate        box-average onto a coarse grid, nearest back up; grid = 20, 15, 10, 7, 5 % of the side
# The digits hold 8 x 8 pixels of detail, so pixelation bites only once the grid is coarser than about 8 cells.
CORRUPTIONS = ("gaussian_noise", "blur", "contrast", "pixelate")
SEVERITIES = (1, 2, 3, 4, 5)
_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)
_BLUR = (0.01, 0.02, 0.03, 0.045, 0.06)
_CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
_PIXELATE = (0.20, 0.15, 0.10, 0.07, 0.05)


def corrupt(images: Tensor, kind: str, severity: int, seed: int = 0) -> Tensor:
    """``images`` (N, C, H, W) in [-1, 1] with corruption ``kind`` at ``severity`` (1..5); same range out."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"corruption {kind!r}: use one of {CORRUPTIONS}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity!r}: use 1..5")
    x = (images.float() + 1) / 2  # (N, C, H, W) in [0, 1]
    level = severity - 1
    side = min(x.shape[-2:])
    if kind == "gaussian_noise":
        g = torch.Generator().manual_seed(seed)
        x = x + _NOISE[level] * torch.randn(x.shape, generator=g)
    elif kind == "blur":
        x = _gaussian_blur(x, _BLUR[level] * side)
    elif kind == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * _CONTRAST[level] + mean
    else:
        cells = max(1, round(_PIXELATE[level] * side))
        small = torch.nn.functional.adaptive_avg_pool2d(x, cells)
        x = torch.nn.functional.interpolate(small, size=tuple(x.shape[-2:]), mode="nearest")
    return x.clamp(0, 1) * 2 - 1


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur (kernel radius 3 sigma), reflect padding at the border."""
    radius = min(max(1, int(3 * sigma + 0.5)), x.shape[-1] - 1, x.shape[-2] - 1)  # reflect padding: pad < size
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()  # (2r + 1,)
    channels = x.shape[1]
    rows = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)  # (C, 1, 1, k)
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (radius, radius, 0, 0), mode="reflect"), rows,
                                   groups=channels)
    cols = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)  # (C, 1, k, 1)
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 0, radius, radius), mode="reflect"), cols,
                                      groups=channels)


def corruption_domains(images: Tensor, labels: Tensor, kinds: tuple[str, ...] = CORRUPTIONS,
                       severities: tuple[int, ...] = SEVERITIES, seed: int = 0) -> list[tuple[str, Tensor, Tensor]]:
    """A stream's domains, severity by severity (each at every kind): ``[("gaussian_noise-1", x, y), ...]``; each
    domain's noise is seeded from ``seed``, its kind and severity."""
    domains = []
    for severity in severities:
        for i, kind in enumerate(kinds):
            x = corrupt(images, kind, severity, seed=seed * 1000 + severity * 10 + i)
            domains.append((f"{kind}-{severity}", x, labels))
    return domains
