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


def zero_init_residual(model: CIFAR10CNN) -> None:
    """Zero each residual block's last batch-norm scale: every block then starts as its shortcut, so the signal
    passes the untrained network almost unchanged (Goyal et al. 2017; torchvision's `zero_init_residual`)."""
    for module in model.modules():
        if isinstance(module, ResidualBlock):
            nn.init.zeros_(module.bn2.weight)


WHITENING_EPS = 5e-4  # added to each eigenvalue (patch variance, normalised pixels) before its inverse root: airbench's


@torch.no_grad()
def init_stem_whitening(model: CIFAR10CNN, images: torch.Tensor, chunk: int = 500) -> None:
    """Set the stem convolution's first filters to a whitening of the images' k x k patches (airbench's init).

    images: (N, 3, 32, 32) normalised float, as the model sees them. The covariance of the patches (3*k*k dims)
    gives eigenvectors e_i and eigenvalues l_i; filter pairs +e_i/sqrt(l_i + eps) and -e_i/sqrt(l_i + eps), largest
    first, fill min(2*3*k*k, out_channels) filters (54 of 64 at k=3); the rest keep their random init. The pairs
    keep both signs of each component through the ReLU after the stem.
    """
    conv = model.stem[0]
    out_channels, in_channels, kh, kw = conv.weight.shape
    dims = in_channels * kh * kw
    covariance = torch.zeros(dims, dims, dtype=torch.float64, device=images.device)
    count = 0
    for start in range(0, len(images), chunk):  # in chunks: all patches of 5,000 images at once are ~0.5 GB
        patches = images[start : start + chunk].float().unfold(2, kh, 1).unfold(3, kw, 1)  # (B, C, H', W', kh, kw)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, dims).double()  # (B*H'*W', C*kh*kw)
        covariance += patches.T @ patches
        count += len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance / count)  # ascending
    pairs = min(dims, out_channels // 2)
    filters = (eigenvectors.T.flip(0)[:pairs] / (eigenvalues.flip(0)[:pairs, None] + WHITENING_EPS).sqrt())
    filters = filters.view(pairs, in_channels, kh, kw).to(conv.weight.dtype)
    conv.weight[: 2 * pairs] = torch.cat((filters, -filters))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
