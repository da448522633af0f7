"""The W&B layer, kept thin: start a run (offline by itself without credentials), read the sweep's settings,
log each epoch, write the summary, upload the best checkpoint, and end the run as finished, failed or preempted
(with its resume checkpoint uploaded, so that another machine can continue it).

With `wandb_sweep` (W&B for the sweep and report tools), the only module that imports wandb: the model, data,
engine and runner can be used without it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch
import wandb

from . import __version__
from .config import Config
from .credentials import DEFAULT_PROJECT, choose_mode
from .records import (
    BEST_EPOCH,
    EPOCH,
    EPOCH_SECONDS,
    LR,
    PARAM_COUNT,
    RESUME_CHECKPOINT,
    RUN_INFO_KEY,
    SELECTION_METRIC,
    TEST_ACC,
    TEST_ACC_PER_CLASS,
    TEST_CONFUSION,
    TEST_LOSS,
    RunRecord,
)
from .signals import stop_on_signals

log = logging.getLogger(__name__)

RESUME_ARTIFACT_TYPE = "resume-checkpoint"  # artifact `resume-<run id>`: last.pt of a preempted run
DATA_DIR_VARIABLE = "WANDB_DATA_DIR"  # W&B's data folder; artifact files are staged in its artifacts/staging/


def resume_artifact_name(run_id: str) -> str:
    return f"resume-{run_id}"


def download_resume_checkpoint(run: wandb.Run, destination: Path) -> bool:
    """Put the resume checkpoint that a preempted attempt of `run` uploaded at `destination`, atomically; False
    when there is none: a new run, an offline run (W&B downloads nothing then), or one stopped before an epoch."""
    if run.offline or not run.resumed:
        return False
    name = f"{resume_artifact_name(run.id)}:latest"
    try:
        artifact = run.use_artifact(name)
    except (wandb.Error, ValueError) as error:  # W&B answers a missing artifact with ValueError
        log.info("no resume checkpoint artifact %s: %s", name, error)
        return False
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=destination.parent) as folder:
        os.replace(artifact.get_entry(RESUME_CHECKPOINT).download(root=folder), destination)
    return True


class Tracker:
    """One W&B run. Its methods subscribe to the engine's callbacks. Used as a context manager, it shuts W&B down
    on leaving (W&B's atexit hook would do it after the caller's signal handling has ended).

    Offline, W&B's data folder (WANDB_DATA_DIR, where artifact files and tables are staged) is the offline run's
    own folder for the whole run: everything the run's `.wandb` file names lies inside that folder, so a copy of it
    is a complete run for `wandb sync`.
    """

    def __init__(self, config: Config) -> None:
        mode = choose_mode()
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
            job_type="train",
            config=config.to_dict(),
            mode=mode,
            resume="allow",  # a preempted sweep run comes back with the same id and continues
        )
        if mode == "offline" and os.environ.get("WANDB_MODE") != "offline":
            log.warning(
                "no W&B credentials (run `wandb login` or set WANDB_API_KEY): running offline; "
                "upload later with `wandb sync %s`",
                self.run.settings.sync_dir,
            )
        # The dashboard summary of val/acc is its best epoch, not its last; every metric is plotted against epoch.
        self.run.define_metric(EPOCH)
        for name in ("train/*", "val/*", LR, EPOCH_SECONDS):
            self.run.define_metric(name, step_metric=EPOCH)
        self.run.define_metric(SELECTION_METRIC, step_metric=EPOCH, summary="max")
        self.next_epoch_to_log: int | None = None  # the first epoch W&B's history lacks, known at the first epoch
        self.data_dir_before = os.environ.get(DATA_DIR_VARIABLE)  # restored when W&B shuts down
        if self.run.offline:
            os.environ[DATA_DIR_VARIABLE] = str(self.run.settings.sync_dir)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        """Shut W&B down: end the run if it is still going, and wait for its files (online: its uploads). Ctrl-C
        is held meanwhile too, so that the run's end is written whole."""
        with stop_on_signals((signal.SIGINT,)):
            wandb.teardown()
        if self.data_dir_before is None:
            os.environ.pop(DATA_DIR_VARIABLE, None)
        else:
            os.environ[DATA_DIR_VARIABLE] = self.data_dir_before

    @property
    def run_id(self) -> str:
        return self.run.id

    def settings(self) -> dict[str, Any]:
        """The run's config as W&B holds it: under a sweep, the sweep's values win over the command line's."""
        return {key: value for key, value in dict(self.run.config).items() if key != RUN_INFO_KEY}

    def record_config(self, config: Config) -> None:
        """Write back only the settings W&B's config lacks or holds otherwise (the recipe's filled-in values):
        the sweep's own keys are locked, and writing them again only makes W&B warn that it ignored them."""
        held = dict(self.run.config)
        changed = {name: value for name, value in config.to_dict().items() if held.get(name, object()) != value}
        if changed:
            self.run.config.update(changed, allow_val_change=True)

    def record_run_info(self, **facts: Any) -> None:
        facts.update(
            # torchvision's version from its metadata: importing it costs a run most of a second, for a string
            cifar_resnet=__version__, torch=torch.__version__, torchvision=importlib.metadata.version("torchvision"),
            wandb=wandb.__version__, python=platform.python_version(),
        )
        self.run.config.update({RUN_INFO_KEY: facts}, allow_val_change=True)

    def on_epoch(self, record: RunRecord) -> None:
        """Log the epochs W&B's history lacks, each at step = epoch, so that every epoch appears once across the
        attempts of a preempted run (and the offline runs of its attempts sync one after another)."""
        epoch = record.history[-1][EPOCH]
        if self.next_epoch_to_log is None:
            # Online, a resumed run's history already holds what its earlier attempts logged: it may lack epochs
            # saved by an attempt killed before logging them, or hold epochs this attempt repeats. Offline, each
            # attempt has an offline run of its own, holding the epochs that attempt trained.
            self.next_epoch_to_log = max(1, self.run.step) if self.run.resumed else epoch
        for metrics in record.history[self.next_epoch_to_log - 1 :]:
            self.run.log(metrics, step=metrics[EPOCH], commit=True)  # written now: a kill cannot lose it
        self.next_epoch_to_log = max(self.next_epoch_to_log, epoch + 1)

    def fetch_resume_checkpoint(self, destination: Path) -> bool:
        """`RunHooks.fetch_resume`: the resume checkpoint a preempted attempt of this run uploaded, if any."""
        return download_resume_checkpoint(self.run, destination)

    def finish_run(self, record: RunRecord, best_checkpoint: Path) -> None:
        """Summary, confusion matrix and the best-checkpoint artifact (`best_checkpoint`, the run's best.pt), all
        from the finished run's record, then end the run as finished."""
        summary = record.summary
        for key in (BEST_EPOCH, TEST_LOSS, TEST_ACC, PARAM_COUNT):
            self.run.summary[key] = summary[key]
        classes = list(summary[TEST_ACC_PER_CLASS])  # in the classes' order
        for name, acc in summary[TEST_ACC_PER_CLASS].items():
            self.run.summary[f"{TEST_ACC}/{name}"] = acc
        # wandb's confusion-matrix chart wants per-image labels: expand the (true, predicted) counts.
        confusion = torch.tensor(summary[TEST_CONFUSION])  # (classes, classes)
        pairs = torch.arange(confusion.numel()).repeat_interleave(confusion.flatten())
        y_true, preds = (pairs // len(classes)).tolist(), (pairs % len(classes)).tolist()
        self.run.log({"test/confusion_matrix": wandb.plot.confusion_matrix(
            y_true=y_true, preds=preds, class_names=classes, title="Test confusion matrix (best epoch)")})
        self.log_checkpoint(best_checkpoint, record)
        self.run.finish(exit_code=0)

    def log_checkpoint(self, path: Path, record: RunRecord) -> None:
        best_epoch = record.summary[BEST_EPOCH]
        artifact = wandb.Artifact(
            name=f"model-{self.run.id}",
            type="model",
            description="CIFAR10CNN weights of the best validation epoch",
            metadata={
                EPOCH: best_epoch,
                SELECTION_METRIC: record.history[best_epoch - 1][SELECTION_METRIC],
                TEST_ACC: record.summary[TEST_ACC],
                "config": record.config,
            },
        )
        artifact.add_file(str(path), name=path.name)
        self.run.log_artifact(artifact, aliases=["best", "latest"])

    def fail(self, message: str) -> None:
        self.run.summary["error"] = message
        self.run.finish(exit_code=1)

    def preempt(self, exit_code: int, resume_checkpoint: Path) -> None:
        """Mark the run preempting, so that the sweep requeues it instead of counting it as failed, and upload its
        resume checkpoint (when an epoch has completed), so that any machine can continue it."""
        self.run.mark_preempting()  # first: if the machine goes before the upload ends, the run is still requeued
        if resume_checkpoint.exists():
            artifact = wandb.Artifact(
                name=resume_artifact_name(self.run.id),
                type=RESUME_ARTIFACT_TYPE,
                description="Full training state after the last completed epoch, for resuming a preempted run",
            )
            artifact.add_file(str(resume_checkpoint), name=RESUME_CHECKPOINT)
            self.run.log_artifact(artifact, aliases=["latest"])
        self.run.finish(exit_code=exit_code)  # waits for the upload
