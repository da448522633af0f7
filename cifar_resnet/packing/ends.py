"""How a member of a pack ends, as one type, `MemberEnd`: what the pack hands back when a member leaves (its
training's return value, or the exception that ended it), its status and a failure's kind, its wire form (what a
trainer tells the member's run, `wire.py`), and what the run's process makes of that: its record, or the exception
that ended it raised again there, where train.py turns it into the run's exit status as for a run alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engine.loop import Interrupted
from ..errors import RunFailed, StorageError, TrainingDiverged, UserError
from ..records import AlreadyFinished, RunFolder, RunRecord

FINISHED, STOPPED, FAILED = "finished", "stopped", "failed"  # an end's status
USER, MACHINE, CRASH, DONE_BEFORE = "user", "machine", "crash", "done-before"  # a failure's kind


@dataclass
class MemberEnd:
    """A member's end: `result`, its training's return value, when it finished; else `error`, what ended it."""

    result: Any = None
    error: BaseException | None = None

    @property
    def status(self) -> str:
        if self.error is None:
            return FINISHED
        # Interrupted: asked to stop; GeneratorExit: its pack closed it. Its last.pt holds its last epoch either way.
        return STOPPED if isinstance(self.error, (Interrupted, GeneratorExit)) else FAILED

    @property
    def kind(self) -> str | None:
        """A failure's kind, which decides its run's exit status; None unless it failed."""
        if self.status != FAILED:
            return None
        if isinstance(self.error, AlreadyFinished):  # finished in an earlier attempt: nothing trained now
            return DONE_BEFORE
        if isinstance(self.error, UserError):
            return USER
        return MACHINE if isinstance(self.error, (TrainingDiverged, StorageError)) else CRASH

    def to_wire(self) -> dict[str, Any]:
        """As its run is told: `{"status"}`, and a failure's `"kind"` and `"error"`, its one line (a crash's with
        the exception's type; the trainer's log holds the traceback)."""
        if self.status != FAILED:
            return {"status": self.status}
        message = f"{type(self.error).__name__}: {self.error}" if self.kind == CRASH else str(self.error)
        return {"status": FAILED, "kind": self.kind, "error": message}

    @classmethod
    def from_wire(cls, end: dict[str, Any]) -> MemberEnd:
        """An end as the run's process hears it, its error the exception the run raises: Interrupted when stopped;
        AlreadyFinished, UserError, or RunFailed with the trainer's one line for a failure not of the user's
        making."""
        if end["status"] == FINISHED:
            return cls()
        if end["status"] == STOPPED:
            return cls(error=Interrupted("stopped in its trainer"))
        return cls(error={DONE_BEFORE: AlreadyFinished, USER: UserError}.get(end["kind"], RunFailed)(end["error"]))

    def record_or_raise(self, folder: RunFolder) -> RunRecord:
        """The run's record from its folder, once it has finished; else the exception that ended it, raised."""
        if self.error is not None:
            raise self.error
        return RunRecord.load(folder.path)
