"""The sweep's progress views (sweep/view.py): a running run's progress read from its progress file, a log line
per running run, the live table with each run's bar and its ids and swept values whole on a narrow terminal, and
the sweep's time left."""

from __future__ import annotations

import logging
import time

import pytest

from cifar_resnet.config import Config
from cifar_resnet.records import EpochProgress, RunFolder, RunRecord
from cifar_resnet.sweep.state import LocalRun
from cifar_resnet.sweep.view import LiveView, LogView, RunProgress, RunTiming, progress_of, sweep_seconds_left


@pytest.mark.quick
def test_progress_of_a_running_run_reads_its_progress_file(tmp_path, tiny_config):
    run = LocalRun("live0001", {"epochs": 4}, "running")
    run_dir = tmp_path / run.run_id
    RunRecord(run.run_id, tiny_config.to_dict(), history=[{"epoch": 1, "val/acc": 0.3}], seconds=20.0).save(run_dir)
    EpochProgress(epoch=2, epochs=4, step=25, steps=100, images_per_second=900.0, seconds=30.0,
                  updated_at=time.time()).save(run_dir)

    progress = progress_of(run, RunRecord.load(run_dir), Config(), RunFolder(run_dir, run.run_id))

    assert (progress.epoch, progress.done_epochs, progress.images_per_second) == (1, 1.25, 900.0)
    assert 30.0 <= progress.seconds < 35.0
    assert progress.seconds_left == pytest.approx(progress.seconds * 2.75 / 1.25)


@pytest.mark.quick
def test_log_view_writes_a_progress_line_per_running_run(caplog):
    running = LocalRun("abc12345", {"learning_rate": 0.001}, "running")
    done = LocalRun("def67890", {"learning_rate": 0.01}, "finished")
    view = LogView(["learning_rate"], progress_every=0.0)
    with caplog.at_level(logging.INFO, logger="cifar_resnet.sweep"):
        view.refresh([RunProgress(running, 1, 4, 0.5, 30.0, epoch_fraction=0.5, images_per_second=1000.0),
                      RunProgress(done, 4, 4, 0.6, 100.0)], total_runs=2)
    assert caplog.messages == ["run abc12345: 1/4 epochs (50% of epoch 2), 1,000 img/s, 30s, about 50s left"]
    quiet = LogView(["learning_rate"])  # the default: a line every PROGRESS_LOG_SECONDS, not at every poll
    caplog.clear()
    quiet.refresh([RunProgress(running, 1, 4, 0.5, 30.0, epoch_fraction=0.5)], total_runs=2)
    assert caplog.messages == []


@pytest.mark.quick
def test_live_view_shows_each_runs_bar_and_time_left_from_the_first_steps(capsys):
    run = LocalRun("abc12345", {"learning_rate": 0.001}, "running")
    with LiveView(["learning_rate"]) as view:
        view.refresh([RunProgress(run, 0, 2, None, 12.0, epoch_fraction=0.3, images_per_second=512.0)], total_runs=1)
    shown = capsys.readouterr().err
    assert "abc12345" in shown and "0/2" in shown and "512" in shown
    assert "12s" in shown and "1m 08s" in shown  # 12 s for 0.3 of 2 epochs: 68 s left
    assert "━" in shown  # the run's own bar


def test_live_view_shows_runs_and_progress(capsys):
    run = LocalRun("abc12345", {"learning_rate": 0.001, "optimizer": "adam"}, "running")
    with LiveView(["learning_rate", "optimizer"]) as view:
        view.refresh([RunProgress(run, 1, 2, 0.42, 3.0)], total_runs=6)
    shown = capsys.readouterr().err
    assert "abc12345" in shown and "1/2" in shown and "42.00%" in shown and "runs 0/6" in shown


@pytest.mark.quick
@pytest.mark.parametrize("columns", [80, 200])
def test_the_live_table_keeps_the_run_ids_and_swept_values_whole_on_a_narrow_terminal(capsys, monkeypatch, columns):
    """Issue 27: at 80 columns every swept value was cut to `0.0…` or `ad…`, and the runs could not be told apart.
    Other columns give way, from the per-run bar on; a wide terminal shows them all."""
    monkeypatch.setenv("COLUMNS", str(columns))
    cells = [(0.001, "adam", "running"), (0.0005, "adamw", "preempted"), (0.0001, "sgd", "finished")]
    runs = [LocalRun(f"run{index:05d}", {"learning_rate": rate, "optimizer": optimizer}, state)
            for index, (rate, optimizer, state) in enumerate(cells)]
    with LiveView(["learning_rate", "optimizer"]) as view:
        view.refresh([RunProgress(run, 1, 2, 0.42, 63.0, 0.5, 12345.0) for run in runs], total_runs=6)
    lines = capsys.readouterr().err.splitlines()
    header = next(line for line in lines if line.startswith("run "))
    assert "learning_rate" in header and "optimizer" in header and "…" not in header
    for run, (rate, optimizer, state) in zip(runs, cells):
        (row,) = [line for line in lines if line.startswith(run.run_id)]
        assert row.split()[:4] == [run.run_id, state, str(rate), optimizer] and "…" not in row
        assert len(row.rstrip()) <= columns
    assert ("12,345" in "".join(lines)) == (columns == 200)  # images per second: given way at 80, shown at 200


