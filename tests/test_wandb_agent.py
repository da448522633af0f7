"""A sweep run started by W&B's own agent code (`wandb.wandb_agent.Agent`), not by our copy of it.

The agent runs for real, offline, in a child process (tests/wandb_agent_driver.py): it reads `command` from
sweep.yaml, receives the run through its heartbeat, writes the parameter file, expands the macros, starts
`python -m cifar_resnet.train` in its own process group and, with `forward_signals`, forwards SIGTERM to it. The
one test double is the W&B server, which cannot run here: a stand-in answers the agent's GraphQL calls.

The offline sweep (`cifar-resnet sweep --offline`) starts its runs with `wandb_sweep.run_argv`: the last test
checks that it builds the argv W&B's agent builds, macro for macro.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers.wandb_agent import SWEEP_ID, start_agent
from helpers.wandb_records import offline_run_file, read_records

from cifar_resnet.records import BEST_CHECKPOINT, RECORD_FILE, RESUME_CHECKPOINT, RunRecord
from cifar_resnet.wandb_sweep import run_argv

WAIT_SECONDS = 300
POLL_SECONDS = 0.05


def test_wandb_agent_starts_the_sweep_command_and_the_run_finishes_with_record_and_artifact(tmp_path, tiny_config):
    params = {**tiny_config.replace(epochs=2).to_dict(), "learning_rate": 0.0005, "optimizer": "sgd"}
    agent, result_file = start_agent(tmp_path, "agentrun", params, forward_signals=False)
    output = agent.communicate(timeout=WAIT_SECONDS)[0]
    assert agent.returncode == 0, output[-3000:]
    result = json.loads(result_file.read_text())
    assert result["runs"] == {"agentrun": 0}, output[-3000:]
    # W&B's agent ran sweep.yaml's command: `${env} ${interpreter} -m ${program} ${args}`.
    argv = result["argv"]["agentrun"]
    assert argv[:4] == ["/usr/bin/env", "python", "-m", "cifar_resnet.train"]
    assert "--optimizer=sgd" in argv and "--learning_rate=0.0005" in argv
    assert {"agentrun": True} in result["heartbeats"]  # it reported the run running to the "server"

    run_dir = Path(tiny_config.output_dir) / "agentrun"
    record = RunRecord.load(run_dir)
    assert record.status == "finished"
    assert (record.config["optimizer"], record.config["learning_rate"]) == ("sgd", 0.0005)
    assert [entry["epoch"] for entry in record.history] == [1, 2]
    assert not (run_dir / RESUME_CHECKPOINT).exists()
    checkpoint = torch.load(run_dir / BEST_CHECKPOINT, weights_only=True)
    assert checkpoint["epoch"] == record.summary["best_epoch"]

    records = read_records(offline_run_file(tmp_path, "agentrun"))
    run = next(r.run for r in records if r.HasField("run"))
    assert run.sweep_id == SWEEP_ID  # the agent's WANDB_SWEEP_ID reached the run
    (model,) = [r.artifact for r in records if r.HasField("artifact") and r.artifact.type == "model"]
    assert model.name == "model-agentrun" and set(model.aliases) >= {"best", "latest"}
    assert [entry.path for entry in model.manifest.contents] == [BEST_CHECKPOINT]
    assert next(r.exit for r in records if r.HasField("exit")).exit_code == 0
    # The run read its settings from the parameter file the agent wrote (WANDB_SWEEP_PARAM_PATH).
    assert (tmp_path / "wandb" / f"sweep-{SWEEP_ID}" / "config-agentrun.yaml").exists()


def test_sigterm_to_a_forwarding_wandb_agent_saves_the_runs_resume_checkpoint(tmp_path, tiny_config):
    # 31 steps an epoch and 6 epochs: the signal lands long before the run could end.
    config = tiny_config.replace(epochs=6, train_size=1000, batch_size=32)
    agent, result_file = start_agent(tmp_path, "agentsig", config.to_dict(), forward_signals=True)
    run_dir = Path(config.output_dir) / "agentsig"
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while not (run_dir / RECORD_FILE).exists() or not RunRecord.load(run_dir).history:
            assert agent.poll() is None, agent.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the run did not complete an epoch"
            time.sleep(POLL_SECONDS)
        agent.send_signal(signal.SIGTERM)  # to the agent alone: the run is in a process group of its own
        output = agent.communicate(timeout=WAIT_SECONDS)[0]
    finally:
        agent.kill()
    result = json.loads(result_file.read_text())
    assert result["runs"] == {"agentsig": 128 + signal.SIGTERM}, output[-3000:]
    assert "SIGTERM received" in output  # W&B's own shutdown cascade waited for the run
    record = RunRecord.load(run_dir)
    assert record.status == "preempted" and len(record.history) < config.epochs
    resume = torch.load(run_dir / RESUME_CHECKPOINT, weights_only=True)
    assert resume["state"]["epoch"] == len(record.history)
    records = read_records(offline_run_file(tmp_path, "agentsig"))
    assert any(r.HasField("preempting") for r in records)
    assert next(r.exit for r in records if r.HasField("exit")).exit_code == 128 + signal.SIGTERM
    (staged,) = [r.artifact for r in records if r.HasField("artifact") and r.artifact.type == "resume-checkpoint"]
    assert staged.name == "resume-agentsig"


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
