"""The data sources (torchvision's CIFAR10, downloaded and cached; an image folder; a synthetic set with real class
structure, for tests and demos) and the split of a source into training, validation and test images."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import Config
from ..errors import DataError
from ..files import file_lock
from .image_folder import CACHE_FOLDER, check_is_folder, load_image_folder, read_cache_file, save_cache_file
from .images import IMAGE_SIZE_PX, DataSource, DataSplits, ImageSet

log = logging.getLogger(__name__)

SYNTHETIC_CLASSES = 10
SYNTHETIC_TRAIN_IMAGES = 10_000  # when train_size is 0; val_size more are made for validation
SYNTHETIC_TEST_IMAGES = 2_000  # when test_size is 0
TEST_SUBSET_SEED = 0  # which test images a test_size subset holds
SYNTHETIC_DATA_SEED = 1234  # the synthetic data set is the same for every run, whatever its seed
SYNTHETIC_PROTOTYPE_PX = 4  # class prototypes are 4x4 colour layouts, upsampled to 32x32
# How far the class prototypes stand apart, on the 0..1 scale: each is a shared grey layout plus this much of its own
# random layout. With the noise below, the trial's cells (width 16, 2 epochs) land apart and below 100%.
SYNTHETIC_CLASS_CONTRAST = 0.2
SYNTHETIC_NOISE_STD = 0.3  # per-pixel Gaussian noise on the 0..1 scale
CIFAR10_FOLDER = "cifar-10-batches-py"  # where torchvision extracts its archive, in data_dir
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta")
CIFAR10_CACHE_VERSION = 1  # of its decode cache's contents (an image folder's cache has a version of its own)


def load_splits(config: Config, device: torch.device | None = None) -> DataSplits:
    """The configured source on `device` (default: the CPU), split as `split` does."""
    source = load_source(config)
    return split(source.to(device) if device is not None else source, config)


def source_key(config: Config) -> tuple:
    """What `load_source` depends on: runs with the same key can share one loaded copy of the data."""
    if config.dataset == "synthetic":
        return (config.dataset, config.val_size + (config.train_size or SYNTHETIC_TRAIN_IMAGES),
                config.test_size or SYNTHETIC_TEST_IMAGES)
    return (config.dataset, os.path.realpath(config.data_dir))


def check_source_present(config: Config) -> None:
    """What `load_source` would fail on at once, found with a few stats: an image folder without its `train/` or
    `test/` folder; CIFAR-10's files, downloaded now where they are missing (so that a download that cannot happen
    fails here). What only reading the images can find (an empty class folder, an unreadable file) is left to
    `load_source`."""
    data_dir = Path(config.data_dir)
    if config.dataset == "imagefolder":
        for folder in (data_dir / "train", data_dir / "test"):
            check_is_folder(folder)
    elif config.dataset == "cifar10" and not all((data_dir / CIFAR10_FOLDER / name).is_file()
                                                 for name in CIFAR10_FILES):
        load_cifar10(data_dir)  # the download (its one owner), or its one-line DataError; the run reads its cache


def load_source(config: Config) -> DataSource:
    """The configured source's training and test images and class names, on the CPU."""
    if config.dataset == "cifar10":
        return DataSource(*load_cifar10(Path(config.data_dir)))
    if config.dataset == "imagefolder":
        return DataSource(*load_image_folder(Path(config.data_dir)))
    train_images = config.val_size + (config.train_size or SYNTHETIC_TRAIN_IMAGES)
    return DataSource(*make_synthetic(train_images, config.test_size or SYNTHETIC_TEST_IMAGES))


