"""An image folder as a data source (`dataset=imagefolder`): its listing in torchvision's `ImageFolder` order, the
decoding of its images on several threads, and the decode cache beside it, found again by its folders' stamps."""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path

import torch

from ..errors import DataError, StorageError
from ..files import atomic_torch_save, file_lock
from .images import IMAGE_SIZE_PX, ImageSet

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # matched in any case, as torchvision's ImageFolder does
MIN_CLASSES = 2  # a classifier of one class is 100% right and learns nothing
CACHE_FOLDER = ".cifar_resnet_cache"  # in data_dir: the decoded tensors of its image folder, or of CIFAR-10
CACHE_FORMAT_VERSION = 2  # 2: an image folder's cache is found by its folders' stamps (1: by every file's stat)


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


def check_is_folder(folder: Path) -> None:
    """A split's folder (`<data_dir>/train`, `<data_dir>/test`) must be a folder: one line where it is not."""
    if not folder.is_dir():
        raise DataError(f"data_dir: {folder} is not a folder; expected <data_dir>/train/<class>/*.jpg and test/")


def list_folder(
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
    check_is_folder(folder)
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
    folder walked is stamped into `stamps`, if given, under its path relative to `root` (see `list_folder`)."""
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
    samples, classes = list_folder(folder, stamps)
    # The name of this folder's cache: a new one for any change of its stamps or its listing.
    digest = hashlib.sha256(f"v{CACHE_FORMAT_VERSION}".encode())
    for relative, (modified, changed) in sorted(stamps.items()):
        digest.update(f"{relative}\0{modified}\0{changed}\n".encode())
    for path, label in samples:
        digest.update(f"{os.path.relpath(path, folder)}\0{label}\n".encode())
    cache_file = cache_dir / f"{folder.name}-{digest.hexdigest()[:16]}.pt"

    def decode() -> ImageSet:
        labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        return ImageSet(decode_images([path for path, _ in samples]), labels)

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


def decode_images(paths: list[str], threads: int | None = None) -> torch.Tensor:
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
