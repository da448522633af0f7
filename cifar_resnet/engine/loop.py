"""The training loop: one epoch of steps (`train_one_epoch`), everything a run needs to continue where it stopped
(`TrainState`), and the whole run (`fit_steps`, a generator of steps that `drive` runs alone and a pack interleaves;
`fit`), which reports through one `TrainHooks` object. A run trains with a step of its own, or as a member of a
fused group (`fit_steps`'s `join`)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..config import Config
from ..data.images import DataSplits
from ..data.loader import DeviceLoader
from ..errors import ConfigError, TrainingDiverged
from ..model import init_stem_whitening
from ..records import (
    EPOCH,
    EPOCH_SECONDS,
    LR,
    TRAIN_ACC,
    TRAIN_IMAGES_PER_SECOND,
    TRAIN_LOSS,
    VAL_ACC,
    VAL_LOSS,
    describe_epoch,
    describe_test,
)
from .averaging import Lookahead, WeightAverage
from .device import build_scheduler, keep_graph_settings
from .evaluation import EvalResult, build_eval_step, evaluate, evaluate_test
from .step import StepTotals, TrainingSteps, build_step
from .streams import CudaStreams, host_copies

log = logging.getLogger(__name__)

T = TypeVar("T")


class Step(Protocol):
    """What the loop uses of a training step: `EagerStep`, `CapturedStep`, or a fused group's member."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    totals: StepTotals

    def run(self, images: torch.Tensor, labels: torch.Tensor) -> TrainingSteps[None]: ...


# How a run joins a fused group (`packing.fused.FusedGroup.joined`): given its config and its model (built, its
# stem whitened), the member it trains as while the context lasts (its weights copied into its slot).
Join = Callable[[Config, nn.Module], contextlib.AbstractContextManager[Step]]


class Interrupted(Exception):
    """Training was asked to stop (a signal); the state of the last completed epoch is intact."""


def train_one_epoch(
    step: Step,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    after_step: Sequence[Callable[[], None]] = (),
    hooks: TrainHooks | None = None,
) -> TrainingSteps[tuple[float, float]]:
    """Train over `loader` once with `step` (which holds the model, optimizer, loss and autocast; a `CapturedStep`
    replays a CUDA graph); return (mean loss, accuracy). One host sync, at the end.

    `after_step` runs after every step, outside it (and outside a captured graph), in order: in a run,
    `TrainState.after_step`'s.
    A generator: it yields after every optimizer step (`step.run`'s yield: a fused member's yields until its group
    has stepped), so that a pack (`packing.pack.Pack`) can interleave several runs' steps; `drive` runs it alone.
    """
    hooks = hooks or TrainHooks()
    step.model.train()
    step.totals.zero_()
    seen = 0
    for images, labels in loader:  # images (B, 3, 32, 32) float, labels (B,)
        if hooks.should_stop():
            raise Interrupted
        yield from step.run(images, labels)
        for update in after_step:
            update()
        seen += len(labels)
        if hooks.on_batch is not None:
            hooks.on_batch()
    loss_sum, correct = host_copies([step.totals.loss_sum, step.totals.correct])  # sync: once per epoch
    return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1)


