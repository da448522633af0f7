"""A stand-in for CIFAR-10, which cannot be downloaded here: a small archive in its format (Python 2 pickles with
bytes keys, as CIFAR-10's batches were written), served over HTTP from this machine to torchvision's real download
code, with torchvision's URL and MD5 constants pointed at it."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import pytest
import torch
import torchvision

from cifar_resnet.data.sources import CIFAR10_FOLDER

from .images import digest

CIFAR10_IMAGES_PER_BATCH = 20
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


class Python2Pickler(pickle._Pickler):
    """Pickles bytes as Python 2's `str` (the BINSTRING opcodes), as CIFAR-10's batches were written: read with
    encoding="bytes" their keys are b"data", b"labels"; torchvision reads them with encoding="latin1"."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def python2_pickle(obj: object) -> bytes:
    out = io.BytesIO()
    Python2Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def stand_in_cifar10(tmp_path: Path):
    """A small archive in CIFAR-10's format, served over HTTP, and torchvision's constants for it; `expected` is
    its content."""
    generator = torch.Generator().manual_seed(0)
    folder = tmp_path / "server" / CIFAR10_FOLDER
    folder.mkdir(parents=True)
    batches = {}
    for name in [*TRAIN_BATCHES, "test_batch"]:
        images = torch.randint(0, 256, (CIFAR10_IMAGES_PER_BATCH, 3, 32, 32), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, len(CIFAR10_CLASSES), (CIFAR10_IMAGES_PER_BATCH,), generator=generator)
        batches[name] = (images, labels)
        entry = {b"batch_label": f"{name} of the stand-in".encode(), b"labels": labels.tolist(),
                 b"data": images.reshape(len(images), -1).numpy(),
                 b"filenames": [f"image_{name}_{i}.png".encode() for i in range(len(images))]}
        (folder / name).write_bytes(python2_pickle(entry))
    (folder / "batches.meta").write_bytes(python2_pickle({
        b"label_names": [name.encode() for name in CIFAR10_CLASSES], b"num_cases_per_batch": CIFAR10_IMAGES_PER_BATCH,
        b"num_vis": 3 * 32 * 32}))
    archive = tmp_path / "server" / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=CIFAR10_FOLDER)

    def md5(path: Path) -> str:
        return hashlib.md5(path.read_bytes()).hexdigest()

    train = [batches[name] for name in TRAIN_BATCHES]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(QuietHandler, directory=str(archive.parent)))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield {
        "url": f"http://127.0.0.1:{server.server_port}/{archive.name}",
        "tgz_md5": md5(archive), "meta_md5": md5(folder / "batches.meta"),
        "train_list": [[name, md5(folder / name)] for name in TRAIN_BATCHES],
        "test_list": [["test_batch", md5(folder / "test_batch")]],
        "archive": str(archive),
        "expected": digest(torch.cat([images for images, _ in train]), torch.cat([labels for _, labels in train]),
                           *batches["test_batch"]),
    }
    server.shutdown()
    server.server_close()


def point_torchvision_at(stand_in: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    cifar10 = torchvision.datasets.CIFAR10
    for name in ("url", "tgz_md5", "train_list", "test_list"):
        monkeypatch.setattr(cifar10, name, stand_in[name])
    monkeypatch.setattr(cifar10, "meta", {**cifar10.meta, "md5": stand_in["meta_md5"]})
