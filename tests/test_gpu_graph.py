"""The training step captured as one CUDA graph against the eager step, on a GPU (marked gpu; skipped without
CUDA): the same first 50 losses within bf16's tolerance, Adam, AdamW and SGD captured for real, and a whole short
run's test accuracy within 0.5 points; the same with the recipe candidates that touch the step or run
beside it. The evaluation batch captured as a graph gives the eager evaluation's results.

The data: the JPEG copy of CIFAR-10 in CIFAR10_JPEG_DIR (benchmarks/gpu_check.sh exports it), else synthetic.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn

from cifar_resnet.config import Config
from cifar_resnet.data.loader import DeviceLoader
from cifar_resnet.data.sources import load_splits
from cifar_resnet.engine.averaging import Lookahead
from cifar_resnet.engine.device import (
    autocast_context,
    build_model,
    build_optimizer,
    build_scheduler,
    memory_format_for,
)
from cifar_resnet.engine.evaluation import CapturedEval, EvalStep, evaluate
from cifar_resnet.engine.loop import fit
from cifar_resnet.engine.step import CapturedStep, EagerStep

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

COMPARED_STEPS = 50
# bf16 autocast keeps 8 bits of mantissa; two equal computations may take different kernels (a graph replays the
# ones captured), and the difference grows a little with every step.
LOSS_RTOL, LOSS_ATOL = 0.03, 0.02
FIRST_LOSS_RTOL = 1e-3  # the first step has the same weights and the same batch
ACCURACY_TOLERANCE = 0.005  # 0.5 points of test accuracy
SHORT_RUN_EPOCHS = 4


def data_config(**changes) -> Config:
    folder = os.environ.get("CIFAR10_JPEG_DIR")
    source = {"dataset": "imagefolder", "data_dir": folder} if folder else {"dataset": "synthetic"}
    return Config(device="cuda", **source).replace(**changes)


def losses(config: Config, graph: bool, steps: int) -> tuple[list[float], object]:
    device = torch.device("cuda")
    data = load_splits(config)
    model = build_model(config, len(data.classes), device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    loader = DeviceLoader(data.train, config.batch_size, device, generator=generator, augment=True)
    optimizer = build_optimizer(config, model, device, graph=graph)
    scheduler = build_scheduler(config, optimizer, len(loader))
    autocast = autocast_context(config, device, cache_enabled=not graph)
    step = (CapturedStep if graph else EagerStep)(model, optimizer, nn.CrossEntropyLoss(
        label_smoothing=config.label_smoothing), autocast, memory_format_for(config, device))
    lookahead = Lookahead(model, config.lookahead_steps, config.lookahead_alpha) if config.lookahead_steps else None
    model.train()
    found = []
    for _, (images, labels) in zip(range(steps), loader, strict=False):
        step(images, labels)
        if lookahead is not None:  # between replays, in place on the parameters the graph reads and updates
            lookahead.update()
        scheduler.step()
        found.append(step.loss.item())
    return found, step


# The recipe candidates that touch the step: two learning-rate tensors (one per param group) and Adam's betas.
CANDIDATE_STEP = {"norm_lr_scale": 4.0, "adam_beta2": 0.99, "adam_eps": 1e-6, "zero_init_residual": True}
# Issue 22's: Lookahead between the replays, SGD's own batch-norm factor and Nesterov momentum 0.9.
LOOKAHEAD = {"lookahead_steps": 5, "lookahead_alpha": 0.5}
SGD_CANDIDATES = {"sgd_norm_lr_scale": 16.0, "momentum": 0.9, **LOOKAHEAD}


@pytest.mark.parametrize(("optimizer", "candidates"), [("adam", {}), ("adamw", {}), ("sgd", {}),
                                                       ("adam", CANDIDATE_STEP), ("adam", LOOKAHEAD),
                                                       ("sgd", SGD_CANDIDATES)])
def test_the_graph_step_gives_the_eager_steps_losses(optimizer, candidates, caplog):
    config = data_config(optimizer=optimizer, train_size=COMPARED_STEPS * 128, **candidates)
    eager, _ = losses(config, graph=False, steps=COMPARED_STEPS)
    with caplog.at_level(logging.WARNING, logger="cifar_resnet.engine"):
        graph, step = losses(config, graph=True, steps=COMPARED_STEPS)
    assert step.graph is not None and not step.eager, [r.getMessage() for r in caplog.records]
    assert graph[0] == pytest.approx(eager[0], rel=FIRST_LOSS_RTOL)
    assert graph == pytest.approx(eager, rel=LOSS_RTOL, abs=LOSS_ATOL)
    assert eager[-1] < eager[0]  # it learns: the comparison is not of two flat lines


@pytest.mark.parametrize("candidates", [{}, {"ema_decay": 0.99, "alternating_flip": True, "whiten_stem": True,
                                              "tta_translate_px": 1},
                                         {"ema_decay": 0.99, "norm_lr_scale": 8.0, **LOOKAHEAD}],
                         ids=["tuned", "with-candidates", "with-lookahead"])
def test_a_short_run_with_the_graph_reaches_the_eager_runs_accuracy(candidates, caplog):
    """The weight average and Lookahead are updated between replays, outside the graph: they must see every step's
    weights, and the graph must train from the weights Lookahead writes."""
    config = data_config(epochs=SHORT_RUN_EPOCHS, **candidates)
    device = torch.device("cuda")
    data = load_splits(config)
    eager = fit(config.replace(cuda_graph=False), build_model(config, len(data.classes), device), data, device)
    with caplog.at_level(logging.INFO, logger="cifar_resnet.engine"):
        graph = fit(config, build_model(config, len(data.classes), device), data, device)
    assert any("captured the training step" in r.getMessage() for r in caplog.records)
    assert any("captured the evaluation batch" in r.getMessage() for r in caplog.records)
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)
    assert graph.test.acc == pytest.approx(eager.test.acc, abs=ACCURACY_TOLERANCE)


EVAL_BATCH = 512  # 5,000 validation images: 9 full batches and a partial one of 392
EVAL_LOSS_RTOL = 1e-6  # the same kernels in the same order: equal but for the last bit


@pytest.mark.parametrize(("tta", "translate_px"), [(False, 0), (True, 0), (True, 1)])
def test_the_evaluation_graph_gives_the_eager_evaluations_results(tta, translate_px, caplog):
    """Over passes that end with a partial batch (eager in both), on a model trained a few steps, with bf16 and
    channels_last; then again after its weights change in place, as training changes them between validations."""
    config = data_config(train_size=COMPARED_STEPS * 128, val_size=5000)
    _, trained = losses(config, graph=False, steps=COMPARED_STEPS)
    model, device = trained.model, torch.device("cuda")
    data = load_splits(config)
    classes = len(data.classes)
    loader = DeviceLoader(data.val, EVAL_BATCH, device)
    settings = (model, classes, autocast_context(config, device, cache_enabled=False),
                memory_format_for(config, device), tta, translate_px)
    eager_step, graph_step = EvalStep(*settings), CapturedEval(*settings, batch_size=EVAL_BATCH)
    with caplog.at_level(logging.WARNING, logger="cifar_resnet.engine"):
        for weights_moved in (False, True):
            if weights_moved:
                with torch.no_grad():
                    for parameter in model.parameters():
                        parameter.mul_(0.9)
            expected = evaluate(model, loader, classes, step=eager_step)
            for _ in range(2):  # the pass that warms up and captures, then a pass of replays
                got = evaluate(model, loader, classes, step=graph_step)
                assert torch.equal(got.confusion, expected.confusion)
                assert got.loss == pytest.approx(expected.loss, rel=EVAL_LOSS_RTOL)
                assert int(got.confusion.sum()) == len(data.val)
    assert graph_step.graph is not None and not graph_step.eager, caplog.messages
    assert 0.2 < expected.acc < 1.0  # a model that learned something: not one class for every image
