"""Checkpoints in a run's folder, written atomically and loadable with `torch.load(..., weights_only=True)`.

- `best.pt` (`RunFolder.best`): the weights of the best validation epoch, with the config, epoch, metrics and class
  names.
- `last.pt` (`RunFolder.last`): the full training state after the last completed epoch, for resuming a preempted run.

Both can be evaluated (`read_weights`): a best.pt's weights, or a last.pt's best weights so far. A run writes them
off its training path, through a `CheckpointWriter`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .config import Config
from .engine.streams import host_copies
from .errors import UserError
from .files import atomic_torch_save

log = logging.getLogger(__name__)

KEYS_SHOWN = 3  # of a foreign checkpoint's keys, in its error message


def save_best(
    path: Path,
    model_state: dict[str, torch.Tensor],
    config: Config,
    epoch: int,
    metrics: dict[str, float],
    classes: list[str],
) -> None:
    """`model_state`: on the host already (a run's snapshot, or the state of a last.pt), as saved."""
    atomic_torch_save(
        path, {"model": model_state, "config": config.to_dict(), "epoch": epoch, "metrics": metrics, "classes": classes}
    )


def save_resume(path: Path, train_state: dict[str, Any], config: Config) -> None:
    atomic_torch_save(path, {"state": train_state, "config": config.to_dict()})


def host_copy(value: Any) -> Any:
    """`value` (dicts, lists and tuples of tensors and plain values) with every tensor copied into host memory: a
    snapshot that the training's in-place updates cannot touch (a CPU tensor is copied too). Call it at a sync point,
    the end of an epoch. The copies of CUDA tensors go into pinned memory without blocking, and the host waits once
    for all of them (`host_copies`), not once per tensor: a pack's other members are not kept waiting. Drop the
    snapshot on the thread that took it (the writer's thread must not call CUDA, as freeing pinned memory does, while
    the run's thread may be capturing a graph)."""
    leaves, spec = pytree.tree_flatten(value)
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    copies = iter(host_copies(tensors))
    return pytree.tree_unflatten([next(copies) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves], spec)


class CheckpointWriter:
    """Writes a run's checkpoints on a background thread, so that saving them (torch.save and fsync of tens of MB)
    is off the training path.

    One writer per run folder, owned by whoever owns the run's files (the runner). `submit(*saves)` waits for the
    previous batch of saves to finish (raising its error: a full disk's StorageError), then runs the new ones in
    order on a fresh thread; each is a function that writes one file atomically (`save_best`, `save_resume`) from
    a `host_copy` taken at the epoch's sync point, never from tensors that training still updates. `wait()` waits
    for the batch in flight and raises its error. As a context manager it waits on the way out, however the block
    ends (the run's end, an error, a signal's Interrupted), so that the process never ends in the middle of a write;
    a write's error then ends the run, unless another error already does (that one is raised, the write's logged).
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, *saves: Callable[[], None]) -> None:
        self.wait()

        def write() -> None:
            try:
                for save in saves:
                    save()
            except BaseException as error:  # handed to the run's thread by wait()
                self._error = error

        self._thread = threading.Thread(target=write, name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if error is None:
            self.wait()
            return
        try:
            self.wait()
        except Exception as write_error:
            log.error("%s", write_error)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written here; a missing or damaged file is a user error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint: {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for a damaged or foreign file
        raise UserError(f"checkpoint: {path} is not a readable checkpoint ({type(error).__name__})") from None


@dataclass
class SavedWeights:
    """The weights a checkpoint offers for evaluation."""

    config: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    epoch: int  # the epoch the weights are from
    classes: list[str] | None  # None for a last.pt, which does not store them


def read_weights(path: str | Path) -> SavedWeights:
    """The weights to evaluate in a `best.pt`, or the best weights so far in a `last.pt` (what its run would
    report if it stopped now); any other file, or one with the right keys holding the wrong types, is a user error
    naming it."""
    saved = load_checkpoint(path)
    if _holds(saved, model=_is_weights, config=dict, epoch=int, classes=_is_names):
        return SavedWeights(saved["config"], saved["model"], saved["epoch"], list(saved["classes"]))
    if _is_resume(saved):
        return SavedWeights(saved["config"], saved["state"]["best_model_state"], saved["state"]["best_epoch"], None)
    raise UserError(
        f"checkpoint: {path} is not a best.pt or last.pt written by cifar-resnet train (it holds {_describe(saved)})"
    )


def check_resume(path: Path, saved: Any) -> None:
    """A user error naming `path` unless `saved` (what it holds) is a last.pt written by cifar-resnet train."""
    if not _is_resume(saved):
        raise UserError(f"checkpoint: {path} is not a last.pt written by cifar-resnet train (it holds "
                        f"{_describe(saved)}); remove it to start the run over")


RESUME_STATE_KEYS = ("model", "optimizer", "scheduler", "generator", "epoch", "best_epoch", "best_val_acc",
                     "best_model_state", "history")  # engine.loop.TrainState.state_dict's


def _is_resume(saved: Any) -> bool:
    """A last.pt: the config, and a training state whose best epoch is one of its history's."""
    if not (_holds(saved, config=dict, state=dict) and set(RESUME_STATE_KEYS) <= saved["state"].keys()):
        return False
    state = saved["state"]
    return (_holds(state, model=_is_weights, best_model_state=_is_weights, epoch=int, best_epoch=int,
                   history=list) and 1 <= state["best_epoch"] <= min(state["epoch"], len(state["history"])))


def _holds(saved: Any, **kinds: type | Any) -> bool:
    """Whether `saved` is a dict whose entries `kinds` names are there, each of its type (or passing its check)."""
    if not isinstance(saved, dict) or not kinds.keys() <= saved.keys():
        return False
    return all(isinstance(saved[key], kind) if isinstance(kind, type) else kind(saved[key])
               for key, kind in kinds.items())


def _is_weights(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(tensor, torch.Tensor) for tensor in value.values())


def _is_names(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value)


def _describe(saved: Any) -> str:
    """What a foreign checkpoint holds, in a few words: enough to recognise, say, a plain state_dict."""
    if not isinstance(saved, dict):
        return f"a {type(saved).__name__}"
    keys = [repr(key) for key in list(saved)[:KEYS_SHOWN]]
    more = ", ..." if len(saved) > KEYS_SHOWN else ""
    return f"a dict of {len(saved)} entries: {', '.join(keys)}{more}" if saved else "an empty dict"
