"""The layout of K runs of one shape as one fused model (HFTA's horizontal fusion: Wang et al., MLSys 2021,
UofT-EcoSystem/hfta).

K copies of `CIFAR10CNN` become one model of the same structure (`fuse`): every convolution a grouped convolution
with `groups=K` (member k's images are channel group k of the batch, (B, 3K, H, W)), every batch norm one over K*C
channels (per-channel statistics are per-member statistics), the head one batched matmul giving (K, B, classes).
Member k's loss is its own cross-entropy with its own label smoothing (`member_losses`); the sum's gradient with
respect to member k's weights is member k's gradient alone. So a member trains as it does alone, to float rounding
(in float64: ~1e-16 per step). Slot k of a fused tensor is the k-th of K equal blocks along its first dimension
(`slot_view`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class FusedBatchNorm2d(nn.BatchNorm2d):
    """Batch norm over K*C channels, K members' C each. `num_batches_tracked` is one counter per slot, (K,), which
    the group counts (a free slot counts no batch); with a fixed momentum, as here, the counter does not enter the
    arithmetic."""

    def __init__(self, slots: int, norm: nn.BatchNorm2d, device: torch.device, dtype: torch.dtype) -> None:
        if norm.momentum is None or not norm.track_running_stats:
            raise ValueError("a fused batch norm needs a fixed momentum and running statistics")
        super().__init__(slots * norm.num_features, norm.eps, norm.momentum, device=device, dtype=dtype)
        self.num_batches_tracked = torch.zeros(slots, dtype=torch.long, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                        self.training, self.momentum, self.eps)


class FusedLinear(nn.Module):
    """K linear layers as one batched matmul: (B, K*in) -> (K, B, out). Weight (K, out, in), bias (K, out)."""

    def __init__(self, slots: int, linear: nn.Linear, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        if linear.bias is None:
            raise ValueError("a fused linear layer needs a bias")
        self.slots = slots
        self.weight = nn.Parameter(torch.zeros(slots, linear.out_features, linear.in_features, device=device,
                                               dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(slots, linear.out_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], self.slots, -1).transpose(0, 1)  # (K, B, in)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))  # (K, B, out), as addmm


def fused_layer(module: nn.Module, slots: int, device: torch.device, dtype: torch.dtype) -> nn.Module | None:
    """`module` for `slots` members, or None for a layer without tensors (ReLU, pooling), which serves as it is."""
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d(slots * module.in_channels, slots * module.out_channels, module.kernel_size, module.stride,
                         module.padding, module.dilation, slots * module.groups, module.bias is not None,
                         module.padding_mode, device=device, dtype=dtype)
    if isinstance(module, nn.BatchNorm2d):
        return FusedBatchNorm2d(slots, module, device, dtype)
    if isinstance(module, nn.Linear):
        return FusedLinear(slots, module, device, dtype)
    if module._parameters or module._buffers:
        raise ValueError(f"cannot fuse a {type(module).__name__}: only Conv2d, BatchNorm2d and Linear layers")
    return None


def fuse(model: nn.Module, slots: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`model` (its structure only: a model on the meta device will do) with each layer replaced by its fused
    version for `slots` members; the forward pass stays the model's own. Weights start at zero (free slots)."""
    for name, module in list(model.named_modules()):
        fused = fused_layer(module, slots, device, dtype) if name else None
        if fused is not None:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, fused)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    return model


def slot_view(fused: torch.Tensor, slots: int, slot: int, shape: Sequence[int]) -> torch.Tensor:
    """Slot `slot`'s block of a fused tensor (the slot-th of `slots` equal blocks along its first dimension), as a
    member's tensor of `shape`: the same storage, so writes either way are seen both ways."""
    return fused.unflatten(0, (slots, -1))[slot].view(shape)


def member_losses(logits: torch.Tensor, labels: torch.Tensor, nll_weights: torch.Tensor,
                  smooth_weights: torch.Tensor) -> torch.Tensor:
    """Each member's mean cross-entropy with its own label smoothing eps: (K,) from logits (K, B, classes) and labels
    (K, B), as `nn.CrossEntropyLoss(label_smoothing=eps)` computes it, (1 - eps) * nll + eps / classes * smooth,
    with nll_weights = 1 - eps and smooth_weights = eps / classes as tensors, so that members differ without a
    capture of their own."""
    log_probs = logits.log_softmax(-1)
    nll = -log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1).mean(-1)  # (K,)
    smooth = -log_probs.sum(-1).mean(-1)  # (K,)
    return nll_weights * nll + smooth * smooth_weights
