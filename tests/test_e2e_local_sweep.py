"""A sweep on one machine, end to end: `cifar-resnet sweep FILE --offline` through W&B's own sweep engine to the
runs' records, the table and the report; stopped, moved and resumed; several sweep processes sharing one folder
(real processes started together join one sweep and run each cell once; a process killed with its run, a dead
host, has its run taken over once its lease runs out, with the result of an uninterrupted run); and what the README
claims of it: bayes learns from the runs' records, a re-run starts no finished run, `early_terminate` stops a run
that falls behind. Real processes, W&B offline."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.runs import processes_of, wait_for
from helpers.sweeps import (
    GRID,
    PROCESS_TIMEOUT_SECONDS,
    SHORT_LEASE_SECONDS,
    SIGNAL_TIMEOUT_SECONDS,
    sweep_state,
    table_rows,
    tiny_settings,
    write_sweep,
)

from cifar_resnet.cli import main
from cifar_resnet.config import Config
from cifar_resnet.records import RECORD_FILE, RunFolder, RunRecord
from cifar_resnet.runner import run_training
from cifar_resnet.sweep.plan import default_output_dir, load_sweep

TIMING_KEYS = ("epoch_seconds", "train/images_per_second")  # differ between any two runs


SIGTERM_EXIT = 128 + 15
# W&B's engine draws the first bayes proposals at random (numpy's global RNG). Two rates close together let its
# Gaussian process fit nothing (it then samples at random, history or not); this seed draws two far apart.
FIRST_PROPOSALS_SEED = 5


def test_grid_with_two_workers_runs_every_cell_as_the_agent_would(tmp_path, tiny_config, capsys):
    path = write_sweep(tmp_path / "grid.yaml", GRID | tiny_settings(tiny_config))
    out_dir = tmp_path / "grid-out"

    assert main(["sweep", str(path), "--workers", "2", "--offline", "--output-dir", str(out_dir)]) == 0

    state = sweep_state(out_dir)
    runs = state["runs"]
    assert [run["state"] for run in runs] == ["finished"] * 4
    cells = {(run["params"]["learning_rate"], run["params"]["optimizer"]) for run in runs}
    assert cells == {(0.001, "adam"), (0.001, "sgd"), (0.0005, "adam"), (0.0005, "sgd")}
    records = [RunRecord.load(out_dir / run["run_id"]) for run in runs]
    for run, record in zip(runs, records):
        assert record.run_id == run["run_id"] and record.status == "finished"
        assert record.config["learning_rate"] == run["params"]["learning_rate"]
        assert record.config["optimizer"] == run["params"]["optimizer"]
        assert record.config["width"] == tiny_config.width and record.config["epochs"] == 1
        assert record.config["output_dir"] == str(out_dir.resolve())
        assert "test/acc" in record.summary
        # A real offline W&B run under the run id the sweep gave it, next to the others (WANDB_DIR).
        assert list((tmp_path / "wandb").glob(f"offline-run-*-{run['run_id']}"))
    # Two workers: the first two runs were in progress at the same time.
    first, second = sorted(records, key=lambda record: record.started_at)[:2]
    assert second.started_at < first.updated_at
    rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 4 and "(best)" in rows[0]

    # The same command again: every cell is done, nothing runs, and it says so in one line before the table
    # (issue 27: it printed the table after a few seconds, without a word).
    assert main(["sweep", str(path), "--workers", "2", "--offline", "--output-dir", str(out_dir)]) == 0
    assert sweep_state(out_dir)["runs"] == runs
    again = capsys.readouterr()
    assert again.err.splitlines()[-1] == "INFO: all 4 runs of the sweep finished already: nothing left to do"
    assert len(table_rows(again.out)) == 4

    # And the report reads the sweep's folder.
    assert main(["report", str(out_dir)]) == 0
    assert (out_dir / "report" / "results.md").read_text().count("| ") > 4


@pytest.mark.slow
def test_an_interrupted_sweep_keeps_finished_runs_and_resumes_the_rest_from_a_moved_folder(tmp_path, tiny_config):
    """The stopped sweep's folder is moved before it resumes (issue 23: output_dir was compared as a setting, so
    the moved run's last.pt was "written with other settings" and the run failed)."""
    # One run at a time: a 1-epoch run that finishes, then a 4-epoch run interrupted after its first epoch.
    parameters = tiny_settings(tiny_config) | {"epochs": {"values": [1, 4]}}
    path = write_sweep(tmp_path / "two.yaml", parameters)
    out_dir = tmp_path / default_output_dir(load_sweep(path, []))  # the sweep's own folder, in the current one
    command = [sys.executable, "-m", "cifar_resnet", "sweep", str(path), "--offline"]
    sweep = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def long_run_has_an_epoch() -> bool:
        runs = sweep_state(out_dir)["runs"] if (out_dir / "sweep.json").exists() else []
        if len(runs) < 2 or runs[0]["state"] != "finished":
            return False
        record = out_dir / runs[1]["run_id"] / RECORD_FILE
        return record.exists() and len(json.loads(record.read_text())["history"]) >= 1

    try:
        wait_for(long_run_has_an_epoch)
        sweep.send_signal(signal.SIGINT)
        output = sweep.communicate(timeout=SIGNAL_TIMEOUT_SECONDS)[0].decode()
    finally:
        sweep.kill()
    assert sweep.returncode == 128 + signal.SIGINT, output
    assert output.rstrip().endswith("stopped; run the same command to resume")  # the last line, after the table
    finished, interrupted = sweep_state(out_dir)["runs"]
    assert finished["state"] == "finished" and interrupted["state"] == "preempted"
    assert (out_dir / interrupted["run_id"] / "last.pt").exists()  # its resume checkpoint
    # No process is left behind: not the run, not its W&B service.
    wait_for(lambda: not processes_of(f"WANDB_SWEEP_PARAM_PATH={out_dir.resolve()}"), timeout=10)
    finished_record = RunRecord.load(out_dir / finished["run_id"])
    interrupted_record = RunRecord.load(out_dir / interrupted["run_id"])
    moved = out_dir.rename(tmp_path / "moved")
    out_dir = moved

    # The same command, pointed at the folder where the sweep now lies (`mv A B`, then `--output-dir B`).
    resumed_sweep = subprocess.run([*command, "--output-dir", str(moved)], capture_output=True, text=True)
    assert resumed_sweep.returncode == 0, resumed_sweep.stderr[-3000:]

    runs = sweep_state(out_dir)["runs"]
    assert [run["run_id"] for run in runs] == [finished["run_id"], interrupted["run_id"]]
    assert [run["state"] for run in runs] == ["finished", "finished"]
    assert RunRecord.load(out_dir / finished["run_id"]) == finished_record  # not run again
    resumed = RunRecord.load(out_dir / interrupted["run_id"])
    assert [entry["epoch"] for entry in resumed.history] == [1, 2, 3, 4]  # each epoch once
    # Resumed, not started over: the same record, and the epochs before the interrupt kept as they were.
    assert resumed.started_at == interrupted_record.started_at
    assert resumed.history[:len(interrupted_record.history)] == interrupted_record.history
    assert not (out_dir / interrupted["run_id"] / "last.pt").exists()
    assert resumed.status == "finished" and resumed.error is None  # not the interrupted attempt's "Interrupted"
    assert resumed.config["output_dir"] == str(moved.resolve())  # where it lies now


