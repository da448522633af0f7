"""Preemption and resume: a run stopped by SIGTERM mid-epoch and started again with the same run id (as W&B's
agent requeues it) ends exactly where an uninterrupted run ends; a kill during a checkpoint write loses nothing;
a crash is never marked preempting.

Real training processes, real signals, real W&B offline runs (read back from their transaction logs). One test
double: W&B cannot download an artifact offline, so the call that downloads the resume checkpoint artifact is
replaced, in the resumed process, by one that serves the file the preempted attempt staged for upload.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import wandb
from torch.utils import _pytree as pytree
from conftest import tiny_args
from helpers.wandb_records import logged_epochs, offline_runs

from cifar_resnet.config import Config
from cifar_resnet.engine import loop
from cifar_resnet.engine.loop import EpochResult, Interrupted
from cifar_resnet.errors import StorageError
from cifar_resnet.files import LOCK_FILE
from cifar_resnet.records import BEST_CHECKPOINT, RECORD_FILE, RESUME_CHECKPOINT, RunFolder, RunRecord
from cifar_resnet.runner import RunHooks, run_training
from cifar_resnet.tracking import RESUME_ARTIFACT_TYPE, Tracker
from cifar_resnet.train import main as train_main

TIMING_KEYS = ("epoch_seconds", "train/images_per_second")  # differ between any two runs
POLL_SECONDS = 0.02
WAIT_SECONDS = 120
# After a run's record says finished, its process logs the summary and the artifact to W&B (a tenth of a second
# here), shuts W&B down and exits (seconds): a signal this much later lands in that shutdown.
SHUTDOWN_SIGNAL_DELAY_SECONDS = 0.5

# Runs `python -m cifar_resnet.train ARGS` with W&B's artifact download replaced (see the module docstring).
DOWNLOAD_DOUBLE = """
import os, shutil, sys
import cifar_resnet.tracking as tracking

def download_resume_checkpoint(run, destination):
    with open(os.environ["DOUBLE_CALLS"], "a") as calls:
        calls.write(f"{run.id} {destination}\\n")
    staged = os.environ.get("DOUBLE_STAGED_FILE")
    if not staged:
        return False
    shutil.copyfile(staged, destination)
    return True

