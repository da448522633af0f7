"""The device and what a run builds on it (engine/device.py): the device setting's forms and the GPU it selects,
the optimizer's parameter groups (weight decay, the batch-norm learning rate, Adam's betas) and the schedule's
shape."""

from __future__ import annotations

import itertools

import pytest
import torch

from cifar_resnet.config import Config
from cifar_resnet.engine.device import build_model, build_optimizer, build_scheduler, select_device
from cifar_resnet.errors import ConfigError
from cifar_resnet.model import CIFAR10CNN

CPU = torch.device("cpu")


@pytest.mark.parametrize("device", ["cudafoo", "cuda:", "cuda:-1", "cuda:x", "CUDA", "cuda:0 ", "gpu", "cpu:0"])
def test_a_bad_device_is_a_config_error(device):
    with pytest.raises(ConfigError, match=r"^device: .* is not one of auto, cpu, cuda, cuda:N \(N a GPU index"):
        Config(device=device)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_good_devices_pass_validation(device):
    assert Config(device=device).device == device


def test_a_gpu_index_beyond_the_visible_gpus_is_one_line(monkeypatch):
    # This machine may have no GPU: pretend it has one, as torch would report it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert select_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match=r"^device: 'cuda:3' asked for, but this machine shows 1 GPU\(s\): "
                                          r"use cuda:0 to cuda:0, cuda or auto$"):
        select_device("cuda:3")


def test_an_unknown_optimizer_name_is_refused_not_replaced(tiny_config):
    config = tiny_config.replace(optimizer="sgd")
    object.__setattr__(config, "optimizer", "lamb")  # past the config's own check, as a caller's typo would be
    with pytest.raises(ConfigError, match="optimizer: 'lamb' is not one of adam, adamw, sgd"):
        build_optimizer(config, CIFAR10CNN(width=8), torch.device("cpu"))


def test_an_unknown_schedule_name_is_refused_not_replaced(tiny_config):
    config = tiny_config.replace(lr_schedule="cosine", warmup_epochs=0, warmup_fraction=0.0)
    object.__setattr__(config, "lr_schedule", "step")  # past the config's own check, as a caller's typo would be
    with pytest.raises(ConfigError, match="lr_schedule: 'step' is not one of constant, cosine, onecycle"):
        build_scheduler(config, build_optimizer(config, CIFAR10CNN(width=8), torch.device("cpu")), 10)


@pytest.mark.quick
def test_weight_decay_skips_batch_norm_and_biases():
    model = CIFAR10CNN(width=8)
    optimizer = build_optimizer(Config(weight_decay=5e-4), model, torch.device("cpu"))
    decayed, exempt = optimizer.param_groups
    assert decayed["weight_decay"] == 5e-4 and exempt["weight_decay"] == 0.0
    assert all(p.ndim == 4 or p.ndim == 2 for p in decayed["params"])  # conv and linear weights
    assert {id(p) for p in exempt["params"]} == {id(p) for p in model.parameters() if p.ndim == 1}


@pytest.mark.quick
@pytest.mark.parametrize("graph", [False, True])
def test_norm_lr_scale_and_adams_betas_reach_the_optimizer_and_follow_the_schedule(graph):
    config = Config(width=8, learning_rate=0.01, norm_lr_scale=8, adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-6,
                    epochs=2, warmup_epochs=1, lr_schedule="onecycle")
    model = build_model(config, 10, CPU)
    optimizer = build_optimizer(config, model, CPU, graph=graph)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch=4)
    weights, norms = optimizer.param_groups
    assert weights["betas"] == (0.8, 0.95) and weights["eps"] == 1e-6
    assert all(p.ndim == 1 for p in norms["params"])
    if graph:  # a tensor of its own per group: the scheduler fills each with its own rate
        assert weights["lr"] is not norms["lr"]
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        assert float(norms["lr"]) == pytest.approx(8 * float(weights["lr"]), rel=1e-6) and float(weights["lr"]) > 0


def lr_per_step(config: Config, steps_per_epoch: int) -> list[float]:
    """The learning rate each optimizer step of a whole run uses, from the engine's own scheduler."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    lrs = []
    for _ in range(steps_per_epoch * config.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.quick
@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_schedule_warms_up_to_the_learning_rate_then_decays(schedule):
    steps_per_epoch = 10
    config = Config(lr_schedule=schedule, warmup_epochs=1, warmup_fraction=1, epochs=4, learning_rate=0.05)
    lrs = lr_per_step(config, steps_per_epoch)
    warmup, decay = lrs[:steps_per_epoch], lrs[steps_per_epoch:]
    assert all(a < b for a, b in itertools.pairwise(warmup))
    assert max(lrs) == pytest.approx(config.learning_rate) and warmup[-1] == pytest.approx(config.learning_rate)
    assert all(a >= b for a, b in itertools.pairwise(decay)) and decay[1] < config.learning_rate
    assert decay[-1] < 0.05 * config.learning_rate


@pytest.mark.quick
def test_writeup_schedule_is_constant():
    assert lr_per_step(Config(recipe="writeup", learning_rate=0.01, epochs=2), 5) == [0.01] * 10


@pytest.mark.quick
@pytest.mark.parametrize(("epochs", "warmup_steps"), [(1, 1), (2, 2), (10, 10), (20, 10)])
def test_tuned_warm_up_is_a_tenth_of_a_short_run_and_at_most_one_epoch(epochs, warmup_steps):
    """A 1-epoch run of the tuned recipe must not spend the whole run warming up."""
    steps_per_epoch = 10
    config = Config(epochs=epochs, learning_rate=0.05)
    lrs = lr_per_step(config, steps_per_epoch)
    peak = lrs.index(max(lrs))
    assert peak == warmup_steps - 1 and max(lrs) == pytest.approx(config.learning_rate)
    assert lrs[-1] < 0.2 * config.learning_rate  # and then decays


@pytest.mark.quick
@pytest.mark.parametrize(("warmup_epochs", "warmup_fraction"), [(2.0, 0.2), (2.5, 0.25), (3.0, 0.3)])
def test_the_onecycle_peak_at_20_to_30_percent_of_the_run_is_the_two_warm_up_settings(warmup_epochs, warmup_fraction):
    """A 10-epoch run at batch 128 (351 steps an epoch): the peak falls at that fraction of its 3,510 steps."""
    steps_per_epoch = 45_000 // 128
    config = Config(epochs=10, learning_rate=0.05, warmup_epochs=warmup_epochs, warmup_fraction=warmup_fraction)
    lrs = lr_per_step(config, steps_per_epoch)
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(config.learning_rate)
    assert (peak + 1) / len(lrs) == pytest.approx(warmup_fraction, abs=1 / len(lrs))
