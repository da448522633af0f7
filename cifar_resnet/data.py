"""Data: every source ends as uint8 tensors (N, 3, 32, 32) plus int64 labels; batching, cropping, flipping and
normalising happen on the training device, in a few vectorised tensor ops per batch.

Sources: torchvision's CIFAR10 (downloaded), an image folder (`train/<class>/*`, `test/<class>/*`, decoded once
and cached), and a synthetic set with real class structure for tests and demos.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import Config
from .errors import DataError, StorageError
from .files import atomic_torch_save, file_lock

log = logging.getLogger(__name__)

IMAGE_SIZE_PX = 32
CROP_PADDING_PX = 4
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # per channel, on the 0..1 scale
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # matched in any case, as torchvision's ImageFolder does
MIN_CLASSES = 2  # a classifier of one class is 100% right and learns nothing
CACHE_FOLDER = ".cifar_resnet_cache"
CIFAR10_FOLDER = "cifar-10-batches-py"  # where torchvision extracts its archive, in data_dir
CACHE_FORMAT_VERSION = 2  # 2: an image folder's cache is found by its folders' stamps (1: by every file's stat)

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


class ImageSet:
    """Images (N, 3, 32, 32) uint8 and their labels (N,) int64, as a view: the rows `rows` of stored tensors that
    other views share (a run's training and validation images are views of one stored training set, and the runs of
    a pack share one stored copy on the device). `images` and `labels` are the view's own, copied out on access;
    `DeviceLoader` reads the stored tensors through `rows` instead.
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


# --- sources --------------------------------------------------------------------------------------------------


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


CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta")


def _cifar10_cache_file(data_dir: Path) -> Path | None:
    """The decoded-tensor cache of the extracted batches, named by their names, sizes and modification times (any
    change means a new name); None while any batch file is missing."""
    digest = hashlib.sha256(f"v{CACHE_FORMAT_VERSION}".encode())
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
    if cache_file is not None and cache_file.exists():
        try:
            cached = torch.load(cache_file, weights_only=True, mmap=True)
            return (ImageSet(cached["train_images"], cached["train_labels"]),
                    ImageSet(cached["test_images"], cached["test_labels"]), list(cached["classes"]))
        except Exception as error:  # a damaged cache is rebuilt, never trusted
            log.warning("ignoring unreadable CIFAR-10 cache %s: %s", cache_file, error)
    import torchvision  # deferred: torchvision's import is slow and only this source and the folder use it

    def open_sets() -> list[torchvision.datasets.CIFAR10]:
        return [torchvision.datasets.CIFAR10(root=data_dir, train=train, download=True) for train in (True, False)]

    try:
        with file_lock(data_dir / ".cifar10.lock"):
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
    if cache_file is not None and os.access(data_dir, os.W_OK):
        with file_lock(data_dir / ".cifar10.lock"):
            for stale in cache_file.parent.glob("cifar10-*.pt"):
                if stale != cache_file:
                    stale.unlink(missing_ok=True)
            if not cache_file.exists():  # another process may have written it while this one waited
                atomic_torch_save(cache_file, {"train_images": train.images, "train_labels": train.labels,
                                               "test_images": test.images, "test_labels": test.labels,
                                               "classes": classes})
    return train, test, classes


def load_image_folder(data_dir: Path) -> tuple[ImageSet, ImageSet, list[str]]:
    """`data_dir/train/<class>/*` and `data_dir/test/<class>/*`, decoded once and cached in `data_dir`."""
    train, train_classes = _load_folder_split(data_dir / "train")
    test, test_classes = _load_folder_split(data_dir / "test")
    if train_classes != test_classes:
        raise DataError(
            f"data_dir: class folders of {data_dir / 'test'} ({', '.join(test_classes)}) do not match "
            f"those of {data_dir / 'train'} ({', '.join(train_classes)})"
        )
    return train, test, train_classes


