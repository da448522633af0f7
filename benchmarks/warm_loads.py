"""Warm loads: the image folder's decode cache (mmap and not), and CIFAR-10 (torchvision against our cache) on a
real-size CIFAR-10-format folder made from the same images (no download: torchvision's own format, made here).

    python -m benchmarks.warm_loads DATA_DIR WORK_DIR    # DATA_DIR: an image folder whose decode cache is built
"""

import argparse
import hashlib
import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from cifar_resnet.data.image_folder import CACHE_FOLDER, list_folder, load_image_folder
from cifar_resnet.data.images import ImageSet
from cifar_resnet.data.sources import CIFAR10_FOLDER, load_cifar10

T = TypeVar("T")


def timed(label: str, load: Callable[[], T], repeats: int = 3) -> T:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = load()
        times.append(time.perf_counter() - start)
    print(f"{label}: {', '.join(f'{t:.2f}' for t in times)} s (load average {os.getloadavg()[0]:.1f})", flush=True)
    return result


def write_cifar10_folder(folder: Path, train: ImageSet, test: ImageSet, classes: list[str]) -> None:
    """The images in the layout torchvision's archive extracts to (pickled batches of HWC rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    flat = train.images.reshape(len(train), -1).numpy()
    for i in range(5):
        part = slice(i * 10000, (i + 1) * 10000)
        batch = {"data": flat[part], "labels": train.labels[part].tolist()}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch))
    test_batch = {"data": test.images.reshape(len(test), -1).numpy(), "labels": test.labels.tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(test_batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": classes}))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.warm_loads", description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="an image folder of CIFAR-10 whose decode cache is built")
    parser.add_argument("work_dir", type=Path, help="where the CIFAR-10-format copy is written (kept for reruns)")
    args = parser.parse_args()
    root, work = args.data_dir, args.work_dir

    train, test, classes = timed("load_image_folder, warm cache (folder stamps, a stat of every image, mmap load)",
                                 lambda: load_image_folder(root))
    cache = sorted((root / CACHE_FOLDER).glob("train-*.pt"))[0]
    timed("torch.load train cache, mmap=True", lambda: torch.load(cache, weights_only=True, mmap=True))
    timed("torch.load train cache, mmap=False", lambda: torch.load(cache, weights_only=True))
    timed("listing the train folder (torchvision make_dataset)", lambda: list_folder(root / "train"))

    folder = work / CIFAR10_FOLDER
    if not (folder / "batches.meta").exists():
        write_cifar10_folder(folder, train, test, classes)
    import torchvision

    def md5(path: Path) -> str:
        return hashlib.md5(path.read_bytes()).hexdigest()

    # torchvision checks its archive's MD5 sums: this copy's, set on the class for this process only.
    cifar10 = torchvision.datasets.CIFAR10
    cifar10.train_list = [[f"data_batch_{i}", md5(folder / f"data_batch_{i}")] for i in range(1, 6)]
    cifar10.test_list = [["test_batch", md5(folder / "test_batch")]]
    cifar10.meta = {**cifar10.meta, "md5": md5(folder / "batches.meta")}
    cifar10.download = lambda self: None  # no archive: the folder is already extracted
    for stale in (work / CACHE_FOLDER).glob("cifar10-*.pt"):
        stale.unlink()
    timed("torchvision CIFAR10 (both splits: MD5 checks and unpickling)",
          lambda: [cifar10(root=work, train=is_train, download=False) for is_train in (True, False)])
    timed("load_cifar10, first (torchvision, then writes the cache)", lambda: load_cifar10(work), repeats=1)
    timed("load_cifar10, warm cache (mmap)", lambda: load_cifar10(work))


if __name__ == "__main__":
    main()
