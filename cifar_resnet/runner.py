"""One training run with its files and no W&B: data, engine, checkpoints and run record in `output_dir/<run id>/`.

`train.py` puts the W&B layer on top of `run_training` (a run alone in its process), and a pack's trainer
(`packing.trainer`) on top of `run_steps`; the benchmarks and the tests call `run_training` directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    CheckpointWriter,
    check_resume,
    host_copy,
    load_checkpoint,
    read_weights,
    save_best,
    save_resume,
)
from .config import Config, changed_settings
from .data.images import DataSplits
from .data.sources import check_source_present, load_source, load_splits, split
from .engine.device import build_model, select_device, start_device
from .engine.evaluation import EvalResult, evaluate_test
from .engine.loop import (
    EpochResult,
    FitResult,
    Interrupted,
    Join,
    TrainHooks,
    TrainingSteps,
    TrainState,
    drive,
    fit_steps,
)
from .engine.streams import CudaStreams
from .errors import ConfigError, StorageError, UserError
from .files import check_folder_path
from .model import count_parameters
from .records import (
    BEST_EPOCH,
    BEST_VAL_ACC,
    CLASS_COUNT,
    DATA_SOURCE,
    DEVICE,
    PARAM_COUNT,
    RUN_SECONDS,
    TEST_ACC,
    TEST_ACC_PER_CLASS,
    TEST_CONFUSION,
    TEST_IMAGES,
    TEST_LOSS,
    TRAIN_IMAGES,
    VAL_IMAGES,
    EpochProgress,
    RunFolder,
    RunRecord,
)

log = logging.getLogger(__name__)

PROGRESS_WRITE_SECONDS = 0.5  # how often a run rewrites its progress file inside an epoch, at most


class ProgressFile:
    """Writes the run's `progress.json` from the engine's host-side hooks: steps are counted on the host and timed
    with the monotonic clock (no device sync), and the file is rewritten at most every PROGRESS_WRITE_SECONDS."""

    def __init__(self, folder: RunFolder, config: Config, elapsed: Callable[[], float]) -> None:
        self.folder, self.config, self.elapsed = folder, config, elapsed
        self.epoch = self.step = self.steps = 0
        self.epoch_started = self.last_write = time.monotonic()

    def on_epoch_start(self, epoch: int, steps: int) -> None:
        self.epoch, self.step, self.steps = epoch, 0, steps
        self.epoch_started = time.monotonic()
        self.write(self.epoch_started)

    def on_batch(self) -> None:
        self.step += 1
        now = time.monotonic()
        if now - self.last_write >= PROGRESS_WRITE_SECONDS or self.step == self.steps:
            self.write(now)

    def write(self, now: float) -> None:
        self.last_write = now
        seconds_in_epoch = now - self.epoch_started
        rate = self.step * self.config.batch_size / seconds_in_epoch if self.step and seconds_in_epoch > 0 else None
        EpochProgress(self.epoch, self.config.epochs, self.step, self.steps, rate, self.elapsed(),
                      time.time()).save(self.folder.path)


@dataclass
class TrainedRun:
    folder: RunFolder
    record: RunRecord
    fit: FitResult
    data: DataSplits  # what it trained and was tested on, still in memory


@dataclass
class RunHooks(TrainHooks):
    """What a run tells the outside world (the W&B layer, a progress bar, a trainer's client) and how it is asked to
    stop; every field is optional. The engine's hooks (`TrainHooks`: each epoch's start, each step, each epoch's
    result and state, and `should_stop`) are passed on to it, called after the run's own (its progress file, its
    checkpoints); the fields below are what only a run has. Called on the host between steps: none may read a device
    tensor.

    A run trained in a trainer (another process) relays `on_start`, `on_epoch_recorded` and `should_stop`, which
    carry plain data; the engine's other hooks hold live objects and stay in the process that trains.
    """

    on_start: Callable[[dict[str, Any]], None] | None = None  # facts known once data and model are built
    # After each epoch, once its files are on their way to disk (CheckpointWriter): the run's record, which holds it.
    on_epoch_recorded: Callable[[RunRecord], None] | None = None
    # Puts a resume checkpoint saved elsewhere (another machine's, via W&B) at the given path when the run folder
    # has none; returns whether it did.
    fetch_resume: Callable[[Path], bool] | None = None


def check_inputs(config: Config) -> None:
    """What would fail the run at its start, checked before anything starts (`train` calls it before W&B, so that
    such a mistake leaves no W&B run behind): the device, and the data source's presence (`check_source_present`)."""
    if config.device != "auto":  # auto never fails
        select_device(config.device)
    check_source_present(config)


