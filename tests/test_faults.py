"""The faults of issue 8, each reproduced with real files (and real processes where the fault is about the
command line): one line, the right exit status, no traceback, and nothing lost. (The image folder's faults are in
test_image_folder.py.)"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import yaml

import pytest
import torch
from conftest import REPO, stopped, tiny_args
from helpers.runs import cli, cli_in_process, error_lines, one_error_line

from cifar_resnet import files
from cifar_resnet.checkpoint import CheckpointWriter, host_copy
from cifar_resnet.cli import main
from cifar_resnet.config import Config
from cifar_resnet.engine.device import select_device
from cifar_resnet.engine.loop import Interrupted
from cifar_resnet.errors import ConfigError, StorageError
from cifar_resnet.records import BEST_CHECKPOINT, RECORD_FILE, RESUME_CHECKPOINT, RunFolder, RunRecord
from cifar_resnet.runner import run_training
from cifar_resnet.sweep.state import LocalRun, SweepFolder
from cifar_resnet.train import main as train_main

# --- 4. device ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cudafoo", "cuda:", "cuda:-1", "cuda:x", "CUDA", "cuda:0 ", "gpu", "cpu:0"])
def test_a_bad_device_is_a_config_error(device):
    with pytest.raises(ConfigError, match=r"^device: .* is not one of auto, cpu, cuda, cuda:N \(N a GPU index"):
        Config(device=device)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_good_devices_pass_validation(device):
    assert Config(device=device).device == device


def test_device_cudafoo_fails_in_one_line_on_the_command_line():
    line = one_error_line(cli("train", "--device=cudafoo"), status=2)
    assert line == "ERROR: device: 'cudafoo' is not one of auto, cpu, cuda, cuda:N (N a GPU index: 0, 1, ...)"
    assert not Path("runs").exists()


def test_a_gpu_index_beyond_the_visible_gpus_is_one_line(monkeypatch):
    # This machine may have no GPU: pretend it has one, as torch would report it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert select_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match=r"^device: 'cuda:3' asked for, but this machine shows 1 GPU\(s\): "
                                          r"use cuda:0 to cuda:0, cuda or auto$"):
        select_device("cuda:3")


# --- 5. evaluate a last.pt, or a foreign file ---------------------------------------------------------------------


def test_evaluate_accepts_a_last_pt_and_tests_its_best_weights_so_far(stopped_run, capsys):
    from_best = cli_in_process(capsys, "evaluate", str(stopped_run / BEST_CHECKPOINT), "--device=cpu")
    from_last = cli_in_process(capsys, "evaluate", str(stopped_run / RESUME_CHECKPOINT), "--device=cpu")
    assert from_best.returncode == 0 and from_last.returncode == 0, from_last.stderr[-3000:]
    assert "Traceback" not in from_last.stderr
    assert "the best weights so far (epoch 1)" in from_last.stderr
    # best.pt holds the same best-so-far weights: the same test result, to the printed digit.
    assert from_last.stdout.split(":", 1)[1] == from_best.stdout.split(":", 1)[1]
    assert "test acc" in from_last.stdout
    # Weights that do not fit the model asked for (a last.pt has no class names to check first): one line.
    line = one_error_line(cli_in_process(capsys, "evaluate", str(stopped_run / RESUME_CHECKPOINT), "--device=cpu",
                                         "--width=16"), 2)
    assert line.startswith(f"ERROR: checkpoint: {stopped_run / RESUME_CHECKPOINT}'s weights do not fit a width=16 ")


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


# --- 6. a full disk ---------------------------------------------------------------------------------------------


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


@contextlib.contextmanager
def tmpfs(mount_point: Path, options: str) -> Iterator[Path]:
    """A real file system (tmpfs, mounted with `options`) at `mount_point` for the block, unmounted after it."""
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


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


# --- 7. issue 23: a damaged or foreign file, or a folder that cannot be one, is one line too -------------------


def write_one_run_sweep(path: Path) -> dict:
    sweep = {"method": "grid", "program": "cifar_resnet.train", "parameters": {"seed": {"value": 1}},
             "command": ["${env}", "${interpreter}", "-m", "${program}", "${args}"]}
    path.write_text(yaml.safe_dump(sweep))
    return sweep


def only_error_line(err: str) -> str:
    """The one ERROR line of a command run in this process (its log lines go to the captured stderr)."""
    (line,) = error_lines(err)
    assert "Traceback" not in err
    return line


def test_a_truncated_run_record_is_one_line_on_resume_in_a_sweep_and_in_the_report(stopped_run, tiny_config,
                                                                                    tmp_path, capsys, monkeypatch):
    record = stopped_run / RECORD_FILE
    record.write_text(record.read_text()[:60])  # cut short, as by a disk full outside this program's writes
    with pytest.raises(ValueError) as json_error:
        json.loads(record.read_text())
    expected = (f"ERROR: {record}: not a run record this version can read ({json_error.value}); restore it from a "
                "copy, or remove it to go on without it (its run's results go with it)")
    monkeypatch.setenv("WANDB_RUN_ID", "stopped1")
    assert train_main(tiny_args(stopped(tiny_config))) == 2  # resuming it
    assert only_error_line(capsys.readouterr().err) == expected

    assert main(["report", tiny_config.output_dir]) == 2
    assert only_error_line(capsys.readouterr().err) == expected

    # A finished sweep, run again: its run's record is read before anything starts.
    sweep = write_one_run_sweep(tmp_path / "sweep.yaml")
    with SweepFolder(Path(tiny_config.output_dir), sweep, lambda: "sweep001").transaction() as state:
        state.runs.append(LocalRun("stopped1", {"seed": 1}, state="finished", exit_code=0))
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--offline", "--output-dir", tiny_config.output_dir]) == 2
    assert only_error_line(capsys.readouterr().err) == expected


def test_a_resumed_run_s_record_keeps_no_error_of_the_attempt_before(stopped_run, tiny_config):
    """Issue 23: a run stopped once and resumed to its end kept `"error": "Interrupted"` in its record."""
    assert RunRecord.load(stopped_run).error == "Interrupted"
    assert run_training(stopped(tiny_config), RunFolder.of(tiny_config.output_dir, "stopped1")).record.status == \
        "finished"
    record = json.loads((stopped_run / RECORD_FILE).read_text())
    assert record["status"] == "finished" and record["error"] is None
    assert [entry["epoch"] for entry in record["history"]] == [1, 2]


def test_a_foreign_file_as_last_pt_is_one_line(stopped_run, tiny_config, capsys, monkeypatch):
    torch.save({"weights": torch.zeros(3)}, stopped_run / RESUME_CHECKPOINT)  # issue 23: KeyError: 'config'
    monkeypatch.setenv("WANDB_RUN_ID", "stopped1")
    assert train_main(tiny_args(stopped(tiny_config))) == 2
    assert only_error_line(capsys.readouterr().err) == (
        f"ERROR: checkpoint: {stopped_run / RESUME_CHECKPOINT} is not a last.pt written by cifar-resnet train (it "
        "holds a dict of 1 entries: 'weights'); remove it to start the run over")


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


# --- 8. checkpoints written off the training path ----------------------------------------------------------------

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
