"""The offline sweep's loop (sweep/local.py, `LocalSweep`), with real runs in subprocesses (W&B offline): a
failed run does not stop the others and shows its log; a mistake every run would repeat stops the sweep in one
line, and is fixed as that line says; a command that cannot start gives up; each run's environment, exit status and
record; random and bayes stop at --count."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.images import image_folder
from helpers.runs import processes_of, wait_for
from helpers.sweeps import GRID, SIGNAL_TIMEOUT_SECONDS, folder_of, sweep_state, table_rows, tiny_settings, write_sweep

from cifar_resnet.cli import main
from cifar_resnet.records import RECORD_FILE, RunRecord
from cifar_resnet.sweep.local import MAX_INITIAL_FAILURES, NO_RECORD_REASON, LocalSweep
from cifar_resnet.sweep.plan import load_sweep
from cifar_resnet.sweep.state import LocalRun
from cifar_resnet.sweep.view import LogView


def test_a_failed_run_does_not_stop_the_others_and_shows_its_log(tmp_path, tiny_config, capsys):
    parameters = tiny_settings(tiny_config) | {
        "dataset": {"values": ["synthetic", "imagefolder"]},
        "data_dir": {"value": str(tmp_path / "no-such-images")},
    }
    out_dir = tmp_path / "out"
    path = write_sweep(tmp_path / "failing.yaml", parameters)

    assert main(["sweep", str(path), "--workers", "2", "--offline", "--output-dir", str(out_dir)]) == 1

    states = {run["params"]["dataset"]: run for run in sweep_state(out_dir)["runs"]}
    assert states["synthetic"]["state"] == "finished"
    assert states["imagefolder"]["state"] == "failed" and states["imagefolder"]["exit_code"] == 2
    stdout = capsys.readouterr().out
    rows = table_rows(stdout)
    assert len(rows) == 2 and "(failed)" in rows[1]
    failed_id = states["imagefolder"]["run_id"]
    assert f"run {failed_id} failed (exit 2)" in stdout
    assert "no-such-images/train is not a folder" in stdout  # the end of the run's own log


def test_a_mistake_every_run_would_repeat_stops_the_sweep_in_one_line(tmp_path, tiny_config, capsys):
    parameters = tiny_settings(tiny_config) | {
        "learning_rate": {"values": [0.001, 0.0005, 0.0001]},
        "dataset": {"value": "imagefolder"}, "data_dir": {"value": str(tmp_path / "no-such-images")},
    }
    path = write_sweep(tmp_path / "nodata.yaml", parameters)
    out_dir = tmp_path / "out"

    assert main(["sweep", str(path), "--offline", "--output-dir", str(out_dir)]) == 2

    runs = sweep_state(out_dir)["runs"]
    assert [(run["state"], run["exit_code"]) for run in runs] == [("failed", 2)]  # no second run started
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "no-such-images" in line]
    assert len(errors) == 1 and errors[0].startswith("ERROR: data_dir: ") and "run the same command" in errors[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert "--offline: running the sweep offline" in captured.err and "wandb sync" in captured.err


@pytest.mark.slow
def test_a_mistake_every_run_would_repeat_is_fixed_as_its_line_says(tmp_path, tiny_config, capsys):
    """"fix it, then run the same command again", followed literally: both fixes a user would make (the data put
    where the sweep said, or `--set` to where it is) work in the sweep's default folder."""
    missing = tmp_path / "images"
    parameters = tiny_settings(tiny_config) | {"dataset": {"value": "imagefolder"}, "data_dir": {"value": str(missing)},
                                               "val_size": {"value": 2}, "train_size": {"value": 0},
                                               "test_size": {"value": 0}, "batch_size": {"value": 2}}
    command = ["sweep", str(write_sweep(tmp_path / "nodata.yaml", parameters)), "--offline"]

    assert main(command) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "the sweep stopped" in line]
    assert error.startswith(f"ERROR: data_dir: {missing}/train is not a folder") and error.endswith(
        "fix it, then run the same command again)")

    elsewhere = image_folder(tmp_path / "elsewhere", per_class=4)  # fix: point the sweep at the data
    assert main([*command, "--set", f"data_dir={elsewhere}"]) == 0

    image_folder(missing, per_class=4)  # or fix: put the data where the sweep looks, and run the same command
    assert main(command) == 0
    runs = sweep_state(tmp_path / folder_of(Path(command[1])))["runs"]
    assert [(run["state"], run["attempts"]) for run in runs] == [("finished", 2)]  # the failed run, retried


def test_a_command_that_cannot_start_fails_its_runs_and_the_sweep_gives_up(tmp_path, tiny_config, capsys):
    """Like `wandb agent`: after 5 failed runs and none finished, no new runs (a random sweep would never end)."""
    parameters = tiny_settings(tiny_config) | {"seed": {"distribution": "int_uniform", "min": 0, "max": 1000}}
    path = write_sweep(tmp_path / "broken.yaml", parameters, method="random",
                       command=["no-such-python", "-m", "${program}", "${args}"])
    out_dir = tmp_path / "out"

    assert main(["sweep", str(path), "--workers", "2", "--offline", "--output-dir", str(out_dir)]) == 1

    runs = sweep_state(out_dir)["runs"]
    assert len(runs) == MAX_INITIAL_FAILURES
    assert all(run["state"] == "failed" and run["exit_code"] is None for run in runs)
    captured = capsys.readouterr()
    assert "5 runs failed and 0 finished: no new runs" in captured.err
    assert "could not start" in captured.out and "No such file or directory: 'no-such-python'" in captured.out


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


