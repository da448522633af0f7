"""Device-side batches: a split on the training device, served as normalised float batches, with the crop and flip
of training images done there in one gather per batch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .images import ImageSet

CROP_PADDING_PX = 4
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # per channel, on the 0..1 scale
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def random_crop_flip(
    images: torch.Tensor, padding: int, generator: torch.Generator | None = None, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Random `padding`-px zero-padded crop and horizontal flip of each image, in one gather.

    images: (B, C, H, W), any dtype, on any device (the generator must be on the same device). flip: (B,) bool,
    which images to mirror; a coin toss per image when None.
    """
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p), zeros outside
    top = torch.randint(0, 2 * padding + 1, (n,), device=device, generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), device=device, generator=generator)
    if flip is None:
        flip = torch.rand(n, device=device, generator=generator) < 0.5
    rows = top[:, None] + torch.arange(h, device=device)  # (B, H)
    cols = left[:, None] + torch.arange(w, device=device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip is the crop's columns read backwards
    # One flat index per output pixel, shared by the channels: torch.gather on it is several times faster than
    # four broadcast index tensors (advanced indexing), most of all on a CPU.
    flat = (rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.flatten(2).gather(2, flat).view(n, c, h, w)  # (B, C, H, W)


class DeviceLoader:
    """One split on the training device, served as normalised float batches. The split is a view (`ImageSet`): its
    images stay in the stored uint8 tensor it shares with the other splits, and with other runs of a pack.

    Training order: a fresh permutation each epoch, drop_last (fixed shapes), crop + flip per batch. With
    `alternating_flip` (airbench), a random half of the images is mirrored in odd epochs and the other half in even
    ones, so each image is seen both ways every two epochs; `set_epoch` says which epoch comes next.
    Evaluation order: as stored, every image once, no augmentation.
    """

    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator | None = None,
        augment: bool = False,
        alternating_flip: bool = False,
    ) -> None:
        # Nothing is copied where the split is on `device` already: a run moves its source there once, before it is
        # split, and every view shares that copy. A split elsewhere (on the CPU) is copied whole, for this loader.
        self.data = data.to(device)
        self.batch_size = batch_size
        self.generator = generator
        self.augment = augment
        self.epoch = 1
        # Drawn once, here: a resumed run restores the generator after this draw, so it gets the same halves.
        self.flipped_in_odd_epochs: torch.Tensor | None = None  # (N,) bool
        if augment and alternating_flip:
            self.flipped_in_odd_epochs = torch.rand(len(data), device=device, generator=generator) < 0.5
        self.mean = torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1) * 255

    def set_epoch(self, epoch: int) -> None:
        """The 1-based epoch the next pass serves (for alternating flips)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.augment:
            return len(self.data) // self.batch_size
        return -(-len(self.data) // self.batch_size)

    def stored_rows(self, index: torch.Tensor | slice) -> torch.Tensor | slice:
        """The stored tensors' rows of the split's images at `index` (positions, or a slice of them)."""
        return index if self.data.rows is None else self.data.rows[index]

    def first(self, count: int) -> torch.Tensor:
        """The split's first `count` images, (count, 3, 32, 32) uint8, unaugmented."""
        return self.data.stored_images[self.stored_rows(torch.arange(min(count, len(self.data)),
                                                                         device=self.data.stored_labels.device))]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        # In place on the fresh float copy (uint8 in, never the caller's tensor): one allocation per batch, not
        # three, which on a CPU costs more than the arithmetic.
        return images.to(torch.float32, copy=True).sub_(self.mean).div_(self.std)  # (B, 3, 32, 32) float32

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stored_images, stored_labels = self.data.stored_images, self.data.stored_labels
        if not self.augment:  # in order: slices of the split (of its rows, for a view of shared tensors)
            for start in range(0, len(self.data), self.batch_size):
                batch_rows = self.stored_rows(slice(start, start + self.batch_size))  # (B,) rows, or a slice
                yield self.normalize(stored_images[batch_rows]), stored_labels[batch_rows]
            return
        order = torch.randperm(len(self.data), device=stored_labels.device, generator=self.generator)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]  # (B,) positions in the split
            flip = None
            if self.flipped_in_odd_epochs is not None:
                flip = self.flipped_in_odd_epochs[index] ^ (self.epoch % 2 == 0)
            batch_rows = self.stored_rows(index)  # (B,) rows of the stored tensors
            images = random_crop_flip(stored_images[batch_rows], CROP_PADDING_PX, self.generator, flip)
            yield self.normalize(images), stored_labels[batch_rows]
