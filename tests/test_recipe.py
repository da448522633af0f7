"""The recipe preset (`recipe=tuned` by default, `recipe=writeup` one switch away) and the schedule's shape."""

import itertools

import pytest
import torch

from cifar_resnet.config import RECIPE_FIELDS, RECIPE_PRESETS, Config, argument_parser
from cifar_resnet.engine.device import build_optimizer, build_scheduler
from cifar_resnet.errors import ConfigError
from cifar_resnet.model import CIFAR10CNN

pytestmark = pytest.mark.quick  # seconds in all: part of `pytest -m quick`

WRITEUP = {"lr_schedule": "constant", "warmup_epochs": 0.0, "warmup_fraction": 1.0, "label_smoothing": 0.0,
           "weight_decay": 0.0, "momentum": 0.9, "nesterov": False, "tta": False,
           # none of the recipe candidates; Adam as torch builds it by default, as the write-up did
           "zero_init_residual": False, "whiten_stem": False, "ema_decay": 0.0, "norm_lr_scale": 1.0,
           "alternating_flip": False, "tta_translate_px": 0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8,
           "sgd_norm_lr_scale": 0.0, "lookahead_steps": 0, "lookahead_alpha": 0.5}


def recipe_values(config: Config) -> dict:
    return {name: getattr(config, name) for name in RECIPE_FIELDS}


def test_writeup_recipe_is_the_writeups_settings():
    assert recipe_values(Config.from_argv(["--recipe=writeup"])) == WRITEUP
    assert recipe_values(Config(recipe="writeup")) == WRITEUP


def test_default_recipe_is_tuned_and_differs_from_the_writeup():
    config = Config()
    assert config.recipe == "tuned" and recipe_values(config) == RECIPE_PRESETS["tuned"]
    assert config.lr_schedule != "constant" and config.tta


@pytest.mark.parametrize("argv", [["--recipe=writeup", "--label_smoothing=0.2"],
                                  ["--label_smoothing=0.2", "--recipe=writeup"]])
def test_explicit_settings_win_over_the_recipe_in_any_order(argv):
    config = Config.from_argv(argv)
    assert config.label_smoothing == 0.2
    assert recipe_values(config) == {**WRITEUP, "label_smoothing": 0.2}


def test_switching_recipe_replaces_the_recipe_settings_but_keeps_the_rest():
    tuned = Config(seed=3, tta=False)
    writeup = tuned.replace(recipe="writeup")
    assert recipe_values(writeup) == WRITEUP and writeup.seed == 3
    assert writeup.replace(seed=4).lr_schedule == "constant"  # other changes keep the recipe's values
    assert writeup.replace(recipe="tuned").tta is True


@pytest.mark.parametrize("recipe", list(RECIPE_PRESETS))
def test_a_saved_config_reads_back_the_same(recipe):
    config = Config(recipe=recipe, label_smoothing=0.05)
    assert Config.from_mapping(config.to_dict()) == config


def test_unknown_recipe_names_the_setting_and_the_choices():
    with pytest.raises(ConfigError, match="recipe: 'fast' is not one of tuned, writeup"):
        Config.from_argv(["--recipe=fast"])


def test_nesterov_without_momentum_is_refused_before_anything_starts():
    with pytest.raises(ConfigError, match="nesterov: needs momentum > 0"):
        Config.from_argv(["--momentum=0"])  # the tuned recipe's Nesterov
    assert Config.from_argv(["--momentum=0", "--nesterov=false"]).momentum == 0


def test_help_lists_the_recipe_and_each_presets_default():
    text = " ".join(argument_parser().format_help().split())
    assert "--recipe STR" in text
    assert "(default: constant with recipe=writeup" in text or "constant with recipe=writeup)" in text


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


def test_writeup_schedule_is_constant():
    assert lr_per_step(Config(recipe="writeup", learning_rate=0.01, epochs=2), 5) == [0.01] * 10


def test_weight_decay_skips_batch_norm_and_biases():
    model = CIFAR10CNN(width=8)
    optimizer = build_optimizer(Config(weight_decay=5e-4), model, torch.device("cpu"))
    decayed, exempt = optimizer.param_groups
    assert decayed["weight_decay"] == 5e-4 and exempt["weight_decay"] == 0.0
    assert all(p.ndim == 4 or p.ndim == 2 for p in decayed["params"])  # conv and linear weights
    assert {id(p) for p in exempt["params"]} == {id(p) for p in model.parameters() if p.ndim == 1}


@pytest.mark.parametrize(("epochs", "warmup_steps"), [(1, 1), (2, 2), (10, 10), (20, 10)])
def test_tuned_warm_up_is_a_tenth_of_a_short_run_and_at_most_one_epoch(epochs, warmup_steps):
    """A 1-epoch run of the tuned recipe must not spend the whole run warming up."""
    steps_per_epoch = 10
    config = Config(epochs=epochs, learning_rate=0.05)
    lrs = lr_per_step(config, steps_per_epoch)
    peak = lrs.index(max(lrs))
    assert peak == warmup_steps - 1 and max(lrs) == pytest.approx(config.learning_rate)
    assert lrs[-1] < 0.2 * config.learning_rate  # and then decays


@pytest.mark.parametrize(("warmup_epochs", "warmup_fraction"), [(2.0, 0.2), (2.5, 0.25), (3.0, 0.3)])
def test_the_onecycle_peak_at_20_to_30_percent_of_the_run_is_the_two_warm_up_settings(warmup_epochs, warmup_fraction):
    """A 10-epoch run at batch 128 (351 steps an epoch): the peak falls at that fraction of its 3,510 steps."""
    steps_per_epoch = 45_000 // 128
    config = Config(epochs=10, learning_rate=0.05, warmup_epochs=warmup_epochs, warmup_fraction=warmup_fraction)
    lrs = lr_per_step(config, steps_per_epoch)
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(config.learning_rate)
    assert (peak + 1) / len(lrs) == pytest.approx(warmup_fraction, abs=1 / len(lrs))


def test_warmup_fraction_outside_0_to_1_is_refused():
    with pytest.raises(ConfigError, match=r"warmup_fraction: must be in \[0, 1\]"):
        Config(warmup_fraction=1.5)
