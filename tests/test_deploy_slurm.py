"""deploy/slurm/sweep-array.sbatch on a real one-node Slurm (slurm-wlm and munge from Debian, started here).

An array of 3 tasks, each `cifar-resnet sweep FILE --offline --output-dir DIR` on one shared folder, finishes a
6-cell grid, every cell exactly once. One task gets Slurm's time-limit warning in the middle of a run (SIGUSR1 to
the batch shell only, as `--signal=B:USR1@N` sends it): the run saves its state, the task requeues itself, and
the run is continued from its last epoch by another task's process. Needs root (the daemons); Slurm is installed
with apt-get when it is missing (deploy/slurm/local-cluster.sh install).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.sweeps import tiny_settings, write_sweep
from helpers.wandb_records import logged_epochs, offline_runs

from cifar_resnet.records import RECORD_FILE

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "deploy" / "slurm" / "local-cluster.sh"
ARRAY_SCRIPT = REPO / "deploy" / "slurm" / "sweep-array.sbatch"
INSTALL_SECONDS = 900  # apt-get update and install on a fresh machine
START_SECONDS = 120
SWEEP_SECONDS = 900  # the whole array, on 2 busy cores
POLL_SECONDS = 0.2
TASKS = 3
GRID = {"learning_rate": {"values": [0.001, 0.0005, 0.0001]}, "optimizer": {"values": ["adam", "sgd"]}}
EPOCHS = 3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A one-node Slurm of this machine's real CPUs and memory; yields the environment its commands need."""
    if os.geteuid() != 0:
        pytest.skip("a local Slurm needs root (slurmd, munged)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and there is no apt-get to install it")
    subprocess.run([str(CLUSTER_SCRIPT), "install"], check=True, timeout=INSTALL_SECONDS)
    cluster = tmp_path_factory.mktemp("slurm")
    try:
        subprocess.run([str(CLUSTER_SCRIPT), "start", str(cluster)], check=True, timeout=START_SECONDS)
        yield {"SLURM_CONF": str(cluster / "slurm.conf")}
    finally:
        subprocess.run([str(CLUSTER_SCRIPT), "stop", str(cluster)], check=False, timeout=START_SECONDS)


def slurm_command(env: dict[str, str], *argv: str) -> str:
    done = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=START_SECONDS)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def training_processes(job_id: str) -> list[dict[str, str]]:
    """The environment of each training process of the array job (the runs its sweeps start)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"cifar_resnet.train" not in (entry / "cmdline").read_bytes():
                continue
            env = dict(item.split("=", 1) for item in (entry / "environ").read_bytes().decode().split("\0")
                       if "=" in item)
        except OSError:
            continue
        if env.get("SLURM_ARRAY_JOB_ID") == job_id and "WANDB_RUN_ID" in env:
            found.append(env)
    return found


def epochs_recorded(run_dir: Path) -> int:
    try:
        return len(json.loads((run_dir / RECORD_FILE).read_text())["history"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_an_array_of_three_tasks_finishes_the_grid_once_and_a_warned_task_resumes_elsewhere(
        slurm, tmp_path, tiny_config):
    started = time.monotonic()
    # 10 steps an epoch: three epochs leave room for the warning inside a run, even on busy cores.
    settings = tiny_settings(tiny_config.replace(train_size=500, batch_size=50), epochs=EPOCHS)
    sweep_file = write_sweep(tmp_path / "grid.yaml", GRID | settings)
    out_dir = tmp_path / "shared" / "grid"
    env = {**slurm, "CIFAR_RESNET": f"{sys.executable} -m cifar_resnet",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    job_id = slurm_command(
        env, "sbatch", "--parsable", f"--array=0-{TASKS - 1}", "--gres=none", "--cpus-per-task=1", "--mem=2G",
        f"--output={tmp_path}/slurm-%A_%a.out", f"--chdir={tmp_path}", str(ARRAY_SCRIPT),
        "sweep", str(sweep_file), "--offline", "--output-dir", str(out_dir)).strip()

    attempts: set[tuple[str, str, str]] = set()  # (run id, array task, restart count) of every training process
    warned: tuple[str, str, str] | None = None
    try:
        deadline = time.monotonic() + SWEEP_SECONDS
        while slurm_command(env, "squeue", "-h", "-j", job_id).strip():
            assert time.monotonic() < deadline, "the array did not finish"
            for process in training_processes(job_id):
                attempt = (process["WANDB_RUN_ID"], process["SLURM_ARRAY_TASK_ID"],
                           process.get("SLURM_RESTART_COUNT", "0"))
                attempts.add(attempt)
                if warned is None and epochs_recorded(out_dir / attempt[0]) >= 1:
                    # The time-limit warning, as `--signal=B:USR1@N` sends it: to the batch shell alone.
                    slurm_command(env, "scancel", "--batch", f"--signal={signal.SIGUSR1.name[3:]}",
                                  f"{job_id}_{attempt[1]}")
                    warned = attempt
            time.sleep(POLL_SECONDS)
    finally:
        subprocess.run(["scancel", job_id], env={**os.environ, **slurm}, check=False)
    outputs = {path.name: path.read_text() for path in sorted(tmp_path.glob("slurm-*.out"))}
    print(f"array of {TASKS} tasks done in {time.monotonic() - started:.0f} s")
    assert warned is not None, f"no run reached an epoch while watched: {outputs}"

    # Every cell of the grid exactly once, all finished.
    runs = json.loads((out_dir / "sweep.json").read_text())["runs"]
    cells = sorted((run["params"]["learning_rate"], run["params"]["optimizer"]) for run in runs)
    expected = sorted((rate, optimizer) for rate in GRID["learning_rate"]["values"]
                      for optimizer in GRID["optimizer"]["values"])
    assert cells == expected, outputs
    assert [run["state"] for run in runs] == ["finished"] * len(expected), outputs
    assert len({run["run_id"] for run in runs}) == len(expected)

    # The warned task stopped its run, which saved its state, and requeued itself.
    run_id, task, restart = warned
    task_output = outputs[f"slurm-{job_id}_{task}.out"]
    assert "requeueing task" in task_output and f"(restart {int(restart) + 1})" in task_output, task_output
    # Another task's process (or the same task after its requeue) continued the run from its last epoch: two
    # attempts, the epochs of the first not trained again.
    continued_by = {(other_task, other_restart) for other_run, other_task, other_restart in attempts
                    if other_run == run_id} - {(task, restart)}
    assert continued_by, attempts
    per_attempt = [logged_epochs(records) for records in offline_runs(tmp_path, run_id)]
    assert len(per_attempt) == 2 and per_attempt[0] and per_attempt[1], per_attempt
    assert per_attempt[0] + per_attempt[1] == list(range(1, EPOCHS + 1)), per_attempt
    assert [entry["epoch"] for entry in json.loads((out_dir / run_id / RECORD_FILE).read_text())["history"]] == \
        list(range(1, EPOCHS + 1))
    # Nothing is left running.
    assert not training_processes(job_id)
