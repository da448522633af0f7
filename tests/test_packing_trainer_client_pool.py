"""A trainer survives what one run, or one run's process, does wrong; and what it cannot survive, it leaves cleanly.

A trainer on a thread of this process (the CPU, tiny synthetic runs), faults injected in-process: a data source that
raises as it loads, a member whose stop raises, a peer that sends garbage or reads nothing.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cifar_resnet.engine.loop import Interrupted
from cifar_resnet.errors import RunFailed, StorageError, UserError
from cifar_resnet.files import folder_lock
from cifar_resnet.packing import pool
from cifar_resnet.packing import trainer as trainer_module
from cifar_resnet.packing.client import connect, run_in_trainer
from cifar_resnet.packing.trainer import Trainer
from cifar_resnet.records import RunFolder
from cifar_resnet.runner import RunHooks

CPU = torch.device("cpu")
WAIT_SECONDS = 60


@pytest.fixture
def socket_path():
    """A short path: a Unix socket's path has at most 107 bytes, more than some pytest folders leave."""
    with tempfile.TemporaryDirectory(prefix="cr-", dir="/tmp") as folder:
        yield Path(folder) / "trainer.sock"


@contextlib.contextmanager
def trainer_thread(socket_path: Path) -> Iterator[tuple[Trainer, threading.Thread]]:
    """A trainer serving on a thread for the block, stopped (as by SIGTERM) when it ends."""
    received: list[int] = []
    trainer = Trainer(socket_path, CPU)
    thread = threading.Thread(target=trainer.serve, args=(received,), name="trainer", daemon=True)
    thread.start()
    try:
        yield trainer, thread
    finally:
        received.append(signal.SIGTERM)
        thread.join(WAIT_SECONDS)


def train_in(socket_path: Path, config, run_id: str):
    """The run handed to the trainer, its record; within WAIT_SECONDS (a trainer that died on a thread, its
    sockets still open, would leave it waiting for ever)."""
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["record"] = run_in_trainer(socket_path, config, RunFolder.of(config.output_dir, run_id),
                                               RunHooks(), [])
        except Exception as error:
            outcome["error"] = error

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    thread.join(WAIT_SECONDS)
    assert outcome, f"run {run_id}: no end from its trainer in {WAIT_SECONDS} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["record"]


def test_a_run_that_crashes_as_it_joins_fails_alone_and_the_trainer_serves_on(tiny_config, socket_path, monkeypatch):
    """Anything but a UserError raised while a run joins (its data cannot load: out of memory, a bad image) used
    to end the trainer, and with it every member; the sweep then claimed the run again, and it ended the next
    trainer too. It is the run's crash (exit 1), and the next run trains."""
    real_load, loads = trainer_module.load_source, []

    def load_once_broken(config):
        loads.append(config)
        if len(loads) == 1:
            raise RuntimeError("injected: CUDA out of memory")
        return real_load(config)

    monkeypatch.setattr(trainer_module, "load_source", load_once_broken)
    config = tiny_config.replace(epochs=1)
    with trainer_thread(socket_path) as (_, thread):
        with pytest.raises(RunFailed, match="RuntimeError: injected: CUDA out of memory"):
            train_in(socket_path, config, "broken01")
        assert thread.is_alive()
        assert train_in(socket_path, config, "after001").status == "finished"


def test_a_member_that_cannot_stop_cleanly_keeps_neither_the_others_nor_the_socket(socket_path, monkeypatch):
    """Stopping, a member whose stop raised (its checkpoint could not be written) ended the trainer's way out:
    the members after it were neither stopped nor told, and its socket stayed."""

    def training():
        while True:
            yield

    trainer = Trainer(socket_path, CPU)
    for name in ("first", "second"):
        trainer.pack.add(name, training())
    real_stop = trainer.pack.stop

    def stop_failing_first(name):
        real_stop(name)
        if name == "first":
            raise StorageError("injected: last.pt cannot be written")

    monkeypatch.setattr(trainer.pack, "stop", stop_failing_first)
    trainer.serve([signal.SIGTERM])
    assert len(trainer.pack) == 0
    assert not socket_path.exists()


def test_a_trainer_whose_supervisor_has_gone_ends_when_idle(socket_path):
    """A trainer read its supervisor's pid once it served (after torch's import and CUDA's start): a supervisor
    gone before then left it holding its GPU for ever. Its supervisor names itself (--parent-pid)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    trainer = subprocess.Popen([sys.executable, "-m", "cifar_resnet", "trainer", f"--socket={socket_path}",
                                "--device=cpu", f"--parent-pid={gone.pid}"])
    try:
        assert trainer.wait(WAIT_SECONDS) == 0
    finally:
        trainer.kill()
    assert not socket_path.exists()


def test_a_malformed_message_drops_its_peer_not_the_trainer(tiny_config, socket_path):
    with trainer_thread(socket_path) as (_, thread):
        peer = connect(socket_path)
        with peer:
            peer.sendall(b"this is not json\n")
            peer.settimeout(WAIT_SECONDS)
            assert peer.recv(1) == b""  # dropped
        assert thread.is_alive()
        assert train_in(socket_path, tiny_config.replace(epochs=1), "after002").status == "finished"


def test_a_run_that_reads_nothing_does_not_hold_the_pack(socket_path, monkeypatch):
    """A send to a run's process that reads nothing blocked the trainer, and every member with it, for ever."""
    monkeypatch.setattr(trainer_module, "SEND_TIMEOUT_SECONDS", 0.2)
    trainer = Trainer(socket_path, CPU)
    try:
        peer = connect(socket_path)
        with peer:
            trainer.poll(WAIT_SECONDS)  # accepts it
            (client,) = trainer.clients.values()
            sending = threading.Thread(target=client.tell, args=({"epoch": "x" * (1 << 24)},), daemon=True)
            sending.start()
            sending.join(WAIT_SECONDS)
            assert not sending.is_alive()
            assert client.stop and client.gone
    finally:
        trainer.serve([signal.SIGTERM])


