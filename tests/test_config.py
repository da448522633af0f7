"""The one `Config` (config.py): its defaults, the agent's arguments and a sweep's values parsed, typed and
checked, each bad value one error naming the setting and what is allowed; the recipe presets (`recipe=tuned` by
default, `recipe=writeup` one switch away) and the recipe candidates' settings."""

from __future__ import annotations

import pytest

from cifar_resnet.config import RECIPE_FIELDS, RECIPE_PRESETS, Config, argument_parser, parse_argv
from cifar_resnet.errors import ConfigError

pytestmark = pytest.mark.quick  # seconds in all: part of `pytest -m quick`


WRITEUP = {"lr_schedule": "constant", "warmup_epochs": 0.0, "warmup_fraction": 1.0, "label_smoothing": 0.0,
           "weight_decay": 0.0, "momentum": 0.9, "nesterov": False, "tta": False,
           # none of the recipe candidates; Adam as torch builds it by default, as the write-up did
           "zero_init_residual": False, "whiten_stem": False, "ema_decay": 0.0, "norm_lr_scale": 1.0,
           "alternating_flip": False, "tta_translate_px": 0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8,
           "sgd_norm_lr_scale": 0.0, "lookahead_steps": 0, "lookahead_alpha": 0.5}


def test_defaults_are_the_sweeps_fixed_names_and_values():
    config = Config()
    assert (config.epochs, config.batch_size, config.val_size, config.dataset) == (10, 128, 5000, "cifar10")
    for name in ("learning_rate", "optimizer", "epochs", "batch_size", "dataset", "data_dir", "val_size", "width",
                 "seed", "output_dir"):
        assert name in config.to_dict()


def test_agent_arguments_are_parsed_and_typed():
    config = Config.from_argv(["--learning_rate=0.0005", "--optimizer=sgd", "--epochs=3", "--batch_size", "64",
                               "--tta=true", "--_wandb={'x': 1}"])
    assert config.learning_rate == 0.0005 and isinstance(config.learning_rate, float)
    assert config.optimizer == "sgd" and config.epochs == 3 and config.batch_size == 64 and config.tta is True


def test_mapping_values_from_yaml_are_coerced_and_wandb_keys_skipped():
    config = Config.from_mapping({"learning_rate": 1, "epochs": 10.0, "nesterov": "false", "_wandb": {}})
    assert config.learning_rate == 1.0 and config.epochs == 10 and config.nesterov is False


