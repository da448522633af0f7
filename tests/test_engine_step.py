"""The training step (engine/step.py) and its CUDA graph capture (engine/capture.py), on the CPU: the same results
as the loop it replaced, a tensor learning rate the schedule fills in place, and the fallback to eager steps when a
capture is not possible (one warning, then it goes on).

The capture itself needs a GPU: tests/test_gpu_graph.py (marked gpu) compares the graphs against eager steps there."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from helpers.engine import one_epoch, pretend_a_gpu_until_the_capture, training_parts

from cifar_resnet.data.sources import load_splits
from cifar_resnet.engine import evaluation
from cifar_resnet.engine import step as training_step
from cifar_resnet.engine.device import build_model, keep_graph_settings
from cifar_resnet.engine.loop import fit
from cifar_resnet.engine.step import CapturedStep, EagerStep

CPU = torch.device("cpu")


def previous_loop(model, loader, optimizer, scheduler, loss_fn):
    """The epoch loop as it was before the step function was factored out (commit f3a9ba0), kept as the reference."""
    model.train()
    loss_sum = torch.zeros(())
    correct = torch.zeros((), dtype=torch.int64)
    seen = 0
    for images, labels in loader:
        logits = model(images)
        loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach().float() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
    return loss_sum.item() / seen, correct.item() / seen


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_the_step_function_gives_the_previous_loops_results_bit_for_bit(tiny_config, optimizer):
    config = tiny_config.replace(optimizer=optimizer, weight_decay=5e-4)
    reference = training_parts(config)
    ours = training_parts(config)
    for _ in range(2):
        expected = previous_loop(*reference)
        got = one_epoch(*ours)
        assert got == expected
    for a, b in zip(reference[0].state_dict().values(), ours[0].state_dict().values(), strict=True):
        assert torch.equal(a, b)


def epoch_with(step_class, config, **step_options):
    model, loader, optimizer, scheduler, loss_fn = training_parts(config)
    step = step_class(model, optimizer, loss_fn, contextlib.nullcontext, **step_options)
    result = one_epoch(model, loader, optimizer, scheduler, loss_fn, step)
    return result, model, step


def test_capture_on_a_cpu_warns_once_and_trains_eagerly(tiny_config, caplog):
    eager_result, eager_model, _ = epoch_with(EagerStep, tiny_config)
    with caplog.at_level(logging.WARNING, logger="cifar_resnet.engine"):
        result, model, step = epoch_with(CapturedStep, tiny_config)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "without a CUDA graph" in warnings[0] and "not CUDA" in warnings[0]
    assert step.eager and step.graph is None
    assert result == eager_result
    for a, b in zip(eager_model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_capture_that_raises_falls_back_once_and_loses_no_step(tiny_config, caplog, monkeypatch):
    """The capture raises after the warm-up steps: that batch is trained eagerly and so is every later one."""
    pretend_a_gpu_until_the_capture(monkeypatch, CapturedStep)
    eager_result, eager_model, _ = epoch_with(EagerStep, tiny_config)
    with caplog.at_level(logging.WARNING, logger="cifar_resnet.engine"):
        result, model, step = epoch_with(CapturedStep, tiny_config, warmup_steps=2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "the capture failed" in warnings[0]
    assert step.eager and step.warmed_up == 2
    assert step.side_stream is None and len(step.streams.given_back) == 1  # given back at the fall back, not at close
    assert result == eager_result  # same steps, same order: nothing skipped, nothing done twice
    for a, b in zip(eager_model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_tensor_learning_rate_follows_the_schedule_in_place(tiny_config, optimizer):
    config = tiny_config.replace(optimizer=optimizer, lr_schedule="onecycle", warmup_epochs=1)
    model, loader, opt, scheduler, loss_fn = training_parts(config, graph=True)
    float_parts = training_parts(config)
    lr_tensors = [group["lr"] for group in opt.param_groups]
    assert all(isinstance(lr, torch.Tensor) for lr in lr_tensors)
    for _ in range(config.epochs):
        got = one_epoch(model, loader, opt, scheduler, loss_fn)
        expected = one_epoch(*float_parts)
        # a float32 rate against a Python float: the same up to rounding (one flipped prediction at most)
        assert got[0] == pytest.approx(expected[0], rel=1e-3) and got[1] == pytest.approx(expected[1], abs=0.01)
        # the very tensors a graph captured, refilled by the schedule, never replaced
        assert [group["lr"] for group in opt.param_groups] == lr_tensors
        assert float(lr_tensors[0]) == pytest.approx(float_parts[2].param_groups[0]["lr"], rel=1e-6, abs=1e-12)
    assert float(lr_tensors[0]) == pytest.approx(0.0, abs=1e-6)  # onecycle ends at zero


def test_resuming_keeps_the_captured_learning_rate_tensor_and_flags(tiny_config):
    config = tiny_config.replace(optimizer="adam")
    model, loader, opt, scheduler, loss_fn = training_parts(config, graph=True)
    one_epoch(model, loader, opt, scheduler, loss_fn)
    saved = opt.state_dict()
    eager_saved = training_parts(config)[2].state_dict()  # a checkpoint of an eager run: a float rate

    for checkpoint in (saved, eager_saved):
        fresh_model, _, fresh, _, _ = training_parts(config, graph=True)
        own_lr = fresh.param_groups[0]["lr"]
        own_lr.fill_(123.0)
        built = [dict(group) for group in fresh.param_groups]
        fresh.load_state_dict(checkpoint)
        keep_graph_settings(fresh, built)
        assert fresh.param_groups[0]["lr"] is own_lr
        assert float(own_lr) == pytest.approx(float(checkpoint["param_groups"][0]["lr"]))


@pytest.mark.parametrize("candidates", [
    {},
    {"norm_lr_scale": 4.0, "ema_decay": 0.9, "alternating_flip": True},
    {"optimizer": "sgd", "learning_rate": 0.01, "sgd_norm_lr_scale": 16.0, "momentum": 0.9, "ema_decay": 0.9,
     "lookahead_steps": 4},
], ids=["tuned", "two-rates-and-an-average", "sgd-with-lookahead-and-an-average"])
def test_fit_on_the_graph_path_trains_like_the_eager_path(tiny_config, monkeypatch, caplog, candidates):
    """fit as on CUDA (a tensor learning rate per group, CapturedStep), on the CPU: it warns once and trains
    eagerly; the Lookahead and the weight average are updated between the steps as on the eager path."""
    config = tiny_config.replace(**candidates)
    eager = fit(config, build_model(config, 10, CPU), load_splits(config), CPU)
    for module in (training_step, evaluation):  # where build_step and build_eval_step look it up
        monkeypatch.setattr(module, "uses_cuda_graph", lambda config, device: True)
    with caplog.at_level(logging.WARNING, logger="cifar_resnet.engine"):
        graph = fit(config, build_model(config, 10, CPU), load_splits(config), CPU)
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1
    for got, expected in zip(graph.history, eager.history, strict=True):
        for name in ("train/loss", "lr"):
            assert got[name] == pytest.approx(expected[name], rel=1e-3, abs=1e-6)
        # A few of the 200 validation images near a tie can flip with float rounding (the tensor learning rate):
        # the losses above are the tight check.
        assert got["val/acc"] == pytest.approx(expected["val/acc"], abs=0.03)
        assert isinstance(got["lr"], float)
    assert graph.test.acc == pytest.approx(eager.test.acc, abs=0.02)
