"""Fused groups in a trainer (`--pack fused`, cifar_resnet/packing/): where each run goes and why, what the logs
say, and runs with their files (the runner's `run_steps`) that end, are preempted and resume, alone, on streams or
fused, as the same runs uninterrupted.

On the CPU, in float32, one thread: a fused member's numbers equal the run alone's within float rounding (a grouped
convolution sums in another order than a convolution alone), not bit for bit; see each test for what is exact.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from helpers.sweeps import tiny_settings, write_sweep

from cifar_resnet.cli import main
from cifar_resnet.config import Config
from cifar_resnet.data.sources import load_splits
from cifar_resnet.engine.loop import Interrupted
from cifar_resnet.engine.streams import CudaStreams
from cifar_resnet.packing.client import run_in_trainer
from cifar_resnet.packing import pool
from cifar_resnet.packing.groups import FusedGroups
from cifar_resnet.packing.pack import Pack
from cifar_resnet.packing.pool import FUSED
from cifar_resnet.packing.trainer import Trainer
from cifar_resnet.records import (
    EPOCH_SECONDS,
    TEST_ACC,
    TRAIN_ACC,
    TRAIN_IMAGES_PER_SECOND,
    TRAIN_LOSS,
    VAL_ACC,
    VAL_LOSS,
    RunFolder,
    RunRecord,
)
from cifar_resnet.run_contract import TRAINER_VARIABLE
from cifar_resnet.runner import RunHooks, run_steps, run_training

CPU = torch.device("cpu")
WAIT_SECONDS = 300


def cell(output_dir: Path, **changes) -> Config:
    """A width-4 model on 128 synthetic images, batches of 16 (8 steps an epoch), 3 epochs, at calm learning rates
    (see test_packing_fused.py's `calm`)."""
    return Config(dataset="synthetic", width=4, epochs=3, batch_size=16, eval_batch_size=64, val_size=64,
                  train_size=128, test_size=64, device="cpu", output_dir=str(output_dir), learning_rate=0.0002,
                  optimizer="adam").replace(**changes)


def assert_close_to(record: RunRecord, expected: RunRecord) -> None:
    """Per-epoch metrics and the test accuracy of two records within float32 rounding: losses to 1e-4 relative,
    accuracies the same or one image's prediction flipped (64 validation and test images)."""
    assert record.status == expected.status == "finished"
    assert len(record.history) == len(expected.history)
    for got, want in zip(record.history, expected.history, strict=True):
        for metric in (TRAIN_LOSS, VAL_LOSS):
            assert got[metric] == pytest.approx(want[metric], rel=1e-4), metric
        for metric in (TRAIN_ACC, VAL_ACC):
            assert got[metric] == pytest.approx(want[metric], abs=1 / 64), metric
    assert record.summary[TEST_ACC] == pytest.approx(expected.summary[TEST_ACC], abs=1 / 64)


def folder(config: Config, run_id: str) -> RunFolder:
    return RunFolder.of(config.output_dir, run_id)


def runner_steps(config: Config, run_id: str, join=None, hooks: RunHooks | None = None):
    return run_steps(config, folder(config, run_id), load_splits(config, CPU), CPU, hooks, join=join)


def test_where_a_trainer_puts_each_run_and_why(tmp_path):
    groups = FusedGroups(CPU, slots=2, streams=CudaStreams(CPU))
    base = cell(tmp_path)
    first = groups.place("a", base, 10)
    assert first.how == "fused: slot 1 of 2, the group's first run"
    assert groups.place("b", base.replace(optimizer="sgd", learning_rate=0.01, seed=3), 10).how == \
        "fused: slot 2 of 2, with runs a"
    assert groups.place("c", base, 10).how == "on streams, not fused: all 2 slots are taken"
    assert groups.place("d", base.replace(width=8), 10).how == "on streams, not fused: width: 8, this group's is 4"
    assert groups.place("e", base.replace(compile=True), 10).how == \
        "on streams, not fused: compile: a fused group runs without torch.compile"
    groups.release("b")  # ended before it joined: its slot is free again
    assert groups.place("f", base, 10).how == "fused: slot 2 of 2, with runs a"
    group = groups.group
    groups.release("a")
    groups.release("f")
    # Idle: a run of other settings opens a new group in its place; one of the same settings would reuse it.
    assert groups.place("g", base.replace(width=8), 10).how == "fused: slot 1 of 2, the group's first run"
    assert groups.group is not group and groups.group.config.width == 8
    assert first.join is not None and groups.place("h", base.replace(compile=True), 10).join is None


def test_a_member_preempted_in_a_fused_group_resumes_alone_on_streams_or_fused_to_the_uninterrupted_run(
        tmp_path):
    """Run `a` is stopped in epoch 2 while fused with run `b` (its last.pt holds epoch 1), then resumed from copies
    of its folder three ways: alone (`run_training`), on streams beside another run, and fused in a new group beside
    another run. Each ends as `a` trained uninterrupted alone, within float32 rounding (its first epoch was fused).
    Exact, bit for bit: the fused resume ends as `a` fused uninterrupted in a group of the same size (beside another
    run), and `b`, whose group lost its neighbour mid-run, as `b` fused without that stop: in a group on the CPU, a
    slot's numbers do not depend on its neighbours."""
    a = cell(tmp_path / "stopped")
    b = cell(tmp_path / "stopped", optimizer="sgd", learning_rate=0.001, seed=2, label_smoothing=0.0)
    steps = {"a": 0}

    def stop_in_epoch_two() -> bool:
        steps["a"] += 1
        return steps["a"] > 12

    group = FusedGroups(CPU, 2, CudaStreams(CPU))
    pack = Pack(CPU)
    stopping = RunHooks(should_stop=stop_in_epoch_two)
    ended = pack.drive({"a": runner_steps(a, "a", group.place("a", a, 10).join, stopping),
                        "b": runner_steps(b, "b", group.place("b", b, 10).join)})
    assert isinstance(ended["a"].error, Interrupted) and ended["b"].error is None
    stopped = Path(a.output_dir) / "a"
    assert RunRecord.load(stopped).status == "preempted" and len(RunRecord.load(stopped).history) == 1

    def resumed(way: str) -> RunRecord:
        config = a.replace(output_dir=str(tmp_path / way))
        shutil.copytree(stopped, tmp_path / way / "a")
        if way == "alone":
            return run_training(config, folder(config, "a")).record
        beside = cell(tmp_path / way, seed=7, learning_rate=0.0005)
        places = FusedGroups(CPU, 2, CudaStreams(CPU)) if way == "fused" else None
        joins = {run_id: places.place(run_id, c, 10).join if places else None for run_id, c in (("a", config),
                                                                                                 ("c", beside))}
        ended = Pack(CPU).drive({"a": runner_steps(config, "a", joins["a"]),
                                 "c": runner_steps(beside, "c", joins["c"])})
        assert {name: end.error for name, end in ended.items()} == {"a": None, "c": None}
        return ended["a"].result.record

    wholes = {name: config.replace(output_dir=str(tmp_path / "whole")) for name, config in (("a", a), ("b", b))}
    uninterrupted = {name: run_training(config, folder(config, name)).record for name, config in wholes.items()}
    for way in ("alone", "streams", "fused"):  # resumed
        assert_close_to(resumed(way), uninterrupted["a"])
    assert_close_to(ended["b"].result.record, uninterrupted["b"])
    # Fused all along, with no stop: the reference of what is exact.
    group = FusedGroups(CPU, 2, CudaStreams(CPU))
    fused = {name: config.replace(output_dir=str(tmp_path / "fused-whole")) for name, config in (("a", a), ("b", b))}
    whole = Pack(CPU).drive({name: runner_steps(config, name, group.place(name, config, 10).join)
                             for name, config in fused.items()})
    assert untimed(RunRecord.load(tmp_path / "fused" / "a")) == untimed(whole["a"].result.record)
    assert untimed(ended["b"].result.record) == untimed(whole["b"].result.record)


def untimed(record: RunRecord) -> list[dict]:
    return [{k: v for k, v in epoch.items() if k not in (EPOCH_SECONDS, TRAIN_IMAGES_PER_SECOND)}
            for epoch in record.history]


def serve_on_a_thread(socket_path: Path, runs: int) -> tuple[threading.Thread, list[int]]:
    received: list[int] = []
    trainer = threading.Thread(target=Trainer(socket_path, CPU, FUSED, runs).serve, args=(received,),
                               name="trainer")
    trainer.start()
    return trainer, received


def test_a_fused_trainer_groups_runs_of_one_shape_and_says_how_each_trains(tmp_path, caplog):
    """A trainer (`--pack fused --runs 2`, on a thread of this process) and three runs' sides, each on a thread:
    two of one shape share a group, the third (another width) trains on streams beside it. The trainer's log and
    each run's own lines say how each run trained; the fused runs' records equal the runs alone within float32
    rounding."""
    socket_path = Path(f"/tmp/cr-fused-{id(tmp_path)}.sock")
    configs = {"adam0001": cell(tmp_path / "runs"),
               "sgd00001": cell(tmp_path / "runs", optimizer="sgd", learning_rate=0.005, seed=2),
               "wide0001": cell(tmp_path / "runs", width=8, seed=3)}
    records: dict[str, RunRecord] = {}
    with caplog.at_level(logging.INFO, logger="cifar_resnet"):
        trainer, received = serve_on_a_thread(socket_path, runs=2)
        try:
            runs = []
            for run_id, config in configs.items():  # one after the other, so that their slots are known
                runs.append(threading.Thread(target=lambda r=run_id, c=config: records.__setitem__(
                    r, run_in_trainer(socket_path, c, folder(c, r), RunHooks(), [])), name=run_id))
                runs[-1].start()
                while not any(f"run {run_id} joins the pack" in item.getMessage() for item in caplog.records):
                    trainer.join(0.05)
            for run in runs:
                run.join(WAIT_SECONDS)
        finally:
            received.append(signal.SIGTERM)
            trainer.join(WAIT_SECONDS)
    lines = {name: [item.getMessage() for item in caplog.records if item.threadName == name]
             for name in ("trainer", *configs)}
    assert "run adam0001 joins the pack (1 member): fused: slot 1 of 2, the group's first run" in lines["trainer"]
    assert "run sgd00001 joins the pack (2 members): fused: slot 2 of 2, with runs adam0001" in lines["trainer"]
    assert ("run wide0001 joins the pack (3 members): on streams, not fused: width: 8, this group's is 4"
            in lines["trainer"])
    assert "trains in the trainer on cpu (2 members), fused: slot 2 of 2, with runs adam0001" in lines["sgd00001"]
    assert ("trains in the trainer on cpu (3 members), on streams, not fused: width: 8, this group's is 4"
            in lines["wide0001"])
    for run_id, config in configs.items():
        alone_config = config.replace(output_dir=str(tmp_path / "alone"))
        alone = run_training(alone_config, folder(alone_config, run_id)).record
        assert_close_to(records[run_id], alone)


def test_a_supervisors_trainers_get_their_mode_slots_and_hardware_queues(monkeypatch):
    """What `TrainerPool` starts for `--pack fused` with two runs on GPU 0 and one on GPU 1 (the process start is
    a stand-in: no GPU here): each GPU's trainer, with the runs planned for it as its group's slots, and
    CUDA_DEVICE_MAX_CONNECTIONS=32 set before CUDA starts."""
    started = []
    monkeypatch.setattr(pool, "start_process", lambda argv, env, *rest: started.append((argv, env)) or
                        subprocess.Popen(["true"]))
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")
    with pool.TrainerPool(["0", "0", "1"], mode=FUSED) as trainers:
        assert trainers.environment("1")[TRAINER_VARIABLE].endswith("trainer-1.sock")
    assert [(argv[-2:], env["CUDA_VISIBLE_DEVICES"], env["CUDA_DEVICE_MAX_CONNECTIONS"]) for argv, env in started] \
        == [(["--pack=fused", "--runs=2"], "0", "32"), (["--pack=fused", "--runs=1"], "1", "32")]


def test_an_unknown_pack_mode_is_one_line_and_exit_2(tmp_path, capsys):
    path = write_sweep(tmp_path / "grid.yaml", {"learning_rate": {"values": [0.1]}} |
                       tiny_settings(cell(tmp_path), epochs=1))
    assert main(["sweep", str(path), "--offline", "--pack", "fuse"]) == 2
    assert main(["agent", "e/p/abc", "--pack", "fuse"]) == 2
    assert main(["trainer", "--socket", str(tmp_path / "s"), "--pack", "off"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "ERROR: --pack: 'fuse' is not one of streams, fused, off", "ERROR: --pack: 'fuse' is not one of streams, "
        "fused, off", "ERROR: --pack: 'off' is not one of streams, fused"]
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_an_offline_sweep_with_pack_fused_trains_its_cells_as_one_fused_group(tmp_path, monkeypatch):
    """The done-when of issue 26 on the CPU: `cifar-resnet sweep FILE --pack fused` trains Adam and SGD cells at two
    learning rates as one fused group, each a whole offline W&B run and record whose figures equal the same cells
    run one at a time within float32 rounding."""
    from helpers.wandb_records import offline_run_file, read_records

    base = cell(tmp_path)
    grid = {"optimizer": {"values": ["adam", "sgd"]}, "learning_rate": {"values": [0.0002, 0.0005]}}
    path = write_sweep(tmp_path / "grid.yaml", grid | tiny_settings(base, epochs=2))
    out_dir = tmp_path / "fused"
    assert main(["sweep", str(path), "--workers", "4", "--pack", "fused", "--offline", "--output-dir",
                 str(out_dir)]) == 0
    runs = json.loads((out_dir / "sweep.json").read_text())["runs"]
    assert [run["state"] for run in runs] == ["finished"] * 4
    (trainer_log,) = (out_dir / "trainers").glob("*/trainer-default.log")
    assert "(members fused, 4 slots to a fused group)" in trainer_log.read_text()
    assert trainer_log.read_text().count(": fused: slot ") == 4
    torch.set_num_threads(1)
    for run in runs:
        run_log = (out_dir / run["run_id"] / "run.log").read_text()
        assert "trains in the trainer on cpu (" in run_log and "), fused: slot " in run_log
        config = Config.from_mapping(run["params"], base=base).replace(output_dir=str(tmp_path / "alone"))
        alone = run_training(config, folder(config, run["run_id"])).record
        assert_close_to(RunRecord.load(out_dir / run["run_id"]), alone)
        records = read_records(offline_run_file(tmp_path, run["run_id"]))  # WANDB_DIR: the test's folder
        assert next(r.exit for r in records if r.HasField("exit")).exit_code == 0
