"""A run with its files (runner.py), without W&B: it learns (synthetic classes, real CIFAR-10 images), writes
its progress file inside each epoch at a bounded rate, counts its time over every attempt, and a resumed run's
record keeps no error of the attempt before."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import stopped

from cifar_resnet.config import Config
from cifar_resnet.engine.loop import Interrupted
from cifar_resnet.records import (
    RECORD_FILE,
    RUN_SECONDS,
    EpochProgress,
    RunFolder,
    RunRecord,
    read_progress,
    result_from_record,
)
from cifar_resnet.runner import RunHooks, run_training


def test_narrow_model_learns_synthetic_classes(tiny_config):
    config = tiny_config.replace(epochs=3, train_size=2000)
    outcome = run_training(config, RunFolder.of(config.output_dir, "learn01"))
    assert outcome.fit.test.acc > 0.3  # chance is 0.1; measured 0.41 (the synthetic classes are meant to be hard)
    assert outcome.record.history[-1]["train/loss"] < outcome.record.history[0]["train/loss"]


def test_narrow_model_learns_real_cifar_images(cifar_jpeg_dir, tmp_path):
    config = Config(dataset="imagefolder", data_dir=str(cifar_jpeg_dir), width=16, epochs=2, val_size=500,
                    batch_size=64, recipe="writeup", output_dir=str(tmp_path / "runs"), device="cpu")
    outcome = run_training(config, RunFolder.of(config.output_dir, "real01"))
    assert outcome.fit.test.acc > 0.25  # chance is 0.1; 2,500 images and 2 epochs


@pytest.mark.parametrize(("write_every_s", "writes_per_epoch"), [(0.0, "every step"), (1e9, "start and end")])
def test_progress_file_is_written_inside_each_epoch_and_throttled(tiny_config, monkeypatch, write_every_s,
                                                                 writes_per_epoch):
    from cifar_resnet import runner

    monkeypatch.setattr(runner, "PROGRESS_WRITE_SECONDS", write_every_s)
    written: list[EpochProgress] = []
    original = EpochProgress.save
    monkeypatch.setattr(EpochProgress, "save", lambda self, run_dir: (written.append(self), original(self, run_dir)))
    seen = []
    run_dir = Path(tiny_config.output_dir) / "prog0001"
    hooks = RunHooks(on_batch=lambda: seen.append(read_progress(run_dir)))

    run_training(tiny_config, RunFolder.of(tiny_config.output_dir, "prog0001"), hooks)

    steps = tiny_config.train_size // tiny_config.batch_size
    expected = steps + 1 if writes_per_epoch == "every step" else 2
    assert len(written) == tiny_config.epochs * expected
    assert [(p.epoch, p.step) for p in written][-1] == (tiny_config.epochs, steps)
    assert all(p.epochs == tiny_config.epochs and p.steps == steps for p in written)
    assert [p.seconds for p in written] == sorted(p.seconds for p in written)
    assert all(p.images_per_second > 0 for p in written if p.step)
    assert seen[-1] == written[-1]  # the file a reader sees is the last one written
    assert read_progress(run_dir.parent / "no-such-run") is None


def test_run_time_counts_every_attempt(tiny_config):
    config = tiny_config.replace(epochs=3)
    epochs_seen = []

    def stop_after_first_epoch() -> bool:
        return len(epochs_seen) >= 1

    hooks = RunHooks(on_epoch_recorded=lambda record: epochs_seen.append(len(record.history)),
                     should_stop=stop_after_first_epoch)
    with pytest.raises(Interrupted):
        run_training(config, RunFolder.of(config.output_dir, "time0001"), hooks)
    run_dir = Path(config.output_dir) / "time0001"
    first_attempt = RunRecord.load(run_dir).seconds
    assert first_attempt > 0

    started = time.perf_counter()
    outcome = run_training(config, RunFolder.of(config.output_dir, "time0001"))
    second_attempt = time.perf_counter() - started

    total = outcome.record.summary[RUN_SECONDS]
    assert first_attempt + 0.5 * second_attempt < total <= first_attempt + second_attempt
    assert result_from_record(RunRecord.load(run_dir)).seconds == total


def test_a_resumed_run_s_record_keeps_no_error_of_the_attempt_before(stopped_run, tiny_config):
    """Issue 23: a run stopped once and resumed to its end kept `"error": "Interrupted"` in its record."""
    assert RunRecord.load(stopped_run).error == "Interrupted"
    assert run_training(stopped(tiny_config), RunFolder.of(tiny_config.output_dir, "stopped1")).record.status == \
        "finished"
    record = json.loads((stopped_run / RECORD_FILE).read_text())
    assert record["status"] == "finished" and record["error"] is None
    assert [entry["epoch"] for entry in record["history"]] == [1, 2]
