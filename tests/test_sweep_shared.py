"""One offline sweep folder shared by several `cifar-resnet sweep` processes: real processes started together
join one sweep and run each cell once; a process killed with its run (a dead host) has its run taken over and
resumed once its lease runs out, with the result of an uninterrupted run; a sweep command that does not start our
training is warned about, and its runs fail instead of "finishing". W&B offline, real files throughout; the one
test double stands in for a filesystem without flock, which cannot be mounted here."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from helpers.runs import processes_of, wait_for
from helpers.sweeps import GRID, sweep_state, table_rows, tiny_settings, write_sweep

from cifar_resnet import files
from cifar_resnet.cli import main
from cifar_resnet.config import Config
from cifar_resnet.records import RECORD_FILE, RunFolder, RunRecord
from cifar_resnet.runner import run_training
from cifar_resnet.sweep.local import NO_RECORD_REASON, LocalSweep
from cifar_resnet.sweep.plan import load_sweep, starts_our_training, warn_unless_our_entry_point
from cifar_resnet.sweep.state import LocalRun, SweepFolder
from cifar_resnet.sweep.view import LogView

TIMING_KEYS = ("epoch_seconds", "train/images_per_second")  # differ between any two runs
PROCESS_TIMEOUT_SECONDS = 300
SHORT_LEASE_SECONDS = 3.0


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


@pytest.mark.quick
def test_a_lease_runs_out_after_its_seconds_and_runs_to_take_over_come_before_new_ones(tmp_path, tiny_config,
                                                                                     caplog):
    """The takeover test above in seconds, without processes (issue 23: with leases that never ran out, the default
    suite stayed green): a lease holds for exactly its seconds after the last heartbeat; a claim takes, in the
    state's order, a run whose lease ran out or a preempted one, before the proposer's next; never a live lease."""
    run = LocalRun("r", {}, state="running", owner="host:1:a", heartbeat_at=1000.0, lease_seconds=3.0)
    assert not run.lease_expired(1003.0) and run.lease_expired(1003.001)
    assert not LocalRun("f", {}, state="finished", heartbeat_at=0.0, lease_seconds=3.0).lease_expired(1e9)

    path = write_sweep(tmp_path / "grid.yaml", tiny_settings(tiny_config) | {"seed": {"values": [1, 2, 3, 4, 5]}})
    sweep = LocalSweep(load_sweep(path, []), tmp_path / "out", [None], None, None, LogView([]), SHORT_LEASE_SECONDS)
    now = time.time()
    with sweep.folder.transaction() as state:
        state.runs += [
            LocalRun("done", {"seed": 1}, state="finished"),
            LocalRun("alive", {"seed": 2}, state="running", owner="host:2:b", heartbeat_at=now, lease_seconds=3.0),
            LocalRun("dead", {"seed": 3}, state="running", owner="host:3:c", heartbeat_at=now - 10, lease_seconds=3.0),
            LocalRun("stopped", {"seed": 4}, state="preempted", owner="host:4:d"),
        ]

    def claim(at: float) -> LocalRun | None:
        with sweep.folder.transaction() as state:
            return sweep.claim(state, at)

    with caplog.at_level(logging.WARNING, logger="cifar_resnet"):
        taken = [claim(now), claim(now), claim(now), claim(now)]
    assert [run.run_id for run in taken[:2]] == ["dead", "stopped"]
    assert taken[2].params["seed"] == 5  # then the proposer's next cell
    assert taken[3] is None  # the grid has no cell left, and "alive" is still leased
    assert [record.getMessage() for record in caplog.records] == [
        "run dead: the lease of host:3:c ran out 10 s ago; taking it over"]
    assert claim(now + SHORT_LEASE_SECONDS + 1).run_id == "alive"  # once its lease has run out
    runs = {run["run_id"]: run for run in sweep_state(tmp_path / "out")["runs"]}
    for run_id in ("dead", "stopped", "alive"):
        assert runs[run_id]["owner"] == sweep.owner and runs[run_id]["attempts"] == 1
    assert runs["done"]["state"] == "finished"


def test_concurrent_transactions_lose_no_change(tmp_path):
    """Four processes each add 25 runs, one transaction each, at the same time: all 100 are kept."""
    out_dir = tmp_path / "out"
    adder = (
        "import sys; from pathlib import Path\n"
        "from cifar_resnet.sweep.state import LocalRun, SweepFolder\n"
        "folder = SweepFolder(Path(sys.argv[1]), {'method': 'grid'}, lambda: 'sweep123')\n"
        "for index in range(25):\n"
        "    with folder.transaction() as state:\n"
        "        state.runs.append(LocalRun(f'{sys.argv[2]}-{index}', {}))\n"
    )
    adders = [subprocess.Popen([sys.executable, "-c", adder, str(out_dir), f"p{number}"]) for number in range(4)]
    assert [process.wait(timeout=PROCESS_TIMEOUT_SECONDS) for process in adders] == [0] * 4

    state = sweep_state(out_dir)
    assert state["sweep_id"] == "sweep123"  # created once, by whichever came first
    assert sorted(run["run_id"] for run in state["runs"]) == sorted(
        f"p{number}-{index}" for number in range(4) for index in range(25))


def test_an_older_state_file_is_read_and_its_running_runs_are_free_to_take(tmp_path):
    """A sweep.json from before leases: its runs have no owner; one left running is taken over at once."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    old_runs = [{"run_id": "a", "params": {"seed": 1}, "state": "finished", "exit_code": 0},
                {"run_id": "b", "params": {"seed": 2}, "state": "running", "exit_code": None}]
    (out_dir / "sweep.json").write_text(json.dumps({"sweep_id": "s", "sweep": {"method": "grid"}, "runs": old_runs}))

    with SweepFolder(out_dir, {"method": "grid"}, lambda: "unused").transaction() as state:
        finished, running = state.runs
    assert finished == LocalRun("a", {"seed": 1}, "finished", 0)
    assert not finished.lease_expired(time.time()) and running.lease_expired(time.time())


