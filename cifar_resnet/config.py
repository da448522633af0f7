"""The one typed config: every setting of a run, with its default, unit and check.

Parsing `--name=value` (what `wandb agent` passes through `${args}`), merging `wandb.config` and validation all
happen here; everything downstream takes a `Config`, never an `argparse.Namespace` or `wandb.config`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "onecycle")
DATASETS = ("cifar10", "imagefolder", "synthetic")
MAX_TRANSLATE_PX = 4  # a test-time shift, like the training crop's padding, moves an image at most 4 px
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda|cuda:[0-9]+")  # cuda:N, N a GPU index (checked against the GPUs later)
# The ranges the model, the data and torch allow, so that a value out of them is one line, not a traceback deep in
# torch (a float32 overflow, an allocation of terabytes):
FLOAT32_MAX = 3.4028234663852886e38  # every float setting reaches the device as a float32
MAX_LEARNING_RATE = 10.0  # per step: far above any rate that trains this model
MAX_NORM_LR_SCALE = 1000.0  # so that learning_rate x norm_lr_scale stays far from float32's overflow
MAX_WIDTH = 1024  # 709 M parameters (width 64: 2.8 M): 11 GB with the gradients and Adam's moments
MAX_IMAGES = 10_000_000  # per split: a split lives in memory and on the device as uint8, 3 KB an image (31 GB)
MAX_SEED = 2**64 - 1  # torch.manual_seed's and torch.Generator's range (from 0: negative seeds are refused)
SIZE_SETTINGS = ("val_size", "train_size", "test_size")
# Where a run's files and data lie, not what it trains: they may differ between the attempts of one run (its
# sweep folder moved, its data copied elsewhere). Every other setting says what the run trains: a checkpoint or a
# record written with another value of one of those belongs to another run.
LOCATION_SETTINGS = ("output_dir", "data_dir")

# A recipe is a preset of the training-recipe settings below: it supplies their defaults, and a setting given
# explicitly still wins. `tuned` was chosen by measurement (BENCHMARKS.md); `writeup` reproduces the write-up's
# settings (constant learning rate, no weight decay, no label smoothing, momentum 0.9 without Nesterov, no TTA) so
# its table can be compared.
# The candidates of the fast-training literature (zero_init_residual ... adam_eps) are off in both presets until a
# GPU measurement over seeds shows one wins (`benchmarks/recipe_experiments.py`, BENCHMARKS.md).
RECIPE_CANDIDATES_OFF: dict[str, Any] = {
    "zero_init_residual": False, "whiten_stem": False, "ema_decay": 0.0, "norm_lr_scale": 1.0,
    "alternating_flip": False, "tta_translate_px": 0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8,
    "sgd_norm_lr_scale": 0.0, "lookahead_steps": 0, "lookahead_alpha": 0.5,
}
RECIPE_PRESETS: dict[str, dict[str, Any]] = {
    # warmup_fraction 0.1 keeps a 10-epoch run's 1-epoch warm-up, and lets a 1- or 2-epoch run learn after it.
    "tuned": {"lr_schedule": "onecycle", "warmup_epochs": 1.0, "warmup_fraction": 0.1, "label_smoothing": 0.1,
              "weight_decay": 5e-4, "momentum": 0.99, "nesterov": True, "tta": True, **RECIPE_CANDIDATES_OFF},
    # Adam's betas and eps here are torch's defaults, which the write-up used.
    "writeup": {"lr_schedule": "constant", "warmup_epochs": 0.0, "warmup_fraction": 1.0, "label_smoothing": 0.0,
                "weight_decay": 0.0, "momentum": 0.9, "nesterov": False, "tta": False, **RECIPE_CANDIDATES_OFF},
}
RECIPE_FIELDS = tuple(RECIPE_PRESETS["writeup"])


def _setting(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None})


def _recipe_setting(help: str, choices: Sequence[str] | None = None) -> Any:
    """A setting whose default comes from the `recipe` preset (None until `__post_init__` fills it in)."""
    return _setting(None, help, choices)


@dataclass(frozen=True)
class Config:
    # --- optimisation -------------------------------------------------------------------------------------------
    learning_rate: float = _setting(0.001, "peak learning rate (per step, at most 10; the schedule scales it)")
    optimizer: str = _setting("adam", "optimizer", OPTIMIZERS)
    momentum: float = _recipe_setting(
        "[recipe] SGD momentum, in [0, 1) (Adam's is adam_beta1); 0.99 makes up for the sweep's small SGD learning "
        "rates"
    )
    nesterov: bool = _recipe_setting("[recipe] Nesterov momentum for SGD")
    weight_decay: float = _recipe_setting(
        "[recipe] weight decay, not applied to batch-norm and bias parameters: an L2 term added to the gradient "
        "for sgd and adam (torch's own meaning), decoupled (weights shrink by learning rate x weight_decay per "
        "step) for adamw"
    )
    lr_schedule: str = _recipe_setting("[recipe] learning-rate schedule, stepped every batch", LR_SCHEDULES)
    warmup_epochs: float = _recipe_setting(
        "[recipe] linear warm-up from 0 to learning_rate, in epochs, at most warmup_fraction of the run")
    warmup_fraction: float = _recipe_setting(
        "[recipe] the longest warm-up, as a fraction of the run's steps, in [0, 1] (1: warmup_epochs alone)")
    label_smoothing: float = _recipe_setting("[recipe] label smoothing of the training loss, in [0, 1)")
    norm_lr_scale: float = _recipe_setting(
        "[recipe] learning-rate factor, > 0 and at most 1000, for the parameters without weight decay (batch-norm "
        "scales and shifts, the head's bias)")
    sgd_norm_lr_scale: float = _recipe_setting(
        "[recipe] SGD only: the learning-rate factor, >= 0 and at most 1000, for the parameters without weight decay, "
        "in place of norm_lr_scale (which Adam and AdamW keep), so that one sweep over both optimizers gives each its "
        "own; 0: norm_lr_scale")
    adam_beta1: float = _recipe_setting("[recipe] Adam and AdamW: decay of the gradient average, in [0, 1)")
    adam_beta2: float = _recipe_setting("[recipe] Adam and AdamW: decay of the squared-gradient average, in [0, 1)")
    adam_eps: float = _recipe_setting("[recipe] Adam and AdamW: term added to the update's denominator, > 0")
    ema_decay: float = _recipe_setting(
        "[recipe] exponential moving average of the weights, decay per optimizer step, in [0, 1), after a ramp "
        "min(decay, (1 + n) / (10 + n)) over the first n steps: validation, test and the checkpoints use the "
        "averaged weights; 0 turns it off")
    lookahead_steps: int = _recipe_setting(
        "[recipe] Lookahead (Zhang et al. 2019) around the optimizer: every this many optimizer steps, slow weights "
        "move lookahead_alpha of the way to the trained (fast) weights, and training goes on from them; in "
        "optimizer steps, >= 0; 0 turns it off")
    lookahead_alpha: float = _recipe_setting(
        "[recipe] Lookahead's step: the fraction of the way, in (0, 1], the slow weights move at each sync "
        "(1: the optimizer alone)")
    zero_init_residual: bool = _recipe_setting(
        "[recipe] start each residual block's last batch-norm scale at zero, so every block starts as its shortcut")
    whiten_stem: bool = _recipe_setting(
        "[recipe] initialise the stem convolution's filters as a whitening of 3x3 patches of the training images "
        "(their covariance's eigenvectors, plus and minus; filters beyond 54 keep the random init)")
    alternating_flip: bool = _recipe_setting(
        "[recipe] flip each training image in every other epoch (a random half in the first), in place of a coin "
        "toss per image and epoch")
    recipe: str = _setting("tuned", "preset of the settings marked [recipe]; a setting given explicitly wins",
                           tuple(RECIPE_PRESETS))
    epochs: int = _setting(10, "training epochs")
    batch_size: int = _setting(128, "training batch size, in images")
    # --- evaluation ---------------------------------------------------------------------------------------------
    eval_batch_size: int = _setting(1024, "evaluation batch size, in images")
    tta: bool = _recipe_setting("[recipe] flip test-time augmentation: average the logits of each image and its mirror")
    tta_translate_px: int = _recipe_setting(
        f"[recipe] with tta, also average the views shifted by this many pixels up-left and down-right (and "
        f"their mirrors), in pixels, 0 to {MAX_TRANSLATE_PX}; 0: the mirror only")
    # --- data ---------------------------------------------------------------------------------------------------
    dataset: str = _setting("cifar10", "data source", DATASETS)
    data_dir: str = _setting("./data", "where CIFAR-10 is downloaded, or the image folder (train/, test/)")
    val_size: int = _setting(5000, "training images held out for validation, in images")
    train_size: int = _setting(0, "training images used after the validation split, in images (0: all)")
    test_size: int = _setting(0, "test images used, in images (0: all)")
    # --- model --------------------------------------------------------------------------------------------------
    width: int = _setting(64, "channels of the first stage, at most 1024; stages 2 and 3 have 2x and 4x")
    # --- run ----------------------------------------------------------------------------------------------------
    seed: int = _setting(0, "seed of the validation split, the initial weights, shuffling and augmentation, "
                         "0 to 2**64 - 1")
    output_dir: str = _setting("./runs", "folder for the per-run folders (checkpoints and run record)")
    device: str = _setting("auto", "training device: auto (CUDA when present), cpu, cuda or cuda:N (N a GPU index)")
    bf16: bool = _setting(True, "bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = _setting(True, "channels_last memory format on CUDA (ignored on CPU)")
    compile: bool = _setting(False, "torch.compile the model (its compile time counts against the run); on CUDA "
                             "with cuda_graph=true in mode reduce-overhead (torch.compile's own CUDA graphs)")
    cuda_graph: bool = _setting(True, "capture the training step (forward, backward, optimizer step) once as one "
                                "CUDA graph and replay it every step (ignored on CPU)")

    # ------------------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if self.recipe not in RECIPE_PRESETS:
            raise ConfigError(f"recipe: {self.recipe!r} is not one of {', '.join(RECIPE_PRESETS)}")
        for name, value in RECIPE_PRESETS[self.recipe].items():
            if getattr(self, name) is None:  # not given: the recipe supplies it
                object.__setattr__(self, name, value)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first setting whose value is not allowed."""
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f"{f.name}: {getattr(self, f.name)!r} is not one of {', '.join(choices)}"
                )
            if f.type == "float" and not abs(getattr(self, f.name)) <= FLOAT32_MAX:  # False for nan too
                raise ConfigError(f"{f.name}: must be a finite float32 number (at most {FLOAT32_MAX:.2e}), "
                                  f"got {getattr(self, f.name)}")
        positive = ("learning_rate", "epochs", "batch_size", "eval_batch_size", "width", "norm_lr_scale", "adam_eps")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        upper_bounds = {"learning_rate": MAX_LEARNING_RATE, "norm_lr_scale": MAX_NORM_LR_SCALE,
                        "sgd_norm_lr_scale": MAX_NORM_LR_SCALE, "width": MAX_WIDTH, "seed": MAX_SEED,
                        **dict.fromkeys(SIZE_SETTINGS, MAX_IMAGES)}
        for name, bound in upper_bounds.items():
            if getattr(self, name) > bound:
                raise ConfigError(f"{name}: must be <= {bound:,}, got {getattr(self, name):,}")
        if self.val_size <= 0:  # the best checkpoint is chosen on validation accuracy
            raise ConfigError(f"val_size: must be > 0 (the best epoch is chosen on it), got {self.val_size}")
        non_negative = ("momentum", "weight_decay", "warmup_epochs", "train_size", "test_size", "seed",
                        "sgd_norm_lr_scale", "lookahead_steps")
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_fraction <= 1:
            raise ConfigError(f"warmup_fraction: must be in [0, 1], got {self.warmup_fraction}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        for name in ("momentum", "ema_decay", "adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.lookahead_alpha <= 1:
            raise ConfigError(f"lookahead_alpha: must be in (0, 1], got {self.lookahead_alpha}")
        if not 0 <= self.tta_translate_px <= MAX_TRANSLATE_PX:
            raise ConfigError(f"tta_translate_px: must be in 0..{MAX_TRANSLATE_PX} pixels, got {self.tta_translate_px}")
        if self.nesterov and self.momentum == 0:  # torch refuses it, and only once the optimizer is built
            raise ConfigError("nesterov: needs momentum > 0; set nesterov=false or a momentum")
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"warmup_epochs: must be <= epochs ({self.epochs}), got {self.warmup_epochs}")
        if not DEVICE_PATTERN.fullmatch(self.device):  # checked here: torch.device() would fail with a traceback
            raise ConfigError(
                f"device: {self.device!r} is not one of auto, cpu, cuda, cuda:N (N a GPU index: 0, 1, ...)"
            )

    # ------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Config:
        """A copy with `changes` applied; values are coerced and checked like any other input."""
        return Config.from_mapping(changes, base=self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: Config | None = None) -> Config:
        """Config from a mapping such as `wandb.config` or a sweep's parameters.

        Keys that start with `_` belong to W&B (`_wandb`) and are skipped; any other unknown key is an error.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        merged = (base or cls()).to_dict()
        if "recipe" in values:  # a new recipe supplies every recipe setting not given alongside it
            merged.update(dict.fromkeys(RECIPE_FIELDS))
        for name, value in values.items():
            if name.startswith("_"):
                continue
            if name not in fields:
                raise ConfigError(f"unknown setting {name!r}; valid settings: {', '.join(fields)}")
            merged[name] = _coerce(name, fields[name].type, value)
        return cls(**merged)

    @classmethod
    def from_argv(cls, argv: Sequence[str], base: Config | None = None) -> Config:
        """Config from `--name=value` arguments (also `--name value`), as `wandb agent` passes them."""
        return cls.from_mapping(parse_argv(argv), base=base)


def changed_settings(saved: Mapping[str, Any], config: Config) -> list[str]:
    """What makes `saved` (the settings a checkpoint or a run record was written with) another run than `config`'s:
    each setting but LOCATION_SETTINGS whose value differs, as `name: saved value -> this value`."""
    current = config.to_dict()
    return [f"{name}: {saved.get(name, 'unset')!r} -> {current.get(name, 'unset')!r}" for name in {**current, **saved}
            if name not in LOCATION_SETTINGS and saved.get(name, ...) != current.get(name, ...)]


def parse_argv(argv: Sequence[str]) -> dict[str, str]:
    """The settings given as `--name=value` (or `--name value`), values still strings.

    The agent may pass its own `--_wandb...` flags: not ours, so skipped. Anything else unknown is an error.
    """
    namespace, unknown = argument_parser().parse_known_args(list(argv))
    for arg in unknown:
        if not arg.startswith("--_"):
            names = ", ".join(f.name for f in dataclasses.fields(Config))
            raise ConfigError(f"unknown argument {arg!r}; valid settings: {names}")
    return {name: value for name, value in vars(namespace).items() if value is not None}


def _coerce(name: str, type_name: str, value: Any) -> Any:
    """Turn a value from the command line (a string) or from YAML (typed) into the field's type."""
    try:
        if type_name == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if type_name == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            with contextlib.suppress(ValueError):
                return int(str(value).strip())  # exact, however many digits
            number = float(value)  # accepts "1e3" and 10.0, not 10.5, inf or nan
            if not number.is_integer():
                raise ValueError
            return int(number)
        if type_name == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a valid {type_name}") from None


class _RaisingParser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def argument_parser(prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """A parser with one `--name=value` option per setting. Values stay strings; `Config` coerces them."""
    parser = _RaisingParser(
        prog=prog, description=description, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = Config()
    group = parser.add_argument_group("settings (each also settable from wandb.config by a sweep)")
    for f in dataclasses.fields(Config):
        choices = f.metadata["choices"]
        allowed = f" {{{','.join(choices)}}}" if choices else ""
        if f.name in RECIPE_FIELDS and len({repr(preset[f.name]) for preset in RECIPE_PRESETS.values()}) == 1:
            default = f"{RECIPE_PRESETS['tuned'][f.name]} with every recipe"
        elif f.name in RECIPE_FIELDS:
            default = ", ".join(f"{preset[f.name]} with recipe={name}" for name, preset in RECIPE_PRESETS.items())
        else:
            default = getattr(defaults, f.name)
        group.add_argument(
            f"--{f.name}",
            metavar=f.type.upper(),
            default=None,
            help=f"{f.metadata['help']}{allowed} (default: {default})",
        )
    return parser
