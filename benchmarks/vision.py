"""Small image data for the vision benchmarks, offline: the handwritten digits as EfficientNet-Lite0 inputs.

``digits(size)`` is scikit-learn's ``load_digits``: 1,797 grayscale 8 x 8 images (values 0..16) of the digits 0..9,
the test part of UCI's "Optical Recognition of Handwritten Digits" (optdigits; Alpaydin & Kaynak 1998,
https://archive.ics.uci.edu/dataset/80, licensed CC BY 4.0), shipped inside scikit-learn. The split is fixed: a
stratified 80 / 20 split drawn with ``seed_split`` (12345), 1,437 train and 360 test images, each class kept in
proportion. Images are scaled to [0, 1], upscaled bilinearly to ``size`` x ``size``, repeated to 3 channels and
mapped to [-1, 1] (``adapterkit.models.efficientnet_lite.to_model_input``).
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
