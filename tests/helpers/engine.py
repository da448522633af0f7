"""The engine's training parts, built as a run builds them on the CPU; an epoch driven alone; and a GPU pretended
until a CUDA graph capture, which then fails as it does without CUDA."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from cifar_resnet.data.loader import DeviceLoader
from cifar_resnet.data.sources import load_splits
from cifar_resnet.engine.device import build_model, build_optimizer, build_scheduler
from cifar_resnet.engine.loop import drive, train_one_epoch
from cifar_resnet.engine.step import EagerStep

CPU = torch.device("cpu")


def training_parts(config, graph=False):
    data = load_splits(config)
    model = build_model(config, len(data.classes), CPU)
    loader = DeviceLoader(data.train, config.batch_size, CPU, generator=torch.Generator().manual_seed(1), augment=True)
    optimizer = build_optimizer(config, model, CPU, graph=graph)
    scheduler = build_scheduler(config, optimizer, len(loader))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    return model, loader, optimizer, scheduler, loss_fn


def one_epoch(model, loader, optimizer, scheduler, loss_fn, step=None):
    """The engine's `train_one_epoch`, driven alone, with an eager step unless one is given."""
    step = step or EagerStep(model, optimizer, loss_fn, contextlib.nullcontext)
    return drive(train_one_epoch(step, loader, [scheduler.step]))


class PretendStreams:
    """The owner of a pretended capture stream (a stand-in for `CudaStreams`, which has no streams without CUDA):
    the streams given back to it."""

    def __init__(self) -> None:
        self.given_back: list[object] = []

    def give_back(self, stream: object) -> None:
        self.given_back.append(stream)


def pretend_a_gpu_until_the_capture(monkeypatch, captured) -> None:
    """As if on a GPU: the side stream exists (taken from a `PretendStreams`) and the warm-up steps run (eagerly,
    here); then the capture raises, because there is no CUDA."""
    def pretend_prepare(self, images):
        self.streams = PretendStreams()
        self.side_stream = object()
        return True

    def eager_warm_up(self, images, labels):
        self.eager_step(images, labels)
        self.warmed_up += 1

    monkeypatch.setattr(captured, "prepare", pretend_prepare)
    monkeypatch.setattr(captured, "warm_up", eager_warm_up)
