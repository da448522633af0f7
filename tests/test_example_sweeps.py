"""The sweep files the repository ships (sweep.yaml, examples/): each fixes its recipe and says so; the
write-up's sweep is the write-up's experiment; sweep.yaml's one grid over Adam and SGD gives SGD its own batch-norm
factor and momentum."""

from __future__ import annotations

import pytest
import sweeps
import torch
import yaml
from conftest import REPO

from cifar_resnet.config import RECIPE_PRESETS, Config
from cifar_resnet.engine.device import build_model, build_optimizer
from cifar_resnet.sweep.plan import load_sweep

pytestmark = pytest.mark.quick  # seconds in all: part of `pytest -m quick`


CPU = torch.device("cpu")


def sweep_file(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.mark.parametrize(("name", "recipe"), [("sweep.yaml", "tuned"), ("examples/trial-sweep.yaml", "tuned"),
                                              ("examples/writeup-sweep.yaml", "writeup")])
def test_each_sweep_file_fixes_its_recipe_and_says_so(name, recipe):
    text = (REPO / name).read_text()
    assert sweep_file(name)["parameters"]["recipe"] == {"value": recipe}
    comment = " ".join(line for line in text.splitlines() if line.startswith("#"))
    assert recipe in comment.lower()


def test_the_writeup_sweep_is_the_writeups_experiment():
    """The write-up: learning rate {0.001, 0.0005, 0.0001} x {adam, sgd}, 10 epochs at batch 128, constant rate,
    no weight decay, no smoothing, momentum 0.9, no TTA."""
    parameters = sweep_file("examples/writeup-sweep.yaml")["parameters"]
    assert parameters["learning_rate"]["values"] == [0.001, 0.0005, 0.0001]
    assert parameters["optimizer"]["values"] == ["adam", "sgd"]
    fixed = {name: spec["value"] for name, spec in parameters.items() if "value" in spec}
    config = Config.from_mapping(fixed)
    assert (config.epochs, config.batch_size) == (10, 128)
    assert {name: getattr(config, name) for name in RECIPE_PRESETS["writeup"]} == RECIPE_PRESETS["writeup"]
    assert config.lr_schedule == "constant" and not config.tta and config.weight_decay == 0


def sweep_cells(*fixed: str) -> list[dict]:
    """The runs W&B's own grid proposes for the repository's sweep.yaml with `fixed` (`name=value`) added to it."""
    sweep = load_sweep(REPO / "sweep.yaml", fixed).config
    runs: list[sweeps.SweepRun] = []
    while (proposal := sweeps.next_run(sweep, runs)) is not None:
        runs.append(sweeps.SweepRun(name=f"r{len(runs)}", state=sweeps.RunState.finished, config=proposal.config))
    return [{name: item["value"] for name, item in run.config.items()} for run in runs]


@pytest.mark.parametrize(("sgd_norm_lr_scale", "sgd_factor"), [(32.0, 32.0), (0.0, 8.0)])
def test_one_sweep_over_adam_and_sgd_gives_sgd_its_own_batch_norm_factor_and_momentum(sgd_norm_lr_scale, sgd_factor):
    """The SGD-only settings are plain fixed parameters of the one sweep file: Adam's cells ignore them."""
    cells = sweep_cells("norm_lr_scale=8", f"sgd_norm_lr_scale={sgd_norm_lr_scale}", "momentum=0.9")
    assert sorted(cell["optimizer"] for cell in cells) == ["adam"] * 3 + ["sgd"] * 3
    for cell in cells:
        config = Config.from_mapping({**cell, "width": 8})
        weights, norms = build_optimizer(config, build_model(config, 10, CPU), CPU).param_groups
        factor = sgd_factor if config.optimizer == "sgd" else 8.0
        assert norms["lr"] == pytest.approx(factor * weights["lr"]) and weights["lr"] == config.learning_rate
        if config.optimizer == "sgd":
            assert (weights["momentum"], weights["nesterov"]) == (0.9, True)  # tuned's Nesterov, momentum 0.9
        else:
            assert "momentum" not in weights and weights["betas"] == (0.9, 0.999)