def test_a_folder_without_file_locks_is_refused_in_one_line(tmp_path, tiny_config, capsys, monkeypatch):
    """Test double: a filesystem without flock (an NFS mount without locking) cannot be mounted here, so flock
    fails as it fails there, with ENOLCK."""
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    path = write_sweep(tmp_path / "grid.yaml", tiny_settings(tiny_config))

    assert main(["sweep", str(path), "--offline", "--output-dir", str(tmp_path / "out")]) == 2

    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sweep.lock: cannot lock it" in err and "flock" in err
    assert not (tmp_path / "out" / "sweep.json").exists()


def test_the_repository_sweep_starts_our_training_without_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="cifar_resnet"):
        warn_unless_our_entry_point(load_sweep(REPO / "sweep.yaml", []))
    assert caplog.records == []
    assert starts_our_training(["cifar-resnet", "train", "--epochs=1"])
    assert starts_our_training(["/usr/bin/env", "python", "-m", "cifar_resnet", "train"])
    assert not starts_our_training(["/usr/bin/env", "python", "cifar_resnet.train", "--epochs=1"])


def test_a_program_without_a_command_is_warned_about_and_its_runs_fail(tmp_path, tiny_config, capsys):
    """W&B's default command runs `python cifar_resnet.train`, a file path: warned when the sweep starts; the first
    run then fails with Python's own message (exit 2), which every run would repeat: the sweep stops there."""
    path = write_sweep(tmp_path / "no-command.yaml", tiny_settings(tiny_config))
    sweep = yaml.safe_load(path.read_text())
    del sweep["command"]
    path.write_text(yaml.safe_dump(sweep))
    out_dir = tmp_path / "out"

    assert main(["sweep", str(path), "--offline", "--output-dir", str(out_dir)]) == 2

    captured = capsys.readouterr()
    warning = next(line for line in captured.err.splitlines() if line.startswith("WARNING: "))
    assert f"{path}: the agent would run `/usr/bin/env python cifar_resnet.train`" in warning
    assert "-m, ${program}" in warning
    (run,) = sweep_state(out_dir)["runs"]
    assert run["state"] == "failed" and run["exit_code"] == 2
    stopped = [line for line in captured.err.splitlines() if line.startswith("ERROR: ")][-1]  # the sweep's last word
    assert "can't open file" in stopped and "cifar_resnet.train" in stopped and "the sweep stopped" in stopped


def test_a_command_that_exits_0_without_a_run_record_fails(tmp_path, tiny_config, capsys):
    path = write_sweep(tmp_path / "other.yaml", tiny_settings(tiny_config),
                       command=["${env}", "${interpreter}", "-c", "print('something else')"])
    out_dir = tmp_path / "out"

    assert main(["sweep", str(path), "--offline", "--output-dir", str(out_dir)]) == 1

    captured = capsys.readouterr()
    assert "the agent would run `/usr/bin/env python -c print('something else')`" in captured.err
    (run,) = sweep_state(out_dir)["runs"]
    assert run["state"] == "failed" and run["exit_code"] == 0 and run["reason"] == NO_RECORD_REASON
    rows = table_rows(captured.out)
    assert len(rows) == 1 and "(failed)" in rows[0]
    assert f"run {run['run_id']} failed (exit 0: {NO_RECORD_REASON})" in captured.out
    assert "finished after" not in captured.err