tracking.download_resume_checkpoint = download_resume_checkpoint
from cifar_resnet.train import main
sys.exit(main(sys.argv[1:]))
"""


def resume_config(tiny_config: Config) -> Config:
    # 31 steps an epoch (about a second on one core): room to land a signal inside an epoch. Three epochs: the
    # run is stopped in epoch 2, then in epoch 3, and its third attempt finishes epoch 3.
    return tiny_config.replace(epochs=3, train_size=1000, batch_size=32)


def start_training(config: Config, run_id: str, log: Path, **env: str) -> subprocess.Popen:
    """`python -m cifar_resnet.train` as the agent starts it; with DOUBLE_CALLS set, through DOWNLOAD_DOUBLE."""
    program = ["-c", DOWNLOAD_DOUBLE] if "DOUBLE_CALLS" in env else ["-m", "cifar_resnet.train"]
    env = dict(os.environ, WANDB_RUN_ID=run_id, **env)  # one thread (conftest): the same arithmetic in all
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, *program, *tiny_args(config)], env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def recorded_history(run_dir: Path) -> list[dict]:
    try:
        return json.loads((run_dir / RECORD_FILE).read_text())["history"]
    except FileNotFoundError:
        return []


def stop_mid_epoch(process: subprocess.Popen, run_dir: Path, after_epoch: int, log: Path) -> int:
    """Once `after_epoch` epochs are recorded, SIGTERM the run half an epoch later; return the epochs it kept."""
    deadline = time.monotonic() + WAIT_SECONDS
    while len(history := recorded_history(run_dir)) < after_epoch:
        assert process.poll() is None, f"the run ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the run did not reach the epoch"
        time.sleep(POLL_SECONDS)
    time.sleep(history[-1]["epoch_seconds"] / 2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(WAIT_SECONDS) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    kept = len(recorded_history(run_dir))
    assert kept == len(history), "the signal landed after the epoch had ended, not inside it"
    return kept


def artifacts(records: list, kind: str) -> list:
    return [r.artifact for r in records if r.HasField("artifact") and r.artifact.type == kind]


def exit_code(records: list) -> int:
    return next(r.exit for r in records if r.HasField("exit")).exit_code


def was_marked_preempting(records: list) -> bool:
    return any(r.HasField("preempting") for r in records)


def without_timing(history: list[dict]) -> list[dict]:
    return [{key: value for key, value in epoch.items() if key not in TIMING_KEYS} for epoch in history]


@pytest.mark.slow
def test_run_preempted_twice_resumes_locally_then_from_its_artifact_and_ends_as_an_uninterrupted_run(
    tmp_path, tiny_config
):
    config = resume_config(tiny_config)
    runs = Path(config.output_dir)
    run_dir, calls = runs / "preempt1", tmp_path / "download-calls.txt"
    straight = start_training(config, "straight1", tmp_path / "straight.log")  # the reference, alongside

    # Attempt 1: SIGTERM inside epoch 2. The state of epoch 1 is saved and uploaded; the run is marked preempting.
    first = start_training(config, "preempt1", tmp_path / "attempt1.log")
    kept1 = stop_mid_epoch(first, run_dir, 1, tmp_path / "attempt1.log")
    assert RunRecord.load(run_dir).status == "preempted"
    assert torch.load(run_dir / RESUME_CHECKPOINT, weights_only=True)["state"]["epoch"] == kept1
    (attempt1,) = offline_runs(tmp_path, "preempt1")
    assert was_marked_preempting(attempt1) and exit_code(attempt1) == 128 + signal.SIGTERM
    assert logged_epochs(attempt1) == list(range(1, kept1 + 1))
    (resume_artifact,) = artifacts(attempt1, RESUME_ARTIFACT_TYPE)
    assert resume_artifact.name == "resume-preempt1" and "latest" in resume_artifact.aliases
    assert [entry.path for entry in resume_artifact.manifest.contents] == [RESUME_CHECKPOINT]

    # Attempt 2, same machine: resumes from the local last.pt (no download), and is preempted again.
    second = start_training(config, "preempt1", tmp_path / "attempt2.log", DOUBLE_CALLS=str(calls))
    kept2 = stop_mid_epoch(second, run_dir, kept1 + 1, tmp_path / "attempt2.log")
    assert f"resuming after epoch {kept1} of" in (tmp_path / "attempt2.log").read_text()
    assert not calls.exists()
    attempt2 = offline_runs(tmp_path, "preempt1")[1]
    assert logged_epochs(attempt2) == list(range(kept1 + 1, kept2 + 1))
    (staged,) = [entry.local_path for entry in artifacts(attempt2, RESUME_ARTIFACT_TYPE)[0].manifest.contents]

    # Attempt 3, another machine: no run folder at all; last.pt comes from the artifact attempt 2 uploaded.
    for path in run_dir.iterdir():
        path.unlink()
    third = start_training(config, "preempt1", tmp_path / "attempt3.log", DOUBLE_CALLS=str(calls),
                           DOUBLE_STAGED_FILE=staged)
    assert third.wait(WAIT_SECONDS) == 0, (tmp_path / "attempt3.log").read_text()[-3000:]
    assert calls.read_text().split() == ["preempt1", str(run_dir / RESUME_CHECKPOINT)]
    assert f"resuming after epoch {kept2} of" in (tmp_path / "attempt3.log").read_text()
    assert straight.wait(WAIT_SECONDS) == 0, (tmp_path / "straight.log").read_text()[-3000:]

    # Identical to the uninterrupted run: weights, per-epoch metrics, best epoch, test metrics.
    reference, resumed = RunRecord.load(runs / "straight1"), RunRecord.load(run_dir)
    assert resumed.status == "finished" and resumed.error is None  # no "Interrupted" left from attempt 2
    assert without_timing(resumed.history) == without_timing(reference.history)
    assert [epoch["epoch"] for epoch in resumed.history] == list(range(1, config.epochs + 1))
    for key in ("best_epoch", "test/loss", "test/acc", "test/acc_per_class"):
        assert resumed.summary[key] == reference.summary[key], key
    best, reference_best = (torch.load(d / BEST_CHECKPOINT, weights_only=True) for d in (run_dir, runs / "straight1"))
    assert best["epoch"] == reference_best["epoch"]
    assert best["model"].keys() == reference_best["model"].keys()
    for name, tensor in reference_best["model"].items():
        assert torch.equal(best["model"][name], tensor), name

    # W&B: every epoch logged once across the three attempts; the model artifact holds the true best weights.
    attempt3 = offline_runs(tmp_path, "preempt1")[2]
    assert logged_epochs(attempt1 + attempt2 + attempt3) == list(range(1, config.epochs + 1))
    assert not was_marked_preempting(attempt3) and exit_code(attempt3) == 0
    (model,) = artifacts(attempt3, "model")
    assert json.loads(model.metadata)["epoch"] == reference_best["epoch"]
    uploaded = torch.load(model.manifest.contents[0].local_path, weights_only=True)["model"]
    assert all(torch.equal(uploaded[name], tensor) for name, tensor in reference_best["model"].items())

    # Nothing left over: no resume checkpoint, no temporary file; the folder's (empty) lock file stays, as lock
    # files must: removing one that another process may be opening would let two processes hold "the" lock.
    assert sorted(path.name for path in run_dir.iterdir()) == [LOCK_FILE, BEST_CHECKPOINT, RECORD_FILE]
    assert not list(runs.rglob("*.tmp"))


def assert_same_end(resumed, reference) -> None:
    """Two runs' outcomes (`run_training`'s) agree bit for bit: per-epoch metrics, test loss, best epoch and weights."""
    assert without_timing(resumed.record.history) == without_timing(reference.record.history)
    assert resumed.record.summary["test/loss"] == reference.record.summary["test/loss"]
    best, reference_best = (torch.load(o.folder.best, weights_only=True) for o in (resumed, reference))
    assert best["epoch"] == reference_best["epoch"]
    assert all(torch.equal(best["model"][name], tensor) for name, tensor in reference_best["model"].items())


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_resumable(tiny_config, monkeypatch):
    config = tiny_config.replace(epochs=3)
    run_dir = Path(config.output_dir) / "killed01"

    # A full disk in the middle of epoch 2's last.pt: the run fails, and last.pt is still epoch 1's, whole.
    real_save = torch.save

    def save_then_fail(value, f, *args, **kwargs):
        if isinstance(value, dict) and value.get("state", {}).get("epoch") == 2:
            f.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")
        real_save(value, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(StorageError, match="no space left on device"):  # one line, naming last.pt
        run_training(config, RunFolder.of(config.output_dir, "killed01"))
    monkeypatch.setattr(torch, "save", real_save)
    assert RunRecord.load(run_dir).status == "failed"
    saved = (run_dir / RESUME_CHECKPOINT).read_bytes()
    assert torch.load(run_dir / RESUME_CHECKPOINT, weights_only=True)["state"]["epoch"] == 1

    # SIGKILL in the middle of a write: a real process, killed while it holds half a file in the temporary.
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from cifar_resnet.files import atomic_write\n"
         "def write(f):\n    f.write(b'x' * 4096); f.flush(); print('writing', flush=True); time.sleep(60)\n"
         "atomic_write(sys.argv[1], write)", str(run_dir / RESUME_CHECKPOINT)],
        stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    writer.kill()
    writer.wait()
    (stray,) = run_dir.glob(".*.tmp")
    assert (run_dir / RESUME_CHECKPOINT).read_bytes() == saved

    # The next attempt resumes from epoch 1, clears the leftovers, and ends as an uninterrupted run does (its
    # best.pt too, though the failed attempt may have written epoch 2's just before failing on last.pt).
    resumed = run_training(config, RunFolder.of(config.output_dir, "killed01"))
    reference = run_training(config, RunFolder.of(config.output_dir, "straight02"))
    assert_same_end(resumed, reference)
    assert sorted(path.name for path in run_dir.iterdir()) == [LOCK_FILE, BEST_CHECKPOINT, RECORD_FILE]


class OnAnotherDevice(torch.Tensor):
    """A CPU tensor that says it is on cuda:0, as the tensors `torch.load(..., map_location="cuda")` hands back on a
    GPU machine: a CPU-only torch cannot make CUDA tensors, and the meta device holds no values to resume from.

    It behaves as a tensor on a device of its own: operations among such tensors stay there, `copy_` and `.to("cpu")`
    bring the values over, and an operation mixing it with a CPU tensor (other than a 0-dim one) raises, as CUDA's
    do. Code that does not say where a tensor goes sees it where torch.load put it.
    """

    DEVICE = torch.device("cuda", 0)

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> OnAnotherDevice:
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), dtype=inner.dtype,
                                                   device=cls.DEVICE, requires_grad=inner.requires_grad)

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    def __repr__(self) -> str:
        return f"OnAnotherDevice({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = pytree.tree_leaves((args, kwargs))
        ours = [leaf for leaf in leaves if isinstance(leaf, cls)]
        aten = torch.ops.aten
        if func is aten._to_copy.default:  # .to(): onto the CPU, or staying here
            (source,) = ours
            copied = func(source.inner, **{k: v for k, v in kwargs.items() if k != "device"})
            target = kwargs.get("device")
            return copied if target is not None and torch.device(target).type == "cpu" else cls(copied)
        if func is not aten.copy_.default:  # copies cross devices; nothing else does
            cpu = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor) and not isinstance(leaf, cls)
                   and leaf.dim() > 0]
            if cpu:
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                                   f"{cls.DEVICE} and cpu! ({func})")
        unwrapped_args, unwrapped_kwargs = pytree.tree_map_only(cls, lambda t: t.inner, (args, kwargs))
        result = func(*unwrapped_args, **unwrapped_kwargs)
        by_inner = {id(t.inner): t for t in ours}  # an in-place operation returns its input: give back the wrapper
        plain_output = func is aten.copy_.default and not isinstance(args[0], cls)
        return pytree.tree_map_only(
            torch.Tensor, lambda t: t if plain_output else by_inner.get(id(t)) or cls(t), result)


def on_another_device(value):
    """`value` with every tensor in it replaced by an `OnAnotherDevice` one; containers keep their type and
    metadata (a module's state_dict is an OrderedDict with `_metadata`)."""
    if isinstance(value, torch.Tensor):
        return OnAnotherDevice(value)
    if isinstance(value, dict):
        moved = type(value)((key, on_another_device(item)) for key, item in value.items())
        if hasattr(value, "_metadata"):
            moved._metadata = value._metadata
        return moved
    if isinstance(value, (list, tuple)):
        return type(value)(on_another_device(item) for item in value)
    return value


def test_a_checkpoint_that_torch_load_puts_on_another_device_resumes_as_an_uninterrupted_run(
    tiny_config, monkeypatch
):
    """On a GPU the resume checkpoint's tensors came back from torch.load on the GPU (b142e91 loaded it with
    map_location=device), and the generator's state failed `set_state` with "RNG state must be a torch.ByteTensor":
    no preempted run could resume on a GPU. Here every tensor torch.load hands back is on another device than the
    CPU run's (`OnAnotherDevice`): each part of the state must still land where it belongs, and the run end as an
    uninterrupted one, weights, average and optimizer state included."""
    config = tiny_config.replace(epochs=3, ema_decay=0.9)  # the weight average's state is restored too
    reference = run_training(config, RunFolder.of(config.output_dir, "straight03"))
    stop = []
    hooks = RunHooks(on_epoch_recorded=lambda record: stop.append(len(record.history)), should_stop=lambda: bool(stop))
    with pytest.raises(Interrupted):
        run_training(config, RunFolder.of(config.output_dir, "moved001"), hooks)

    real_load, loaded = torch.load, []

    def load_onto_another_device(f, *args, **kwargs):
        loaded.append(Path(f).name)
        return on_another_device(real_load(f, *args, **kwargs))

    def misplaced(state) -> list[str]:
        """The tensors of the run's state that are not plain CPU tensors (the run's device here)."""
        tensors = {"best weights": state.best_model_state, "optimizer": state.optimizer.state_dict(),
                   "scheduler": state.scheduler.state_dict(), "average": state.average.state_dict()}
        return [f"{part}: {type(leaf).__name__} on {leaf.device}" for part, tree in tensors.items()
                for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)
                and (type(leaf) is not torch.Tensor or leaf.device.type != "cpu")]

    found, real_restore = [], loop.TrainState.load_state_dict

    def restore_and_look(state, saved) -> None:
        real_restore(state, saved)
        found.append(misplaced(state))  # one list per restore: empty when every part is where it belongs

    monkeypatch.setattr(torch, "load", load_onto_another_device)
    monkeypatch.setattr(loop.TrainState, "load_state_dict", restore_and_look)
    resumed = run_training(config, RunFolder.of(config.output_dir, "moved001"))
    monkeypatch.setattr(torch, "load", real_load)

    assert loaded == [RESUME_CHECKPOINT]
    assert found == [[]]
    assert [epoch["epoch"] for epoch in resumed.record.history] == [1, 2, 3]
    assert without_timing(resumed.record.history) == without_timing(reference.record.history)
    for key in ("best_epoch", "test/loss", "test/acc"):
        assert resumed.record.summary[key] == reference.record.summary[key], key
    best, reference_best = (torch.load(o.folder.best, weights_only=True) for o in (resumed, reference))
    assert all(torch.equal(best["model"][name], tensor) for name, tensor in reference_best["model"].items())