def test_each_run_gets_the_agents_environment_and_its_share_of_the_cores(tmp_path, tiny_config, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("WANDB_DIR")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a shell where this environment is not activated
    plan = load_sweep(write_sweep(tmp_path / "grid.yaml", GRID | tiny_settings(tiny_config)), [])
    local = LocalSweep(plan, tmp_path / "out", ["0", "1"], None, "proj", LogView([]))
    run = LocalRun("abcd1234", {"learning_rate": 0.001})

    env = local.environment(run, "1")

    assert env["WANDB_MODE"] == "offline" and env["WANDB_RUN_ID"] == "abcd1234"
    assert env["WANDB_SWEEP_PARAM_PATH"] == str((tmp_path / "out" / "abcd1234" / "sweep-params.yaml").resolve())
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["WANDB_PROJECT"] == "proj"
    assert env["WANDB_DIR"] == str((tmp_path / "out").resolve())
    assert env["WANDB_RUN_GROUP"] == f"sweep-grid-{local.state.sweep_id}"
    assert "WANDB_SWEEP_ID" not in env  # a local id would make `wandb sync` refuse the run
    # `python` (the agent's `${interpreter}`) resolves to the interpreter cifar_resnet is installed in.
    assert shutil.which("python", path=env["PATH"]) == str(Path(sys.executable).parent / "python")
    assert env["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert local.environment(run, None)["OMP_NUM_THREADS"] == "3"  # the user's own choice wins


@pytest.mark.quick
def test_a_run_killed_by_a_signal_is_recorded_with_128_plus_its_number(tmp_path):
    """Issue 27: a run stopped in its start-up, before it handles signals, was recorded with exit_code -15 (Python's
    returncode), where the docs and every other status say 143. Killed by the sweep's stop it is preempted; killed
    by anything else (SIGKILL: the OOM killer), failed."""
    path = write_sweep(tmp_path / "wait.yaml", {"seed": {"values": [1, 2]}}, command=["sleep", "60"])
    sweep = LocalSweep(load_sweep(path, []), tmp_path / "out", [None, None], None, None, LogView([]))
    sweep.step()  # both runs start
    killed, stopped = sweep.active.values()
    killed.process.kill()
    killed.process.wait()
    sweep.step()  # reaps the killed run
    sweep.interrupt(signal.SIGTERM)  # as Ctrl-C or SIGTERM to the sweep: the other run gets SIGTERM
    runs = sweep_state(tmp_path / "out")["runs"]
    assert [(run["state"], run["exit_code"]) for run in runs] == [("failed", 128 + signal.SIGKILL),
                                                                 ("preempted", 128 + signal.SIGTERM)]


@pytest.mark.slow
def test_a_run_killed_after_its_record_says_finished_is_finished_and_never_run_again(tmp_path, tiny_config):
    """As when the OOM killer, or a second stop, ends a run while it shuts W&B down: its record says finished, its
    exit status does not; the record wins (issue 23: the run was recorded preempted or failed, and the next sweep
    trained it again from scratch, over its record and best.pt)."""
    path = write_sweep(tmp_path / "one.yaml", tiny_settings(tiny_config) | {"seed": {"values": [1]}})
    out_dir = tmp_path / "out"
    command = [sys.executable, "-m", "cifar_resnet", "sweep", str(path), "--offline", "--output-dir", str(out_dir)]
    sweep = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def run_finished() -> bool:
        runs = sweep_state(out_dir)["runs"] if (out_dir / "sweep.json").exists() else []
        record = out_dir / runs[0]["run_id"] / RECORD_FILE if runs else None
        return record is not None and record.exists() and json.loads(record.read_text())["status"] == "finished"

    try:
        wait_for(run_finished)
        for pid in processes_of(f"WANDB_SWEEP_PARAM_PATH={out_dir.resolve()}"):  # the run and its W&B service
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output = sweep.communicate(timeout=SIGNAL_TIMEOUT_SECONDS)[0].decode()
    finally:
        sweep.kill()
    assert sweep.returncode == 0, output
    (run,) = sweep_state(out_dir)["runs"]
    assert run["state"] == "finished" and run["exit_code"] == 128 + signal.SIGKILL, run
    record = RunRecord.load(out_dir / run["run_id"])

    assert main(["sweep", str(path), "--offline", "--output-dir", str(out_dir)]) == 0
    (run,) = sweep_state(out_dir)["runs"]
    assert run["attempts"] == 1 and RunRecord.load(out_dir / run["run_id"]) == record


@pytest.mark.parametrize(("method", "count"), [("random", 2), pytest.param("bayes", 3, marks=pytest.mark.slow)])
def test_random_and_bayes_stop_at_count(tmp_path, tiny_config, method, count):
    """The engine proposes each run; bayes proposes from the finished runs' val/acc, fed back from their records."""
    parameters = tiny_settings(tiny_config) | {
        "learning_rate": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
        "optimizer": {"values": ["adam", "sgd"]},
    }
    path = write_sweep(tmp_path / f"{method}.yaml", parameters, method=method)
    out_dir = tmp_path / "out"

    assert main(["sweep", str(path), "--workers", "2", "--count", str(count), "--offline", "--output-dir",
                 str(out_dir)]) == 0

    runs = sweep_state(out_dir)["runs"]
    assert len(runs) == count and all(run["state"] == "finished" for run in runs)
    assert len({run["params"]["learning_rate"] for run in runs}) == count
    for run in runs:
        assert 1e-4 <= run["params"]["learning_rate"] <= 1e-2
        assert RunRecord.load(out_dir / run["run_id"]).config["learning_rate"] == run["params"]["learning_rate"]