def run_training(config: Config, folder: RunFolder, hooks: RunHooks | None = None) -> TrainedRun:
    """Train one run in this process, in `folder` (`RunFolder.of(config.output_dir, run_id)`): its data loaded
    here, then `run_steps` driven alone."""
    started = time.perf_counter()
    check_folder_path(folder.path, "output_dir")  # a file in the way, found before anything is loaded
    log.info("config: %s", config.to_dict())
    device = select_device(config.device)
    log.info("trains alone, in its own process, on %s", device)
    device_ready = start_device(device)  # CUDA starts on a thread while the data loads
    # The data loads on a thread too: its stat of every image (an image folder's cache checked) and its decoding
    # release the GIL, and overlap the import below where a core is free.
    with ThreadPoolExecutor(1, thread_name_prefix="data-load") as loading:
        source = loading.submit(load_source, config)
        # torch.optim imports torch._dynamo when it builds its first optimizer (add_param_group is wrapped by
        # torch._disable_dynamo): a second or more of every run's start. Imported here, it overlaps CUDA's start.
        import torch._dynamo  # noqa: F401
        device_ready()
        data = split(source.result().to(device), config)  # on the device once: the splits are views of it
    return drive(run_steps(config, folder, data, device, hooks, started))


def run_steps(config: Config, folder: RunFolder, data: DataSplits, device: torch.device, hooks: RunHooks | None = None,
              started: float | None = None, join: Join | None = None,
              streams: CudaStreams | None = None) -> TrainingSteps[TrainedRun]:
    """One run with its files: write `best.pt`, `last.pt` (removed when the run finishes) and `record.json` in
    `folder`, training on `data` (views on `device`, perhaps shared with other runs). A generator of steps, as
    `engine.loop.fit_steps` is: `run_training` drives it alone, a trainer in a pack.

    A `last.pt` already in the run folder (a preempted earlier attempt with the same run id), or else the one
    `hooks.fetch_resume` provides, is resumed: training continues after its last completed epoch. The run claims its
    folder (`RunFolder.claim`: its lock, and the refusal of a run that finished already) once its data and model are
    ready, and holds it to its end.

    `join` and `streams` go to `engine.loop.fit_steps`: a trainer's run joins a fused group with them, and takes its
    CUDA streams from the trainer's one owner of streams.
    """
    hooks = hooks or RunHooks()
    started = time.perf_counter() if started is None else started
    model = build_model(config, len(data.classes), device)
    with folder.claim(config):
        return (yield from _run_claimed(config, folder, hooks, started, device, data, model, join, streams))