def _folder_stamp(path: str | os.PathLike[str]) -> list[int]:
    """What changes when a folder's entries change: its modification and status-change times, in nanoseconds.
    Adding, removing or renaming an entry updates both; only the kernel sets the second, so a tool that puts the
    first back (tar, `rsync -t`, `touch -d`) still changes the stamp."""
    stat = os.stat(path)
    return [stat.st_mtime_ns, stat.st_ctime_ns]


def _list_folder(
    folder: Path, stamps: dict[str, list[int]] | None = None
) -> tuple[list[tuple[str, int]], list[str]]:
    """The images under `folder/<class>/` (subfolders included) with their labels, and the class names.

    With `stamps`, every folder listed (`folder`, its class folders and their subfolders) is entered there under its
    path relative to `folder`, with its `_folder_stamp` taken just before it is listed: a change made while it is
    listed shows as a changed stamp next time.

    The order is torchvision's `ImageFolder`'s: classes are the sorted folder names, images sorted by folder then
    name, and an image is a regular file whose name ends in one of IMAGE_EXTENSIONS, in any case.

    Links: a link to a file is followed (deduplicated data sets link their image files); a link to a folder, as a
    class folder or inside one, is refused with one line. Following those is what made a link back up the tree
    (`train/cat/loop -> ..`) relabel every image as `cat`, and two such links loop forever (issue 8).
    `folder` itself and the folders above it may be links.
    """
    if not folder.is_dir():
        raise DataError(f"data_dir: {folder} is not a folder; expected <data_dir>/train/<class>/*.jpg and test/")
    if stamps is not None:
        stamps[os.curdir] = _folder_stamp(folder)
    classes = sorted(entry.name for entry in _scan(folder) if _is_folder(entry))
    if not classes:
        raise DataError(f"data_dir: {folder} has no class folders; expected {folder}/<class>/*.jpg")
    if len(classes) < MIN_CLASSES:
        raise DataError(
            f"data_dir: {folder} has one class folder ({classes[0]}); a classifier needs at least {MIN_CLASSES}"
        )
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        images = _list_images(os.path.join(folder, name), stamps, str(folder))
        if not images:
            empty.append(os.path.join(folder, name))
        samples.extend((path, label) for path in images)
    if empty:
        raise DataError(
            f"data_dir: no images in class folder {', '.join(empty)}; "
            f"images are files ending in {', '.join(IMAGE_EXTENSIONS)} (any case)"
        )
    return samples, classes


def _scan(folder: str | os.PathLike[str]) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as error:
        raise DataError(f"data_dir: cannot list {folder}: {error.strerror}") from None


def _is_folder(entry: os.DirEntry[str]) -> bool:
    """Whether `entry` is a real folder; a link to a folder is a DataError, a link to anything else is not."""
    if entry.is_symlink() and entry.is_dir():  # is_dir() follows the link
        raise DataError(
            f"data_dir: {entry.path} is a link to a folder; links to folders are not followed (a link up the tree "
            "relabels or loops): replace it with a real folder, or link the image files one by one"
        )
    return entry.is_dir(follow_symlinks=False)