def test_replace_checks_values():
    with pytest.raises(ConfigError, match="epochs"):
        Config().replace(epochs=0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizer=rmsprop"], "optimizer: 'rmsprop' is not one of adam, adamw, sgd"),
        (["--dataset=mnist"], "dataset: 'mnist' is not one of cifar10, imagefolder, synthetic"),
        (["--learning_rate=0"], "learning_rate: must be > 0"),
        (["--learning_rate=-0.1"], "learning_rate: must be > 0"),
        (["--epochs=0"], "epochs: must be > 0"),
        (["--batch_size=-5"], "batch_size: must be > 0"),
        (["--epochs=2.5"], "epochs: '2.5' is not a valid int"),
        (["--learning_rate=fast"], "learning_rate: 'fast' is not a valid float"),
        (["--tta=maybe"], "tta: 'maybe' is not a valid bool"),
        (["--val_size=0"], "val_size: must be > 0"),
        (["--label_smoothing=1"], r"label_smoothing: must be in \[0, 1\)"),
        (["--learnig_rate=0.1"], "unknown argument '--learnig_rate=0.1'; valid settings: learning_rate"),
        (["--device=tpu"], "device: 'tpu' is not one of auto, cpu, cuda, cuda:N"),
        # Issue 23: the ranges torch, the model and the data allow (each was a traceback, or terabytes asked for).
        (["--seed=1e30"], "seed: must be <= 18,446,744,073,709,551,615, got 1,000,000,000,000,000,019,884,624"),
        (["--seed=18446744073709551616"], "seed: must be <= 18,446,744,073,709,551,615, got "
                                          "18,446,744,073,709,551,616"),
        (["--learning_rate=inf"], r"learning_rate: must be a finite float32 number \(at most 3.40e\+38\), got inf"),
        (["--learning_rate=nan"], "learning_rate: must be a finite float32 number"),
        (["--learning_rate=11"], "learning_rate: must be <= 10.0, got 11.0"),
        (["--weight_decay=1e300"], "weight_decay: must be a finite float32 number"),
        (["--norm_lr_scale=1e9"], "norm_lr_scale: must be <= 1,000.0, got 1,000,000,000.0"),
        (["--momentum=1"], r"momentum: must be in \[0, 1\), got 1.0"),
        (["--width=1000000"], "width: must be <= 1,024, got 1,000,000"),
        (["--val_size=1e12"], "val_size: must be <= 10,000,000, got 1,000,000,000,000"),
        (["--test_size=10000001"], "test_size: must be <= 10,000,000, got 10,000,001"),
    ],
)
def test_bad_values_name_the_setting_and_what_is_allowed(argv, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_argv(argv)


def test_integers_are_read_exactly_however_many_digits():
    assert Config.from_argv(["--seed=18446744073709551615"]).seed == 2**64 - 1  # through a float it was 2**64
    assert Config.from_argv(["--seed=1e3", "--epochs=2.0"]).seed == 1000


def test_paths_are_where_a_run_lies_not_what_it_trains():
    from cifar_resnet.config import changed_settings  # issue 23's

    config = Config()
    moved = {**config.to_dict(), "output_dir": "/elsewhere", "data_dir": "/data/copy"}
    assert changed_settings(moved, config) == []
    assert changed_settings({**moved, "learning_rate": 0.1}, config) == ["learning_rate: 0.1 -> 0.001"]


def test_unknown_mapping_key_is_an_error():
    with pytest.raises(ConfigError, match="unknown setting 'lr'"):
        Config.from_mapping({"lr": 0.1})


def test_parse_argv_keeps_only_given_settings():
    assert parse_argv(["--tta=true", "--data_dir=/x"]) == {"tta": "true", "data_dir": "/x"}


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


def test_warmup_fraction_outside_0_to_1_is_refused():
    with pytest.raises(ConfigError, match=r"warmup_fraction: must be in \[0, 1\]"):
        Config(warmup_fraction=1.5)


@pytest.mark.parametrize(("argument", "message"), [
    ("--ema_decay=1", r"ema_decay: must be in \[0, 1\), got 1.0"),
    ("--ema_decay=-0.1", r"ema_decay: must be in \[0, 1\)"),
    ("--adam_beta1=1.5", r"adam_beta1: must be in \[0, 1\)"),
    ("--adam_beta2=1", r"adam_beta2: must be in \[0, 1\)"),
    ("--adam_eps=0", r"adam_eps: must be > 0"),
    ("--norm_lr_scale=0", r"norm_lr_scale: must be > 0"),
    ("--tta_translate_px=5", r"tta_translate_px: must be in 0..4 pixels, got 5"),
    ("--whiten_stem=maybe", r"whiten_stem: 'maybe' is not a valid bool"),
    ("--sgd_norm_lr_scale=-1", r"sgd_norm_lr_scale: must be >= 0, got -1.0"),
    ("--lookahead_steps=-5", r"lookahead_steps: must be >= 0, got -5"),
    ("--lookahead_steps=2.5", r"lookahead_steps: '2.5' is not a valid int"),
    ("--lookahead_alpha=0", r"lookahead_alpha: must be in \(0, 1\], got 0.0"),
    ("--lookahead_alpha=1.5", r"lookahead_alpha: must be in \(0, 1\]"),
])
def test_each_candidate_setting_is_checked_in_one_line(argument, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_argv([argument])
