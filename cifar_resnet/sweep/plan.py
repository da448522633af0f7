"""A sweep file, read and checked, and the glue to W&B's proposer (the `sweeps` package): what the sweep is, before
anything runs."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from ..config import Config
from ..errors import ConfigError, UserError, extra_needed
from ..names import sweep_folder_name
from ..records import RunRecord
from ..wandb_sweep import run_argv
from .state import LocalRun

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_ROOT = Path("sweeps")
FOLDER_DIGEST_CHARS = 8  # hex digits of the settings' digest in a sweep's default folder name
TRAIN_MODULE = "cifar_resnet.train"  # the training entry point a sweep's command must start
PACKAGE_MODULE, PACKAGE_COMMAND = "cifar_resnet", "cifar-resnet"  # `-m cifar_resnet train`, `cifar-resnet train`
OUR_COMMAND = ("${env}", "${interpreter}", "-m", "${program}", "${args}")  # sweep.yaml's
GRID_SIZE_LIMIT = 100_000
# What W&B's grid search accepts: finite sets of values.
GRID_TYPES = ("param_single_value", "param_categorical", "param_int_uniform", "param_quniform")
# Distributions whose `min` and `max` are values of the setting itself (not logarithms or moments).
BOUNDED_IN_VALUE_SPACE = ("param_uniform", "param_int_uniform", "param_quniform", "param_loguniform_v2",
                          "param_inv_loguniform_v2", "param_qloguniform_v2")
MAX_SWEEP_FILE_BYTES = 1_000_000  # a sweep file has a few kB
# Values, lists and mappings in a sweep file, each alias (*name) counted as what it repeats: a sweep has hundreds.
MAX_SWEEP_YAML_NODES = 100_000
PROPOSER_STATE = {"pending": "pending", "running": "running", "finished": "finished", "failed": "failed",
                  "stopped": "killed", "preempted": "preempted"}


def sweep_proposer() -> ModuleType:
    """W&B's `sweeps` package, the proposer of its sweep controller (grid, random, bayes, hyperband): its
    pydantic-v1-style classes warn on import, which is not the user's concern."""
    with warnings.catch_warnings(), extra_needed("sweep", "sweep"):
        warnings.simplefilter("ignore")
        import sweeps
        import sweeps.params  # noqa: F401  (HyperParameter, used to check parameters)
    return sweeps


# --- the sweep file ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPlan:
    path: Path
    config: dict[str, Any]  # the sweep as W&B would get it, with --set values fixed
    grid_size: int | None  # runs in the grid; None for random and bayes


def read_sweep_yaml(path: Path) -> Any:
    """A sweep file's YAML, read in bounded time and memory: at most MAX_SWEEP_FILE_BYTES of UTF-8, holding at most
    MAX_SWEEP_YAML_NODES values once its aliases are expanded. An alias bomb (lists of aliases of lists of aliases)
    is a few lines that expand to billions of values, later, in whatever walks the document; it is refused before.
    Every problem is one UserError line naming the file."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_SWEEP_FILE_BYTES + 1)
    except OSError as error:
        raise UserError(f"{path}: cannot read the sweep file ({error.strerror})") from None
    if len(data) > MAX_SWEEP_FILE_BYTES:
        raise UserError(f"{path}: more than {MAX_SWEEP_FILE_BYTES:,} bytes: not a sweep file")
    try:
        text = data.decode()
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start} is {data[error.start]:#04x}): not a sweep "
                        "file") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_nodes(node, {}, set()) > MAX_SWEEP_YAML_NODES:
            raise UserError(f"{path}: more than {MAX_SWEEP_YAML_NODES:,} values once its aliases (*name) are "
                            "expanded: not a sweep file")
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise UserError(f"{path}: not valid YAML{line} ({getattr(error, 'problem', None) or error})") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply, or an alias (*name) inside its own anchor: not a sweep "
                        "file") from None
    finally:
        loader.dispose()


def _expanded_nodes(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """The nodes `node` stands for with its aliases expanded, each distinct node counted once (`sizes`); a node
    inside itself (`&a [*a]`) raises RecursionError."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise RecursionError
    open_nodes.add(key)
    children = node.value if isinstance(node, yaml.SequenceNode) else []
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    sizes[key] = 1 + sum(_expanded_nodes(child, sizes, open_nodes) for child in children)
    open_nodes.discard(key)
    return sizes[key]


def load_sweep(path: Path, overrides: Sequence[str]) -> SweepPlan:
    """Read, override and check a sweep file; every problem is one UserError line naming the file."""
    config = read_sweep_yaml(path)
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a sweep: expected a YAML mapping with method, metric and parameters")
    if not isinstance(config.get("parameters", {}), dict):
        raise UserError(f"{path}: parameters: expected a mapping of setting names to {{value: ...}} or "
                        "{values: [...]}, e.g. parameters: {learning_rate: {values: [0.001, 0.0005]}}")
    config = apply_overrides(config, overrides)
    try:
        violations = sweep_proposer().schema_violations_from_proposed_config(config)
    except (ValueError, TypeError, AttributeError) as error:  # a parameter the schema code cannot even read
        violations = [str(error)]
    if violations:
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        raise UserError(f"{path}: not a valid W&B sweep: {violations[0]}{more}")
    if "output_dir" in config["parameters"]:
        raise UserError(f"{path}: parameter output_dir: a local sweep sets it; use --output-dir instead")
    for needs_metric in ("early_terminate" in config and "early_terminate", config["method"] == "bayes" and "bayes"):
        if needs_metric and "metric" not in config:
            raise UserError(f"{path}: {needs_metric} needs a metric, e.g. metric: {{name: val/acc, goal: maximize}}")
    check_parameters(path, config["parameters"])
    grid_size = count_grid(path, config) if config["method"] == "grid" else None
    if "program" not in config and "${program}" in (config.get("command") or ["${program}"]):
        raise UserError(f"{path}: no program, and the command runs ${{program}}; add program: cifar_resnet.train")
    return SweepPlan(path, config, grid_size)


