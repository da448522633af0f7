"""Paths that rarely run but must work when they do: the online resume download, W&B refusing to create a sweep,
and the agent's bad arguments. (The decode cache's rare paths are in test_image_folder.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import wandb
import yaml

from cifar_resnet.cli import main as cli_main
from cifar_resnet.records import RESUME_CHECKPOINT
from cifar_resnet.tracking import download_resume_checkpoint, resume_artifact_name

WAIT_SECONDS = 300


# --- the online resume download (tracking.download_resume_checkpoint) -------------------------------------------


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


# --- W&B refusing to create a sweep (wandb_sweep.create_sweep) --------------------------------------------------


@pytest.mark.slow
def test_a_sweep_wandb_cannot_create_is_one_line_and_starts_no_agent(tmp_path, tiny_config):
    """The real `wandb.sweep`, with credentials, against a W&B address where nothing listens."""
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"program": "cifar_resnet.train", "method": "grid",
                                    "command": ["${env}", "${interpreter}", "-m", "${program}", "${args}"],
                                    "parameters": {"epochs": {"value": 1}, "width": {"value": 8}}}))
    env = {key: value for key, value in os.environ.items() if key != "WANDB_MODE"}
    env.update(WANDB_API_KEY="k" * 40, WANDB_BASE_URL="http://127.0.0.1:9")  # port 9: discard, nothing there
    done = subprocess.run([sys.executable, "-m", "cifar_resnet", "sweep", str(path), "--project", "proj"],
                          capture_output=True, text=True, timeout=WAIT_SECONDS, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and errors[0].startswith("ERROR: W&B could not create the sweep: ")
    assert "Traceback" not in done.stderr and "agent" not in done.stderr
    assert not (tmp_path / "sweeps").exists()


STUCK_SERVICE = """
import os, signal, sys, wandb
from cifar_resnet.wandb_sweep import stop_wandb_service
wandb.setup()  # starts W&B's service process, a child of this one
children = [int(pid) for task in os.listdir('/proc/self/task')
            for pid in open(f'/proc/self/task/{task}/children').read().split()]
for pid in children:
    os.kill(pid, signal.SIGSTOP)  # a service that no longer answers, as one busy retrying a dead server
print(*children, flush=True)
stop_wandb_service(timeout_s=2)
"""


def test_a_service_that_no_longer_answers_does_not_hold_a_failed_command_s_exit():
    """W&B's exit hook waits for its service without a limit; after a failed request the package bounds that wait
    (a CI machine once waited out a 5-minute test timeout after the sweep's error line)."""
    env = {key: value for key, value in os.environ.items() if key != "WANDB_MODE"}
    process = subprocess.Popen([sys.executable, "-c", STUCK_SERVICE], stdout=subprocess.PIPE, text=True, env=env)
    children = process.stdout.readline().split()
    try:
        assert children, "wandb.setup() started no service process"
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        for pid in children:
            subprocess.run(["kill", "-9", pid], check=False)


# --- the agent's bad arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["ent/proj/abc", "--stagger=-1"], "ERROR: --stagger: must be >= 0 seconds, got -1"),
    (["ent/proj/abc", "--no-such-option"], "ERROR: agent: unknown argument '--no-such-option' (see cifar-resnet "
                                           "agent --help)"),
])
def test_bad_agent_arguments_are_one_line_and_exit_2(monkeypatch, capsys, args, message):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)  # with credentials: the arguments alone are at fault
    assert cli_main(["agent", *args]) == 2
    assert capsys.readouterr().err.splitlines() == [message]