@pytest.mark.quick
def test_the_live_view_shows_the_sweeps_time_left(capsys):
    run = LocalRun("abc12345", {}, "running")
    with LiveView([]) as view:
        view.refresh([RunProgress(run, 1, 2, 0.42, 3.0)], total_runs=6, seconds_left=225.0)
    assert "remaining 3m 45s" in capsys.readouterr().err


# A run of the trial as measured on the 2-core CPU (one run alone, W&B offline, at a load average of 7.8: 31 s before
# the run's own clock started, 16 s of data, model and test pass, 162 s of epochs, 5 s for W&B's finish), scaled to
# the 75 s a run took in the 3:45 trial (3 rounds of 2 runs): seconds of each part.
BEFORE_CLOCK, SETUP, TRAIN, VALIDATE, END = 11.0, 3.0, 26.0, 2.7, 6.5
TRIAL_EPOCHS, TRIAL_RUNS, TRIAL_WORKERS = 2, 6, 2
WHOLE_RUN = BEFORE_CLOCK + SETUP + TRIAL_EPOCHS * (TRAIN + VALIDATE) + END


def trial_progress(t: float) -> tuple[list[RunProgress], dict[str, float]]:
    """What the sweep sees `t` seconds into the trial: each run's progress, and when each running run started."""
    progress, started = [], {}
    for index in range(TRIAL_RUNS):
        start = (index // TRIAL_WORKERS) * WHOLE_RUN
        if t < start:
            break
        run, into = LocalRun(f"run{index}", {}, "running"), t - start
        clock = into - BEFORE_CLOCK  # the run's own clock, which its record and progress file carry
        if into >= WHOLE_RUN:
            run.state = "finished"
            progress.append(RunProgress(run, TRIAL_EPOCHS, TRIAL_EPOCHS, 0.5, WHOLE_RUN - BEFORE_CLOCK))
            continue
        started[run.run_id] = start
        training = max(0.0, clock - SETUP)
        epoch = min(TRIAL_EPOCHS, int(training // (TRAIN + VALIDATE)))
        fraction = 0.0 if epoch == TRIAL_EPOCHS else min(0.999, (training - epoch * (TRAIN + VALIDATE)) / TRAIN)
        progress.append(RunProgress(run, epoch, TRIAL_EPOCHS, None, clock if clock > 0 else None,
                                    epoch_fraction=fraction if clock > SETUP else 0.0))
    return progress, started


@pytest.mark.quick
def test_the_sweeps_time_left_counts_every_runs_start_and_end_and_the_rounds_of_runs():
    """Polled as the sweep polls (every 0.5 s) through the trial: from the first steps on, the estimate is within
    20% of the truth, and once a run has finished, within a second. (The bar's own estimate, epochs left at the
    rate of training steps, gave 1:58 left at 0:10 of a trial that took 3:45.)"""
    from rich.progress import Progress

    total = TRIAL_RUNS // TRIAL_WORKERS * WHOLE_RUN
    timings: dict[str, RunTiming] = {}
    whole_runs: list[float] = []
    estimates, bars = {}, {}
    clock = [0.0]
    bar = Progress(get_time=lambda: clock[0])  # the bar's own estimate, fed the same epochs
    task = bar.add_task("", total=TRIAL_RUNS * TRIAL_EPOCHS)
    for tick in range(int(total * 2)):
        now = clock[0] = tick / 2
        progress, started = trial_progress(now)
        bar.update(task, completed=sum(item.done_epochs for item in progress))
        bars[now] = bar.tasks[0].time_remaining
        for run_id in set(timings) - set(started):
            whole_runs.append(now - timings.pop(run_id).started_at)
        for item in progress:
            if item.run.run_id in started:
                timings.setdefault(item.run.run_id, RunTiming(started[item.run.run_id])).saw(item.done_epochs, now)
        estimates[now] = sweep_seconds_left(progress, TRIAL_RUNS, TRIAL_WORKERS, timings, whole_runs, now)

    first_steps = BEFORE_CLOCK + SETUP
    assert all(estimate is None for now, estimate in estimates.items() if now < first_steps)  # no guess yet
    for now, estimate in estimates.items():
        if first_steps + 1 < now <= WHOLE_RUN + 1:
            assert estimate == pytest.approx(total - now, rel=0.2), now
        elif now > WHOLE_RUN + 1:
            assert estimate == pytest.approx(total - now, abs=1.0), now
    # The bar's own estimate: far too low while the first runs train (their start and end, and the runs waiting for
    # a worker, are left out).
    assert bars[first_steps + 5] < 0.75 * (total - first_steps - 5)
