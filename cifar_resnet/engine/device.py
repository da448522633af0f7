"""The device a run trains on, and what a run of a config builds for it: the model, the optimizer (and what a
checkpoint must not change in it), the learning-rate schedule, the memory format, autocast, and whether the step is
captured as a CUDA graph by hand or compiled."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import LR_SCHEDULES, OPTIMIZERS, Config
from ..errors import ConfigError
from ..model import CIFAR10CNN, zero_init_residual


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
    if config.lr_schedule == "onecycle":
        return 1.0 - progress  # linear decay to zero after the warm-up
    raise ConfigError(f"lr_schedule: {config.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")


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


def uses_cuda_graph(config: Config, device: torch.device) -> bool:
    """Whether a run captures its step by hand: on CUDA with cuda_graph, unless torch.compile does the graphs."""
    return config.cuda_graph and device.type == "cuda" and not config.compile


def compile_mode(config: Config, device: torch.device) -> str | None:
    """torch.compile's mode for the run, or None when it is not compiled."""
    if not config.compile:
        return None
    return "reduce-overhead" if config.cuda_graph and device.type == "cuda" else "default"
