"""Runs handed to one trainer (`cifar-resnet trainer`) by their own processes, as W&B's agent starts them.

Real processes throughout: a trainer on the CPU, `python -m cifar_resnet.train` runs with CIFAR_RESNET_TRAINER set,
real signals, W&B offline. Each run must end exactly as it would alone: its history, its best weights, its W&B run
with history and model artifact, and its exit status.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import tiny_args
from helpers.sweeps import tiny_settings, write_sweep
from helpers.wandb_agent import start_agent
from helpers.wandb_records import offline_run_file, read_records

from cifar_resnet.config import Config
from cifar_resnet.engine.loop import Interrupted
from cifar_resnet.errors import RunFailed, StorageError, TrainingDiverged, UserError
from cifar_resnet.packing.client import run_in_trainer
from cifar_resnet.packing.ends import MemberEnd
from cifar_resnet.packing.trainer import Trainer
from cifar_resnet.records import (
    BEST_CHECKPOINT,
    EPOCH_SECONDS,
    RESUME_CHECKPOINT,
    TRAIN_IMAGES_PER_SECOND,
    AlreadyFinished,
    RunFolder,
    RunRecord,
    read_record,
)
from cifar_resnet.run_contract import TRAINER_VARIABLE
from cifar_resnet.runner import RunHooks, run_training

WAIT_SECONDS = 300
POLL_SECONDS = 0.05
TIMINGS = (EPOCH_SECONDS, TRAIN_IMAGES_PER_SECOND)


@pytest.fixture
def socket_path():
    """A short path: a Unix socket's path has at most 107 bytes, more than some pytest folders leave."""
    folder = Path(tempfile.mkdtemp(prefix="cr-", dir="/tmp"))
    yield folder / "trainer.sock"
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


def start_trainer(socket_path: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "cifar_resnet", "trainer", f"--socket={socket_path}",
                                 "--device=cpu"], stdout=out, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def trainer_running(socket_path: Path, log: Path) -> Iterator[subprocess.Popen]:
    """A trainer for the block, stopped with SIGTERM when it ends, as its pool stops it."""
    trainer = start_trainer(socket_path, log)
    try:
        yield trainer
    finally:
        trainer.send_signal(signal.SIGTERM)
        trainer.wait(WAIT_SECONDS)


def assert_own_wandb_run(wandb_dir: Path, run_id: str, epochs: int) -> None:
    """The run's offline W&B run logged val/acc every epoch and holds its model artifact."""
    records = read_records(offline_run_file(wandb_dir, run_id))
    logged = [item.key or "/".join(item.nested_key) for r in records if r.HasField("history")
              for item in r.history.item]
    assert logged.count("val/acc") == epochs
    (model,) = [r.artifact for r in records if r.HasField("artifact") and r.artifact.type == "model"]
    assert model.name == f"model-{run_id}"
    assert next(r.exit for r in records if r.HasField("exit")).exit_code == 0


def start_run(config, run_id: str, socket_path: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, WANDB_RUN_ID=run_id, **{TRAINER_VARIABLE: str(socket_path)})
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "cifar_resnet.train", *tiny_args(config)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def cells(tiny_config):
    config = tiny_config.replace(train_size=480, batch_size=32, epochs=3)  # 15 steps an epoch
    return {
        "adam0001": config.replace(optimizer="adam", learning_rate=0.002, seed=1),
        "sgd00001": config.replace(optimizer="sgd", learning_rate=0.05, seed=2),
        "adamema1": config.replace(optimizer="adam", learning_rate=0.001, seed=3, ema_decay=0.9),
    }


def without_timings(history):
    return [{k: v for k, v in epoch.items() if k not in TIMINGS} for epoch in history]


def best_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / BEST_CHECKPOINT, weights_only=True)["model"]


def assert_like_alone(run_dir: Path, alone) -> None:
    record = RunRecord.load(run_dir)
    assert record.status == "finished"
    assert without_timings(record.history) == without_timings(alone.record.history)
    assert record.summary["test/acc"] == alone.record.summary["test/acc"]
    for name, tensor in best_weights(alone.folder.path).items():
        assert torch.equal(best_weights(run_dir)[name], tensor), name


def wait_all(processes: dict, logs: Path) -> dict:
    return {run_id: process.wait(WAIT_SECONDS) for run_id, process in processes.items()}


def alone_runs(configs, tmp_path):
    return {run_id: run_training(config.replace(output_dir=str(tmp_path / "alone")),
                                 RunFolder.of(tmp_path / "alone", run_id))
            for run_id, config in configs.items()}


