"""An image folder as a data source (`dataset=imagefolder`): its listing in torchvision's `ImageFolder` order, the
decoding of its images on several threads, and the decode cache beside it, found again by its folders' stamps and
checked against its images' stamps."""

from __future__ import annotations

import array
import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError, StorageError
from ..files import atomic_torch_save, file_lock
from .images import IMAGE_SIZE_PX, ImageSet

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # matched in any case, as torchvision's ImageFolder does
MIN_CLASSES = 2  # a classifier of one class is 100% right and learns nothing
CACHE_FOLDER = ".cifar_resnet_cache"  # in data_dir: the decoded tensors of its image folder, or of CIFAR-10
CACHE_FORMAT_VERSION = 3  # 3: it holds every image's stamp too; 2: found by its folders' stamps alone (1: by every
# file's stat)
SIGN_BIT = 1 << 63  # of a 64-bit number


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


def image_stamps(folder: Path, names: list[str]) -> torch.Tensor | None:
    """(N, 4) int64: each image's inode, size, and modification and status-change times in nanoseconds, as `stat`
    gives them through a link; None where an image is gone. A rewrite in place changes the times (the status-change
    time even where a tool puts the modification time back), a replacement the inode. One `stat` per image
    (BENCHMARKS.md has its cost for CIFAR-10's 60,000)."""
    stamps = array.array("q")
    try:
        split_folder = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)  # names resolved from it, not from the root
        try:
            for name in names:
                stat = os.stat(name, dir_fd=split_folder)
                # An inode number is unsigned and may use the top bit (overlayfs does): stored as its signed twin.
                stamps.extend(((stat.st_ino ^ SIGN_BIT) - SIGN_BIT, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))
        finally:
            os.close(split_folder)
    except OSError:  # an image, or the folder itself, gone
        return None
    return torch.frombuffer(stamps, dtype=torch.int64).view(-1, 4)


def read_cache_file(cache_file: Path) -> Any:
    """A decode cache's contents (of an image folder's split, or of CIFAR-10), or None where it is missing or
    damaged (a damaged cache is rebuilt, never trusted)."""
    try:
        # mmap: the pages are read as the tensors are first touched, with no second copy in memory
        return torch.load(cache_file, weights_only=True, mmap=True)
    except FileNotFoundError:  # none yet, or removed as stale by a process that is rebuilding it
        return None
    except Exception as error:
        log.warning("ignoring unreadable decode cache %s: %s", cache_file, error)
        return None


def save_cache_file(cache_file: Path, contents: dict[str, Any]) -> Path | None:
    """Write a decode cache (`<name>-<key>.pt`, under its lock) in place of the old ones of that name; its path, or
    None where it could not be written (the cache only saves time: the run trains on, as for a read-only data
    folder)."""
    name = cache_file.name.rsplit("-", 1)[0]
    try:
        # Old caches of that name, and temporary files of writers killed mid-write (only the lock holder writes).
        # A cache refreshed under its own name is replaced by the atomic write, never missing for a reader.
        for stale in [*cache_file.parent.glob(f"{name}-*.pt"), *cache_file.parent.glob(f".{name}-*.tmp")]:
            if stale != cache_file:
                stale.unlink(missing_ok=True)
        atomic_torch_save(cache_file, contents)
    except (StorageError, OSError) as error:  # a full disk, a read-only cache folder
        log.warning("%s; training on without a decode cache", error)
        return None
    return cache_file


def _read_cache(cache_dir: Path, folder: Path) -> dict[str, Any] | None:
    """The contents of `folder`'s cache file whose folders' stamps still hold, or None."""
    for cache_file in sorted(cache_dir.glob(f"{folder.name}-*.pt")):
        cached = read_cache_file(cache_file)
        if (isinstance(cached, dict) and cached.get("format") == CACHE_FORMAT_VERSION
                and _stamps_unchanged(folder, cached["folders"])):
            return cached
    return None


def _unchanged(folder: Path, cached: dict[str, Any]) -> bool:
    file_stamps = image_stamps(folder, cached["files"].split("\0"))
    return file_stamps is not None and torch.equal(file_stamps, cached["file_stamps"])


def _listed(folder: Path) -> dict[str, Any]:
    """A cache's contents for `folder` but its images: the listing, the folders' stamps taken as they were listed
    and the images' stamps taken after (each before its image is decoded: a change made meanwhile shows next time)."""
    stamps: dict[str, list[int]] = {}
    samples, classes = list_folder(folder, stamps)
    names = [os.path.relpath(path, folder) for path, _ in samples]
    file_stamps = image_stamps(folder, names)
    if file_stamps is None:
        raise DataError(f"data_dir: {folder} changed while it was read (an image was removed); run again")
    return {"format": CACHE_FORMAT_VERSION, "labels": torch.tensor([label for _, label in samples]),
            "classes": classes, "folders": stamps, "files": "\0".join(names), "file_stamps": file_stamps}


