"""One training step: forward, backward and optimizer step on a batch (`train_step`), run eagerly (`EagerStep`) or
captured once as a CUDA graph and replayed (`CapturedStep`), and its builder for a run (`build_step`). The training
loop drives a step through its `run` (`yield from step.run(images, labels)`), which a fused group's member
(`packing.fused.FusedMember`) has too."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator
from typing import Any, TypeVar

import torch
from torch import nn

from ..config import Config
from .capture import CAPTURE_WARMUP_STEPS, GraphCapture
from .device import autocast_context, build_optimizer, compile_mode, memory_format_for, uses_cuda_graph
from .streams import CudaStreams

T = TypeVar("T")
# A run's training, one epoch of it or one step, as a generator that yields after every optimizer step and returns
# its result: `loop.drive` runs one alone; `packing.pack.Pack` steps several in turn on one device.
TrainingSteps = Generator[None, None, T]


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


class StepOnce:
    """What the training loop calls: `run`, one optimizer step on a batch, then one yield."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        raise NotImplementedError

    def run(self, images: torch.Tensor, labels: torch.Tensor) -> TrainingSteps[None]:
        """This batch's optimizer step, then one yield: the loop drives it with `yield from`, as it drives a fused
        member's, which yields until its group has stepped."""
        self(images, labels)
        yield

    def close(self) -> None:
        """The run is done with the step (a captured one gives its graph and stream back)."""


class EagerStep(StepOnce):
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


class CapturedStep(GraphCapture[EagerStep], StepOnce):
    """The same step as one CUDA graph: an `EagerStep` of its own, whose work on static image and label buffers is
    captured once and replayed every call.

    The first `warmup_steps` calls train eagerly on a side stream; the next captures the step (and the accumulation
    into `totals`) and replays it for its own batch; every later call copies its batch into the static buffers and
    replays. These are real training steps: a run takes as many steps as an eager one. Whatever the capture cannot
    do (no CUDA, a GPU older than Volta, a batch of another shape, the capture raising) makes it train eagerly from
    then on, after one warning with the reason.
    The optimizer must come from `build_optimizer(..., graph=True)` and `autocast` use `cache_enabled=False`.
    """

    DOING = "training"

    def __init__(self, *args: Any, warmup_steps: int = CAPTURE_WARMUP_STEPS, streams: CudaStreams | None = None,
                 **kwargs: Any) -> None:
        """`args` and `kwargs`: those of the `EagerStep` it builds and holds."""
        super().__init__(EagerStep(*args, **kwargs), warmup_steps, streams)
        self.capture_seconds = 0.0  # the warm-up steps and the capture, with the syncs they need

    # What `train_one_epoch` and `fit_steps` read of a step (and the GPU tests its `loss`), as the eager step holds
    # it. Once captured, `loss` and `totals` are tensors the graph writes on every replay.
    @property
    def model(self) -> nn.Module:
        return self.eager_step.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.eager_step.optimizer

    @property
    def totals(self) -> StepTotals:
        return self.eager_step.totals

    @property
    def loss(self) -> torch.Tensor | None:
        return self.eager_step.loss

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if self.eager:
            return self.eager_step(images, labels)
        if self.graph is not None:
            if images.shape != self.static_images.shape or labels.shape != self.static_labels.shape:
                self.fall_back(f"a batch of shape {tuple(images.shape)}, captured {tuple(self.static_images.shape)}")
                return self.eager_step(images, labels)
            return self.replay(images, labels)
        started = time.perf_counter()
        self.warm_up_or_capture(images, labels)
        self.capture_seconds += time.perf_counter() - started
        return None

    def clear_for_capture(self) -> None:
        # Before the capture, backward must allocate the gradients in the graph's pool; after a failed one, drop
        # gradients that point into that pool.
        self.optimizer.zero_grad(set_to_none=True)

    def captured(self) -> str:
        return (f"captured the training step as one CUDA graph ({self.warmed_up} warm-up steps and the capture: "
                f"{self.capture_seconds:.2f} s)")


def build_step(config: Config, model: nn.Module, device: torch.device, fused: bool | None = None,
               mode: str | None = None, streams: CudaStreams | None = None) -> EagerStep | CapturedStep:
    """The training step of a run of `config` on `model` (from `build_model`): the model under torch.compile when
    `compile` says so (`step.model`; state dicts stay those of `model`), its optimizer (`step.optimizer`), the loss,
    autocast and memory format; a `CapturedStep` on CUDA with cuda_graph (captured in the first epoch trained), else
    an `EagerStep`.

    The one builder of the step, for a run (`fit_steps`) and the benchmark, whose variants each change one option from
    a run's: `fused` (the optimizer's; default fused on CUDA) and `mode` (torch.compile's; default `compile_mode`'s).
    `streams`: where a captured step takes its capture stream (the process's owner of streams).
    """
    graph = uses_cuda_graph(config, device)
    optimizer = build_optimizer(config, model, device, fused=fused, graph=graph)
    mode = mode or compile_mode(config, device)
    step_model = torch.compile(model, mode=mode) if mode else model
    autocast = autocast_context(config, device, cache_enabled=not graph)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    settings = (step_model, optimizer, loss_fn, autocast, memory_format_for(config, device))
    return CapturedStep(*settings, streams=streams) if graph else EagerStep(*settings)
