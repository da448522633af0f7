"""A run's W&B layer (tracking.py), W&B offline: a run without credentials goes offline by itself and says how
to sync; an offline run carries its own artifact files and names no file outside its folder; a resumed online run
downloads its resume checkpoint and logs each epoch once (a stand-in where only W&B's server could answer); a
sweep's run draws no W&B warning about the sweep's own settings."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import wandb
from conftest import TINY_DATA_LINE
from helpers.sweeps import sweep_state, tiny_settings, write_sweep
from helpers.wandb_records import read_records

from cifar_resnet.cli import main
from cifar_resnet.engine.loop import EpochResult
from cifar_resnet.records import RESUME_CHECKPOINT, read_progress
from cifar_resnet.tracking import Tracker, download_resume_checkpoint, resume_artifact_name


def test_no_credentials_goes_offline_by_itself_and_says_how_to_sync(offline_run):
    warning = [line for line in offline_run.done.stderr.splitlines() if "no W&B credentials" in line]
    assert len(warning) == 1 and "wandb sync" in warning[0] and offline_run.run_id in warning[0]


def test_an_offline_run_holds_its_artifact_files(offline_run, tmp_path):
    """Copy the offline run folder elsewhere: every file the run's artifact names is there, inside the copy, for
    `wandb sync` on another machine (and W&B's own staging area is empty: the test below)."""
    (run_folder,) = (offline_run.wandb_dir / "wandb").glob(f"offline-run-*-{offline_run.run_id}")
    copy = tmp_path / "elsewhere" / run_folder.name
    shutil.copytree(run_folder, copy)

    artifacts = [record.artifact for record in read_records(copy / f"run-{offline_run.run_id}.wandb")
                 if record.HasField("artifact")]
    (model,) = [artifact for artifact in artifacts if artifact.type == "model"]
    named = [Path(entry.local_path) for entry in model.manifest.contents]
    assert named and all(path.is_relative_to(run_folder) for path in named)
    assert all((copy / path.relative_to(run_folder)).is_file() for path in named)


def strings_of(message) -> list[str]:
    """Every string field of a protobuf message, nested ones too."""
    found = []
    for field, value in message.ListFields():
        for item in value if field.is_repeated else [value]:
            if isinstance(item, str):
                found.append(item)
            elif hasattr(item, "ListFields"):
                found += strings_of(item)
    return found


def test_an_offline_run_s_wandb_log_names_no_file_outside_its_folder(tmp_path, offline_run):
    """W&B's data folder is the offline run's folder for the whole run (issue 23: the confusion-matrix table was
    staged in WANDB_DATA_DIR, here the conftest's, and the run's .wandb file pointed there). Every path in the
    logs of a copy of the run lies inside the run's folder, and the copy holds each file."""
    (run_folder,) = offline_run.wandb_dir.glob(f"wandb/offline-run-*-{offline_run.run_id}")
    copy = shutil.copytree(run_folder, tmp_path / "copied" / run_folder.name)
    logs = list(copy.rglob("*.wandb"))
    assert logs
    named = [text for log in logs for record in read_records(log) if record.WhichOneof("record_type") != "environment"
             for text in strings_of(record) if text.startswith("/")]  # the environment record describes the host
    assert len(named) >= 2  # the table and the best.pt, staged for the artifacts
    for path in map(Path, named):
        assert path.is_relative_to(run_folder), path
        assert (copy / path.relative_to(run_folder)).is_file(), path
    assert not any(offline_run.wandb_data_dir.rglob("*"))  # nothing staged outside


class StandInArtifact:
    """What `run.use_artifact(...)` returns online: `get_entry(name).download(root)` puts the file under root.
    (W&B cannot serve an artifact offline: this stands in for its server's copy of the staged file.)"""

    def __init__(self, staged: Path) -> None:
        self.staged, self.entries = staged, []

    def get_entry(self, name: str) -> SimpleNamespace:
        self.entries.append(name)

        def download(root: str) -> str:
            target = Path(root) / name
            shutil.copyfile(self.staged, target)
            return str(target)

        return SimpleNamespace(download=download)


def stand_in_run(artifact=None, error: Exception | None = None, offline: bool = False, resumed: bool = True):
    asked = []

    def use_artifact(name: str):
        asked.append(name)
        if error is not None:
            raise error
        return artifact

    return SimpleNamespace(id="resume01", offline=offline, resumed=resumed, use_artifact=use_artifact), asked


def test_a_resumed_online_run_downloads_its_resume_checkpoint_into_place(tmp_path):
    staged = tmp_path / "staged.pt"
    torch.save({"state": {"epoch": 2}}, staged)
    artifact = StandInArtifact(staged)
    run, asked = stand_in_run(artifact)
    destination = tmp_path / "runs" / "resume01" / RESUME_CHECKPOINT

    assert download_resume_checkpoint(run, destination) is True

    assert asked == [f"{resume_artifact_name('resume01')}:latest"] and artifact.entries == [RESUME_CHECKPOINT]
    assert destination.read_bytes() == staged.read_bytes()
    assert sorted(path.name for path in destination.parent.iterdir()) == [RESUME_CHECKPOINT]  # no temporary left


@pytest.mark.parametrize("error", [ValueError("artifact not found"), wandb.errors.CommError("server said no")])
def test_a_missing_resume_artifact_means_start_from_scratch(tmp_path, error):
    run, asked = stand_in_run(error=error)
    destination = tmp_path / "runs" / "resume01" / RESUME_CHECKPOINT

    assert download_resume_checkpoint(run, destination) is False

    assert len(asked) == 1 and not destination.exists()


@pytest.mark.parametrize("kind", ["offline", "new run"])
def test_offline_or_new_runs_do_not_ask_for_a_resume_artifact(tmp_path, kind):
    run, asked = stand_in_run(StandInArtifact(tmp_path / "never"), offline=kind == "offline",
                              resumed=kind == "offline")
    assert download_resume_checkpoint(run, tmp_path / RESUME_CHECKPOINT) is False
    assert asked == []


def epoch_result(epoch: int) -> EpochResult:
    return EpochResult(epoch=epoch, train_loss=1.0, train_acc=0.5, val_loss=1.0, val_acc=0.5, lr=0.1,
                       epoch_seconds=1.0, train_images_per_second=100.0, is_best=False)


@pytest.mark.parametrize(
    "wandb_next_step, resumed_after, logged",
    [
        (3, 2, [3, 4, 5]),  # W&B holds epochs 1-2, as does the checkpoint: log the new epochs
        (2, 3, [2, 3, 4, 5, 6]),  # killed after saving epoch 3, before logging it: log the missing ones too
        (5, 2, [5]),  # W&B holds epochs 3-4 of an attempt whose checkpoint was lost: do not log them twice
    ],
)
def test_resumed_online_run_logs_each_epoch_once(wandb_next_step, resumed_after, logged):
    """W&B's side of a resumed online run (the step its history reached) cannot run here: a stand-in supplies it."""
    steps = []
    tracker = object.__new__(Tracker)  # its W&B run is the stand-in
    tracker.next_epoch_to_log = None
    tracker.run = SimpleNamespace(resumed=True, step=wandb_next_step,
                                  log=lambda metrics, step, commit: steps.append((step, metrics["epoch"])))
    history = [epoch_result(epoch).metrics() for epoch in range(1, resumed_after + 1)]
    for epoch in range(resumed_after + 1, resumed_after + 4):  # this attempt trains three epochs
        history.append(epoch_result(epoch).metrics())
        tracker.on_epoch(SimpleNamespace(history=history))
    assert steps == [(epoch, epoch) for epoch in logged]


def test_a_sweep_run_logs_no_warnings_about_the_sweeps_own_settings(tmp_path, tiny_config, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_SILENT")  # W&B's own warnings, as a user sees them
    parameters = tiny_settings(tiny_config) | {"learning_rate": {"values": [0.0005]},
                                               "optimizer": {"values": ["sgd"]}}
    path = write_sweep(tmp_path / "one.yaml", parameters)
    out_dir = tmp_path / "out"

    assert main(["sweep", str(path), "--offline", "--output-dir", str(out_dir)]) == 0

    (run,) = sweep_state(out_dir)["runs"]
    log_text = (out_dir / run["run_id"] / "run.log").read_text()
    assert "wandb:" in log_text  # W&B did speak
    assert "locked by" not in log_text
    assert capsys.readouterr().out.startswith(TINY_DATA_LINE)
    assert read_progress(out_dir / run["run_id"]) is None  # a finished run keeps its record, not its progress
