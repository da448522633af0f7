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
    ],
)
def test_bad_values_name_the_setting_and_what_is_allowed(argv, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_argv(argv)


def test_unknown_mapping_key_is_an_error():
    with pytest.raises(ConfigError, match="unknown setting 'lr'"):
        Config.from_mapping({"lr": 0.1})


def test_parse_argv_keeps_only_given_settings():
    assert parse_argv(["--tta=true", "--data_dir=/x"]) == {"tta": "true", "data_dir": "/x"}


def test_the_readmes_settings_table_lists_every_setting_once():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("<!-- settings-table -->")[1].split("<!-- /settings-table -->")[0]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    listed = [name for cell in first_cells for name in re.findall(r"`(\w+)`", cell)]
    assert sorted(listed) == sorted(f.name for f in dataclasses.fields(Config))
