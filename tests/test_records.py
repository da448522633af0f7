"""A run's data (records.py): a run record this version cannot read is one line wherever it is read (resume,
report, sweep); the progress file is replaced atomically, without waiting for the disk."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import stopped, tiny_args
from helpers.runs import only_error_line
from helpers.sweeps import write_one_run_sweep

from cifar_resnet.cli import main
from cifar_resnet.records import PROGRESS_FILE, RECORD_FILE, EpochProgress, RunRecord, read_progress
from cifar_resnet.sweep.state import LocalRun, SweepFolder
from cifar_resnet.train import main as train_main


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


@pytest.mark.quick
def test_the_progress_file_is_replaced_atomically_without_waiting_for_the_disk(tmp_path, tiny_config, monkeypatch):
    """progress.json is rewritten several times an epoch on the training path: atomic (a reader never sees half a
    file) but not fsync'd, which can take most of a second on a busy disk; the record is fsync'd as before."""
    from cifar_resnet import files

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    EpochProgress(epoch=1, epochs=2, step=3, steps=10, images_per_second=1.0, seconds=1.0,
                  updated_at=time.time()).save(tmp_path)
    assert synced == [] and read_progress(tmp_path).step == 3
    assert sorted(path.name for path in tmp_path.iterdir()) == [PROGRESS_FILE]  # no temporary file left
    RunRecord("sync0001", tiny_config.to_dict()).save(tmp_path)
    assert len(synced) == 1