def crash_in_epoch_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training raises, as a GPU fault would, when its second epoch starts (after epoch 1's checkpoint)."""
    real_epoch = loop.train_one_epoch
    epochs_started = []

    def crashing(*args, **kwargs):
        epochs_started.append(1)
        if len(epochs_started) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", crashing)


def test_a_crash_ends_the_run_as_failed_not_preempting(tmp_path, tiny_config, monkeypatch):
    """A bug must fail the run, or the sweep would requeue it for ever."""
    crash_in_epoch_2(monkeypatch)
    monkeypatch.setenv("WANDB_RUN_ID", "crash001")
    assert train_main(tiny_args(tiny_config)) == 1
    wandb.teardown()  # as at the end of the process: W&B's service writes out the run's last records
    (records,) = offline_runs(tmp_path, "crash001")
    assert not was_marked_preempting(records)
    assert exit_code(records) == 1
    assert not artifacts(records, RESUME_ARTIFACT_TYPE)
    assert RunRecord.load(Path(tiny_config.output_dir) / "crash001").status == "failed"


@pytest.mark.slow
def test_lookahead_and_the_average_resume_from_last_pt_as_the_uninterrupted_run(tiny_config, monkeypatch):
    """Lookahead's slow weights and step count travel in last.pt beside the weight average: a run that fails in
    epoch 2, when its last.pt holds epoch 1 in the middle of a Lookahead cycle, runs again to the same end."""
    config = tiny_config.replace(epochs=3, optimizer="sgd", learning_rate=0.01, sgd_norm_lr_scale=16.0,
                                 lookahead_steps=4, ema_decay=0.9)  # 15 steps an epoch: a sync every 4
    run_dir = Path(config.output_dir) / "ahead01"
    real_epoch = loop.train_one_epoch
    crash_in_epoch_2(monkeypatch)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run_training(config, RunFolder.of(config.output_dir, "ahead01"))
    monkeypatch.setattr(loop, "train_one_epoch", real_epoch)
    saved = torch.load(run_dir / RESUME_CHECKPOINT, weights_only=True)["state"]
    assert saved["epoch"] == 1 and saved["lookahead"]["steps_taken"] == 15 and "average" in saved
    slow, fast = saved["lookahead"]["slow"], saved["model"]
    assert slow.keys() < fast.keys()  # the parameters, not the batch-norm statistics
    assert not all(torch.equal(slow[name], fast[name]) for name in slow)  # 3 steps after the last sync

    resumed = run_training(config, RunFolder.of(config.output_dir, "ahead01"))
    reference = run_training(config, RunFolder.of(config.output_dir, "straight03"))
    assert_same_end(resumed, reference)


def test_a_stop_signal_while_a_finished_run_shuts_down_leaves_it_finished(tmp_path, tiny_config):
    """SIGTERM once the run's record says finished, while W&B and the interpreter shut down (seconds, after
    torch and W&B): the run exits 0 and its W&B run ends as finished, not preempting (issue 23: 128 + 15, which
    the sweep took for a preempted run and trained again)."""
    run_dir, log = Path(tiny_config.output_dir) / "late0001", tmp_path / "late.log"
    process = start_training(tiny_config.replace(epochs=1), "late0001", log)
    deadline = time.monotonic() + WAIT_SECONDS
    while not ((run_dir / RECORD_FILE).exists() and RunRecord.load(run_dir).status == "finished"):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(POLL_SECONDS)
    time.sleep(SHUTDOWN_SIGNAL_DELAY_SECONDS)
    process.send_signal(signal.SIGTERM)

    assert process.wait(WAIT_SECONDS) == 0, log.read_text()[-3000:]
    (records,) = offline_runs(tmp_path, "late0001")
    assert not was_marked_preempting(records) and exit_code(records) == 0
    assert RunRecord.load(run_dir).status == "finished"


def epoch_result(epoch: int) -> EpochResult:
    return EpochResult(epoch=epoch, train_loss=1.0, train_acc=0.5, val_loss=1.0, val_acc=0.5, lr=0.1,
                       epoch_seconds=1.0, train_images_per_second=100.0, is_best=False)


@pytest.mark.parametrize(
    "wandb_next_step, resumed_after, logged",
    [
        (3, 2, [3, 4, 5]),  # W&B holds epochs 1-2, as does the checkpoint: log the new epochs
        (2, 3, [2, 3, 4, 5, 6]),  # killed after saving epoch 3, before logging it: log the missing ones too
        (5, 2, [5]),  # W&B holds epochs 3-4 of an attempt whose checkpoint was lost: do not log them twice
    ],
)
def test_resumed_online_run_logs_each_epoch_once(wandb_next_step, resumed_after, logged):
    """W&B's side of a resumed online run (the step its history reached) cannot run here: a stand-in supplies it."""
    steps = []
    tracker = object.__new__(Tracker)  # its W&B run is the stand-in
    tracker.next_epoch_to_log = None
    tracker.run = SimpleNamespace(resumed=True, step=wandb_next_step,
                                  log=lambda metrics, step, commit: steps.append((step, metrics["epoch"])))
    history = [epoch_result(epoch).metrics() for epoch in range(1, resumed_after + 1)]
    for epoch in range(resumed_after + 1, resumed_after + 4):  # this attempt trains three epochs
        history.append(epoch_result(epoch).metrics())
        tracker.on_epoch(SimpleNamespace(history=history))
    assert steps == [(epoch, epoch) for epoch in logged]
