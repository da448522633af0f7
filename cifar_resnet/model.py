"""The write-up's ResNet-style CNN: conv stem, three stages of two residual blocks, global pool, linear head."""

from __future__ import annotations

import torch
from torch import nn

BLOCKS_PER_STAGE = 2
STAGE_WIDTH_MULTIPLIERS = (1, 2, 4)  # stage channels are width * (1, 2, 4): 64, 128, 256 at width 64
STAGE_STRIDES = (1, 2, 2)  # spatial 32 -> 32 -> 16 -> 8


class ResidualBlock(nn.Module):
    """Two 3x3 conv + batch norm layers with a skip connection; a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CIFAR10CNN(nn.Module):
    """(N, 3, 32, 32) normalised images -> (N, num_classes) logits. About 2.78 M parameters at width 64."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages = []
        in_channels = width
        for multiplier, stride in zip(STAGE_WIDTH_MULTIPLIERS, STAGE_STRIDES):
            out_channels = width * multiplier
            blocks = [ResidualBlock(in_channels, out_channels, stride)]
            blocks += [ResidualBlock(out_channels, out_channels) for _ in range(BLOCKS_PER_STAGE - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))  # (N, 4*width, 8, 8)
        return self.fc(torch.flatten(self.pool(x), 1))  # (N, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
