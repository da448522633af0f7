"""Data ready at once: an image folder decoded on several threads gives the same pixels and names a bad file,
and CIFAR-10 (torchvision's format, served locally) is read back from the decoded-tensor cache until a batch file
changes."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision
from test_data_concurrency import digest, point_torchvision_at, stand_in_cifar10, write_jpeg_folder  # noqa: F401, F811

from cifar_resnet import data
from cifar_resnet.data import CIFAR10_FOLDER, _decode_images, _list_folder, load_cifar10
from cifar_resnet.errors import DataError


def test_threads_decode_the_same_pixels_in_the_same_order(tmp_path, monkeypatch):
    root = write_jpeg_folder(tmp_path / "images", {"train": 6, "test": 2})
    paths = [path for split in ("train", "test") for path, _ in _list_folder(root / split)[0]]
    monkeypatch.setattr(data, "DECODE_CHUNK_IMAGES", 3)  # many chunks, so the threads share the work
    one = _decode_images(paths, threads=1)
    assert torch.equal(_decode_images(paths, threads=3), one)
    assert len(paths) > 3 * 3 and one.float().std() > 0


def test_a_bad_file_among_threads_is_named(tmp_path, monkeypatch):
    root = write_jpeg_folder(tmp_path / "images", {"train": 6, "test": 2})
    paths = [path for path, _ in _list_folder(root / "train")[0]]
    broken = paths[-1]
    with open(broken, "wb") as f:
        f.write(b"not an image")
    monkeypatch.setattr(data, "DECODE_CHUNK_IMAGES", 2)
    with pytest.raises(DataError, match=f"cannot read image {broken}"):
        _decode_images(paths, threads=2)


def test_cifar10_is_read_back_from_its_cache_until_a_batch_changes(tmp_path, stand_in_cifar10, monkeypatch):
    point_torchvision_at(stand_in_cifar10, monkeypatch)
    data_dir = tmp_path / "data"
    first = load_cifar10(data_dir)
    assert digest(first[0].images, first[0].labels, first[1].images, first[1].labels) == stand_in_cifar10["expected"]

    def no_torchvision(*args, **kwargs):
        raise AssertionError("torchvision's CIFAR10 opened although the cache is valid")

    with monkeypatch.context() as patched:
        patched.setattr(torchvision.datasets, "CIFAR10", no_torchvision)
        cached = load_cifar10(data_dir)
    assert digest(cached[0].images, cached[0].labels, cached[1].images, cached[1].labels) == stand_in_cifar10[
        "expected"]
    assert cached[2] == first[2]

    batch = data_dir / CIFAR10_FOLDER / "data_batch_1"
    stat = batch.stat()
    os.utime(batch, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # changed: checked and read again
    opened = []
    original = torchvision.datasets.CIFAR10

    def counting(*args, **kwargs):
        opened.append(kwargs.get("train"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", counting)
    again = load_cifar10(data_dir)
    assert opened == [True, False]
    assert digest(again[0].images, again[0].labels, again[1].images, again[1].labels) == stand_in_cifar10["expected"]
    assert len(list((data_dir / data.CACHE_FOLDER).glob("cifar10-*.pt"))) == 1  # the old cache is gone
