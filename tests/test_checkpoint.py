"""Checkpoints (checkpoint.py): saved on a thread of their own, off the training path, in order, and waited for
at the run's end; a snapshot that training cannot change; a full disk while saving one ends the run in one line
with every epoch kept; a file that is not a checkpoint of ours is one line, for evaluate and for resume."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

import pytest
import torch
from conftest import REPO, stopped, tiny_args
from helpers.filesystems import tmpfs
from helpers.runs import cli_in_process, one_error_line, only_error_line

from cifar_resnet import files
from cifar_resnet.checkpoint import CheckpointWriter, host_copy
from cifar_resnet.engine.loop import Interrupted
from cifar_resnet.errors import StorageError
from cifar_resnet.records import BEST_CHECKPOINT, RECORD_FILE, RESUME_CHECKPOINT, RunFolder, RunRecord
from cifar_resnet.runner import run_training
from cifar_resnet.train import main as train_main

WRITER_WAIT_S = 30  # how long a test waits for the writer's thread to reach a point; it takes milliseconds


@pytest.mark.quick
def test_the_checkpoint_writer_saves_on_its_thread_in_order_and_waits_for_them_on_exit(tmp_path):
    release, started, written = threading.Event(), threading.Event(), []

    def slow_save() -> None:
        started.set()
        assert release.wait(WRITER_WAIT_S)
        files.atomic_write_json(tmp_path / "first.json", {"n": 1})
        written.append(("first", threading.current_thread().name))

    with CheckpointWriter() as writer:
        writer.submit(slow_save, lambda: written.append(("second", threading.current_thread().name)))
        assert started.wait(WRITER_WAIT_S) and written == []  # submit returned while the save is still going
        release.set()
    assert written == [("first", "checkpoint-writer"), ("second", "checkpoint-writer")]  # both, in order, off
    assert json.loads((tmp_path / "first.json").read_text()) == {"n": 1}  # this thread, before the block ended


@pytest.mark.quick
def test_a_failed_checkpoint_write_ends_the_run_at_the_next_save_or_at_its_end(tmp_path):
    def full_disk() -> None:
        raise StorageError(f"could not write {tmp_path / 'last.pt'}: no space left on device (0.0 MB free there)")

    writer = CheckpointWriter()
    writer.submit(full_disk)
    with pytest.raises(StorageError, match="no space left on device"):  # the next epoch's save
        writer.submit(lambda: None)
    writer.wait()  # raised once, then cleared
    with pytest.raises(StorageError, match="no space left on device"):  # the last epoch's, as the run ends
        with writer:
            writer.submit(full_disk)


@pytest.mark.quick
def test_a_run_stopped_by_a_signal_waits_for_its_checkpoint_and_ends_with_the_stop(tmp_path, caplog):
    """The first error wins: a run stopped while its files are written ends as stopped, with the write finished
    (the stop's resume checkpoint is the file being written); a write error then is logged, not lost."""
    release = threading.Event()

    def slow_save() -> None:
        assert release.wait(WRITER_WAIT_S)
        files.atomic_write_json(tmp_path / "last.json", {"epoch": 1})

    with pytest.raises(Interrupted):
        with CheckpointWriter() as writer:
            writer.submit(slow_save)
            threading.Timer(0.2, release.set).start()
            raise Interrupted
    assert json.loads((tmp_path / "last.json").read_text()) == {"epoch": 1}

    def full_disk() -> None:
        raise StorageError("could not write last.pt: no space left on device (0.0 MB free there)")

    with caplog.at_level(logging.ERROR, logger="cifar_resnet.checkpoint"), pytest.raises(Interrupted):
        with CheckpointWriter() as writer:
            writer.submit(full_disk)
            raise Interrupted
    assert caplog.messages == ["could not write last.pt: no space left on device (0.0 MB free there)"]


@pytest.mark.quick
def test_a_host_copy_is_a_snapshot_that_training_cannot_change():
    weights = torch.zeros(3)
    state = {"model": {"w": weights}, "steps": [torch.tensor(1.0)], "epoch": 2, "pair": (weights, "x")}
    snapshot = host_copy(state)
    weights.add_(1)  # the next epoch trains in place
    assert snapshot["model"]["w"].tolist() == [0.0, 0.0, 0.0] and snapshot["pair"][0].tolist() == [0.0, 0.0, 0.0]
    assert snapshot["epoch"] == 2 and snapshot["pair"][1] == "x" and isinstance(snapshot["pair"], tuple)
    assert snapshot["steps"][0].item() == 1.0


@pytest.fixture
def small_disk(tmp_path):
    """A real, small file system for the test."""
    with tmpfs(tmp_path / "disk", "size=16M") as mount_point:
        yield mount_point


def test_a_full_disk_while_saving_a_checkpoint_ends_in_one_line_and_keeps_every_epoch(small_disk, tiny_config,
                                                                                      stopped_run_folder):
    config = tiny_config.replace(train_size=128, val_size=32, test_size=32, output_dir=str(small_disk / "runs"))
    # This run's checkpoint sizes, measured on the session's stopped run (the same model: the same sizes, give or
    # take the few bytes of its folder's name in the config they hold).
    best_bytes, last_bytes = ((stopped_run_folder / name).stat().st_size
                              for name in (BEST_CHECKPOINT, RESUME_CHECKPOINT))
    # Leave room for epoch 1's best.pt and last.pt, plus half a best.pt (the run record fits in that): epoch 2
    # can write neither checkpoint next to the old one.
    disk = os.statvfs(small_disk)
    fill = small_disk / "filler"
    fill.write_bytes(b"\0" * (disk.f_bavail * disk.f_frsize - (best_bytes + last_bytes + best_bytes // 2)))
    run_dir = small_disk / "runs" / "full0001"

    done = subprocess.run([sys.executable, "-m", "cifar_resnet.train", *tiny_args(config)], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO), WANDB_RUN_ID="full0001"))

    line = one_error_line(done, status=1)
    assert line.startswith(f"ERROR: could not write {run_dir}/") and "no space left on device" in line, line
    record = json.loads((run_dir / RECORD_FILE).read_text())
    assert record["status"] == "failed" and "no space left on device" in record["error"]
    assert [h["epoch"] for h in record["history"]] == [1, 2]  # epoch 2 finished; only its checkpoint did not
    # Epoch 1's checkpoints are intact: both load, and last.pt resumes after epoch 1.
    assert torch.load(run_dir / BEST_CHECKPOINT, weights_only=True)["epoch"] == 1
    assert torch.load(run_dir / RESUME_CHECKPOINT, weights_only=True)["state"]["epoch"] == 1
    assert not list(run_dir.glob(".*.tmp"))  # no half-written file is left
    # With space again, the run resumes after epoch 1 and finishes.
    fill.unlink()
    resumed = run_training(config, RunFolder.of(config.output_dir, "full0001"))
    assert resumed.record.status == "finished" and [h["epoch"] for h in resumed.record.history] == [1, 2]
    assert RunRecord.load(run_dir).status == "finished"


@pytest.mark.parametrize(
    "content, holds",
    [
        ({"conv.weight": torch.zeros(2, 2), "conv.bias": torch.zeros(2), "fc.weight": torch.zeros(1),
          "fc.bias": torch.zeros(1)}, "a dict of 4 entries: 'conv.weight', 'conv.bias', 'fc.weight', ..."),
        (torch.zeros(3), "a Tensor"),
        ({"state": {"model": {}}, "config": {}}, "a dict of 2 entries: 'state', 'config'"),
        # Issue 23: the right keys, the wrong types (a traceback from deep in Config or torch).
        ({"model": "weights", "config": 1, "epoch": "one", "classes": 5},
         "a dict of 4 entries: 'model', 'config', 'epoch', ..."),
    ],
)
def test_evaluate_names_a_foreign_checkpoint_in_one_line(tmp_path, capsys, content, holds):
    path = tmp_path / "foreign.pt"
    torch.save(content, path)
    line = one_error_line(cli_in_process(capsys, "evaluate", str(path), "--device=cpu"), status=2)
    assert line == (f"ERROR: checkpoint: {path} is not a best.pt or last.pt written by cifar-resnet train "
                    f"(it holds {holds})")


def test_a_foreign_file_as_last_pt_is_one_line(stopped_run, tiny_config, capsys, monkeypatch):
    torch.save({"weights": torch.zeros(3)}, stopped_run / RESUME_CHECKPOINT)  # issue 23: KeyError: 'config'
    monkeypatch.setenv("WANDB_RUN_ID", "stopped1")
    assert train_main(tiny_args(stopped(tiny_config))) == 2
    assert only_error_line(capsys.readouterr().err) == (
        f"ERROR: checkpoint: {stopped_run / RESUME_CHECKPOINT} is not a last.pt written by cifar-resnet train (it "
        "holds a dict of 1 entries: 'weights'); remove it to start the run over")
