"""Small architectures with hand-declared permutation specs (``pleas.spec``).

Every ReLU is its own module so that activation matching can hook it; ``features(x)`` returns the input of
the task head, ``forward(x)`` returns ``head(features(x))``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from mergelab.core.errors import ConfigError


class MLP(nn.Module):
    """``in_dim → hidden[0] → ... → hidden[-1] → out_dim`` with ReLU; inputs are flattened."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int) -> None:
        super().__init__()
        if not hidden:
            raise ConfigError("MLP needs at least one hidden layer to merge")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = in_dim
        for i, h in enumerate(hidden):
            layers[f"fc{i}"] = nn.Linear(width, h)
            layers[f"act{i}"] = nn.ReLU()
            width = h
        self.body = nn.Sequential(layers)
        self.head = nn.Linear(width, out_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Stem(nn.Module):
    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu-conv-bn, plus the identity or a 1×1 conv-bn shortcut, then ReLU."""

    def __init__(self, in_width: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_width, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_width != width:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_width, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.relu2(out + skip)


class SmallResNet(nn.Module):
    """A small ResNet for 28×28 images: stem, ``blocks_per_stage`` basic blocks per width (stride 2 between
    stages), global average pooling and a linear head."""

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 1,
        num_classes: int = 10,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if not widths or blocks_per_stage < 1:
            raise ConfigError("SmallResNet needs at least one stage and one block per stage")
        self.stem = Stem(in_channels, widths[0], stem_stride)
        blocks = []
        width = widths[0]
        for stage, w in enumerate(widths):
            for b in range(blocks_per_stage):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(BasicBlock(width, w, stride))
                width = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
