"""CUDA graph capture by hand, what the captured training step (`step.CapturedStep`) and the captured evaluation
batch (`evaluation.CapturedEval`) share: each holds the eager step whose work on one batch it captures, and captures
it on a stream of its own (`streams.CudaStreams`), never on the capture stream torch shares between every capture of
a process."""

from __future__ import annotations

import logging
from typing import Any, Generic, Protocol, TypeVar

import torch

from .streams import CudaStreams

log = logging.getLogger(__name__)

CAPTURE_WARMUP_STEPS = 3  # eager steps on a side stream before the capture (PyTorch's CUDA Graphs notes use 3):
# they create the optimizer state and the cuDNN and cuBLAS workspaces, which must exist before a capture.
MIN_GRAPH_CAPABILITY = (7, 0)  # Volta: older GPUs lack the CUDA graph features the capture relies on


class EagerWork(Protocol):
    """The work on one batch, done eagerly, all on the device: what a `GraphCapture` captures."""

    memory_format: torch.memory_format

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None: ...


Work = TypeVar("Work", bound=EagerWork)


class GraphCapture(Generic[Work]):
    """What `CapturedStep` and `CapturedEval` share, whatever they capture: the eager step they hold (`eager_step`,
    which does every batch no graph does), the checks that a capture is possible here, the eager warm-up calls on a
    side stream (PyTorch's CUDA Graphs notes), the capture of the eager step's work on static buffers, its replays,
    and the fall back to the eager step for good, after one warning with the reason. A subclass decides, per batch,
    whether to replay, warm up or capture, or run it eagerly.

    The warm-up steps and the capture run on a stream taken from `streams` (the process's owner of streams; by default
    one of its own), which the graph holds until `close` or a fall back: cuBLAS keeps a workspace per stream, made by
    the warm-up, baked into the graph and freed when a graph captured on that stream is destroyed, so no two live
    graphs may share a capture stream (pytorch/pytorch#193402). Replays run on the caller's stream.
    """

    DOING = "running"  # the warning's first word: "training eagerly, ..."

    def __init__(self, eager_step: Work, warmup_steps: int = CAPTURE_WARMUP_STEPS,
                 streams: CudaStreams | None = None) -> None:
        self.eager_step = eager_step
        self.warmup_steps = warmup_steps
        self.streams = streams
        self.warmed_up = 0
        self.graph: Any = None  # torch.cuda.CUDAGraph once captured
        self.eager = False  # fell back for good
        self.static_images: torch.Tensor | None = None
        self.static_labels: torch.Tensor | None = None
        self.side_stream: Any = None

    def fall_back(self, reason: str) -> None:
        """Work eagerly from now on: the graph (and its memory pool) and the capture stream are given back at once,
        not held until `close`."""
        log.warning("%s eagerly, without a CUDA graph: %s", self.DOING, reason)
        self.close()

    def prepare(self, images: torch.Tensor) -> bool:
        """Check that a capture is possible here and make the side stream; False (after the warning) if not."""
        try:
            if images.device.type != "cuda":
                raise RuntimeError(f"the device is {images.device.type}, not CUDA")
            capability = torch.cuda.get_device_capability(images.device)
            if capability < MIN_GRAPH_CAPABILITY:
                raise RuntimeError(f"GPU compute capability {capability} is below {MIN_GRAPH_CAPABILITY}")
            self.streams = self.streams or CudaStreams(images.device)
            self.side_stream = self.streams.take(f"the capture of the {self.DOING} step")
            if self.side_stream is None:
                raise RuntimeError("no CUDA stream is free for the capture")
        except Exception as error:  # any reason at all: the work goes on eagerly
            self.fall_back(f"{type(error).__name__}: {error}")
            return False
        return True

    def warm_up_or_capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Before the graph exists, each call runs its batch as a warm-up step, or as the capture's, or eagerly when
        no capture is possible here."""
        if self.side_stream is None and not self.prepare(images):
            self.eager_step(images, labels)
        elif self.warmed_up < self.warmup_steps:
            self.warm_up(images, labels)
        else:
            self.capture(images, labels)

    def warm_up(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.side_stream.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(self.side_stream):
            self.eager_step(images, labels)
        torch.cuda.current_stream(images.device).wait_stream(self.side_stream)
        self.warmed_up += 1

    def capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Capture the eager step's work on the static buffers as `self.graph` and replay it for this batch; if the
        capture raises, fall back and run this batch eagerly."""
        # The buffers the graph reads, filled with this batch: every replay copies its batch into them.
        self.static_images = torch.empty_like(images, memory_format=self.eager_step.memory_format).copy_(images)
        self.static_labels = labels.clone()
        try:
            graph = torch.cuda.CUDAGraph()
            self.clear_for_capture()
            # On the stream of the warm-up, which made the workspaces the graph bakes in: its own, never torch's
            # default capture stream, which every capture in the process shares.
            with torch.cuda.graph(graph, stream=self.side_stream):
                self.eager_step(self.static_images, self.static_labels)  # in its memory format already: no copy
        except Exception as error:  # nothing ran: a capture records kernels without running them
            self.clear_for_capture()  # what the failed capture left behind
            self.fall_back(f"the capture failed: {type(error).__name__}: {error}")
            self.eager_step(images, labels)
            return
        self.graph = graph
        graph.replay()  # this call's own batch
        log.info("%s", self.captured())

    def clear_for_capture(self) -> None:
        """What must be cleared before a capture, and again after a failed one; nothing by default."""

    def captured(self) -> str:
        """The line logged once the capture is done."""
        raise NotImplementedError

    def close(self) -> None:
        """The graph is done with: once the caller's stream (where it replays) has finished its work, destroy it and
        give its capture stream back; eager from then on. The run's end calls it, however the run ends."""
        self.eager = True  # no capture again: the stream is given back
        if self.side_stream is None:
            return
        if self.graph is not None:
            torch.cuda.current_stream(self.side_stream.device).synchronize()
            self.graph.reset()
            self.graph = None
        self.streams.give_back(self.side_stream)  # synchronises the capture stream (its warm-up work)
        self.side_stream = None

    def replay(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.static_images.copy_(images)  # also converts to the captured memory format
        self.static_labels.copy_(labels)
        self.graph.replay()
