"""The W&B layer, kept thin: start a run (offline by itself without credentials), read the sweep's settings,
log each epoch, write the summary, upload the best checkpoint, and end the run as finished or failed.

Nothing else in the package imports wandb.
"""

from __future__ import annotations

import logging
import netrc
import os
import platform
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
import torchvision
import wandb

from . import __version__
from .checkpoint import BEST_CHECKPOINT
from .config import Config
from .engine import EpochResult, TrainState
from .runner import RunOutcome

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "cifar-resnet"
DEFAULT_BASE_URL = "https://api.wandb.ai"
RUN_INFO_KEY = "run_info"  # derived facts (parameter count, device, versions) in the run's config


def has_credentials() -> bool:
    """True when `WANDB_API_KEY` is set or `wandb login` left a key in the netrc file for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def choose_mode() -> str:
    """`WANDB_MODE` when set to offline or disabled; otherwise online if there are credentials, else offline."""
    mode = os.environ.get("WANDB_MODE", "online")
    if mode in ("offline", "disabled", "dryrun"):
        return "offline" if mode == "dryrun" else mode
    return "online" if has_credentials() else "offline"


class Tracker:
    """One W&B run. Its methods subscribe to the engine's callbacks."""

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
        self.run.define_metric("epoch")
        for name in ("train/*", "val/*", "lr", "epoch_seconds"):
            self.run.define_metric(name, step_metric="epoch")
        self.run.define_metric("val/acc", step_metric="epoch", summary="max")

    @property
    def run_id(self) -> str:
        return self.run.id

    def settings(self) -> dict[str, Any]:
        """The run's config as W&B holds it: under a sweep, the sweep's values win over the command line's."""
        return {key: value for key, value in dict(self.run.config).items() if key != RUN_INFO_KEY}

    def record_config(self, config: Config) -> None:
        self.run.config.update(config.to_dict(), allow_val_change=True)

    def record_run_info(self, **facts: Any) -> None:
        facts.update(
            cifar_resnet=__version__, torch=torch.__version__, torchvision=torchvision.__version__,
            wandb=wandb.__version__, python=platform.python_version(),
        )
        self.run.config.update({RUN_INFO_KEY: facts}, allow_val_change=True)

    def on_epoch(self, result: EpochResult, state: TrainState) -> None:
        self.run.log(result.metrics())

    def finish_run(self, outcome: RunOutcome) -> None:
        """Summary, confusion matrix and the best-checkpoint artifact, then end the run as finished."""
        summary = outcome.record.summary
        test = outcome.fit.test
        for key in ("best_epoch", "test/loss", "test/acc", "param_count"):
            self.run.summary[key] = summary[key]
        for name, acc in summary["test/acc_per_class"].items():
            self.run.summary[f"test/acc/{name}"] = acc
        # wandb's confusion-matrix chart wants per-image labels: expand the (true, predicted) counts.
        num_classes = len(outcome.classes)
        pairs = torch.arange(num_classes * num_classes).repeat_interleave(test.confusion.flatten())
        y_true, preds = (pairs // num_classes).tolist(), (pairs % num_classes).tolist()
        self.run.log({"test/confusion_matrix": wandb.plot.confusion_matrix(
            y_true=y_true, preds=preds, class_names=outcome.classes, title="Test confusion matrix (best epoch)")})
        self.log_checkpoint(outcome.run_dir / BEST_CHECKPOINT, outcome)
        self.run.finish(exit_code=0)

    def log_checkpoint(self, path: Path, outcome: RunOutcome) -> None:
        best = outcome.fit.history[outcome.fit.best_epoch - 1]
        artifact = wandb.Artifact(
            name=f"model-{self.run.id}",
            type="model",
            description="CIFAR10CNN weights of the best validation epoch",
            metadata={
                "epoch": outcome.fit.best_epoch,
                "val/acc": best["val/acc"],
                "test/acc": outcome.fit.test.acc,
                "config": outcome.record.config,
            },
        )
        artifact.add_file(str(path), name=path.name)
        self.run.log_artifact(artifact, aliases=["best", "latest"])

    def fail(self, message: str) -> None:
        self.run.summary["error"] = message
        self.run.finish(exit_code=1)

    def preempt(self, exit_code: int) -> None:
        """Mark the run preempting, so that the sweep requeues it instead of counting it as failed."""
        self.run.mark_preempting()
        self.run.finish(exit_code=exit_code)
