"""An offline sweep's shared state (sweep/state.py): transactions on sweep.json that lose no change between
processes, run leases that run out after their seconds, a state file from before leases, and a folder of another
sweep or without file locks refused in one line."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import time

import pytest
from helpers.sweeps import PROCESS_TIMEOUT_SECONDS, SHORT_LEASE_SECONDS, sweep_state, tiny_settings, write_sweep

from cifar_resnet import files
from cifar_resnet.cli import main
from cifar_resnet.sweep.local import LocalSweep
from cifar_resnet.sweep.plan import load_sweep
from cifar_resnet.sweep.state import LocalRun, SweepFolder
from cifar_resnet.sweep.view import LogView


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


@pytest.mark.quick
def test_a_lease_runs_out_after_its_seconds_and_runs_to_take_over_come_before_new_ones(tmp_path, tiny_config,
                                                                                     caplog):
    """The takeover test of test_e2e_local_sweep.py in seconds, without processes (issue 23: with leases that never
    ran out, the default suite stayed green): a lease holds for exactly its seconds after the last heartbeat; a
    claim takes, in the state's order, a run whose lease ran out or a preempted one, before the proposer's next;
    never a live lease."""
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


def test_an_output_folder_of_another_sweep_is_refused(tmp_path, tiny_config, capsys):
    out_dir = tmp_path / "out"
    first = write_sweep(tmp_path / "a.yaml", tiny_settings(tiny_config) | {"seed": {"values": [1]}})
    out_dir.mkdir()
    (out_dir / "sweep.json").write_text(json.dumps({"sweep_id": "x", "sweep": {"other": 1}, "runs": []}))

    assert main(["sweep", str(first), "--offline", "--output-dir", str(out_dir)]) == 2
    assert "holds another sweep" in capsys.readouterr().err
