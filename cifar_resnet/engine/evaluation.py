"""Evaluation: one batch's logits over its test-time views (`tta_logits`), its loss and confusion counts on the
device (`EvalStep`, or `CapturedEval` as one CUDA graph), a pass over a split (`evaluate`) and the test pass of a
run (`evaluate_test`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import Config
from ..data.images import DataSplits
from ..data.loader import DeviceLoader
from .capture import CAPTURE_WARMUP_STEPS, GraphCapture
from .device import autocast_context, memory_format_for, uses_cuda_graph
from .streams import CudaStreams, host_copies


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

    def close(self) -> None:
        """Nothing to give back (a `CapturedEval` gives back its graph and stream)."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """The batch's work, all on the device: what a graph captures."""
        images = images.contiguous(memory_format=self.memory_format)
        with self.autocast():
            logits = tta_logits(self.model, images, self.tta, self.translate_px)  # (B, classes) float32
        self.loss_sum.add_(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        # scatter_add_, not bincount: bincount reads its input's largest value back to the host (a sync per batch)
        self.confusion.scatter_add_(0, labels * self.num_classes + logits.argmax(1), torch.ones_like(labels))

    def result(self) -> EvalResult:
        loss_sum, confusion = host_copies([self.loss_sum, self.confusion])  # sync point: one read of both
        confusion = confusion.view(self.num_classes, self.num_classes)
        total = int(confusion.sum())
        return EvalResult(loss=loss_sum.item() / max(total, 1), acc=int(confusion.diag().sum()) / max(total, 1),
                          confusion=confusion)


class CapturedEval(GraphCapture[EvalStep]):
    """The same evaluation batch as one CUDA graph, for batches of `batch_size` images: an `EvalStep` of its own,
    whose work on static image and label buffers is captured once and replayed for every full batch. Evaluation is
    launch-bound on a large GPU as training is; a graph launches a pass's dozens of kernels (times its TTA views) at
    once.

    The first `warmup_steps` full batches run eagerly on a side stream, the next is captured and replayed; a batch
    of another size (a split's last, partial one) runs eagerly, which gives the same numbers. Whatever the capture
    cannot do (no CUDA, a GPU older than Volta, the capture raising) makes it evaluate eagerly from then on, after
    one warning with the reason. The graph reads the model's weights where they are: in-place updates (the
    optimizer's, the weight average's, `load_state_dict`) are seen by the next replay. `autocast` must have
    `cache_enabled=False`, as for `CapturedStep`.
    """

    DOING = "evaluating"

    def __init__(self, *args: Any, batch_size: int, warmup_steps: int = CAPTURE_WARMUP_STEPS,
                 streams: CudaStreams | None = None, **kwargs: Any) -> None:
        """`args` and `kwargs`: those of the `EvalStep` it builds and holds."""
        super().__init__(EvalStep(*args, **kwargs), warmup_steps, streams)
        self.batch_size = batch_size

    @property
    def model(self) -> nn.Module:
        return self.eager_step.model

    def zero_(self) -> None:
        self.eager_step.zero_()

    def result(self) -> EvalResult:
        return self.eager_step.result()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if self.eager or len(labels) != self.batch_size:
            return self.eager_step(images, labels)
        if self.graph is not None:
            return self.replay(images, labels)
        return self.warm_up_or_capture(images, labels)

    def captured(self) -> str:
        views = tta_views(self.eager_step.tta, self.eager_step.translate_px)
        return f"captured the evaluation batch ({self.batch_size} images, {views} views) as one CUDA graph"


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    memory_format: torch.memory_format = torch.contiguous_format,
    tta: bool = False,
    translate_px: int = 0,
    step: EvalStep | CapturedEval | None = None,
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
                    capture: bool | None = None, streams: CudaStreams | None = None) -> EvalStep | CapturedEval:
    """How a run of `config` evaluates `model`: its test-time views (`tta`, `tta_translate_px`), autocast and memory
    format; a `CapturedEval` for batches of `eval_batch_size` where the training step is captured too
    (`uses_cuda_graph`), unless `capture` says otherwise, else an `EvalStep`. A graph pays off over a run's
    validations; a single pass (`evaluate_test` alone) is not worth its warm-up and capture. `streams`: where a
    captured one takes its capture stream."""
    capture = uses_cuda_graph(config, device) if capture is None else capture
    autocast = autocast_context(config, device, cache_enabled=not capture)
    settings = (model, num_classes, autocast, memory_format_for(config, device), config.tta, config.tta_translate_px)
    if capture:
        return CapturedEval(*settings, batch_size=config.eval_batch_size, streams=streams)
    return EvalStep(*settings)


def evaluate_test(config: Config, model: nn.Module, data: DataSplits, device: torch.device,
                  step: EvalStep | CapturedEval | None = None) -> EvalResult:
    """The test pass: `model` over `data`'s test split in batches of `eval_batch_size`, through `step` (a run's own,
    whose graph it reuses), by default an eager `build_eval_step` of `config`'s settings."""
    step = step or build_eval_step(config, model, len(data.classes), device, capture=False)
    return evaluate(model, DeviceLoader(data.test, config.eval_batch_size, device), len(data.classes), step=step)
