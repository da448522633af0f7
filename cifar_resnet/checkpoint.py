"""Checkpoints in a run's folder, written atomically and loadable with `torch.load(..., weights_only=True)`.

- `best.pt`: the weights of the best validation epoch, with the config, epoch, metrics and class names.
- `last.pt`: the full training state after the last completed epoch, for resuming a preempted run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import Config
from .errors import UserError
from .files import atomic_torch_save

BEST_CHECKPOINT = "best.pt"
RESUME_CHECKPOINT = "last.pt"


def save_best(
    path: Path,
    model_state: dict[str, torch.Tensor],
    config: Config,
    epoch: int,
    metrics: dict[str, float],
    classes: list[str],
) -> None:
    cpu_state = {name: tensor.detach().cpu() for name, tensor in model_state.items()}
    atomic_torch_save(
        path, {"model": cpu_state, "config": config.to_dict(), "epoch": epoch, "metrics": metrics, "classes": classes}
    )


def save_resume(path: Path, train_state: dict[str, Any], config: Config) -> None:
    atomic_torch_save(path, {"state": train_state, "config": config.to_dict()})


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written here; a missing or damaged file is a user error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint: {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for a damaged or foreign file
        raise UserError(f"checkpoint: {path} is not a readable checkpoint ({type(error).__name__})") from None
