"""A small random CNN the conformance suite drives like its text models (``make_tiny("cnn")``).

The token ids (B, T) become a picture (B, 3, T, 4), each id embedded as 4 pixels of 3 channels; then a stem conv,
one inverted-residual block (1x1 expand, 3x3 depthwise, 1x1 project, BatchNorm after each, ReLU6), a strided 3x3
conv, average pooling and a 3-way head. ``forward(input_ids=...)`` returns an object with ``.logits`` (B, 3), as a
transformers classifier does. BatchNorm statistics and affine parameters are random, so no norm is an identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class CNNOutput:
    logits: Tensor


class Block(nn.Module):
    def __init__(self, channels: int, expand: int = 2) -> None:
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn_depthwise = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, channels, 1, bias=False)
        self.bn_project = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self.bn_expand(self.expand(x)))
        h = F.relu6(self.bn_depthwise(self.depthwise(h)))
        return x + self.bn_project(self.project(h))


class TinyCNN(nn.Module):
    def __init__(self, vocab: int = 100, classes: int = 3) -> None:
        super().__init__()
        self.pixels = nn.Embedding(vocab, 12)
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.block = Block(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, classes)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.normal_(0.0, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(0.0, 0.1)

    def forward(self, input_ids: Tensor) -> CNNOutput:
        batch, length = input_ids.shape
        image = self.pixels(input_ids).view(batch, length, 3, 4).permute(0, 2, 1, 3)  # (B, 3, T, 4)
        h = F.relu6(self.bn0(self.stem(image)))  # (B, 8, T, 4)
        h = self.block(h)  # (B, 8, T, 4)
        h = F.relu6(self.bn1(self.down(h)))  # (B, 16, T/2, 2)
        return CNNOutput(self.head(h.mean(dim=(2, 3))))  # (B, 3)
