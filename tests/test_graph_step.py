"""The training step and the evaluation batch that CUDA captures, on the CPU: the same results as the loops they
replaced, and the fallback to eager work when a capture is not possible (one warning, then it goes on).

The capture itself needs a GPU: tests/test_gpu_graph.py (marked gpu) compares the graphs against eager steps there.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from torch import nn

from cifar_resnet.data.loader import DeviceLoader
from cifar_resnet.data.sources import load_splits
from cifar_resnet.engine import evaluation
from cifar_resnet.engine import step as training_step
from cifar_resnet.engine.device import build_model, build_optimizer, build_scheduler, keep_graph_settings
from cifar_resnet.engine.evaluation import CapturedEval, EvalStep, evaluate, tta_logits
from cifar_resnet.engine.loop import drive, fit, train_one_epoch
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


def training_parts(config, graph=False):
    data = load_splits(config)
    model = build_model(config, len(data.classes), CPU)
    loader = DeviceLoader(data.train, config.batch_size, CPU, generator=torch.Generator().manual_seed(1), augment=True)
    optimizer = build_optimizer(config, model, CPU, graph=graph)
    scheduler = build_scheduler(config, optimizer, len(loader))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    return model, loader, optimizer, scheduler, loss_fn


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


def one_epoch(model, loader, optimizer, scheduler, loss_fn, step=None):
    """The engine's `train_one_epoch`, driven alone, with an eager step unless one is given."""
    step = step or EagerStep(model, optimizer, loss_fn, contextlib.nullcontext)
    return drive(train_one_epoch(step, loader, [scheduler.step]))


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


def pretend_a_gpu_until_the_capture(monkeypatch, captured) -> None:
    """As if on a GPU: the side stream exists and the warm-up steps run (eagerly, here); then the capture raises,
    because there is no CUDA."""
    def pretend_prepare(self, images):
        self.side_stream = object()
        return True

    def eager_warm_up(self, images, labels):
        self.eager_step(images, labels)
        self.warmed_up += 1

    monkeypatch.setattr(captured, "prepare", pretend_prepare)
    monkeypatch.setattr(captured, "warm_up", eager_warm_up)


def test_a_capture_that_raises_falls_back_once_and_loses_no_step(tiny_config, caplog, monkeypatch):
    """The capture raises after the warm-up steps: that batch is trained eagerly and so is every later one."""
    pretend_a_gpu_until_the_capture(monkeypatch, CapturedStep)
    eager_result, eager_model, _ = epoch_with(EagerStep, tiny_config)
    with caplog.at_level(logging.WARNING, logger="cifar_resnet.engine"):
        result, model, step = epoch_with(CapturedStep, tiny_config, warmup_steps=2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "the capture failed" in warnings[0]
    assert step.eager and step.warmed_up == 2
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


# --- evaluation ---------------------------------------------------------------------------------------------------


@torch.inference_mode()
def previous_evaluate(model, loader, num_classes, tta, translate_px):
    """evaluate as it was before the evaluation step was factored out (commit b142e91), kept as the reference."""
    model.eval()
    loss_sum = torch.zeros(())
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    for images, labels in loader:
        logits = tta_logits(model, images, tta, translate_px)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
        confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
    confusion = confusion.view(num_classes, num_classes)
    total = int(confusion.sum())
    return loss_sum.item() / total, int(confusion.diag().sum()) / total, confusion


def trained_model_and_val_loader(config, eval_batch_size):
    """A model after one epoch (its predictions are not all one class) and the validation split in batches that
    end with a partial one."""
    model, loader, optimizer, scheduler, loss_fn = training_parts(config)
    one_epoch(model, loader, optimizer, scheduler, loss_fn)
    val = load_splits(config).val
    assert len(val) % eval_batch_size != 0
    return model, DeviceLoader(val, eval_batch_size, CPU)


@pytest.mark.parametrize("tta, translate_px", [(False, 0), (True, 0), (True, 2)])
def test_the_evaluation_step_gives_the_previous_evaluations_results_bit_for_bit(tiny_config, tta, translate_px):
    model, loader = trained_model_and_val_loader(tiny_config, eval_batch_size=64)
    loss, acc, confusion = previous_evaluate(model, loader, 10, tta, translate_px)
    step = EvalStep(model, 10, tta=tta, translate_px=translate_px)
    for _ in range(2):  # the totals start from zero on every pass
        got = evaluate(model, loader, 10, step=step)
        assert (got.loss, got.acc) == (loss, acc) and torch.equal(got.confusion, confusion)
    assert 0.0 < acc < 1.0


def test_evaluation_capture_on_a_cpu_warns_once_and_evaluates_eagerly(tiny_config, caplog):
    model, loader = trained_model_and_val_loader(tiny_config, eval_batch_size=64)
    expected = evaluate(model, loader, 10, tta=True)
    step = CapturedEval(model, 10, tta=True, batch_size=64)
    with caplog.at_level(logging.WARNING, logger="cifar_resnet.engine"):
        results = [evaluate(model, loader, 10, step=step) for _ in range(2)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["evaluating eagerly, without a CUDA graph: RuntimeError: the device is cpu, not CUDA"]
    assert step.eager and step.graph is None
    for got in results:
        assert (got.loss, got.acc) == (expected.loss, expected.acc) and torch.equal(got.confusion, expected.confusion)


def test_an_evaluation_capture_that_raises_falls_back_once_and_loses_no_batch(tiny_config, caplog, monkeypatch):
    """The capture raises after the warm-up batches: that batch is evaluated eagerly, as is every later one; the
    last, partial batch of each pass never counts towards the warm-up or the capture."""
    pretend_a_gpu_until_the_capture(monkeypatch, CapturedEval)
    model, loader = trained_model_and_val_loader(tiny_config, eval_batch_size=64)  # 3 full batches, 1 partial
    expected = evaluate(model, loader, 10)
    step = CapturedEval(model, 10, batch_size=64, warmup_steps=2)
    with caplog.at_level(logging.WARNING, logger="cifar_resnet.engine"):
        got = evaluate(model, loader, 10, step=step)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "the capture failed" in warnings[0]
    assert step.eager and step.warmed_up == 2
    assert (got.loss, got.acc) == (expected.loss, expected.acc) and torch.equal(got.confusion, expected.confusion)
    assert int(got.confusion.sum()) == len(loader.data)  # every image once: nothing skipped, nothing twice
