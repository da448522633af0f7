"""Data ready at once: CIFAR-10 (torchvision's format, served locally) is read back from the decoded-tensor cache
until a batch file changes. (An image folder decoded on several threads: test_image_folder.py.)"""

from __future__ import annotations

import os

import torchvision
from helpers.cifar10 import point_torchvision_at, stand_in_cifar10  # noqa: F401  (stand_in_cifar10: a fixture)
from helpers.images import digest

from cifar_resnet.data.image_folder import CACHE_FOLDER
from cifar_resnet.data.sources import CIFAR10_FOLDER, load_cifar10


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
    assert len(list((data_dir / CACHE_FOLDER).glob("cifar10-*.pt"))) == 1  # the old cache is gone
