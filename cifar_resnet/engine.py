"""The training engine: the builders (optimizer, schedule, the training step `build_step` and the evaluation step
`build_eval_step`), `train_one_epoch`, `evaluate`, the test pass `evaluate_test`, and `training` / `fit`.

It knows nothing of W&B or files: `fit` reports through one `TrainHooks` object, and the run record, the checkpoint
writer, the W&B layer and progress displays subscribe to it. Host synchronisation happens once per epoch, never per
step.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .config import OPTIMIZERS, Config
from .data import DataSplits, DeviceLoader
from .errors import ConfigError, TrainingDiverged
from .model import CIFAR10CNN, init_stem_whitening, zero_init_residual
from .records import (
    EPOCH,
    EPOCH_SECONDS,
    LR,
    TRAIN_ACC,
    TRAIN_IMAGES_PER_SECOND,
    TRAIN_LOSS,
    VAL_ACC,
    VAL_LOSS,
    describe_epoch,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
# A run's training, or one epoch of it, as a generator that yields after every optimizer step and returns its
# result: `drive` runs one alone; `pack.Pack` steps several in turn on one device.
TrainingSteps = Generator[None, None, T]


class Interrupted(Exception):
    """Training was asked to stop (a signal); the state of the last completed epoch is intact."""


# --- builders -------------------------------------------------------------------------------------------------


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but CUDA is not available here; use device=cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device: {name!r} asked for, but this machine shows {torch.cuda.device_count()} GPU(s): "
            f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}, cuda or auto"
        )
    return device


def start_device(device: torch.device) -> Callable[[], None]:
    """Start CUDA on `device` on a thread: its context, and cuDNN's and cuBLAS's libraries and handles (a small
    convolution and matmul), so that the second or more this takes overlaps what the caller does meanwhile (loading
    the data). Returns the function that waits for it and raises what it raised. On a CPU there is nothing to start:
    no thread, and the function returns at once."""
    if device.type != "cuda":
        return lambda: None
    failed: list[BaseException] = []

    def start() -> None:
        try:
            with torch.cuda.device(device):
                images = torch.zeros(1, 3, 8, 8, device=device)
                nn.functional.conv2d(images, torch.zeros(1, 3, 3, 3, device=device))  # loads cuDNN
                torch.mm(images.view(3, 64).T, images.view(3, 64))  # loads cuBLAS
                torch.cuda.synchronize(device)
        except BaseException as error:  # raised by the waiting thread, where it would have happened anyway
            failed.append(error)

    thread = threading.Thread(target=start, name="cuda-start")  # not a daemon: the process waits for it
    thread.start()

    def wait() -> None:
        thread.join()
        if failed:
            raise failed[0]

    return wait


def build_model(config: Config, num_classes: int, device: torch.device) -> nn.Module:
    # A private RNG for the initial weights: the same seed gives the same model, and the caller's global RNG
    # is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = CIFAR10CNN(num_classes=num_classes, width=config.width)
    if config.zero_init_residual:
        zero_init_residual(model)
    return model.to(device, memory_format=memory_format_for(config, device))


def build_optimizer(
    config: Config, model: nn.Module, device: torch.device, fused: bool | None = None, graph: bool = False
) -> torch.optim.Optimizer:
    """Weight decay applies to conv and linear weights only, never to batch-norm parameters or biases; those
    take `norm_lr_scale` times the learning rate (`sgd_norm_lr_scale` times for SGD, when it is set).

    `fused` (one kernel for the whole update) defaults to True on CUDA; the benchmark turns it off to measure it.
    `graph` builds it for a captured step (`CapturedStep`): the learning rate is a device tensor, which the schedule
    updates in place between replays, and Adam and AdamW are `capturable` (their step counters on the device).
    """
    norm_lr_scale = (config.sgd_norm_lr_scale if config.optimizer == "sgd" and config.sgd_norm_lr_scale > 0
                     else config.norm_lr_scale)
    groups = [
        {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": config.weight_decay,
         "initial_lr": config.learning_rate},
        {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0,
         "initial_lr": config.learning_rate * norm_lr_scale},
    ]
    # `initial_lr`, a float, is the schedule's base rate. Under `graph` each group's rate is a tensor of its own,
    # which the scheduler fills with plain numbers (no device arithmetic and no host read per step).
    for group in groups:
        group["lr"] = (torch.tensor(group["initial_lr"], dtype=torch.float32, device=device) if graph
                       else group["initial_lr"])
    if fused is None:
        fused = device.type == "cuda"
    capturable = {"capturable": True} if graph and device.type == "cuda" else {}  # torch refuses it on a CPU
    adam = {"betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_eps, "fused": fused, **capturable}
    if config.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(groups, **adam)
    elif config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, **adam)
    elif config.optimizer == "sgd":
        # SGD has no `capturable`: fused SGD takes a tensor learning rate as it is, without a host read.
        optimizer = torch.optim.SGD(groups, momentum=config.momentum, nesterov=config.nesterov, fused=fused)
    else:
        raise ConfigError(f"optimizer: {config.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    return optimizer


def keep_graph_settings(optimizer: torch.optim.Optimizer, built: list[dict[str, Any]]) -> None:
    """After `optimizer.load_state_dict`, put back what this process built and a checkpoint must not change: the
    learning rates as this process holds them (its tensors refilled with the loaded values, or plain numbers), the
    capturable and fused flags, and the step counters where this optimizer keeps them. A checkpoint replaces each
    param group's dict with the saved one, which may come from an eager run, a captured one, or another device."""
    for group, own in zip(optimizer.param_groups, built, strict=True):
        loaded = float(group["lr"])  # a number, or a tensor on whatever device the checkpoint came from
        if isinstance(own["lr"], torch.Tensor):
            own["lr"].fill_(loaded)
            group["lr"] = own["lr"]
        else:
            group["lr"] = loaded
        for flag in ("capturable", "fused", "foreach"):
            if flag in own:
                group[flag] = own[flag]
    # Capturable and fused Adam keep their step counters on the parameters' device; the others on the CPU, where
    # reading one (each step, for the bias correction) costs no host sync. torch moves the other state tensors.
    device_steps = any(own.get("capturable") or own.get("fused") for own in built)
    for param, state in optimizer.state.items():
        step = state.get("step")
        if not isinstance(step, torch.Tensor):
            continue
        if device_steps and step.device != param.device:
            state["step"] = step.to(param.device, torch.float32)
        elif not device_steps and step.device.type != "cpu":
            state["step"] = step.to("cpu")