def drive(steps: TrainingSteps[T]) -> T:
    """Run a generator of training steps (`train_one_epoch`, `fit_steps`) to its end, alone; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


WHITENING_IMAGES = 5000  # training images whose patches set the stem's whitening (airbench's number): plenty for
# a 27 x 27 covariance, and seconds on a CPU


@dataclass
class EpochResult:
    epoch: int  # 1-based
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float  # at the end of the epoch
    epoch_seconds: float  # training and validation
    train_images_per_second: float
    is_best: bool

    def metrics(self) -> dict[str, float]:
        """The per-epoch metrics under the names W&B and the run record use."""
        return {
            EPOCH: self.epoch,
            TRAIN_LOSS: self.train_loss,
            TRAIN_ACC: self.train_acc,
            VAL_LOSS: self.val_loss,
            VAL_ACC: self.val_acc,
            LR: self.lr,
            EPOCH_SECONDS: self.epoch_seconds,
            TRAIN_IMAGES_PER_SECOND: self.train_images_per_second,
        }


@dataclass
class TrainState:
    """Everything a run needs to continue exactly where it stopped."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # shuffling and augmentation
    average: WeightAverage | None = None  # with ema_decay: the averaged weights, which are the ones evaluated
    lookahead: Lookahead | None = None  # with lookahead_steps: the slow weights and the steps counted
    epoch: int = 0  # completed epochs
    best_epoch: int = 0
    best_val_acc: float = -1.0
    best_model_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def start(cls, config: Config, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
              steps_per_epoch: int) -> TrainState:
        """A run's state before its first epoch: the schedule of `config`, and the weight average and Lookahead when
        it asks for them."""
        scheduler = build_scheduler(config, optimizer, steps_per_epoch)
        average = WeightAverage(model, config.ema_decay) if config.ema_decay > 0 else None
        lookahead = Lookahead(model, config.lookahead_steps, config.lookahead_alpha) if config.lookahead_steps else None
        return cls(model, optimizer, scheduler, generator, average, lookahead)

    def resume(self, saved: dict[str, Any]) -> None:
        """Continue after the last completed epoch of `saved` (a `state_dict()`), keeping what this process built
        and a checkpoint must not change (`keep_graph_settings`)."""
        built = [dict(group) for group in self.optimizer.param_groups]
        self.load_state_dict(saved)
        keep_graph_settings(self.optimizer, built)

    def after_step(self) -> list[Callable[[], None]]:
        """What runs after every optimizer step, in order: Lookahead, the weight average, the schedule (the average
        sees the weights after a Lookahead sync; the schedule fills the next step's learning rate in place, as a
        captured step reads it)."""
        return [part.update for part in (self.lookahead, self.average) if part is not None] + [self.scheduler.step]

    def keep_if_best(self, epoch: int, val_acc: float, kept: nn.Module) -> bool:
        """Whether `epoch` is the best so far; if so, `kept`'s weights are copied as the best."""
        is_best = val_acc > self.best_val_acc
        if is_best:
            self.best_epoch, self.best_val_acc = epoch, val_acc
            self.best_model_state = {k: v.detach().clone() for k, v in kept.state_dict().items()}
        return is_best

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "best_epoch": self.best_epoch,
            "best_val_acc": self.best_val_acc,
            "best_model_state": self.best_model_state,
            "history": self.history,
            **({"average": self.average.state_dict()} if self.average is not None else {}),
            **({"lookahead": self.lookahead.state_dict()} if self.lookahead is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state` (a `state_dict()`), wherever `torch.load` put its tensors: the weights, the optimizer's
        and the average's state and the best weights land on the model's device, the optimizer's step counters and
        the generator's state on the CPU (`set_state` takes a CPU byte tensor, even for a CUDA generator). Call
        `keep_graph_settings` after it."""
        device = next(self.model.parameters()).device
        self.model.load_state_dict(state["model"])  # copied into the model's own tensors, on its device
        # From the CPU, as saved: torch moves the state to each parameter's device, except the step counters, which
        # it leaves where they are unless the optimizer is capturable (a counter on a GPU would sync every step).
        self.optimizer.load_state_dict(pytree.tree_map_only(torch.Tensor, torch.Tensor.cpu, state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"].to("cpu"))
        self.epoch = state["epoch"]
        self.best_epoch = state["best_epoch"]
        self.best_val_acc = state["best_val_acc"]
        self.best_model_state = {name: tensor.to(device) for name, tensor in state["best_model_state"].items()}
        self.history = list(state["history"])
        if self.average is not None and "average" in state:
            self.average.load_state_dict(state["average"])
        elif self.average is not None:  # saved without an average: start it from the loaded weights
            self.average.model.load_state_dict(state["model"])
        if self.lookahead is not None and "lookahead" in state:
            self.lookahead.load_state_dict(state["lookahead"])
        elif self.lookahead is not None:  # saved without Lookahead: slow weights from the loaded ones
            self.lookahead.restart()


@dataclass
class TrainHooks:
    """What `fit` tells the outside world, and how it is asked to stop; every field is optional. The runner's
    `RunHooks` are these, and what only a run with files has.

    Called on the host between steps: none of them may read a device tensor, or it would add a sync per step.
    """

    on_epoch_start: Callable[[int, int], None] | None = None  # (epoch, batches in it)
    on_batch: Callable[[], None] | None = None  # after each optimizer step
    on_epoch: Callable[[EpochResult, TrainState], None] | None = None  # after validation: the state to save
    should_stop: Callable[[], bool] = lambda: False  # polled every step; True raises Interrupted

    def followed_by(self, later: TrainHooks) -> TrainHooks:
        """These hooks, then `later`'s, at each event; stopping when either asks."""
        return TrainHooks(on_epoch_start=_in_turn(self.on_epoch_start, later.on_epoch_start),
                          on_batch=_in_turn(self.on_batch, later.on_batch),
                          on_epoch=_in_turn(self.on_epoch, later.on_epoch),
                          should_stop=lambda: self.should_stop() or later.should_stop())


def _in_turn(first: Callable[..., None] | None, then: Callable[..., None] | None) -> Callable[..., None] | None:
    if first is None or then is None:
        return first or then

    def both(*args: Any) -> None:
        first(*args)
        then(*args)

    return both


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_val_acc: float
    test: EvalResult
    model: nn.Module  # holding the best weights


def fit(
    config: Config,
    model: nn.Module,
    data: DataSplits,
    device: torch.device,
    hooks: TrainHooks | None = None,
    resume: dict[str, Any] | None = None,
) -> FitResult:
    """`fit_steps` run alone, to its end."""
    return drive(fit_steps(config, model, data, device, hooks, resume))


def fit_steps(
    config: Config,
    model: nn.Module,
    data: DataSplits,
    device: torch.device,
    hooks: TrainHooks | None = None,
    resume: dict[str, Any] | None = None,
    join: Join | None = None,
    streams: CudaStreams | None = None,
) -> TrainingSteps[FitResult]:
    """Train `model` (from `build_model`, on `device`) for `config.epochs`, keep the weights of the best
    validation epoch, and test them once at the end. With `whiten_stem` the stem's filters are first set from the
    training images (not on resume); with `ema_decay` the weights validated, tested and kept are the average;
    with `lookahead_steps` Lookahead wraps the optimizer.

    `resume` is a `TrainState.state_dict()`; training continues after its last completed epoch. When
    `hooks.should_stop` returns True, `Interrupted` is raised and the state of the last completed epoch stays as
    `hooks.on_epoch` last saw it.

    With `join` the run trains as a member of a fused group: its model's weights go into its slot, and from then on
    it trains, validates and tests the slot's model (`FitResult.model`), leaving the group when it ends, however it
    ends. `streams`: the process's owner of CUDA streams, where captured steps take their capture streams (by
    default the run's own).

    A generator that yields after every optimizer step (`fit` drives it alone; a `packing.pack.Pack` interleaves
    several); its return value is the `FitResult`.
    """
    hooks = hooks or TrainHooks()
    num_classes = len(data.classes)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    train_loader = DeviceLoader(data.train, config.batch_size, device, generator=generator, augment=True,
                                alternating_flip=config.alternating_flip)
    val_loader = DeviceLoader(data.val, config.eval_batch_size, device)
    if len(train_loader) == 0:
        raise ConfigError(
            f"batch_size: {config.batch_size} is more than the {len(data.train)} training images; lower it"
        )
    if config.whiten_stem and resume is None:
        init_stem_whitening(model, train_loader.normalize(train_loader.first(WHITENING_IMAGES)))
    streams = streams or CudaStreams(device)  # every stream this run draws, through one owner
    with contextlib.ExitStack() as held:  # the steps, given back however the run ends
        if join is None:
            step: Step = build_step(config, model, device, streams=streams)
            held.callback(step.close)
        else:
            step = held.enter_context(join(config, model))
            model = step.model  # the slot's views: what is trained, kept and tested from here on
        state = TrainState.start(config, model, step.optimizer, generator, len(train_loader))
        if resume is not None:
            state.resume(resume)
            log.info("resuming after epoch %d of %d", state.epoch, config.epochs)
        after_step = state.after_step()
        # With ema_decay the averaged copy is what is validated, tested and kept; else the model trained.
        evaluated, kept = (state.average.model,) * 2 if state.average is not None else (step.model, model)
        val_step = build_eval_step(config, evaluated, num_classes, device, streams=streams)  # captured in epoch 1
        held.callback(val_step.close)

        for epoch in range(state.epoch + 1, config.epochs + 1):
            if hooks.on_epoch_start is not None:
                hooks.on_epoch_start(epoch, len(train_loader))
            start = time.perf_counter()
            train_loader.set_epoch(epoch)
            train_loss, train_acc = yield from train_one_epoch(step, train_loader, after_step, hooks)
            # train_one_epoch ended on a sync, so this is honest. In a pack it includes the other members' steps,
            # interleaved with this run's: train_images_per_second is then this run's share of the device.
            train_seconds = time.perf_counter() - start
            if not math.isfinite(train_loss):
                raise TrainingDiverged(
                    f"training loss became {train_loss} in epoch {epoch}; lower learning_rate "
                    f"(now {config.learning_rate})"
                )
            val = evaluate(evaluated, val_loader, num_classes, step=val_step)
            # A device tensor under a captured step, read once an epoch, while nothing is queued after it.
            lr = float(state.scheduler.get_last_lr()[0])
            is_best = state.keep_if_best(epoch, val.acc, kept)
            result = EpochResult(
                epoch, train_loss, train_acc, val.loss, val.acc, lr,
                epoch_seconds=time.perf_counter() - start,
                train_images_per_second=len(train_loader) * config.batch_size / train_seconds,
                is_best=is_best,
            )
            state.epoch = epoch
            state.history.append(result.metrics())
            log.info("%s", describe_epoch(state.history, config.epochs))
            if hooks.on_epoch is not None:
                hooks.on_epoch(result, state)

        model.load_state_dict(state.best_model_state)
        if evaluated is not step.model:  # the average, validated and kept: the best weights are its own
            evaluated.load_state_dict(state.best_model_state)
        # Through the validation step, and its graph: one pass is not worth a capture of its own.
        test = evaluate_test(config, evaluated, data, device, val_step)
        log.info("%s", describe_test(state.best_epoch, test.loss, test.acc))
        return FitResult(state.history, state.best_epoch, state.best_val_acc, test, model)
