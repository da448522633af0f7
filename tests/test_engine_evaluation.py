"""Evaluation (engine/evaluation.py): the evaluation step, eager or captured, gives the previous evaluation's
results on the CPU and falls back to eager batches once; test-time views (mirrored pairs, shifted views), one
forward pass per view. (The captured evaluation on a GPU: tests/test_gpu_graph.py.)"""

from __future__ import annotations

import logging

import pytest
import torch
from helpers.engine import one_epoch, pretend_a_gpu_until_the_capture, training_parts
from torch import nn

from cifar_resnet.data.images import ImageSet
from cifar_resnet.data.loader import DeviceLoader
from cifar_resnet.data.sources import load_splits
from cifar_resnet.engine.evaluation import CapturedEval, EvalStep, evaluate, tta_logits, tta_views

CPU = torch.device("cpu")


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


def reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect-pad index arithmetic: -1 -> 1, size -> size - 2."""
    return torch.where(index < 0, -index, torch.where(index >= size, 2 * (size - 1) - index, index))


@pytest.mark.quick
def test_translated_tta_averages_the_mirrored_pairs_of_three_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))  # sees every pixel where it is
    images = torch.randn(4, 3, 8, 8)
    rows = torch.arange(8)

    def shifted(by: int) -> torch.Tensor:  # the view whose pixel (i, j) is the image's (i + by, j + by), reflected
        index = reflect(rows + by, 8)
        return images[:, :, index][:, :, :, index]

    def pair(views: torch.Tensor) -> torch.Tensor:
        return (model(views) + model(views.flip(3))) / 2

    expected = pair(images) / 2 + (pair(shifted(-1)) + pair(shifted(1))) / 4
    with torch.no_grad():
        assert torch.allclose(tta_logits(model, images, tta=True, translate_px=1), expected, atol=1e-6)
        assert torch.allclose(tta_logits(model, images, tta=True, translate_px=0), pair(images))
        assert torch.allclose(tta_logits(model, images, tta=False, translate_px=1), model(images))


@pytest.mark.quick
@pytest.mark.parametrize(("tta", "translate_px", "views"), [(False, 0, 1), (True, 0, 2), (True, 1, 6)])
def test_evaluate_runs_one_forward_pass_per_view(tta, translate_px, views):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    data = ImageSet(torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.zeros(10, dtype=torch.int64))
    evaluate(model, DeviceLoader(data, 10, CPU), 10, tta=tta, translate_px=translate_px)
    assert len(calls) == views == tta_views(tta, translate_px)