def test_a_source_no_member_trains_on_is_freed_when_another_loads(tiny_config, socket_path):
    """Each source a trainer loaded stayed on its device for the trainer's life. A sweep's runs on one source keep
    it between them; another source frees the ones no member uses."""
    first, other = tiny_config.replace(epochs=1), tiny_config.replace(epochs=1, train_size=800)
    with trainer_thread(socket_path) as (trainer, _):
        assert train_in(socket_path, first, "source01").status == "finished"
        assert train_in(socket_path, first, "source02").status == "finished"
        assert len(trainer.sources) == 1
        kept = next(iter(trainer.sources.values()))
        assert train_in(socket_path, other, "source03").status == "finished"
        assert len(trainer.sources) == 1 and kept not in trainer.sources.values()


def test_a_trainer_that_keeps_failing_at_its_start_is_given_up_after_a_few_tries(tmp_path, monkeypatch, caplog):
    """A trainer that died at its start was started again every half second for ever, a warning each time. Its
    restarts back off, and after MAX_QUICK_FAILURES no more: its runs train in their own processes. (The trainer
    is a stand-in process that fails at once.)"""
    monkeypatch.setattr(pool, "FIRST_RESTART_DELAY_SECONDS", 0.05)
    monkeypatch.setattr(pool, "MAX_QUICK_FAILURES", 3)
    starts = []
    monkeypatch.setattr(pool, "start_process", lambda argv, env, *rest: starts.append(argv) or
                        subprocess.Popen(["false"]))
    with caplog.at_level(logging.WARNING, logger=pool.__name__), pool.TrainerPool([None], tmp_path) as trainers:
        deadline = time.monotonic() + WAIT_SECONDS
        while trainers.environment(None) and time.monotonic() < deadline:
            trainers.revive()
            time.sleep(0.01)
        for _ in range(20):
            trainers.revive()
            time.sleep(0.01)
    assert len(starts) == 3
    assert [record.getMessage() for record in caplog.records] == [
        "the trainer of this machine ended (status 1); starting another in 0.05 s",
        "the trainer of this machine ended (status 1); starting another in 0.1 s",
        "the trainer of this machine ended 3 times in a row within 60 s of its start (status 1): no more trainers "
        "there; its runs train in their own processes"]


def test_an_old_style_mig_id_names_its_trainers_files_without_a_slash(tmp_path, monkeypatch):
    monkeypatch.setattr(pool, "start_process", lambda argv, env, *rest: subprocess.Popen(["true"]))
    gpu = "MIG-GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3f/1/0"
    with pool.TrainerPool([gpu], tmp_path) as trainers:
        assert trainers.socket(gpu).parent == trainers.sockets
    assert [path.name for path in tmp_path.iterdir()] == [
        "trainer-MIG-GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3f_1_0.log"]


@contextlib.contextmanager
def hanging_up_trainer(socket_path: Path) -> Iterator[threading.Thread]:
    """A stand-in for a trainer that dies as a run connects: it accepts one connection and closes it. (The run's
    side is what is tested; a real trainer cannot be made to die at that moment.)"""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    listener.listen()

    def hang_up() -> None:
        connection, _ = listener.accept()
        connection.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    with listener:
        yield thread


def test_a_run_whose_trainer_dies_as_it_hands_over_is_preempted_not_failed(tiny_config, socket_path):
    """A send to a trainer that had died (a BrokenPipeError) reached train.main as a crash: exit 1, the run
    failed, where a trainer's death preempts its runs (exit 143: they resume)."""
    folder = RunFolder.of(tiny_config.output_dir, "handover")
    with hanging_up_trainer(socket_path) as trainer:
        hooks = RunHooks(fetch_resume=lambda path: trainer.join(WAIT_SECONDS) or False)  # it has hung up by then
        with pytest.raises(Interrupted, match="its trainer ended"):
            run_in_trainer(socket_path, tiny_config, folder, hooks, [])


def test_a_resume_checkpoint_is_fetched_only_under_the_run_folders_lock(tiny_config, socket_path):
    """The run's process fetched W&B's resume checkpoint without the folder's lock: over the last.pt of an attempt
    that another process trains. It fetches under the lock, as a run alone does, and another process's lock is
    the runner's UserError."""
    folder = RunFolder.of(tiny_config.output_dir, "locked01")
    fetched = []
    with hanging_up_trainer(socket_path), folder_lock(folder.path):  # another process trains the run
        with pytest.raises(UserError, match="another process is training it"):
            run_in_trainer(socket_path, tiny_config, folder, RunHooks(fetch_resume=fetched.append), [])
    assert fetched == []


def test_a_signal_while_a_run_waits_for_its_trainer_stops_it_at_once(tiny_config, socket_path):
    """A run waited for a trainer that does not answer for CONNECT_WAIT_SECONDS (60 s), its SIGTERM unheeded
    meanwhile, past its supervisor's grace (30 s). It stops at once, as preempted."""
    started = time.monotonic()
    with pytest.raises(Interrupted):
        run_in_trainer(socket_path, tiny_config, RunFolder.of(tiny_config.output_dir, "waiting1"), RunHooks(),
                       [signal.SIGTERM])
    assert time.monotonic() - started < 10
