"""W&B for the tools (wandb_sweep.py): a run's command built as W&B's agent builds it, macro for macro;
`wandb.sweep` refusing is one line; a W&B service that no longer answers does not hold a failed command's exit; the
workspace view's panels."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cifar_resnet.wandb_sweep import build_sweep_view, run_argv

WAIT_SECONDS = 300


def test_the_run_command_is_expanded_as_the_agent_expands_it(tmp_path, monkeypatch):
    monkeypatch.setenv("EXTRA_FLAG", "--seed=3")
    params = {"learning_rate": 0.001, "tta": False}
    command = ["${env}", "${interpreter}", "-m", "${program}", "${args_no_hyphens}", "${envvar:EXTRA_FLAG}",
               "${args_json_file}"]

    expanded = run_argv(command, "cifar_resnet.train", params, tmp_path / "args.json")

    assert expanded == ["/usr/bin/env", "python", "-m", "cifar_resnet.train", "learning_rate=0.001", "tta=False",
                        "--seed=3", str(tmp_path / "args.json")]
    assert json.loads((tmp_path / "args.json").read_text()) == params
    assert run_argv(None, "train.py", params, tmp_path / "unused.json") == [
        "/usr/bin/env", "python", "train.py", "--learning_rate=0.001", "--tta=False"]  # W&B's default command


@pytest.mark.parametrize("command", [
    ["${env}", "${interpreter}", "-c", "pass", "${program}", "${args}", "${args_no_hyphens}", "${args_json_file}",
     "${envvar:EXTRA_FLAG}", "${args_json}"],
    None,  # W&B's default command: ${env} ${interpreter} ${program} ${args}
])
def test_our_run_argv_is_the_argv_wandbs_agent_builds(tmp_path, monkeypatch, command):
    """W&B's `Agent._command_run` starts the process; ours must give the same argv and the same JSON file."""
    from wandb import wandb_agent

    monkeypatch.setenv("EXTRA_FLAG", "--seed=3")
    monkeypatch.setenv("WANDB_SWEEP_ID", "cmpsweep")
    for name in ("WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):  # _command_run sets them in this process
        monkeypatch.setenv(name, "")
    params = {"learning_rate": 0.001, "optimizer": "adam", "tta": False, "width": 16}
    program = str(tmp_path / "program.py")
    (tmp_path / "program.py").write_text("")  # the default command runs it: it must exist
    agent = wandb_agent.Agent(api=None, queue=queue.Queue(), sweep_id="cmpsweep")
    if command is not None:
        agent._sweep_command = command
    agent._command_run({"type": "run", "run_id": "cmprun01", "program": program,
                        "args": {name: {"value": value} for name, value in params.items()}})
    process = agent._run_processes["cmprun01"]
    assert process.wait(timeout=WAIT_SECONDS) == 0
    wandb_json = Path(os.environ["WANDB_DIR"], "wandb", "sweep-cmpsweep", "config-cmprun01.json")
    wandb_wrote = wandb_json.read_text() if wandb_json.exists() else None

    ours = run_argv(command, program, params, wandb_json)

    assert ours == process._popen.args
    if command is not None:
        assert "learning_rate=0.001" in ours and "--seed=3" in ours and str(wandb_json) in ours
        assert json.loads(wandb_wrote) == params and wandb_json.read_text() == wandb_wrote


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


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # wandb-workspaces' own pydantic-v1 validators
def test_wandb_view_has_the_sweeps_panels():
    import wandb_workspaces.reports.v2 as wr

    view = build_sweep_view("team", "cifar", "sw33p", ["learning_rate", "optimizer"])

    assert (view.entity, view.project) == ("team", "cifar")
    (section,) = view.sections
    parallel, importance, curves = section.panels
    assert isinstance(parallel, wr.ParallelCoordinatesPlot)
    assert [column.metric.name for column in parallel.columns] == ["learning_rate", "optimizer", "val/acc",
                                                                    "test/acc"]
    assert isinstance(importance, wr.ParameterImportancePlot) and importance.with_respect_to == "val/acc"
    assert isinstance(curves, wr.LinePlot) and curves.x == "epoch" and curves.y == ["val/acc"]
    assert "sw33p" in str(view.runset_settings.filters)
    view._to_model()  # serialises for the server without contacting it