@pytest.mark.parametrize(("error", "wire", "raised"), [
    (Interrupted(), {"status": "stopped"}, Interrupted("stopped in its trainer")),
    (GeneratorExit(), {"status": "stopped"}, Interrupted("stopped in its trainer")),
    (AlreadyFinished("run r: finished already"), {"status": "failed", "kind": "done-before",
                                                  "error": "run r: finished already"},
     AlreadyFinished("run r: finished already")),
    (UserError("width: must be > 0"), {"status": "failed", "kind": "user", "error": "width: must be > 0"},
     UserError("width: must be > 0")),
    (TrainingDiverged("loss is nan"), {"status": "failed", "kind": "machine", "error": "loss is nan"},
     RunFailed("loss is nan")),
    (StorageError("disk full"), {"status": "failed", "kind": "machine", "error": "disk full"},
     RunFailed("disk full")),
    (KeyError("x"), {"status": "failed", "kind": "crash", "error": "KeyError: 'x'"}, RunFailed("KeyError: 'x'")),
], ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None)
def test_a_members_end_reaches_its_run_as_the_exception_a_run_alone_would_raise(error, wire, raised, tmp_path):
    """A member's end in the trainer, its wire form, and what the run's process raises: the exit status train.py
    gives it is a run alone's (a failure not of the user's making arrives as RunFailed, one line)."""
    sent = MemberEnd(error=error).to_wire()
    assert sent == wire
    with pytest.raises(type(raised)) as heard:
        MemberEnd.from_wire(json.loads(json.dumps(sent))).record_or_raise(RunFolder.of(tmp_path, "r"))
    assert type(heard.value) is type(raised) and str(heard.value) == str(raised)


def test_a_finished_members_run_reads_its_record_from_its_folder(finished_run):
    assert MemberEnd(result=finished_run).to_wire() == {"status": "finished"}
    record = MemberEnd.from_wire({"status": "finished"}).record_or_raise(finished_run.folder)
    assert record == RunRecord.load(finished_run.folder.path) and record.status == "finished"


@pytest.mark.slow
def test_three_runs_in_one_trainer_end_as_three_runs_alone_with_their_own_wandb_runs(tmp_path, tiny_config,
                                                                                    socket_path):
    configs = cells(tiny_config)
    with trainer_running(socket_path, tmp_path / "trainer.log") as trainer:
        runs = {run_id: start_run(config, run_id, socket_path, tmp_path / f"{run_id}.log")
                for run_id, config in configs.items()}
        statuses = wait_all(runs, tmp_path)
    assert trainer.returncode == 0
    assert statuses == dict.fromkeys(configs, 0), (tmp_path / "trainer.log").read_text()[-3000:]
    trainer_log = (tmp_path / "trainer.log").read_text()
    assert trainer_log.count("joins the pack") == 3
    alone = alone_runs(configs, tmp_path)
    for run_id, config in configs.items():
        run_dir = Path(config.output_dir) / run_id
        assert_like_alone(run_dir, alone[run_id])
        assert not (run_dir / RESUME_CHECKPOINT).exists()
        assert_own_wandb_run(tmp_path, run_id, config.epochs)


@pytest.mark.slow
def test_a_run_stopped_in_its_trainer_resumes_there_and_the_others_are_undisturbed(tmp_path, tiny_config,
                                                                                  socket_path):
    configs = cells(tiny_config)
    with trainer_running(socket_path, tmp_path / "trainer.log"):
        runs = {run_id: start_run(config, run_id, socket_path, tmp_path / f"{run_id}.log")
                for run_id, config in configs.items()}
        stopped = "sgd00001"
        run_dir = Path(configs[stopped].output_dir) / stopped
        deadline = time.monotonic() + WAIT_SECONDS
        while (record := read_record(run_dir)) is None or len(record.history) < 1:
            assert time.monotonic() < deadline and runs[stopped].poll() is None
            time.sleep(POLL_SECONDS)
        runs[stopped].send_signal(signal.SIGTERM)
        assert runs[stopped].wait(WAIT_SECONDS) == 128 + signal.SIGTERM
        assert RunRecord.load(run_dir).status == "preempted" and (run_dir / RESUME_CHECKPOINT).exists()
        # The same run again, in the same trainer: it resumes from its last.pt.
        runs[stopped] = start_run(configs[stopped], stopped, socket_path, tmp_path / f"{stopped}.log")
        statuses = wait_all(runs, tmp_path)
    assert statuses == dict.fromkeys(configs, 0), (tmp_path / "trainer.log").read_text()[-3000:]
    alone = alone_runs(configs, tmp_path)
    for run_id, config in configs.items():
        assert_like_alone(Path(config.output_dir) / run_id, alone[run_id])


@pytest.mark.slow
def test_runs_of_a_killed_trainer_are_preempted_and_resume_in_the_next_one(tmp_path, tiny_config, socket_path):
    configs = cells(tiny_config)
    trainer = start_trainer(socket_path, tmp_path / "trainer.log")
    runs = {run_id: start_run(config, run_id, socket_path, tmp_path / f"{run_id}.log")
            for run_id, config in configs.items()}
    watched = Path(configs["adam0001"].output_dir) / "adam0001"
    deadline = time.monotonic() + WAIT_SECONDS
    while (record := read_record(watched)) is None or len(record.history) < 1:
        assert time.monotonic() < deadline and trainer.poll() is None
        time.sleep(POLL_SECONDS)
    trainer.kill()
    trainer.wait()
    assert wait_all(runs, tmp_path) == dict.fromkeys(configs, 128 + signal.SIGTERM)
    with trainer_running(socket_path, tmp_path / "trainer2.log"):
        runs = {run_id: start_run(config, run_id, socket_path, tmp_path / f"{run_id}.log")
                for run_id, config in configs.items()}
        assert wait_all(runs, tmp_path) == dict.fromkeys(configs, 0)
    alone = alone_runs(configs, tmp_path)
    for run_id, config in configs.items():
        assert_like_alone(Path(config.output_dir) / run_id, alone[run_id])