def split(source: DataSource, config: Config) -> DataSplits:
    """`val_size` training images held out (chosen by `seed`), then at most `train_size` training and `test_size`
    test images: views of the source's stored tensors, wherever they are."""
    train, test = source.train, source.test
    if config.val_size >= len(train):
        raise DataError(f"val_size: {config.val_size} leaves no training images out of {len(train)}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))
    val, rest = order[: config.val_size], order[config.val_size :]
    if config.train_size > len(rest):
        raise DataError(
            f"train_size: {config.train_size} is more than the {len(rest)} training images left after validation"
        )
    if config.test_size > len(test):
        raise DataError(f"test_size: {config.test_size} is more than the {len(test)} test images")
    if config.train_size:
        rest = rest[: config.train_size]
    if config.test_size:
        # A random subset (folders list the test set class by class), the same one whatever the run's seed, so
        # that the runs of a sweep are tested on the same images.
        chosen = torch.randperm(len(test), generator=torch.Generator().manual_seed(TEST_SUBSET_SEED))
        test = test.subset(chosen[: config.test_size].to(test.stored_labels.device))
    device = train.stored_labels.device  # the indices live where the stored tensors do
    return DataSplits(train=train.subset(rest.to(device)), val=train.subset(val.to(device)), test=test,
                      classes=source.classes)


def _cifar10_cache_file(data_dir: Path) -> Path | None:
    """The decoded-tensor cache of the extracted batches, named by their names, sizes and modification times (any
    change means a new name); None while any batch file is missing."""
    digest = hashlib.sha256(f"v{CIFAR10_CACHE_VERSION}".encode())
    for name in CIFAR10_FILES:
        try:
            stat = os.stat(data_dir / CIFAR10_FOLDER / name)
        except OSError:
            return None
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return data_dir / CACHE_FOLDER / f"cifar10-{digest.hexdigest()[:16]}.pt"


def load_cifar10(data_dir: Path) -> tuple[ImageSet, ImageSet, list[str]]:
    """torchvision's CIFAR10, downloaded into `data_dir` once (one process downloads, the others wait).

    Its decoded tensors are cached beside it, as an image folder's are: torchvision checks every batch file's MD5
    and unpickles it on each load, which takes seconds; the cache is written only after those checks passed, and
    is named by the files' sizes and modification times, so a changed file is checked again.
    """
    cache_file = _cifar10_cache_file(data_dir)
    cached = read_cache_file(cache_file) if cache_file is not None else None
    if isinstance(cached, dict):
        return (ImageSet(cached["train_images"], cached["train_labels"]),
                ImageSet(cached["test_images"], cached["test_labels"]), list(cached["classes"]))
    import torchvision  # deferred: torchvision's import is slow and only this source and the folder use it

    def open_sets() -> list[torchvision.datasets.CIFAR10]:
        return [torchvision.datasets.CIFAR10(root=data_dir, train=train, download=True) for train in (True, False)]

    # A folder that exists but cannot be written (a shared read-only copy) can hold no lock, and needs none: nothing
    # is written there (no download, no cache).
    writable = not data_dir.exists() or os.access(data_dir, os.W_OK)
    if not writable:
        log.warning("%s is read-only: reading CIFAR-10 there without a cache", data_dir)
    try:
        with file_lock(data_dir / ".cifar10.lock") if writable else contextlib.nullcontext():
            # torchvision verifies the archive's and the extracted files' MD5 sums, and downloads or extracts
            # again when they are wrong, so a download cut short is never mistaken for good data.
            try:
                sets = open_sets()
            except RuntimeError:
                # Except batches.meta, checked only after the batches have passed: an extraction over an older
                # folder, cut short, can leave it broken for good. Start that folder over, once.
                shutil.rmtree(data_dir / CIFAR10_FOLDER, ignore_errors=True)
                sets = open_sets()
    except (OSError, RuntimeError) as error:
        raise DataError(
            f"data_dir: could not download or read CIFAR-10 in {data_dir} ({error}); without internet access, "
            "use dataset=imagefolder with a local copy"
        ) from None
    train, test = (
        ImageSet(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets)) for s in sets
    )
    classes = list(sets[0].classes)
    cache_file = _cifar10_cache_file(data_dir)
    if cache_file is not None and writable:
        with file_lock(data_dir / ".cifar10.lock"):
            # Another process may have written it while this one waited; a damaged one is replaced.
            if read_cache_file(cache_file) is None:
                save_cache_file(cache_file, {"train_images": train.images, "train_labels": train.labels,
                                             "test_images": test.images, "test_labels": test.labels,
                                             "classes": classes})
    return train, test, classes


def make_synthetic(num_train: int, num_test: int) -> tuple[ImageSet, ImageSet, list[str]]:
    """Images of 10 classes, each a fixed coarse colour layout plus noise: learnable, but not by one pixel."""
    generator = torch.Generator().manual_seed(SYNTHETIC_DATA_SEED)
    layout = (SYNTHETIC_CLASSES + 1, 3, SYNTHETIC_PROTOTYPE_PX, SYNTHETIC_PROTOTYPE_PX)
    shared, *own = torch.rand(layout, generator=generator)
    prototypes = shared + SYNTHETIC_CLASS_CONTRAST * (torch.stack(own) - 0.5)
    prototypes = F.interpolate(prototypes, size=IMAGE_SIZE_PX, mode="bilinear", align_corners=False)

    def sample(count: int) -> ImageSet:
        labels = torch.randint(SYNTHETIC_CLASSES, (count,), generator=generator)
        noise = torch.randn(count, 3, IMAGE_SIZE_PX, IMAGE_SIZE_PX, generator=generator) * SYNTHETIC_NOISE_STD
        images = ((prototypes[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
        return ImageSet(images, labels)

    classes = [f"class{i}" for i in range(SYNTHETIC_CLASSES)]
    return sample(num_train), sample(num_test), classes
