"""The W&B side of `cifar-resnet sweep` and `cifar-resnet report`: the agent's run command, its parameter file, a
sweep on the W&B server, a sweep's runs through the public API, and the sweep's workspace view.

Besides `tracking` (one run's W&B layer), the only module that imports wandb (lazily, inside functions, so the CLI
starts fast). It imports no tool: the tools import it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .records import (
    DATA_NAMES,
    EPOCH,
    RUN_INFO_KEY,
    SELECTION_METRIC,
    TEST_ACC,
    TRAIN_ACC,
    TRAIN_LOSS,
    VAL_ACC,
    VAL_LOSS,
    RunResult,
)

if TYPE_CHECKING:
    from wandb_workspaces.workspaces import Workspace

# How long a failed command waits for W&B's service process to stop before it exits anyway.
SERVICE_STOP_SECONDS = 10.0

# The history keys a run logs per epoch that the report needs; `scan_history` returns rows holding all of them.
HISTORY_KEYS = (EPOCH, TRAIN_LOSS, TRAIN_ACC, VAL_LOSS, VAL_ACC)
RUNTIME_KEY = "_runtime"  # W&B's own summary entry: the run's wall seconds
DEFAULT_STAGGER_SECONDS = 5.0  # between agent starts, so that they do not all call W&B and load data at once


def new_id() -> str:
    """An id in W&B's own format (8 lowercase letters and digits), for a local sweep or a run."""
    from wandb.sdk.lib.runid import generate_id

    return generate_id()


def agent_argv(sweep_id: str, project: str | None = None, entity: str | None = None,
               count: int | None = None) -> list[str]:
    """W&B's own agent for `sweep_id`, forwarding SIGTERM and SIGINT to its run (the run then saves and resumes);
    with `count`, it exits after that many runs."""
    argv = ["wandb", "agent", "--forward-signals"]
    if count is not None:
        argv += ["--count", str(count)]
    if project:
        argv += ["--project", project]
    if entity:
        argv += ["--entity", entity]
    return [*argv, sweep_id]


def run_argv(sweep_command: Sequence[str] | None, program: str | None, params: Mapping[str, Any],
             args_json_file: Path) -> list[str]:
    """The command line `wandb agent` runs for one proposal, built with wandb's own macro code.

    Mirrors `wandb.wandb_agent.Agent._command_run`: `${env}` is `/usr/bin/env`, `${interpreter}` is the
    `python` on PATH, `${program}` the sweep's program and `${args}` the `--name=value` flags.
    """
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    # create_sweep_command fills in environment-variable macros in place: give it a copy.
    command = sweep_utils.create_sweep_command(list(sweep_command or sweep_utils.DEFAULT_SWEEP_COMMAND))
    macros = sweep_utils.create_sweep_command_args({"args": {name: {"value": value} for name, value in
                                                             params.items()}})
    macros.update(interpreter=["python"], program=[program], args_json_file=[str(args_json_file)],
                  env=["/usr/bin/env"])
    if "${args_json_file}" in command:
        args_json_file.write_text(macros["args_json"][0])
    expanded: list[str] = []
    for chunk in map(str, command):
        if chunk.startswith("${") and chunk.endswith("}"):
            expanded += macros.get(chunk[2:-1]) or []
        else:
            expanded.append(chunk)
    return expanded


def write_param_file(path: Path, params: Mapping[str, Any]) -> None:
    """The file `WANDB_SWEEP_PARAM_PATH` names: `wandb.init` loads it and its values win over the command line."""
    from wandb.sdk.lib import config_util

    config_util.save_config_file_from_dict(str(path.resolve()), {name: {"value": value} for name, value in
                                                                 params.items()})


def create_sweep(sweep_config: Mapping[str, Any], project: str) -> str:
    """Create the sweep on the W&B server; its id."""
    import wandb

    try:
        return wandb.sweep(sweep=dict(sweep_config), project=project)
    except wandb.errors.Error as error:  # W&B unreachable, a bad key, or a sweep the server refuses
        stop_wandb_service()
        raise UserError(f"W&B could not create the sweep: {error}") from None


def stop_wandb_service(timeout_s: float = SERVICE_STOP_SECONDS) -> None:
    """Stop W&B's service process, waiting at most `timeout_s`.

    After a failed request the service can go on retrying a server that is not there, and W&B's own exit hook waits
    for it without a limit (a loaded CI machine waited over 5 minutes after the error was printed). Only for a
    process with no run open: a service still busy after the wait is left to end by itself, as it does when the
    process that started it is gone.
    """
    import wandb

    stopper = threading.Thread(target=wandb.teardown, name="wandb-teardown", daemon=True)
    stopper.start()
    stopper.join(timeout_s)


def fetch_sweep_results(path: str) -> list[RunResult]:
    """The runs of the W&B sweep `entity/project/sweep_id`, as report rows."""
    import wandb

    try:
        sweep = wandb.Api().sweep(path)
    except (wandb.errors.CommError, ValueError) as error:
        raise UserError(f"{path}: W&B could not load this sweep ({error})") from None
    return [
        RunResult(
            run_id=run.id, status=run.state, config=dict(run.config),
            history=list(run.scan_history(keys=list(HISTORY_KEYS))),
            summary=dict(run.summary), seconds=run.summary.get(RUNTIME_KEY),
            data={name: value for name, value in (run.config.get(RUN_INFO_KEY) or {}).items() if name in DATA_NAMES},
        )
        for run in sweep.runs
    ]


def build_sweep_view(entity: str, project: str, sweep_id: str, params: Sequence[str]) -> Workspace:
    """A workspace view of one sweep: parallel coordinates of `params` and the metrics, parameter importance
    against val/acc, and val accuracy per epoch for every run."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(name)) for name in params]
    columns += [wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(name))
                for name in (SELECTION_METRIC, TEST_ACC)]
    panels = [
        wr.ParallelCoordinatesPlot(title="Settings and accuracy", columns=columns),
        wr.ParameterImportancePlot(with_respect_to=SELECTION_METRIC),
        wr.LinePlot(title="Validation accuracy per epoch", x=EPOCH, y=[SELECTION_METRIC]),
    ]
    return ws.Workspace(
        entity=entity, project=project, name=f"sweep {sweep_id}",
        sections=[ws.Section(name=f"Sweep {sweep_id}", panels=panels, is_open=True)],
        runset_settings=ws.RunsetSettings(filters=expr.And(expr.Metric("Sweep") == sweep_id)),
    )


def save_sweep_view(view: Workspace) -> str:
    """Save the view on the W&B server; its URL."""
    view.save()
    return view.url