@pytest.mark.slow
def test_three_runs_of_one_sweep_through_wandbs_own_agent_share_one_trainer(tmp_path, tiny_config, socket_path):
    """The online path: W&B's own agent code starts each run (tests/wandb_agent_driver.py, the W&B server a
    stand-in), three agents on one "GPU" whose runs hand their training to its one trainer."""
    configs = cells(tiny_config)
    with trainer_running(socket_path, tmp_path / "trainer.log"):
        agents = {}
        for run_id, config in configs.items():
            os.environ[TRAINER_VARIABLE] = str(socket_path)  # the agents' environment, as `cifar-resnet agent` sets it
            try:
                agents[run_id] = start_agent(tmp_path, run_id, config.to_dict(), forward_signals=False)
            finally:
                del os.environ[TRAINER_VARIABLE]
        outputs = {run_id: agent.communicate(timeout=WAIT_SECONDS)[0] for run_id, (agent, _) in agents.items()}
    assert (tmp_path / "trainer.log").read_text().count("joins the pack") == 3
    for run_id, config in configs.items():
        agent, result_file = agents[run_id]
        assert agent.returncode == 0, outputs[run_id][-3000:]
        assert json.loads(result_file.read_text())["runs"] == {run_id: 0}
        assert RunRecord.load(Path(config.output_dir) / run_id).status == "finished"
        assert_own_wandb_run(tmp_path, run_id, config.epochs)


@pytest.mark.slow
def test_an_offline_sweep_packs_its_workers_runs_into_one_trainer(tmp_path, tiny_config, monkeypatch):
    """`cifar-resnet sweep --workers 3 --pack` on a CPU: one trainer, every cell trained in it, as alone."""
    from cifar_resnet.cli import main

    grid = {"learning_rate": {"values": [0.002, 0.001, 0.0005]}, "optimizer": {"value": "adam"}}
    path = write_sweep(tmp_path / "grid.yaml", grid | tiny_settings(tiny_config, epochs=2))
    out_dir = tmp_path / "packed"
    assert main(["sweep", str(path), "--workers", "3", "--pack", "--offline", "--output-dir", str(out_dir)]) == 0
    runs = json.loads((out_dir / "sweep.json").read_text())["runs"]
    assert [run["state"] for run in runs] == ["finished"] * 3
    (trainer_log,) = (out_dir / "trainers").glob("*/trainer-default.log")
    assert trainer_log.read_text().count("joins the pack") == 3
    for run in runs:
        config = Config.from_mapping(run["params"], base=tiny_config).replace(output_dir=str(tmp_path / "alone"))
        alone = run_training(config, RunFolder.of(config.output_dir, run["run_id"]))
        assert_like_alone(out_dir / run["run_id"], alone)


def test_a_packed_runs_log_holds_the_lines_of_a_run_alone(tiny_config, socket_path, caplog):
    """Issue 27: a packed run's log (its process's output, the sweep's run.log) lacked its `config:` and `test (best
    epoch ...)` lines, which only the trainer's log held; and the trainer said "(1 members)". A trainer on a thread
    of this process; the run's side (this thread) logs what its member's messages relay. Its lines are a run
    alone's, but for the timings and the line that says how it trains (issue 26)."""
    received: list[int] = []
    trainer = threading.Thread(target=Trainer(socket_path, torch.device("cpu")).serve, args=(received,),
                               name="trainer")
    with caplog.at_level(logging.INFO, logger="cifar_resnet"):
        trainer.start()
        try:
            record = run_in_trainer(socket_path, tiny_config, RunFolder.of(tiny_config.output_dir, "packed01"),
                                    RunHooks(), [])
        finally:
            received.append(signal.SIGTERM)
            trainer.join(WAIT_SECONDS)
        packed = [item.getMessage() for item in caplog.records if item.threadName != "trainer"]
        trainer_lines = [item.getMessage() for item in caplog.records if item.threadName == "trainer"]
        caplog.clear()
        run_training(tiny_config, RunFolder.of(tiny_config.output_dir, "alone001"))
        alone = [item.getMessage() for item in caplog.records]

    def untimed(lines: list[str]) -> list[str]:
        return [re.sub(r"\d+\.\ds  \d+ img/s", "(timing)", line) for line in lines]

    assert record.status == "finished"
    assert "run packed01 joins the pack (1 member): on streams" in trainer_lines
    assert packed[0].startswith("config: ") and packed[-1].startswith("test (best epoch ")
    assert packed.pop(1) == "trains in the trainer on cpu (1 member), on streams"
    assert alone.pop(1) == "trains alone, in its own process, on cpu"
    assert untimed(packed) == untimed(alone)
