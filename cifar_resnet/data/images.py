"""What every data source ends as: its images as `ImageSet`s (views of stored tensors that others share, on the CPU or
the training device), a source's training and test sets (`DataSource`), and a run's splits of them (`DataSplits`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_SIZE_PX = 32


class ImageSet:
    """Images (N, 3, 32, 32) uint8 and their labels (N,) int64, as a view: the rows `rows` of stored tensors that
    other views share (a run's training and validation images are views of one stored training set, and the runs of
    a pack share one stored copy on the device). `images` and `labels` are the view's own: the stored tensors where
    the view is all of them (`rows` None), else copied out on each access; `DeviceLoader` reads the stored tensors
    through `rows` instead.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        self.stored_images = images  # (M, 3, 32, 32) uint8
        self.stored_labels = labels  # (M,) int64
        self.rows = rows  # (N,) int64 indices into the stored tensors, in order; None: all M of them

    def __len__(self) -> int:
        return len(self.stored_labels) if self.rows is None else len(self.rows)

    @property
    def images(self) -> torch.Tensor:  # (N, 3, 32, 32) uint8
        return self.stored_images if self.rows is None else self.stored_images[self.rows]

    @property
    def labels(self) -> torch.Tensor:  # (N,)
        return self.stored_labels if self.rows is None else self.stored_labels[self.rows]

    def subset(self, indices: torch.Tensor) -> ImageSet:
        """The images at `indices` (of this set), as a view of the same stored tensors."""
        rows = indices if self.rows is None else self.rows[indices]
        return ImageSet(self.stored_images, self.stored_labels, rows)

    def to(self, device: torch.device) -> ImageSet:
        """The same view on `device` (the stored tensors moved once; nothing copied when already there)."""
        rows = None if self.rows is None else self.rows.to(device)
        return ImageSet(self.stored_images.to(device), self.stored_labels.to(device), rows)


@dataclass
class DataSource:
    """A data source as loaded, before the validation split: what runs on the same source can share."""

    train: ImageSet
    test: ImageSet
    classes: list[str]

    def to(self, device: torch.device) -> DataSource:
        return DataSource(self.train.to(device), self.test.to(device), self.classes)


@dataclass
class DataSplits:
    train: ImageSet
    val: ImageSet
    test: ImageSet
    classes: list[str]
