"""The one home of run data: the metric names, a run's folder and its files, the run record and the report's view
of a run.

Each run keeps its files in one folder (`RunFolder`: `output_dir/<run id>`), among them one small JSON file
(`record.json`, next to its checkpoints) with the config, the per-epoch history, the summary and the status. The
sweep runner, the report, resume and the benchmark all read it; W&B gets the same numbers under the same names. A
new metric touches the engine (which computes it) and this module (which names it).

A run's data has one name for each form it takes: `RunFolder` is where it lies; `RunRecord` is what the run keeps
(`record.json`, written as it trains); `EpochProgress` is where it is inside the epoch in progress (`progress.json`);
`RunResult` is a run as the report and the tables read it, from a record or from W&B. Around them, in their modules:
the runner's `TrainedRun` is what one call of `run_training` hands back in memory (the folder, the record, the
engine's result, the data); the sweep's `Attempt` is one attempt of a run in progress (its process), `AttemptEnd`
how it ended, `RunProgress` a run as the sweep's progress views show it, and `LocalSweepResult` how a whole offline
sweep ended.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, changed_settings
from .errors import UserError
from .files import FolderBusy, atomic_write_json, folder_lock
from .names import check_run_id

# --- metric names: per epoch (history), as W&B logs them at step = epoch ------------------------------------------
EPOCH = "epoch"  # 1-based
TRAIN_LOSS = "train/loss"
TRAIN_ACC = "train/acc"  # fraction correct, 0..1, as every accuracy in JSON and W&B
VAL_LOSS = "val/loss"
VAL_ACC = "val/acc"
LR = "lr"  # learning rate at the end of the epoch
EPOCH_SECONDS = "epoch_seconds"  # training and validation
TRAIN_IMAGES_PER_SECOND = "train/images_per_second"
EPOCH_METRICS = (EPOCH, TRAIN_LOSS, TRAIN_ACC, VAL_LOSS, VAL_ACC, LR, EPOCH_SECONDS, TRAIN_IMAGES_PER_SECOND)

# --- summary names: once, at the end of a run ---------------------------------------------------------------------
BEST_EPOCH = "best_epoch"
BEST_VAL_ACC = "best/val_acc"
TEST_LOSS = "test/loss"  # of the best epoch's weights
TEST_ACC = "test/acc"
TEST_ACC_PER_CLASS = "test/acc_per_class"  # {class name: accuracy}, in the classes' order; W&B gets one
# `test/acc/<class>` key each
TEST_CONFUSION = "test/confusion"  # (classes x classes) counts: rows are true labels, columns predictions
PARAM_COUNT = "param_count"
DEVICE = "device"
RUN_SECONDS = "run_seconds"  # wall time of every attempt of the run (a resumed run's included), data loading too
SELECTION_METRIC = VAL_ACC  # the best epoch, and the sweep's metric, maximise it

# --- the run's data, known at its start (RunRecord.data): what the table and plots name beside the results --------
DATA_SOURCE = "dataset"  # cifar10, imagefolder or synthetic
TRAIN_IMAGES = "train_images"  # after the validation split
VAL_IMAGES = "val_images"
TEST_IMAGES = "test_images"
CLASS_COUNT = "class_count"
DATA_NAMES = (DATA_SOURCE, TRAIN_IMAGES, VAL_IMAGES, TEST_IMAGES, CLASS_COUNT)  # W&B keeps them in run_info
RUN_INFO_KEY = "run_info"  # derived facts (parameter count, device, data, versions) in a W&B run's config


def describe_epoch(history: list[dict[str, float]], epochs: int) -> str:
    """The log line of the last epoch of `history` (one run's, `EPOCH_METRICS` each)."""
    last = history[-1]
    best = all(last[VAL_ACC] > earlier[VAL_ACC] for earlier in history[:-1])
    return (f"epoch {last[EPOCH]}/{epochs}  train loss {last[TRAIN_LOSS]:.4f} acc {100 * last[TRAIN_ACC]:.2f}%  "
            f"val loss {last[VAL_LOSS]:.4f} acc {100 * last[VAL_ACC]:.2f}%  lr {last[LR]:.2e}  "
            f"{last[EPOCH_SECONDS]:.1f}s  {last[TRAIN_IMAGES_PER_SECOND]:.0f} img/s{'  (best)' if best else ''}")


def describe_test(best_epoch: int, loss: float, acc: float) -> str:
    """The log line of a run's test pass, with its best epoch's weights."""
    return f"test (best epoch {best_epoch}): loss {loss:.4f} acc {100 * acc:.2f}%"


@dataclass
class RunRecord:
    run_id: str
    config: dict[str, Any]
    status: str = "running"  # running, finished, failed or preempted
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per epoch, EPOCH_METRICS
    summary: dict[str, Any] = field(default_factory=dict)  # the summary names above
    error: str | None = None
    started_at: float = field(default_factory=time.time)  # Unix seconds
    updated_at: float = field(default_factory=time.time)
    data: dict[str, Any] = field(default_factory=dict)  # the data names above
    seconds: float = 0.0  # wall time of every attempt so far, updated at each save

    def save(self, run_dir: Path) -> None:
        self.updated_at = time.time()
        atomic_write_json(run_dir / RECORD_FILE, asdict(self))

    @classmethod
    def load(cls, run_dir: Path) -> RunRecord:
        """The record in `run_dir`; one that cannot be read (damaged, or not a record) is a UserError naming it."""
        path = run_dir / RECORD_FILE
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict):
                raise TypeError(f"a JSON {type(saved).__name__}, not an object")
            return cls(**saved)
        except (OSError, ValueError, TypeError) as error:  # ValueError: bad JSON or UTF-8; TypeError: bad keys
            reason = error.strerror if isinstance(error, OSError) else str(error).splitlines()[0]
            raise UserError(f"{path}: not a run record this version can read ({reason}); restore it from a copy, "
                            "or remove it to go on without it (its run's results go with it)") from None