def sweep_name(plan: SweepPlan) -> str:
    """The sweep's `name`, or its file's stem."""
    return str(plan.config.get("name") or plan.path.stem)


def default_output_dir(plan: SweepPlan) -> Path:
    """`sweeps/<name>-<digest>`: the sweep's name and a digest of everything that makes it this sweep (its settings,
    `--set` values included; what `sweep.json` must match), so that the same command finds its own folder again and
    a changed one, such as the trial with `--set dataset=imagefolder`, gets a folder of its own."""
    name = sweep_folder_name(sweep_name(plan))  # one that stays in DEFAULT_OUTPUT_ROOT, or a UserError
    settings = json.dumps(plan.config, sort_keys=True)  # as sweep.json holds it: key order does not matter
    digest = hashlib.sha256(settings.encode()).hexdigest()[:FOLDER_DIGEST_CHARS]
    return DEFAULT_OUTPUT_ROOT / f"{name}-{digest}"


def starts_our_training(argv: Sequence[str]) -> bool:
    """Whether a run command starts this package's training: `... -m cifar_resnet.train`, `... -m cifar_resnet
    train`, or `cifar-resnet train`."""
    for index, word in enumerate(argv):
        after = list(argv[index + 1:index + 3])
        if word == "-m" and (after[:1] == [TRAIN_MODULE] or after == [PACKAGE_MODULE, "train"]):
            return True
        if Path(word).name == PACKAGE_COMMAND and after[:1] == ["train"]:
            return True
    return False


def warn_unless_our_entry_point(plan: SweepPlan) -> None:
    """A sweep whose command would not start our training (W&B's default command runs `${program}` as a file
    path, without `-m`) is allowed, since a wrapper script may start it, but gets one warning line."""
    with tempfile.TemporaryDirectory() as scratch:  # where a ${args_json_file} command writes its file
        argv = run_argv(plan.config.get("command"), plan.config.get("program"), {}, Path(scratch) / "args.json")
    if not starts_our_training(argv):
        log.warning("%s: the agent would run `%s`, which is not this package's training; for it write "
                    "program: %s and command: [%s] (see docs/sweeps.md, On one machine)", plan.path, " ".join(argv),
                    TRAIN_MODULE, ", ".join(OUR_COMMAND))


def apply_overrides(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`--set name=value`: fix a setting for the whole sweep, typed as its Config field."""
    if not overrides:
        return config
    parameters = dict(config.get("parameters") or {})
    for item in overrides:
        name, equals, value = item.partition("=")
        if not equals or not name:
            raise UserError(f"--set {item!r}: expected name=value, e.g. --set epochs=2")
        try:
            typed = getattr(Config.from_mapping({name: value}), name)
        except ConfigError as error:
            raise UserError(f"--set {item}: {error}") from None
        parameters[name] = {"value": typed}
    return {**config, "parameters": parameters}


def check_parameters(path: Path, parameters: Mapping[str, Any]) -> None:
    """Every parameter must be a Config setting, and every value it can take must be allowed."""
    proposer = sweep_proposer()
    constants = {name: spec["value"] for name, spec in parameters.items() if "value" in spec}
    try:
        base = Config.from_mapping(constants)
        for name, spec in parameters.items():
            candidates = spec.get("values", [])
            if proposer.params.HyperParameter(name, spec).type in BOUNDED_IN_VALUE_SPACE:
                candidates = [spec["min"], spec["max"]]
            for value in candidates:
                Config.from_mapping({name: value}, base=base)
    except ConfigError as error:
        raise UserError(f"{path}: {error}") from None


def count_grid(path: Path, config: Mapping[str, Any]) -> int:
    """The number of runs in a grid, from the proposer's own proposals."""
    proposer = sweep_proposer()
    for name, spec in config["parameters"].items():
        if proposer.params.HyperParameter(name, spec).type not in GRID_TYPES:
            raise UserError(f"{path}: parameter {name}: a grid needs `values` (or an int_uniform or q_uniform "
                            f"range), not a continuous distribution: the grid would never end")
    proposals = proposer.next_runs(config, [], n=GRID_SIZE_LIMIT)
    return sum(proposal is not None for proposal in proposals)


# --- the proposer's view of the sweep's runs -----------------------------------------------------------------


def proposer_run(run: LocalRun, record: RunRecord | None) -> Any:
    """A run as W&B's proposer sees it: config, state, per-epoch history and summary."""
    return sweep_proposer().SweepRun(
        name=run.run_id, state=PROPOSER_STATE[run.state], config={k: {"value": v} for k, v in run.params.items()},
        history=record.history if record else [], summary_metrics=record.summary if record else {},
    )


def runs_to_stop(sweep: Mapping[str, Any], runs: Sequence[LocalRun], records: Mapping[str, RunRecord | None]
                 ) -> list[str]:
    """The running runs that the sweep's `early_terminate` (hyperband) stops, judged on their histories so far."""
    chosen = sweep_proposer().stop_runs(sweep, [proposer_run(run, records.get(run.run_id)) for run in runs])
    return [run.name for run in chosen]