def _list_images(class_dir: str, stamps: dict[str, list[int]] | None = None, root: str = "") -> list[str]:
    """The image files under `class_dir`, walked without following links to folders, in torchvision's order; each
    folder walked is stamped into `stamps`, if given, under its path relative to `root` (see `_list_folder`)."""
    files_by_folder: dict[str, list[str]] = {}
    pending = [class_dir]
    while pending:
        current = pending.pop()
        files_by_folder[current] = []
        if stamps is not None:
            stamps[os.path.relpath(current, root)] = _folder_stamp(current)
        for entry in _scan(current):
            if _is_folder(entry):
                pending.append(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                if entry.is_symlink() and not os.path.exists(entry.path):
                    raise DataError(f"data_dir: {entry.path} is a broken link (its target does not exist)")
                if entry.is_file():  # a regular file, or a link to one; never a pipe or a device
                    files_by_folder[current].append(entry.name)
    # torchvision sorts os.walk's (folder, files) by folder path, then each folder's files by name.
    return [os.path.join(path, name) for path in sorted(files_by_folder) for name in sorted(files_by_folder[path])]


def _stamps_unchanged(folder: Path, stamps: dict[str, list[int]]) -> bool:
    try:
        return all(_folder_stamp(folder / relative) == list(stamp) for relative, stamp in stamps.items())
    except OSError:  # a folder gone
        return False


def _load_folder_split(folder: Path) -> tuple[ImageSet, list[str]]:
    """One split's images and class names: from its decode cache while the folder is unchanged, else decoded from
    the files (and cached, in `<data_dir>/.cifar_resnet_cache/`).

    A cache holds the stamps (`_folder_stamp`) of every folder of the split as it was listed: the split folder, its
    class folders and their subfolders. A warm cache is found by checking those few stamps, without listing or
    stat-ing the image files (60,000 of them for CIFAR-10: BENCHMARKS.md has the times). What changes a stamp, and so
    decodes the folder again: an image added, removed or renamed, an image replaced by another moved onto its name
    (as rsync, `mv` and atomic writers replace files), a class or subfolder added or removed; also what only touches
    a folder (`touch`, `chmod`), which decodes for nothing. What does not: an image rewritten in place under its name
    (`cp` onto it, an editor saving it) and a change to the target of a linked image file. After such a change,
    touch the image's folder or delete the cache folder. Stamps are as fine as the file system's timestamps.
    """
    cache_dir = folder.parent / CACHE_FOLDER

    def read_cache() -> tuple[ImageSet, list[str]] | None:
        for cache_file in sorted(cache_dir.glob(f"{folder.name}-*.pt")):
            try:
                # mmap: the pages are read as the tensors are first touched, with no second copy in memory
                cached = torch.load(cache_file, weights_only=True, mmap=True)
            except FileNotFoundError:  # removed as stale by a process that is rebuilding it
                continue
            except Exception as error:  # a damaged cache is rebuilt, never trusted
                log.warning("ignoring unreadable decode cache %s: %s", cache_file, error)
                continue
            if (isinstance(cached, dict) and cached.get("format") == CACHE_FORMAT_VERSION
                    and _stamps_unchanged(folder, cached["folders"])):
                return ImageSet(cached["images"], cached["labels"]), list(cached["classes"])
        return None

    if (found := read_cache()) is not None:
        return found
    stamps: dict[str, list[int]] = {}
    samples, classes = _list_folder(folder, stamps)
    # The name of this folder's cache: a new one for any change of its stamps or its listing.
    digest = hashlib.sha256(f"v{CACHE_FORMAT_VERSION}".encode())
    for relative, (modified, changed) in sorted(stamps.items()):
        digest.update(f"{relative}\0{modified}\0{changed}\n".encode())
    for path, label in samples:
        digest.update(f"{os.path.relpath(path, folder)}\0{label}\n".encode())
    cache_file = cache_dir / f"{folder.name}-{digest.hexdigest()[:16]}.pt"

    def decode() -> ImageSet:
        labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        return ImageSet(_decode_images([path for path, _ in samples]), labels)

    if not os.access(folder.parent, os.W_OK):
        log.warning("%s is read-only: decoding %s without a cache", folder.parent, folder)
        return decode(), classes
    with file_lock(cache_dir / f"{folder.name}.lock"):
        if (found := read_cache()) is not None:  # another process built it while this one waited
            return found
        decoded = decode()
        # Old caches of this split, and temporary files of writers killed mid-write (only the lock holder writes).
        for stale in [*cache_dir.glob(f"{folder.name}-*.pt"), *cache_dir.glob(f".{folder.name}-*.tmp")]:
            stale.unlink(missing_ok=True)
        try:
            atomic_torch_save(cache_file, {"format": CACHE_FORMAT_VERSION, "images": decoded.images,
                                           "labels": decoded.labels, "classes": classes, "folders": stamps})
        except StorageError as error:  # the cache only saves time: train on, as for a read-only data folder
            log.warning("%s; training on without a decode cache", error)
            return decoded, classes
    log.info("decoded %d images in %s; cached in %s", len(decoded), folder, cache_file)
    return decoded, classes


DECODE_CHUNK_IMAGES = 1000  # images per decoding task: enough to amortise a task's overhead, small enough to
# keep every core busy to the end


def decode_threads() -> int:
    """Threads for the first decode of an image folder: every core this process may use (the decoders release the
    GIL; the decode runs once per folder, under the cache lock)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _decode_with_pil(path: str, torchvision_error: str) -> torch.Tensor:
    """(3, H, W) uint8: the file as PIL's convert("RGB") gives it; a DataError with torchvision's reason if PIL
    cannot read it either."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    except (OSError, ValueError, Image.DecompressionBombError):  # not an image, damaged, or absurdly large
        raise DataError(f"data_dir: cannot read image {path}: {torchvision_error}") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def _decode_images(paths: list[str], threads: int | None = None) -> torch.Tensor:
    """Decode `paths` (32x32 images) into one (N, 3, 32, 32) uint8 tensor, in chunks on `threads` threads.

    The pixels are those PIL's `convert("RGB")` gives (what torchvision's ImageFolder loads), whatever the file's
    bit depth, mode or palette. torchvision's decoder (libpng, libjpeg-turbo) gives PIL's pixels for 8-bit files of
    every mode: grey, grey and alpha, palette (with transparency or not), RGBA (alpha dropped), CMYK JPEG. A 16-bit
    PNG it returns as uint16: scaled to 8 bits by its high byte, as PIL scales 16-bit colour PNGs (PIL clips 16-bit
    grey at 255 instead, which turns any real 16-bit grey image white). A file it cannot decode (a BMP named .png)
    goes to PIL.
    """
    from concurrent.futures import ThreadPoolExecutor

    from torchvision.io import ImageReadMode, decode_image, read_file

    images = torch.empty(len(paths), 3, IMAGE_SIZE_PX, IMAGE_SIZE_PX, dtype=torch.uint8)

    def decode_chunk(start: int) -> None:
        for i in range(start, min(start + DECODE_CHUNK_IMAGES, len(paths))):
            path = paths[i]
            try:
                image = decode_image(read_file(path), mode=ImageReadMode.RGB)  # (3, H, W) uint8; uint16 if 16-bit
            except RuntimeError as error:
                image = _decode_with_pil(path, str(error).splitlines()[0])
            if image.dtype != torch.uint8:
                from torchvision.transforms.v2.functional import to_dtype

                image = to_dtype(image, torch.uint8, scale=True)  # 16 -> 8 bits: the high byte, not the value mod 256
            if image.shape[1:] != (IMAGE_SIZE_PX, IMAGE_SIZE_PX):
                raise DataError(
                    f"data_dir: image {path} is {image.shape[2]}x{image.shape[1]}; "
                    f"only {IMAGE_SIZE_PX}x{IMAGE_SIZE_PX} images are allowed"
                )
            images[i] = image

    # torchvision 0.29 marks its decoders deprecated in favour of TorchCodec; they are 2.5x faster than PIL here,
    # give identical pixels, and run once per folder thanks to the cache. The filter is set here, once, for the
    # threads too: warning filters are process-wide, and catch_warnings is not thread-safe.
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=threads or decode_threads()) as pool:
        warnings.simplefilter("ignore", DeprecationWarning)
        # list(): waits for every chunk and raises the first chunk's error (a DataError naming the file)
        list(pool.map(decode_chunk, range(0, len(paths), DECODE_CHUNK_IMAGES)))
    return images


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


# --- device-side batches --------------------------------------------------------------------------------------


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
        self.data = data.to(device)  # the stored tensors are moved once, and shared with every view of them
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

    def stored_rows(self, index: torch.Tensor) -> torch.Tensor:
        """The stored tensors' rows of the split's images at `index`."""
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
        stored_images, stored_labels, rows = self.data.stored_images, self.data.stored_labels, self.data.rows
        if not self.augment:  # in order: slices of the split (of its rows, for a view of shared tensors)
            for start in range(0, len(self.data), self.batch_size):
                part = slice(start, start + self.batch_size)
                if rows is None:
                    yield self.normalize(stored_images[part]), stored_labels[part]
                else:
                    yield self.normalize(stored_images[rows[part]]), stored_labels[rows[part]]
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