def lr_multiplier(config: Config, step: int, steps_per_epoch: int) -> float:
    """The schedule's factor on `learning_rate` at optimizer step `step` (0-based)."""
    total_steps = config.epochs * steps_per_epoch
    # The shorter of the two: a short run's warm-up must not be the whole run.
    warmup_steps = round(min(config.warmup_epochs * steps_per_epoch, config.warmup_fraction * total_steps))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)  # 0 -> 1 over the decay
    if config.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress  # onecycle: linear decay to zero after the warm-up


def build_scheduler(
    config: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(config, step, steps_per_epoch))


def memory_format_for(config: Config, device: torch.device) -> torch.memory_format:
    if device.type == "cuda" and config.channels_last:
        return torch.channels_last  # NHWC: what cuDNN's tensor-core convolutions want
    return torch.contiguous_format


def autocast_context(
    config: Config, device: torch.device, cache_enabled: bool = True
) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on CUDA when configured. A captured step needs `cache_enabled=False` (PyTorch's CUDA Graphs
    notes): the cast weights must be recomputed inside the graph, not taken from a cache filled outside it."""
    if device.type == "cuda" and config.bf16:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache_enabled)
    return contextlib.nullcontext


# --- one step -------------------------------------------------------------------------------------------------

CAPTURE_WARMUP_STEPS = 3  # eager steps on a side stream before the capture (PyTorch's CUDA Graphs notes use 3):
# they create the optimizer state and the cuDNN and cuBLAS workspaces, which must exist before a capture.
MIN_GRAPH_CAPABILITY = (7, 0)  # Volta: older GPUs lack the CUDA graph features the capture relies on


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward and optimizer step on one batch; returns the batch's mean loss (float32) and its number
    of correct predictions (int64), both still on the device (no host sync).

    The one step function: run as it is on a CPU, captured once as a CUDA graph by `CapturedStep`. Gradients are
    set to None, not zeroed: under capture, backward then allocates them in the graph's own memory pool and writes
    them afresh on every replay (PyTorch's whole-network capture does the same).
    """
    with autocast():
        logits = model(images)  # (B, classes)
        loss = loss_fn(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach().float(), (logits.argmax(1) == labels).sum()


class StepTotals:
    """An epoch's loss sum and correct count, accumulated on the device: reading them each step would stall the
    GPU. Their tensors never change (a captured step adds into them); `zero_` starts an epoch."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)

    def zero_(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()

    def add_(self, loss: torch.Tensor, correct: torch.Tensor, batch_size: int) -> None:
        self.loss_sum.add_(loss * batch_size)
        self.correct.add_(correct)


class EagerStep:
    """`train_step` run as it is, each call, adding into `totals`; `loss` is the last batch's mean loss."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module,
        autocast: Callable[[], contextlib.AbstractContextManager],
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.model, self.optimizer, self.loss_fn, self.autocast = model, optimizer, loss_fn, autocast
        self.memory_format = memory_format
        self.totals = StepTotals(next(model.parameters()).device)
        self.loss: torch.Tensor | None = None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        images = images.contiguous(memory_format=self.memory_format)
        self.loss, correct = train_step(self.model, images, labels, self.optimizer, self.loss_fn, self.autocast)
        self.totals.add_(self.loss, correct, len(labels))


class GraphCapture:
    """What `CapturedStep` and `CapturedEval` share, whatever they capture (a base put before the eager step it
    captures, whose `__call__` it runs): the checks that a capture is possible here, the eager warm-up calls on a side
    stream (PyTorch's CUDA Graphs notes), the static buffers, and the fall back to the eager step for good, after one
    warning with the reason."""

    DOING = "running"  # the warning's first word: "training eagerly, ..."

    def __init__(self, *args: Any, warmup_steps: int = CAPTURE_WARMUP_STEPS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.warmup_steps = warmup_steps
        self.warmed_up = 0
        self.graph: Any = None  # torch.cuda.CUDAGraph once captured
        self.eager = False  # fell back for good
        self.static_images: torch.Tensor | None = None
        self.static_labels: torch.Tensor | None = None
        self.side_stream: Any = None

    def fall_back(self, reason: str) -> None:
        log.warning("%s eagerly, without a CUDA graph: %s", self.DOING, reason)
        self.eager = True

    def prepare(self, images: torch.Tensor) -> bool:
        """Check that a capture is possible here and make the side stream; False (after the warning) if not."""
        try:
            if images.device.type != "cuda":
                raise RuntimeError(f"the device is {images.device.type}, not CUDA")
            capability = torch.cuda.get_device_capability(images.device)
            if capability < MIN_GRAPH_CAPABILITY:
                raise RuntimeError(f"GPU compute capability {capability} is below {MIN_GRAPH_CAPABILITY}")
            self.side_stream = torch.cuda.Stream(images.device)
        except Exception as error:  # any reason at all: the work goes on eagerly
            self.fall_back(f"{type(error).__name__}: {error}")
            return False
        return True

    def warm_up_or_capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Before the graph exists, each call runs its batch as a warm-up step, or as the capture's (the subclass's
        `capture`), or eagerly when no capture is possible here."""
        if self.side_stream is None and not self.prepare(images):
            super().__call__(images, labels)  # the eager step's
        elif self.warmed_up < self.warmup_steps:
            self.warm_up(images, labels)
        else:
            self.capture(images, labels)

    def capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Capture the work on this batch as `self.graph` and replay it for this batch (or fall back)."""
        raise NotImplementedError

    def warm_up(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.side_stream.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(self.side_stream):
            super().__call__(images, labels)  # the eager step's
        torch.cuda.current_stream(images.device).wait_stream(self.side_stream)
        self.warmed_up += 1

    def static_copies(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """The buffers the graph reads, filled with this batch: every replay copies its batch into them."""
        self.static_images = torch.empty_like(images, memory_format=self.memory_format).copy_(images)
        self.static_labels = labels.clone()

    def replay(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.static_images.copy_(images)  # also converts to the captured memory format
        self.static_labels.copy_(labels)
        self.graph.replay()


class CapturedStep(GraphCapture, EagerStep):
    """The same step as one CUDA graph: static image and label buffers, captured once, replayed every call.

    The first `CAPTURE_WARMUP_STEPS` calls train eagerly on a side stream; the next captures the step (and the
    accumulation into `totals`) and replays it for its own batch; every later call copies its batch into the
    static buffers and replays. These are real training steps: a run takes as many steps as an eager one.
    Whatever the capture cannot do (no CUDA, a GPU older than Volta, a batch of another shape, the capture
    raising) makes it train eagerly from then on, after one warning with the reason.
    The optimizer must come from `build_optimizer(..., graph=True)` and `autocast` use `cache_enabled=False`.
    """

    DOING = "training"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.capture_seconds = 0.0  # the warm-up steps and the capture, with the syncs they need

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if self.eager:
            return super().__call__(images, labels)
        if self.graph is not None:
            if images.shape != self.static_images.shape or labels.shape != self.static_labels.shape:
                self.fall_back(f"a batch of shape {tuple(images.shape)}, captured {tuple(self.static_images.shape)}")
                return super().__call__(images, labels)
            return self.replay(images, labels)
        started = time.perf_counter()
        self.warm_up_or_capture(images, labels)
        self.capture_seconds += time.perf_counter() - started
        return None

    def capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.static_copies(images, labels)
        try:
            graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)  # backward allocates the gradients in the graph's pool
            with torch.cuda.graph(graph):
                loss, correct = train_step(self.model, self.static_images, self.static_labels, self.optimizer,
                                           self.loss_fn, self.autocast)
                self.totals.add_(loss, correct, len(labels))
        except Exception as error:  # nothing ran: a capture records kernels without running them
            self.optimizer.zero_grad(set_to_none=True)  # drop gradients that point into the failed graph's pool
            self.fall_back(f"the capture failed: {type(error).__name__}: {error}")
            super().__call__(images, labels)
            return
        self.graph, self.loss = graph, loss
        graph.replay()  # this call's own batch
        log.info("captured the training step as one CUDA graph (%d warm-up steps and the capture: %.2f s)",
                 self.warmed_up, self.capture_seconds)


def uses_cuda_graph(config: Config, device: torch.device) -> bool:
    """Whether a run captures its step by hand: on CUDA with cuda_graph, unless torch.compile does the graphs."""
    return config.cuda_graph and device.type == "cuda" and not config.compile


def compile_mode(config: Config, device: torch.device) -> str | None:
    """torch.compile's mode for the run, or None when it is not compiled."""
    if not config.compile:
        return None
    return "reduce-overhead" if config.cuda_graph and device.type == "cuda" else "default"


def build_step(config: Config, model: nn.Module, device: torch.device, fused: bool | None = None,
               mode: str | None = None) -> EagerStep:
    """The training step of a run of `config` on `model` (from `build_model`): the model under torch.compile when
    `compile` says so (`step.model`; state dicts stay those of `model`), its optimizer (`step.optimizer`), the loss,
    autocast and memory format; a `CapturedStep` on CUDA with cuda_graph (captured in the first epoch trained), else
    an `EagerStep`.

    The one builder of the step, for a run (`training`) and the benchmark, whose variants each change one option from
    a run's: `fused` (the optimizer's; default fused on CUDA) and `mode` (torch.compile's; default `compile_mode`'s).
    """
    graph = uses_cuda_graph(config, device)
    optimizer = build_optimizer(config, model, device, fused=fused, graph=graph)
    mode = mode or compile_mode(config, device)
    step_model = torch.compile(model, mode=mode) if mode else model
    autocast = autocast_context(config, device, cache_enabled=not graph)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    step_class = CapturedStep if graph else EagerStep
    return step_class(step_model, optimizer, loss_fn, autocast, memory_format_for(config, device))


class WeightAverage:
    """An exponential moving average of a model's weights and batch-norm statistics, kept in a copy of the model
    that validation, test and the checkpoints use in place of the trained one.

    `update` runs after each optimizer step, outside a captured step, as a few fused kernels on the device (no host
    sync). The decay ramps up as (1 + n) / (10 + n) over the first updates (TensorFlow's ExponentialMovingAverage
    with num_updates), so the early average is not dominated by the random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model)
        self.decay = decay
        self.updates = 0
        averaged, live = self.model.state_dict(), model.state_dict()  # tensors sharing the modules' storage
        self.averaged = [t for t in averaged.values() if t.is_floating_point()]
        self.live = [t for t in live.values() if t.is_floating_point()]
        self.counters = [averaged[k] for k, t in live.items() if not t.is_floating_point()]
        self.live_counters = [t for t in live.values() if not t.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.averaged, self.live, 1.0 - decay)  # what torch.optim.swa_utils' EMA runs
        if self.counters:
            torch._foreach_copy_(self.counters, self.live_counters)  # batch norm's num_batches_tracked

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


class Lookahead:
    """Lookahead (Zhang et al. 2019, "k steps forward, 1 step back") around the run's own optimizer: every `steps`
    optimizer steps the slow weights move `alpha` of the way to the fast weights (the model's parameters, which the
    optimizer trains), and the fast weights start again from there. The optimizer's own state (momentum, Adam's
    moments) carries on across a sync, neither reset nor pulled.

    Parameters only: batch-norm running statistics are buffers of the forward pass and stay those of the fast
    weights (neither pulled nor reset at a sync), as in the published implementations, which see only an
    optimizer's parameters. Validation and test see the model as it stands (fast weights, synced or not).
    `update` runs after each optimizer step, outside a captured step: the steps are counted on the host, and a
    sync is two fused kernels in place on the parameters (the captured graph keeps their storage), no host sync.
    """

    def __init__(self, model: nn.Module, steps: int, alpha: float) -> None:
        self.steps, self.alpha = steps, alpha
        self.names = [name for name, _ in model.named_parameters()]
        self.fast = [p.detach() for p in model.parameters()]  # the parameters' own storage
        self.slow = [p.clone() for p in self.fast]
        self.steps_taken = 0  # optimizer steps of the run so far: the syncs fall on its multiples of `steps`

    @torch.no_grad()
    def update(self) -> None:
        self.steps_taken += 1
        if self.steps_taken % self.steps:
            return
        torch._foreach_lerp_(self.slow, self.fast, self.alpha)  # slow += alpha * (fast - slow)
        torch._foreach_copy_(self.fast, self.slow)

    def restart(self) -> None:
        """Slow weights from the parameters as they are now, counting steps from zero (a resume without state)."""
        torch._foreach_copy_(self.slow, self.fast)
        self.steps_taken = 0

    def state_dict(self) -> dict[str, Any]:
        return {"slow": dict(zip(self.names, self.slow, strict=True)), "steps_taken": self.steps_taken}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, slow in zip(self.names, self.slow, strict=True):
            slow.copy_(state["slow"][name])  # onto this run's device, whichever the checkpoint was loaded onto
        self.steps_taken = state["steps_taken"]


# --- one epoch ------------------------------------------------------------------------------------------------


def train_one_epoch(
    step: EagerStep,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    after_step: Sequence[Callable[[], None]] = (),
    hooks: TrainHooks | None = None,
) -> TrainingSteps[tuple[float, float]]:
    """Train over `loader` once with `step` (which holds the model, optimizer, loss and autocast; a `CapturedStep`
    replays a CUDA graph); return (mean loss, accuracy). One host sync, at the end.

    `after_step` runs after every step, outside it (and outside a captured graph), in order: in a run, the Lookahead,
    the weight average and the schedule (the average sees the weights after a Lookahead sync; the schedule fills the
    next step's learning rate in place, as a captured step reads it).
    A generator: it yields after every optimizer step, so that a pack (`pack.Pack`) can interleave several runs'
    steps; `drive` runs it alone.
    """
    hooks = hooks or TrainHooks()
    step.model.train()
    step.totals.zero_()
    seen = 0
    for images, labels in loader:  # images (B, 3, 32, 32) float, labels (B,)
        if hooks.should_stop():
            raise Interrupted
        step(images, labels)
        for update in after_step:
            update()
        seen += len(labels)
        if hooks.on_batch is not None:
            hooks.on_batch()
        yield
    loss_value, correct_value = step.totals.loss_sum.item(), step.totals.correct.item()  # sync: once per epoch
    return loss_value / max(seen, 1), correct_value / max(seen, 1)


def drive(steps: TrainingSteps[T]) -> T:
    """Run a generator of training steps (`train_one_epoch`, `training`) to its end, alone; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


@dataclass
class EvalResult:
    loss: float
    acc: float
    confusion: torch.Tensor  # (classes, classes) int64 on the CPU; rows are true labels, columns predictions

    def per_class_acc(self) -> list[float]:
        totals = self.confusion.sum(1).clamp(min=1)
        return (self.confusion.diag() / totals).tolist()


def tta_logits(model: nn.Module, images: torch.Tensor, tta: bool, translate_px: int) -> torch.Tensor:
    """Logits of `images` (B, 3, H, W), averaged over test-time views: the image alone; with `tta` the image and its
    mirror; with `translate_px` as well, half that pair's mean and half the mean of the same pair shifted by
    `translate_px` up-left and down-right (reflected borders), as airbench does."""

    def mirrored(views: torch.Tensor) -> torch.Tensor:
        return (model(views).float() + model(views.flip(3)).float()) / 2

    if not tta:
        return model(images).float()
    if translate_px == 0:
        return mirrored(images)
    p, (h, w) = translate_px, images.shape[2:]
    padded = nn.functional.pad(images, (p, p, p, p), mode="reflect")  # (B, 3, H+2p, W+2p)
    shifted = (mirrored(padded[:, :, : h, : w]) + mirrored(padded[:, :, 2 * p :, 2 * p :])) / 2
    return (mirrored(images) + shifted) / 2


def tta_views(tta: bool, translate_px: int) -> int:
    """Forward passes per image under these TTA settings."""
    return 1 if not tta else 2 if translate_px == 0 else 6


class EvalStep:
    """One evaluation batch, eagerly: the logits of its test-time views (`tta_logits`), then its summed loss and its
    confusion counts added into device totals, with no host sync. `result` reads them (the sync); `zero_` starts a
    pass. `CapturedEval` replays the same batch as a CUDA graph."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        memory_format: torch.memory_format = torch.contiguous_format,
        tta: bool = False,
        translate_px: int = 0,
    ) -> None:
        self.model, self.num_classes, self.autocast, self.memory_format = model, num_classes, autocast, memory_format
        self.tta, self.translate_px = tta, translate_px
        device = next(model.parameters()).device
        self.loss_sum = torch.zeros((), device=device)
        # (true label x classes + predicted label): the confusion matrix, flat
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)

    def zero_(self) -> None:
        self.loss_sum.zero_()
        self.confusion.zero_()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.add_(images.contiguous(memory_format=self.memory_format), labels)

    def add_(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """The batch's work, all on the device: what a graph captures."""
        with self.autocast():
            logits = tta_logits(self.model, images, self.tta, self.translate_px)  # (B, classes) float32
        self.loss_sum.add_(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        # scatter_add_, not bincount: bincount reads its input's largest value back to the host (a sync per batch)
        self.confusion.scatter_add_(0, labels * self.num_classes + logits.argmax(1), torch.ones_like(labels))

    def result(self) -> EvalResult:
        confusion = self.confusion.view(self.num_classes, self.num_classes).cpu()  # sync point
        total = int(confusion.sum())
        return EvalResult(loss=self.loss_sum.item() / max(total, 1), acc=int(confusion.diag().sum()) / max(total, 1),
                          confusion=confusion)


class CapturedEval(GraphCapture, EvalStep):
    """The same evaluation batch as one CUDA graph, for batches of `batch_size` images: static image and label
    buffers, captured once, replayed for every full batch. Evaluation is launch-bound on a large GPU as training is;
    a graph launches a pass's dozens of kernels (times its TTA views) at once.

    The first `warmup_steps` full batches run eagerly on a side stream, the next is captured and replayed; a batch
    of another size (a split's last, partial one) runs eagerly, which gives the same numbers. Whatever the capture
    cannot do (no CUDA, a GPU older than Volta, the capture raising) makes it evaluate eagerly from then on, after
    one warning with the reason. The graph reads the model's weights where they are: in-place updates (the
    optimizer's, the weight average's, `load_state_dict`) are seen by the next replay. `autocast` must have
    `cache_enabled=False`, as for `CapturedStep`.
    """

    DOING = "evaluating"

    def __init__(self, *args: Any, batch_size: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if self.eager or len(labels) != self.batch_size:
            return super().__call__(images, labels)
        if self.graph is not None:
            return self.replay(images, labels)
        return self.warm_up_or_capture(images, labels)

    def capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.static_copies(images, labels)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.add_(self.static_images, self.static_labels)
        except Exception as error:  # nothing ran: a capture records kernels without running them
            self.fall_back(f"the capture failed: {type(error).__name__}: {error}")
            super().__call__(images, labels)
            return
        self.graph = graph
        graph.replay()  # this call's own batch
        log.info("captured the evaluation batch (%d images, %d views) as one CUDA graph", self.batch_size,
                 tta_views(self.tta, self.translate_px))


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    memory_format: torch.memory_format = torch.contiguous_format,
    tta: bool = False,
    translate_px: int = 0,
    step: EvalStep | None = None,
) -> EvalResult:
    """Mean cross-entropy, accuracy and confusion matrix of `model` over `loader`; with `tta`, logits of each image
    and its mirror are averaged, and with `translate_px` too, those of the views shifted up-left and down-right (see
    `tta_logits`). One host sync, at the end.

    `step` runs each batch (a `CapturedEval` replays a CUDA graph; it holds its own model and settings); by default
    an `EvalStep` of the model and settings given.
    """
    step = step or EvalStep(model, num_classes, autocast, memory_format, tta, translate_px)
    step.model.eval()
    step.zero_()
    for images, labels in loader:  # images (B, 3, 32, 32) float, labels (B,)
        step(images, labels)
    return step.result()


def build_eval_step(config: Config, model: nn.Module, num_classes: int, device: torch.device,
                    capture: bool | None = None) -> EvalStep:
    """How a run of `config` evaluates `model`: its test-time views (`tta`, `tta_translate_px`), autocast and memory
    format; a `CapturedEval` for batches of `eval_batch_size` where the training step is captured too
    (`uses_cuda_graph`), unless `capture` says otherwise, else an `EvalStep`. A graph pays off over a run's
    validations; a single pass (`evaluate_test` alone) is not worth its warm-up and capture."""
    capture = uses_cuda_graph(config, device) if capture is None else capture
    autocast = autocast_context(config, device, cache_enabled=not capture)
    settings = (model, num_classes, autocast, memory_format_for(config, device), config.tta, config.tta_translate_px)
    return CapturedEval(*settings, batch_size=config.eval_batch_size) if capture else EvalStep(*settings)


def evaluate_test(config: Config, model: nn.Module, data: DataSplits, device: torch.device,
                  step: EvalStep | None = None) -> EvalResult:
    """The test pass: `model` over `data`'s test split in batches of `eval_batch_size`, through `step` (a run's own,
    whose graph it reuses), by default an eager `build_eval_step` of `config`'s settings."""
    step = step or build_eval_step(config, model, len(data.classes), device, capture=False)
    return evaluate(model, DeviceLoader(data.test, config.eval_batch_size, device), len(data.classes), step=step)


# --- the whole run --------------------------------------------------------------------------------------------

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
    """What `fit` tells the outside world, and how it is asked to stop; every field is optional.

    Called on the host between steps: none of them may read a device tensor, or it would add a sync per step.
    """

    on_epoch_start: Callable[[int, int], None] | None = None  # (epoch, batches in it)
    on_batch: Callable[[], None] | None = None  # after each optimizer step
    on_epoch: Callable[[EpochResult, TrainState], None] | None = None  # after validation: the state to save
    should_stop: Callable[[], bool] = lambda: False  # polled every step; True raises Interrupted


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
    """`training` run alone, to its end."""
    return drive(training(config, model, data, device, hooks, resume))


def training(
    config: Config,
    model: nn.Module,
    data: DataSplits,
    device: torch.device,
    hooks: TrainHooks | None = None,
    resume: dict[str, Any] | None = None,
) -> TrainingSteps[FitResult]:
    """Train `model` (from `build_model`, on `device`) for `config.epochs`, keep the weights of the best
    validation epoch, and test them once at the end. With `whiten_stem` the stem's filters are first set from the
    training images (not on resume); with `ema_decay` the weights validated, tested and kept are the average;
    with `lookahead_steps` Lookahead wraps the optimizer.

    `resume` is a `TrainState.state_dict()`; training continues after its last completed epoch. When
    `hooks.should_stop` returns True, `Interrupted` is raised and the state of the last completed epoch stays as
    `hooks.on_epoch` last saw it.

    A generator that yields after every optimizer step (`fit` drives it alone; a `pack.Pack` interleaves several);
    its return value is the `FitResult`.
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
    step = build_step(config, model, device)
    state = TrainState.start(config, model, step.optimizer, generator, len(train_loader))
    if resume is not None:
        state.resume(resume)
        log.info("resuming after epoch %d of %d", state.epoch, config.epochs)
    after_step = state.after_step()
    # With ema_decay the averaged copy is what is validated, tested and kept; else the model trained.
    evaluated, kept = (state.average.model,) * 2 if state.average is not None else (step.model, model)
    val_step = build_eval_step(config, evaluated, num_classes, device)  # captured at the first validation

    for epoch in range(state.epoch + 1, config.epochs + 1):
        if hooks.on_epoch_start is not None:
            hooks.on_epoch_start(epoch, len(train_loader))
        start = time.perf_counter()
        train_loader.set_epoch(epoch)
        train_loss, train_acc = yield from train_one_epoch(step, train_loader, after_step, hooks)
        train_seconds = time.perf_counter() - start  # train_one_epoch ended on a sync, so this is honest
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"training loss became {train_loss} in epoch {epoch}; lower learning_rate "
                f"(now {config.learning_rate})"
            )
        val = evaluate(evaluated, val_loader, num_classes, step=val_step)
        is_best = state.keep_if_best(epoch, val.acc, kept)
        result = EpochResult(
            epoch, train_loss, train_acc, val.loss, val.acc,
            lr=float(state.scheduler.get_last_lr()[0]),  # a device tensor under a captured step: read once an epoch
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
    # The validation step (and its graph) where it evaluates the model tested; else one of the model tested.
    test_step = val_step if evaluated is step.model else build_eval_step(config, step.model, num_classes, device)
    test = evaluate_test(config, step.model, data, device, test_step)
    log.info("test (best epoch %d): loss %.4f acc %.2f%%", state.best_epoch, test.loss, 100 * test.acc)
    return FitResult(state.history, state.best_epoch, state.best_val_acc, test, model)
