"""A W&B agent's run, end to end: sweep.yaml through W&B's own sweep engine and macro expansion to `python -m
cifar_resnet.train` in a process, offline, and its checkpoint, run record and artifact in the offline run.

W&B's own agent code (`wandb.wandb_agent.Agent`) runs for real, offline, in a child process
(tests/wandb_agent_driver.py): it reads `command` from sweep.yaml, receives the run through its heartbeat, writes
the parameter file, expands the macros, starts `python -m cifar_resnet.train` in its own process group and, with
`forward_signals`, forwards SIGTERM to it. The one test double is the W&B server, which cannot run here: a
stand-in answers the agent's GraphQL calls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import sweeps
import torch
import yaml
from conftest import REPO
from helpers.wandb_agent import SWEEP_ID, start_agent
from helpers.wandb_records import offline_run_file, read_records
from wandb.sdk.lib import config_util

from cifar_resnet.config import Config
from cifar_resnet.records import BEST_CHECKPOINT, RECORD_FILE, RESUME_CHECKPOINT, RunRecord
from cifar_resnet.wandb_sweep import run_argv

SWEEP_YAML = REPO / "sweep.yaml"


WAIT_SECONDS = 300
POLL_SECONDS = 0.05


def load_sweep() -> dict:
    return yaml.safe_load(SWEEP_YAML.read_text())


def test_sweep_yaml_passes_the_schema_and_expands_to_the_six_cells():
    sweep = load_sweep()
    assert sweeps.schema_violations_from_proposed_config(sweep) == []
    runs: list[sweeps.SweepRun] = []
    while (proposal := sweeps.next_run(sweep, runs)) is not None:
        runs.append(sweeps.SweepRun(name=f"r{len(runs)}", state=sweeps.RunState.finished, config=proposal.config))
    cells = {(r.config["learning_rate"]["value"], r.config["optimizer"]["value"]) for r in runs}
    assert len(runs) == 6
    assert cells == {(lr, opt) for lr in (0.001, 0.0005, 0.0001) for opt in ("adam", "sgd")}
    assert all(r.config["epochs"]["value"] == 10 and r.config["batch_size"]["value"] == 128 for r in runs)
    for run in runs:  # every proposed cell is a valid Config
        Config.from_mapping({name: item["value"] for name, item in run.config.items()})


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


def sweep_run_argv(sweep: dict, params: dict) -> list[str]:
    """The command `wandb agent` runs for `params` (built with wandb's own macro code, as its Agent does)."""
    return run_argv(sweep["command"], sweep["program"], params, Path("args.json"))


def run_as_agent(tmp_path: Path, params: dict, run_id: str) -> subprocess.CompletedProcess:
    sweep = load_sweep()
    param_path = tmp_path / "sweep-test" / f"config-{run_id}.yaml"
    config_util.save_config_file_from_dict(str(param_path), {k: {"value": v} for k, v in params.items()})
    env = dict(os.environ, WANDB_SWEEP_ID="testsweep", WANDB_RUN_ID=run_id, WANDB_SWEEP_PARAM_PATH=str(param_path))
    return subprocess.run(sweep_run_argv(sweep, params), env=env, capture_output=True, text=True, timeout=300)


def test_agent_runs_a_cell_offline_and_records_checkpoint_and_artifact(tmp_path, tiny_config):
    params = {**tiny_config.to_dict(), "learning_rate": 0.0005, "optimizer": "sgd"}
    done = run_as_agent(tmp_path, params, run_id="cell0001")
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir = Path(tiny_config.output_dir) / "cell0001"
    record = RunRecord.load(run_dir)
    assert record.status == "finished"
    assert record.config["learning_rate"] == 0.0005 and record.config["optimizer"] == "sgd"
    assert [h["epoch"] for h in record.history] == [1, 2]
    assert 0 <= record.summary["test/acc"] <= 1 and record.summary["best_epoch"] in (1, 2)
    assert not (run_dir / RESUME_CHECKPOINT).exists()

    checkpoint = torch.load(run_dir / BEST_CHECKPOINT, weights_only=True)
    assert checkpoint["epoch"] == record.summary["best_epoch"]
    assert checkpoint["config"]["optimizer"] == "sgd"
    assert checkpoint["metrics"]["val/acc"] == max(h["val/acc"] for h in record.history)

    records = read_records(offline_run_file(tmp_path, "cell0001"))
    kinds = [r.WhichOneof("record_type") for r in records]
    run = next(r.run for r in records if r.HasField("run"))
    assert run.sweep_id == "testsweep"
    (model,) = [r.artifact for r in records if r.HasField("artifact") and r.artifact.type == "model"]
    assert model.name == "model-cell0001"
    assert set(model.aliases) >= {"best", "latest"}
    assert [entry.path for entry in model.manifest.contents] == [BEST_CHECKPOINT]
    assert json.loads(model.metadata)["epoch"] == record.summary["best_epoch"]
    assert kinds.count("history") >= 2
    exit_record = next(r.exit for r in records if r.HasField("exit"))
    assert exit_record.exit_code == 0


def test_sweep_values_win_over_the_command_line(tmp_path, tiny_config):
    """Under a sweep, W&B's config (from the parameter file) is the truth, as with a real agent."""
    sweep = load_sweep()
    params = {**tiny_config.to_dict(), "epochs": 1, "optimizer": "adamw"}
    param_path = tmp_path / "params.yaml"
    config_util.save_config_file_from_dict(str(param_path), {k: {"value": v} for k, v in params.items()})
    argv = [a for a in sweep_run_argv(sweep, params) if not a.startswith("--optimizer")] + ["--optimizer=sgd"]
    env = dict(os.environ, WANDB_SWEEP_ID="s", WANDB_RUN_ID="winner01", WANDB_SWEEP_PARAM_PATH=str(param_path))
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert RunRecord.load(Path(tiny_config.output_dir) / "winner01").config["optimizer"] == "adamw"