def sweep_process(path: Path, out_dir: Path, *args: str) -> subprocess.Popen:
    """`cifar-resnet sweep PATH --offline` in a process (and a process group) of its own."""
    command = [sys.executable, "-m", "cifar_resnet", "sweep", str(path), "--offline", "--output-dir", str(out_dir),
               *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(processes: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """Each process's (exit status, stdout, stderr), once all have ended."""
    try:
        outputs = [process.communicate(timeout=PROCESS_TIMEOUT_SECONDS) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    return [(process.returncode, out, err) for process, (out, err) in zip(processes, outputs)]


def assert_each_cell_ran_once(out_dir: Path, cells: set[tuple]) -> list[dict]:
    runs = sweep_state(out_dir)["runs"]
    assert {(run["params"]["learning_rate"], run["params"]["optimizer"]) for run in runs} == cells
    assert len(runs) == len(cells)
    for run in runs:
        assert run["state"] == "finished" and run["attempts"] == 1, run
        assert RunRecord.load(out_dir / run["run_id"]).status == "finished"
        # One attempt: one offline W&B run per run id.
        assert len(list(Path(os.environ["WANDB_DIR"]).glob(f"wandb/offline-run-*-{run['run_id']}"))) == 1
    return runs


@pytest.mark.slow
def test_two_sweeps_started_together_share_the_folder_and_run_each_cell_once(tmp_path, tiny_config):
    path = write_sweep(tmp_path / "grid.yaml", GRID | tiny_settings(tiny_config))
    out_dir = tmp_path / "out"

    results = finish([sweep_process(path, out_dir), sweep_process(path, out_dir)])

    assert [status for status, _, _ in results] == [0, 0], results
    runs = assert_each_cell_ran_once(out_dir, {(0.001, "adam"), (0.001, "sgd"), (0.0005, "adam"), (0.0005, "sgd")})
    assert len({run["owner"] for run in runs}) == 2  # both processes ran some of the cells
    # Each process waits for the other's runs, so both end with the whole sweep's table.
    for _, stdout, _ in results:
        rows = table_rows(stdout)
        shown = sorted(row.split("|")[1].split()[0].strip("*") for row in rows)  # "| **abc** (best) | ..."
        assert shown == sorted(run["run_id"] for run in runs)
    assert main(["report", str(out_dir)]) == 0
    report_rows = table_rows((out_dir / "report" / "results.md").read_text())
    assert len(report_rows) == 4


@pytest.mark.slow
def test_processes_racing_for_the_same_cells_claim_each_once(tmp_path, tiny_config):
    """Three processes with two workers each, three cells: six free workers contend for every proposal."""
    parameters = tiny_settings(tiny_config) | {"learning_rate": {"values": [0.002, 0.001, 0.0005]},
                                               "optimizer": {"value": "adam"}}
    path = write_sweep(tmp_path / "race.yaml", parameters)
    out_dir = tmp_path / "out"

    results = finish([sweep_process(path, out_dir, "--workers", "2") for _ in range(3)])

    assert [status for status, _, _ in results] == [0, 0, 0], results
    assert_each_cell_ran_once(out_dir, {(0.002, "adam"), (0.001, "adam"), (0.0005, "adam")})


@pytest.mark.slow  # 3 min on the shared 2-core machine: two sweep processes, a lease to wait out, a reference run
def test_a_killed_host_s_run_is_taken_over_and_ends_as_an_uninterrupted_run(tmp_path, tiny_config):
    """A (lease 3 s) is killed with its run after the first epoch, as when its host dies; B, started after,
    waits for the lease to run out, takes the run over under its run id and resumes it from last.pt."""
    config = tiny_config.replace(epochs=4, train_size=1000, batch_size=32)  # about a second an epoch
    path = write_sweep(tmp_path / "one.yaml", tiny_settings(config, epochs=config.epochs)
                       | {"learning_rate": {"values": [0.002]}})
    out_dir = tmp_path / "out"
    lease = ["--lease-seconds", str(SHORT_LEASE_SECONDS)]
    host_a = sweep_process(path, out_dir, *lease)

    def first_epoch_done() -> bool:
        runs = sweep_state(out_dir)["runs"] if (out_dir / "sweep.json").exists() else []
        record = out_dir / runs[0]["run_id"] / RECORD_FILE if runs else None
        return record is not None and record.exists() and len(json.loads(record.read_text())["history"]) >= 1

    try:
        wait_for(first_epoch_done, timeout=PROCESS_TIMEOUT_SECONDS)
    finally:
        os.killpg(host_a.pid, signal.SIGKILL)
        for pid in processes_of(f"WANDB_SWEEP_PARAM_PATH={out_dir.resolve()}"):  # the run and its W&B service
            os.kill(pid, signal.SIGKILL)
        host_a.communicate()
    (dead,) = sweep_state(out_dir)["runs"]
    assert dead["state"] == "running" and dead["attempts"] == 1  # still leased to the dead process
    killed = RunRecord.load(out_dir / dead["run_id"])
    assert 1 <= len(killed.history) < config.epochs

    host_b = sweep_process(path, out_dir, *lease)
    wait_for(lambda: sweep_state(out_dir)["runs"][0]["attempts"] == 2, timeout=PROCESS_TIMEOUT_SECONDS)
    taken_over_at = time.time()
    ((status, _, stderr),) = finish([host_b])

    assert status == 0, stderr
    assert f"run {dead['run_id']}: the lease of {dead['owner']} ran out" in stderr
    (run,) = sweep_state(out_dir)["runs"]
    assert run["run_id"] == dead["run_id"] and run["state"] == "finished" and run["attempts"] == 2
    assert run["owner"] != dead["owner"]
    assert taken_over_at >= dead["heartbeat_at"] + SHORT_LEASE_SECONDS  # only once the lease had run out
    resumed = RunRecord.load(out_dir / run["run_id"])
    assert resumed.started_at == killed.started_at  # resumed, not started over
    assert resumed.history[:len(killed.history)] == killed.history
    assert not (out_dir / run["run_id"] / "last.pt").exists()

    # The same cell uninterrupted, in this process on one thread as the runs had: the same numbers, bit for bit.
    reference = run_training(Config.from_mapping({**resumed.config, "output_dir": str(tmp_path / "ref")}),
                             RunFolder.of(tmp_path / "ref", "reference")).record

    def without_timing(history: list[dict]) -> list[dict]:
        return [{key: value for key, value in entry.items() if key not in TIMING_KEYS} for entry in history]

    assert without_timing(resumed.history) == without_timing(reference.history)
    for key in ("test/acc", "test/loss", "best_epoch", "test/acc_per_class"):
        assert resumed.summary[key] == reference.summary[key], key


def sweep_runs(out_dir: Path) -> list[dict[str, Any]]:
    return sweep_state(out_dir)["runs"]


def sweep(path: Path, out_dir: Path, *args: str) -> int:
    return main(["sweep", str(path), "--offline", "--output-dir", str(out_dir), *args])


@pytest.mark.slow
def test_bayes_proposes_from_the_runs_records_and_a_rerun_starts_no_finished_run(tmp_path, tiny_config):
    parameters = tiny_settings(tiny_config) | {
        "learning_rate": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-1}}
    path = write_sweep(tmp_path / "bayes.yaml", parameters, method="bayes")
    learned = tmp_path / "learned"
    np.random.seed(FIRST_PROPOSALS_SEED)
    assert sweep(path, learned, "--workers", "2", "--count", "2") == 0
    first = {run["run_id"]: RunRecord.load(learned / run["run_id"]) for run in sweep_runs(learned)}
    assert len(first) == 2 and all(record.status == "finished" for record in first.values())
    # A seeded history: tiny runs can score alike, and a flat history teaches a Gaussian process nothing (W&B's
    # engine then samples at random). The smaller rate scores far better.
    for accuracy, run_id in zip((0.6, 0.1), sorted(first, key=lambda run_id: first[run_id].config["learning_rate"])):
        first[run_id].history = [{**entry, "val/acc": accuracy} for entry in first[run_id].history]
        first[run_id].save(learned / run_id)
        first[run_id] = RunRecord.load(learned / run_id)
    # The same sweep, its runs' records gone: the engine sees the runs, but none of their results.
    blind = tmp_path / "blind"
    shutil.copytree(learned, blind)
    for run_id in first:
        (blind / run_id / RECORD_FILE).unlink()

    proposals = {}
    for out_dir in (learned, blind):
        np.random.seed(1)  # the engine's random draws, the same for both
        assert sweep(out_dir.parent / "bayes.yaml", out_dir, "--count", "3") == 0
        runs = sweep_runs(out_dir)
        assert len(runs) == 3 and runs[2]["state"] == "finished"
        proposals[out_dir.name] = runs[2]["params"]["learning_rate"]

    assert proposals["learned"] != proposals["blind"]  # the results changed the proposal
    # ... towards the run that scored better (on the log scale the rate is searched on).
    best_rate = min(record.config["learning_rate"] for record in first.values())
    assert abs(math.log(proposals["learned"] / best_rate)) < abs(math.log(proposals["blind"] / best_rate))
    # The re-run started none of the finished runs again: their records are as they were.
    for run_id, record in first.items():
        again = RunRecord.load(learned / run_id)
        assert again.started_at == record.started_at and again == record


@pytest.mark.slow
def test_early_terminate_stops_a_run_that_falls_behind_and_marks_it_stopped(tmp_path, tiny_config):
    # Two runs at once: Adam at a good rate, and at a rate far too small to learn anything. Hyperband with
    # min_iter 2 and eta 3 judges them at epochs 2, 6, 18...: at epoch 2 the hopeless run (still at chance) is below
    # the top third, while the good one has learned well clear of chance (at epoch 1 the two can still tie near
    # chance on the synthetic set); the good one ends at epoch 5, before the next band.
    epochs = 5
    parameters = tiny_settings(tiny_config.replace(train_size=2000), epochs=epochs) | {
        "optimizer": {"value": "adam"}, "learning_rate": {"values": [0.002, 1e-9]}}
    path = write_sweep(tmp_path / "hyperband.yaml", parameters, method="grid",
                       early_terminate={"type": "hyperband", "min_iter": 2, "eta": 3})
    out_dir = tmp_path / "out"

    assert sweep(path, out_dir, "--workers", "2") == 0  # a stopped run is not a failure

    runs = {run["params"]["learning_rate"]: run for run in sweep_runs(out_dir)}
    good, hopeless = runs[0.002], runs[1e-9]
    assert good["state"] == "finished"
    assert [entry["epoch"] for entry in RunRecord.load(out_dir / good["run_id"]).history] == list(range(1, epochs + 1))
    # Stopped by SIGTERM from the sweep's loop: the run saved its state and exited with 128 + 15.
    assert hopeless["state"] == "stopped" and hopeless["exit_code"] == SIGTERM_EXIT
    stopped = RunRecord.load(out_dir / hopeless["run_id"])
    assert 2 <= len(stopped.history) < epochs and stopped.status == "preempted"
    assert max(entry["val/acc"] for entry in stopped.history) < max(
        entry["val/acc"] for entry in RunRecord.load(out_dir / good["run_id"]).history)
