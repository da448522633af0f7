import dataclasses
import re
from pathlib import Path

import pytest

from cifar_resnet.config import Config, parse_argv
from cifar_resnet.errors import ConfigError

pytestmark = pytest.mark.quick  # seconds in all: part of `pytest -m quick`


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


def test_the_docs_settings_table_lists_every_setting_once():
    page = (Path(__file__).resolve().parents[1] / "docs" / "settings.md").read_text()
    table = page.split("<!-- settings-table -->")[1].split("<!-- /settings-table -->")[0]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    listed = [name for cell in first_cells for name in re.findall(r"`(\w+)`", cell)]
    assert sorted(listed) == sorted(f.name for f in dataclasses.fields(Config))