def _run_claimed(config: Config, folder: RunFolder, hooks: RunHooks, started: float, device: torch.device,
                 data: DataSplits, model: nn.Module, join: Join | None,
                 streams: CudaStreams | None) -> TrainingSteps[TrainedRun]:
    data_facts = {DATA_SOURCE: config.dataset, TRAIN_IMAGES: len(data.train), VAL_IMAGES: len(data.val),
                  TEST_IMAGES: len(data.test), CLASS_COUNT: len(data.classes)}
    if hooks.on_start is not None:
        hooks.on_start({
            PARAM_COUNT: count_parameters(model), DEVICE: str(device), "classes": data.classes, **data_facts,
        })
    # This process holds the folder's lock, so a temporary file here is a write cut short by a kill.
    for stray in folder.path.glob(".*.tmp"):
        stray.unlink(missing_ok=True)
    if not folder.last.exists() and hooks.fetch_resume is not None and hooks.fetch_resume(folder.last):
        log.info("fetched the resume checkpoint of run %s into %s", folder.run_id, folder.last)
    resume = None
    if folder.last.exists():
        # On the CPU: `fit` puts each part where it belongs (TrainState.load_state_dict), and best.pt wants it there.
        saved = load_checkpoint(folder.last)
        check_resume(folder.last, saved)
        changed = changed_settings(saved["config"], config)
        if changed:
            raise UserError(f"checkpoint: {folder.last} was written with other settings ({'; '.join(changed)}); "
                            "remove it to start over")
        resume = saved["state"]
        # best.pt is written just before last.pt (and is absent on another machine): rewrite it from the state
        # being resumed, so that it stays the best of the epochs this run keeps.
        best_epoch = resume["best_epoch"]
        save_best(folder.best, resume["best_model_state"], config, best_epoch, resume["history"][best_epoch - 1],
                  data.classes)
    resumable_record = resume is not None and folder.record.exists()
    record = RunRecord.load(folder.path) if resumable_record else RunRecord(folder.run_id, config.to_dict())
    record.data = data_facts
    earlier_attempts_seconds = record.seconds if resumable_record else 0.0

    def elapsed() -> float:
        return earlier_attempts_seconds + time.perf_counter() - started

    def save_record() -> None:
        record.seconds = elapsed()
        record.save(folder.path)

    if resume is not None:
        record.history = list(resume["history"])  # the record may lag the checkpoint by the epoch of a kill
    # The settings as they are now (the folder may have moved since), and no error of an earlier attempt.
    record.config, record.status, record.error = config.to_dict(), "running", None
    save_record()

    writer = CheckpointWriter()
    snapshots = []  # the last epoch's, held here so that it is freed on this thread (see `host_copy`)

    def on_epoch(result: EpochResult, state: TrainState) -> None:
        # The epoch's files are copied here, at its sync point, and written on the writer's thread while the next
        # epoch trains: best.pt, last.pt, then the record, so that the record never holds an epoch last.pt lacks.
        # The run waits for them before it ends, however it ends: a run stopped by a signal resumes with every epoch
        # it has reported. (A kill in mid-write leaves the previous files; W&B may then hold an epoch the resumed run
        # trains again, and tracking logs it once.)
        record.history = list(state.history)  # first: a checkpoint that cannot be written must not lose the epoch
        record.seconds = elapsed()
        snapshot = host_copy(state.state_dict())
        saves = [functools.partial(save_resume, folder.last, snapshot, config),
                 functools.partial(dataclasses.replace(record, history=list(record.history)).save, folder.path)]
        if result.is_best:
            saves.insert(0, functools.partial(save_best, folder.best, snapshot["best_model_state"], config,
                                              result.epoch, result.metrics(), data.classes))
        writer.submit(*saves)  # first waits for the previous epoch's files, raising their error
        snapshots[:] = [snapshot]  # the previous one's files are written: it is freed here, now
        if hooks.on_epoch_recorded is not None:
            hooks.on_epoch_recorded(record)

    progress = ProgressFile(folder, config, elapsed)
    own = TrainHooks(on_epoch_start=progress.on_epoch_start, on_batch=progress.on_batch, on_epoch=on_epoch)
    try:
        with writer:  # waits for the last checkpoints; their write error (a full disk) fails the run
            result = yield from fit_steps(config, model, data, device, own.followed_by(hooks), resume=resume,
                                          join=join, streams=streams)
    except BaseException as error:
        # Interrupted: asked to stop; GeneratorExit: its pack was closed. Either way last.pt holds the last epoch.
        record.status = "preempted" if isinstance(error, (Interrupted, GeneratorExit)) else "failed"
        record.error = str(error) or type(error).__name__
        with contextlib.suppress(StorageError):  # a disk too full for the record too: report the first error
            save_record()
        raise
    record.status = "finished"
    record.summary = {
        BEST_EPOCH: result.best_epoch,
        BEST_VAL_ACC: result.best_val_acc,
        TEST_LOSS: result.test.loss,
        TEST_ACC: result.test.acc,
        TEST_ACC_PER_CLASS: dict(zip(data.classes, result.test.per_class_acc())),
        TEST_CONFUSION: result.test.confusion.tolist(),
        PARAM_COUNT: count_parameters(result.model),
        DEVICE: str(device),
        RUN_SECONDS: elapsed(),
    }
    save_record()
    folder.last.unlink(missing_ok=True)  # finished: nothing left to resume
    folder.progress.unlink(missing_ok=True)  # nor to follow: the record has it all
    return TrainedRun(folder, record, result, data)


def evaluate_checkpoint(path: Path, overrides: dict[str, Any]) -> tuple[Config, EvalResult]:
    """Test a `best.pt`, or the best weights so far of a `last.pt`, on its run's test set; `overrides` (data_dir,
    dataset, device, tta, ...) change settings."""
    saved = read_weights(path)
    try:
        base = Config.from_mapping(saved.config)
    except ConfigError as error:
        raise UserError(f"checkpoint: {path} holds settings this version cannot use ({error})") from None
    config = Config.from_mapping(overrides, base=base)
    device = select_device(config.device)
    device_ready = start_device(device)  # CUDA starts on a thread while the data loads
    try:
        data = load_splits(config)
    finally:
        device_ready()  # joined however the load ends, so that an error of CUDA's start is not lost
    if saved.classes is None:  # a last.pt stores no class names: the data's are taken as the run's
        log.info("%s: the best weights so far (epoch %d); classes from the data: %s", path, saved.epoch,
                 ", ".join(data.classes))
    elif data.classes != saved.classes:
        raise UserError(f"checkpoint: {path} was trained on classes {saved.classes}, the data has {data.classes}")
    model = build_model(config, len(data.classes), device)
    try:
        model.load_state_dict(saved.model_state)
    except RuntimeError:  # another width, or another number of classes than the data has
        raise UserError(
            f"checkpoint: {path}'s weights do not fit a width={config.width} model of {len(data.classes)} classes "
            f"(the data's); use the width and data it was trained with"
        ) from None
    return config, evaluate_test(config, model, data, device)