def read_record(run_dir: Path) -> RunRecord | None:
    """The record in `run_dir`, or None before the run has written one."""
    return RunRecord.load(run_dir) if (run_dir / RECORD_FILE).exists() else None


@dataclass
class EpochProgress:
    """Where a run is inside its current epoch (`progress.json`); written by the runner, read by the sweep's view."""

    epoch: int  # 1-based, the epoch in progress
    epochs: int
    step: int  # optimizer steps done in this epoch
    steps: int  # in the epoch
    images_per_second: float | None  # training, over this epoch so far
    seconds: float  # wall time of every attempt of the run so far
    updated_at: float  # Unix seconds

    def save(self, run_dir: Path) -> None:
        # Not fsync'd: rewritten several times an epoch on the training path, and worthless after a crash.
        atomic_write_json(run_dir / PROGRESS_FILE, asdict(self), durable=False)


def read_progress(run_dir: Path) -> EpochProgress | None:
    """The progress in `run_dir`, or None before the first step (or when being replaced: it is read again soon)."""
    try:
        return EpochProgress(**json.loads((run_dir / PROGRESS_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


# --- a run's folder, `output_dir/<run id>`: its files -------------------------------------------------------------
RECORD_FILE = "record.json"  # RunRecord: written as the run trains, kept when it ends
PROGRESS_FILE = "progress.json"  # EpochProgress: rewritten a few times a second inside an epoch, removed at the end
BEST_CHECKPOINT = "best.pt"  # the best validation epoch's weights (checkpoint.save_best)
RESUME_CHECKPOINT = "last.pt"  # the state after the last completed epoch (checkpoint.save_resume); removed at the end
RUN_LOG = "run.log"  # the run's stdout and stderr, where a tool that starts its process keeps them (the sweep)


class AlreadyFinished(UserError):
    """The run finished earlier with these settings: nothing to train. `train` says so and exits 0; for any other
    caller it is a refusal like any UserError."""


@dataclass(frozen=True)
class RunFolder:
    """A run's folder, `output_dir/<run id>`, where it keeps its checkpoints, record and progress: its files by name,
    its lock, and the one check that the run has not finished already. Built once where the run's output_dir and id
    are known (train's `main`, a caller of `runner.run_training`, the sweep, the trainer) and passed down.

    One process at a time trains a run: `claim` holds the folder's lock for as long as the run trains (a second
    process with the same run id is refused in one line), and refuses a run that finished already, under that lock,
    since another process may have finished it meanwhile. The runner claims the folder once the run's data and
    model are ready, in whichever process trains it (the run's own, or its trainer's): a mistake in the data leaves
    no folder behind. `check_not_finished` is the same check, claimed and released at once, for an entry point that
    must refuse a finished run before it starts anything: `train` calls it before W&B starts, so that a finished run
    gets no W&B run. (A run finished by another process between the two is still refused by the runner's claim.)
    """

    path: Path
    run_id: str

    @classmethod
    def of(cls, output_dir: str | os.PathLike[str], run_id: str) -> RunFolder:
        """`output_dir/<run id>`; a run id that would name another folder (`..`) or that W&B refuses is a
        UserError."""
        return cls(Path(output_dir) / check_run_id(run_id), run_id)

    @property
    def record(self) -> Path:
        return self.path / RECORD_FILE

    @property
    def progress(self) -> Path:
        return self.path / PROGRESS_FILE

    @property
    def best(self) -> Path:
        return self.path / BEST_CHECKPOINT

    @property
    def last(self) -> Path:
        return self.path / RESUME_CHECKPOINT

    @property
    def log(self) -> Path:
        return self.path / RUN_LOG

    @contextlib.contextmanager
    def claim(self, config: Config) -> Iterator[None]:
        """Hold the folder's lock for the block, to train the run with `config`: another process holding it is a
        UserError, and so is a run that finished already (AlreadyFinished with the same settings; a folder that moved
        counts as the same run). A finished run is never trained again under its id, which would overwrite its
        best.pt and record."""
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(folder_lock(self.path))
            except FolderBusy:
                raise UserError(f"run {self.run_id}: another process is training it in {self.path}; wait for it to "
                                "end, or give this run another id") from None
            record = read_record(self.path)
            if record is not None and record.status == "finished":
                changed = changed_settings(record.config, config)
                if changed:
                    raise UserError(f"run {self.run_id}: finished already in {self.path}, with other settings "
                                    f"({'; '.join(changed)}); give this run another id (WANDB_RUN_ID), or another "
                                    "output_dir")
                raise AlreadyFinished(f"run {self.run_id}: finished already in {self.path}; nothing to train (remove "
                                      "that folder to train it again)")
            yield

    def check_not_finished(self, config: Config) -> None:
        """`claim`'s refusals, at once, where the folder exists (a folder not there yet holds no finished run, and
        none is made; a file in its place is the runner's to refuse, naming output_dir)."""
        if self.path.is_dir():
            with self.claim(config):
                pass


# --- the report's view of a run -----------------------------------------------------------------------------------


@dataclass
class RunResult:
    """One run of a sweep as the report and the sweep's table see it, whether read from a run record or from W&B."""

    run_id: str
    status: str
    config: dict[str, Any]
    history: list[dict[str, Any]]  # one entry per epoch, EPOCH_METRICS
    summary: dict[str, Any]
    seconds: float | None  # wall time of the run, every attempt together
    data: dict[str, Any] = field(default_factory=dict)  # the data names above, where known

    @property
    def best_epoch(self) -> int | None:
        """The epoch whose checkpoint the run kept: the summary's, or (for an unfinished run) the best so far."""
        if self.summary.get(BEST_EPOCH) is not None:
            return int(self.summary[BEST_EPOCH])
        scored = [entry for entry in self.history if entry.get(SELECTION_METRIC) is not None]
        return int(max(scored, key=lambda entry: entry[SELECTION_METRIC])[EPOCH]) if scored else None

    def at_best_epoch(self, metric: str) -> float | None:
        """`metric` of the best epoch: the table reports the epoch the model was chosen at, not the last one."""
        best_epoch = self.best_epoch
        return next((entry.get(metric) for entry in self.history if entry.get(EPOCH) == best_epoch), None)

    @property
    def val_acc(self) -> float | None:
        return self.at_best_epoch(VAL_ACC)

    @property
    def test_acc(self) -> float | None:
        return self.summary.get(TEST_ACC)

    def curve(self, metric: str) -> tuple[list[int], list[float]]:
        """(epochs, values) of a per-epoch metric."""
        points = [(entry[EPOCH], entry[metric]) for entry in self.history if entry.get(metric) is not None]
        return [epoch for epoch, _ in points], [value for _, value in points]


def result_from_record(record: RunRecord) -> RunResult:
    seconds = record.summary.get(RUN_SECONDS) or record.seconds or record.updated_at - record.started_at
    return RunResult(record.run_id, record.status, record.config, record.history, record.summary, seconds,
                     {DATA_SOURCE: record.config.get(DATA_SOURCE), **record.data})


def results_from_folder(folder: Path) -> list[RunResult]:
    """Every run with a record in `folder/<run id>/record.json`."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    results = [result_from_record(RunRecord.load(path.parent)) for path in sorted(folder.glob(f"*/{RECORD_FILE}"))]
    if not results:
        raise UserError(f"{folder}: holds no run records (<run id>/{RECORD_FILE})")
    return results
