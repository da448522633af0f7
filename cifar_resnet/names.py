"""The names that become folder names and W&B names, each checked in one place where it enters: run ids and sweep
names. A name that would leave its folder (`..`, `../escape`, `/`), or that W&B would refuse, is one UserError line
before anything trains.

- A run id names its folder (`output_dir/<run id>`), its W&B run and its artifacts (`model-<run id>`,
  `resume-<run id>`). It comes from WANDB_RUN_ID (set by W&B's agent, the offline sweep or the user), from W&B, or
  from a sweep's `sweep.json`.
- A sweep's name (its `name:`, else its file's name) names its folder under `sweeps/`.
"""

from __future__ import annotations

import os
import re

from .errors import UserError

RUN_ID_VARIABLE = "WANDB_RUN_ID"  # W&B's: the id a new run takes (or the run it resumes)
# W&B's artifact names (wandb.Artifact's own check): letters, digits, `-`, `_` and `.`, at most 128 characters. The
# longest artifact name this package gives a run is `resume-<run id>` (tracking.py), so a run id has 121 at most.
ARTIFACT_NAME_CHARS = re.compile(r"[A-Za-z0-9_.-]+")
RUN_ID_MAX_CHARS = 128 - len("resume-")
# A sweep's folder name keeps letters, digits (any script), `_`, `.` and `-`; runs of anything else become `-`.
SWEEP_FOLDER_OTHER_CHARS = re.compile(r"[^\w.-]+")
SWEEP_NAME_MAX_CHARS = 128  # a file name has 255 bytes at most; a digest may be appended


def check_run_id(run_id: str) -> str:
    """`run_id`, if it can name a run folder and W&B artifacts; else a UserError saying what a run id may be.

    A leading `.` is refused too: it would make `..` (the parent folder), `.` (output_dir itself) or a hidden folder
    that the report and the sweep's table do not list.
    """
    if not (ARTIFACT_NAME_CHARS.fullmatch(run_id) and len(run_id) <= RUN_ID_MAX_CHARS and run_id[0] != "."):
        raise UserError(
            f"run id {run_id!r}: a run id names the run's folder and its W&B artifacts: 1 to {RUN_ID_MAX_CHARS} "
            f"letters, digits, -, _ or ., not starting with . (set {RUN_ID_VARIABLE} to such an id, or unset it)"
        )
    return run_id


def requested_run_id() -> str | None:
    """The run id WANDB_RUN_ID asks for (checked), or None when W&B is to choose one."""
    run_id = os.environ.get(RUN_ID_VARIABLE)
    return None if run_id is None else check_run_id(run_id)


def sweep_folder_name(name: str) -> str:
    """The folder name of a sweep called `name`: runs of characters other than letters, digits, `_`, `.` and `-`
    become `-` (`my sweep` -> `my-sweep`). A name that would leave the folder it is made in (`..`, `../escape`,
    `/`) or be hidden (`.x`), an empty one and an overlong one are a UserError."""
    if not name.strip() or "/" in name or "\\" in name or name.startswith(".") or len(name) > SWEEP_NAME_MAX_CHARS:
        raise UserError(
            f"sweep name {name!r}: a sweep's name names its folder: 1 to {SWEEP_NAME_MAX_CHARS} characters, no / or "
            "\\, not starting with . (set name: in the sweep file, or give --output-dir)"
        )
    return SWEEP_FOLDER_OTHER_CHARS.sub("-", name)
