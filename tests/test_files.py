"""Atomic writes and folder locks (files.py): a full disk is one line and keeps the previous file; an output
folder that is a file, or on a read-only file system, is one line, for train and for sweep."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from conftest import tiny_args
from helpers.filesystems import tmpfs
from helpers.runs import only_error_line
from helpers.sweeps import write_one_run_sweep

from cifar_resnet import files
from cifar_resnet.cli import main
from cifar_resnet.errors import StorageError
from cifar_resnet.train import main as train_main


class _FullDiskFile:
    """A real file whose writes fail with ENOSPC once `room` bytes are written, as a full disk's do."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


@pytest.mark.parametrize("save", [
    lambda path: files.atomic_torch_save(path, {"weights": torch.arange(100_000)}),
    lambda path: files.atomic_write_json(path, {"history": list(range(100_000))}),
], ids=["torch", "json"])
def test_atomic_writer_turns_enospc_into_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch, save):
    path = tmp_path / "out" / "best.pt"
    files.atomic_write_json(path, {"epoch": 1})
    previous = path.read_bytes()
    real_open = open
    monkeypatch.setattr(files, "open", lambda *a, **k: _FullDiskFile(real_open(*a, **k), room=4096),
                        raising=False)
    with pytest.raises(StorageError) as error:
        save(path)
    message = str(error.value)
    assert message.startswith(f"could not write {path}: no space left on device (") and "\n" not in message
    assert path.read_bytes() == previous  # the earlier version is intact...
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]  # ...and no temporary file is left


def test_an_output_folder_that_is_a_file_is_one_line(tmp_path, tiny_config, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    assert train_main(tiny_args(tiny_config.replace(output_dir=str(a_file)))) == 2
    assert only_error_line(capsys.readouterr().err) == (
        f"ERROR: output_dir: {a_file} is a file, not a folder; give output_dir a folder")

    write_one_run_sweep(tmp_path / "sweep.yaml")
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--offline", "--output-dir", str(a_file / "sweep")]) == 2
    assert only_error_line(capsys.readouterr().err) == (
        f"ERROR: --output-dir: {a_file} is a file, not a folder; give --output-dir a folder")
    assert a_file.read_text() == "not a folder"


@pytest.fixture
def read_only_folder(tmp_path):
    """A real read-only file system for the test."""
    with tmpfs(tmp_path / "read-only", "ro,size=1M") as mount_point:
        yield mount_point


def test_a_read_only_output_folder_is_one_line_and_exit_1(read_only_folder, tiny_config, tmp_path, capsys,
                                                            monkeypatch):
    """EROFS is the machine's fault, not a setting's: exit status 1 (issue 23: a traceback for train; for sweep,
    the lock's error, taken for a file system without flock)."""
    monkeypatch.setenv("WANDB_RUN_ID", "rofs0001")
    assert train_main(tiny_args(tiny_config.replace(output_dir=str(read_only_folder)))) == 1
    assert only_error_line(capsys.readouterr().err) == (
        f"ERROR: could not write {read_only_folder / 'rofs0001' / '.lock'}: Read-only file system (make the folder "
        "writable, or give another one); its previous version, if any, is intact")

    write_one_run_sweep(tmp_path / "sweep.yaml")
    for out_dir, message in [
        (read_only_folder, f"could not write {read_only_folder / 'sweep.lock'}: Read-only file system (make the "
                           "folder writable, or give another one); its previous version, if any, is intact"),
        (read_only_folder / "sweep", f"could not create folder {read_only_folder / 'sweep'}: Read-only file system "
                                     "(make the folder writable, or give another one)"),
    ]:
        assert main(["sweep", str(tmp_path / "sweep.yaml"), "--offline", "--output-dir", str(out_dir)]) == 1
        assert only_error_line(capsys.readouterr().err) == f"ERROR: {message}"
