"""Warm loads: the image folder's decode cache (mmap and not), and CIFAR-10 (torchvision against our cache) on a
real-size CIFAR-10-format folder made from the same images (no download: torchvision's own format, made here).

    python -m benchmarks.warm_loads DATA_DIR WORK_DIR    # DATA_DIR: an image folder whose decode cache is built
"""
import hashlib, os, pickle, sys, time
from pathlib import Path
import torch
from cifar_resnet.data.image_folder import CACHE_FOLDER, list_folder, load_image_folder
from cifar_resnet.data.sources import CIFAR10_FOLDER, load_cifar10

root = Path(sys.argv[1]); work = Path(sys.argv[2])
def timed(label, fn, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); result = fn(); times.append(time.perf_counter() - start)
    print(f"{label}: {', '.join(f'{t:.2f}' for t in times)} s (load average {os.getloadavg()[0]:.1f})", flush=True)
    return result
train, test, classes = timed("load_image_folder, warm cache (folder stamps, a stat of every image, mmap load)", lambda: load_image_folder(root))
cache = sorted((root / CACHE_FOLDER).glob("train-*.pt"))[0]
timed("torch.load train cache, mmap=True", lambda: torch.load(cache, weights_only=True, mmap=True))
timed("torch.load train cache, mmap=False", lambda: torch.load(cache, weights_only=True))
timed("listing the train folder (torchvision make_dataset)", lambda: list_folder(root / "train"))
# a CIFAR-10-format folder with these 60,000 images, as torchvision's archive extracts it
folder = work / CIFAR10_FOLDER
if not (folder / "batches.meta").exists():
    folder.mkdir(parents=True, exist_ok=True)
    flat = train.images.reshape(len(train), -1).numpy()
    for i in range(5):
        part = slice(i * 10000, (i + 1) * 10000)
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps({"data": flat[part], "labels": train.labels[part].tolist()}))
    (folder / "test_batch").write_bytes(pickle.dumps({"data": test.images.reshape(len(test), -1).numpy(), "labels": test.labels.tolist()}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": classes}))
import torchvision
md5 = lambda p: hashlib.md5(p.read_bytes()).hexdigest()
C = torchvision.datasets.CIFAR10
C.train_list = [[f"data_batch_{i}", md5(folder / f"data_batch_{i}")] for i in range(1, 6)]
C.test_list = [["test_batch", md5(folder / "test_batch")]]
C.meta = {**C.meta, "md5": md5(folder / "batches.meta")}
C.download = lambda self: None  # no archive: the folder is already extracted
for stale in (work / CACHE_FOLDER).glob("cifar10-*.pt"):
    stale.unlink()
def torchvision_only():
    return [C(root=work, train=t, download=False) for t in (True, False)]
timed("torchvision CIFAR10 (both splits: MD5 checks and unpickling)", torchvision_only)
timed("load_cifar10, first (torchvision, then writes the cache)", lambda: load_cifar10(work), repeats=1)
timed("load_cifar10, warm cache (mmap)", lambda: load_cifar10(work))