def _decoded(folder: Path, contents: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """`contents` (a cache's, whose folders' stamps hold, or `_listed`'s) with its images, and how many were
    decoded for it: every image where it has none, else those whose stamps changed (where an image is gone, the
    folder is listed again)."""
    names = contents["files"].split("\0")
    if "images" not in contents:
        return {**contents, "images": decode_images([os.path.join(folder, name) for name in names])}, len(names)
    file_stamps = image_stamps(folder, names)
    if file_stamps is None:
        return _decoded(folder, _listed(folder))
    changed = (file_stamps != contents["file_stamps"]).any(dim=1).nonzero().flatten()  # (C,) rows
    images = contents["images"]
    if len(changed):
        images = images.clone()  # the cache's memory-mapped pages stay as they are
        images[changed] = decode_images([os.path.join(folder, names[row]) for row in changed.tolist()])
    return {**contents, "images": images, "file_stamps": file_stamps}, len(changed)


def _cache_file(cache_dir: Path, folder: Path, contents: dict[str, Any]) -> Path:
    """The name of this folder's cache: a new one for any change of its folders' stamps or its listing."""
    digest = hashlib.sha256(f"v{CACHE_FORMAT_VERSION}".encode())
    for relative, (modified, changed) in sorted(contents["folders"].items()):
        digest.update(f"{relative}\0{modified}\0{changed}\n".encode())
    for name, label in zip(contents["files"].split("\0"), contents["labels"].tolist(), strict=True):
        digest.update(f"{name}\0{label}\n".encode())
    return cache_dir / f"{folder.name}-{digest.hexdigest()[:16]}.pt"


def _load_folder_split(folder: Path) -> tuple[ImageSet, list[str]]:
    """One split's images and class names: from its decode cache while the folder and its images are unchanged,
    else decoded from the files (and cached, in `<data_dir>/.cifar_resnet_cache/`).

    A cache holds the stamps (`_folder_stamp`) of every folder of the split as it was listed (the split folder, its
    class folders and their subfolders), and of every image (`image_stamps`). It is found by its folders' stamps,
    without listing the folders; then every image's stamp is checked. What changes a folder's stamp, and so lists
    and decodes the split again: an image added, removed or renamed, an image replaced by another moved onto its
    name (as rsync, `mv` and atomic writers replace files), a class or subfolder added or removed; also what only
    touches a folder (`touch`, `chmod`), which decodes for nothing. What changes an image's stamp only, and so
    decodes that image again: a rewrite in place under its name (`cp` onto it, an editor saving it), of the image
    or of a linked image's target. Stamps are as fine as the file system's timestamps: a rewrite that keeps the
    size, inode and both times (within one tick of the file system's clock) is not seen.
    """
    cache_dir = folder.parent / CACHE_FOLDER
    cached = _read_cache(cache_dir, folder)
    if cached is not None and _unchanged(folder, cached):
        return ImageSet(cached["images"], cached["labels"]), list(cached["classes"])
    # Without a cache, listed before the lock is taken: a folder that cannot be listed leaves nothing behind.
    listing = _listed(folder) if cached is None else None
    cache_file = None
    if not os.access(folder.parent, os.W_OK):
        log.warning("%s is read-only: decoding %s without a cache", folder.parent, folder)
        contents, decoded = _decoded(folder, cached or listing)
    else:
        with file_lock(cache_dir / f"{folder.name}.lock"):
            # Another process may have built or refreshed the cache while this one waited: then none is decoded.
            contents, decoded = _decoded(folder, _read_cache(cache_dir, folder) or listing or _listed(folder))
            if decoded:
                cache_file = save_cache_file(_cache_file(cache_dir, folder, contents), contents)
    images = ImageSet(contents["images"], contents["labels"])
    if decoded:
        log.info("%s; %s", f"decoded {decoded} images in {folder}" if decoded == len(images) else
                 f"{decoded} of {len(images)} images in {folder} changed since they were cached: decoded again",
                 f"cached in {cache_file}" if cache_file else "not cached")
    return images, list(contents["classes"])


TORCHVISION_DECODER_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"
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
    from torchvision.transforms.v2.functional import to_dtype

    # torchvision 0.29 marks its decoders deprecated in favour of TorchCodec; they are 2.5x faster than PIL here,
    # give identical pixels, and run once per folder thanks to the cache. Only that warning is silenced, by one
    # filter (process-wide, as every filter is; adding it again replaces it): not with catch_warnings, which
    # restores the whole filter list on exit and so drops what other threads (the run's, starting CUDA) added.
    warnings.filterwarnings("ignore", message=TORCHVISION_DECODER_DEPRECATION, category=DeprecationWarning,
                            module="torchvision.io.image")
    images = torch.empty(len(paths), 3, IMAGE_SIZE_PX, IMAGE_SIZE_PX, dtype=torch.uint8)

    def decode_chunk(start: int) -> None:
        for i in range(start, min(start + DECODE_CHUNK_IMAGES, len(paths))):
            path = paths[i]
            try:
                image = decode_image(read_file(path), mode=ImageReadMode.RGB)  # (3, H, W) uint8; uint16 if 16-bit
            except RuntimeError as error:
                image = _decode_with_pil(path, str(error).splitlines()[0])
            if image.dtype != torch.uint8:
                image = to_dtype(image, torch.uint8, scale=True)  # 16 -> 8 bits: the high byte, not the value mod 256
            if image.shape[1:] != (IMAGE_SIZE_PX, IMAGE_SIZE_PX):
                raise DataError(
                    f"data_dir: image {path} is {image.shape[2]}x{image.shape[1]}; "
                    f"only {IMAGE_SIZE_PX}x{IMAGE_SIZE_PX} images are allowed"
                )
            images[i] = image

    with ThreadPoolExecutor(max_workers=threads or decode_threads()) as pool:
        # list(): waits for every chunk and raises the first chunk's error (a DataError naming the file)
        list(pool.map(decode_chunk, range(0, len(paths), DECODE_CHUNK_IMAGES)))
    return images
