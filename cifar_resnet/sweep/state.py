"""The state of an offline sweep, `OUTPUT_DIR/sweep.json`, shared by every process that works on the sweep.

Several `cifar-resnet sweep --offline` processes, on one host or on many hosts over a shared filesystem, join one
sweep through its folder. Every change is a transaction: take the sweep's lock (`sweep.lock`, a blocking flock),
read `sweep.json`, change it, write it atomically, release. So two processes never claim the same run, and no
process overwrites what another recorded.

A running run carries its owner (`owner_name`: host, pid and a random id) and a lease: `heartbeat_at`, renewed by
its owner while the run's process lives, and `lease_seconds`, the owner's promise. A run whose lease has run out
(its owner's host died, or the owner was killed) may be taken over by any other process: it restarts under the
same run id and resumes from its folder's `last.pt`. Wall-clock time (Unix seconds), so the hosts' clocks must
agree to within a small fraction of the lease (NTP).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import atomic_write_json, file_lock, make_folder, storage_error
from ..names import check_run_id

STATE_FILE = "sweep.json"
STATE_LOCK_FILE = "sweep.lock"  # flock'ed for each transaction on sweep.json
LEASE_SECONDS = 60.0  # a running run whose owner has not renewed it for this long may be taken over
LEASE_RENEW_SECONDS = 10.0  # how often an owner renews the leases of its runs (at most)
RENEWALS_PER_LEASE = 6  # a short lease (tests) is renewed this many times over its length

# Local run states: pending (an older sweep.json's proposal, not started), running (under its owner's lease),
# finished, failed, stopped (by early_terminate), preempted (stopped by a signal after saving its state; any
# process resumes it under the same run id).
DONE = ("finished", "stopped")
ENDED = (*DONE, "failed")
CLAIMABLE = ("pending", "preempted")
# What flock(2) fails with on a file system without locks; any other error means the folder cannot be written.
NO_FLOCK_ERRNOS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def owner_name() -> str:
    """This process's name as an owner of runs: host, pid, and a random id (pids repeat across hosts)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def renew_interval(lease_seconds: float) -> float:
    return min(LEASE_RENEW_SECONDS, lease_seconds / RENEWALS_PER_LEASE)


@dataclass
class LocalRun:
    run_id: str
    params: dict[str, Any]  # the proposer's proposal: setting -> value
    state: str = "pending"
    exit_code: int | None = None
    owner: str | None = None  # the process running it, or the last one that did
    heartbeat_at: float | None = None  # Unix seconds of the owner's last renewal
    lease_seconds: float | None = None  # how long after heartbeat_at the owner's claim holds
    attempts: int = 0  # times a process started it
    ended_at: float | None = None  # Unix seconds
    reason: str | None = None  # why it failed, where the exit status does not say

    def lease_expired(self, now: float) -> bool:
        """A running run whose owner stopped renewing it (an older sweep.json's running run has no lease)."""
        if self.state != "running":
            return False
        if self.heartbeat_at is None:
            return True
        return now > self.heartbeat_at + (self.lease_seconds or LEASE_SECONDS)


@dataclass
class SweepState:
    sweep_id: str
    sweep: dict[str, Any]
    runs: list[LocalRun] = field(default_factory=list)

    def find(self, run_id: str) -> LocalRun | None:
        return next((run for run in self.runs if run.run_id == run_id), None)

    def count(self, state: str) -> int:
        return sum(run.state == state for run in self.runs)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> SweepState:
        runs = [LocalRun(**run) for run in saved["runs"]]
        for run in runs:  # each names a folder in the sweep's
            check_run_id(run.run_id)
        return cls(saved["sweep_id"], saved["sweep"], runs)


@contextlib.contextmanager
def state_lock(out_dir: Path) -> Iterator[None]:
    """The sweep folder's lock; a filesystem without flock (some NFS mounts) is refused in one line, a folder that
    cannot be written (read-only) is a StorageError."""
    path = out_dir / STATE_LOCK_FILE
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(path))
        except OSError as error:
            if error.errno not in NO_FLOCK_ERRNOS:
                raise storage_error(path, error) from None
            raise UserError(f"{path}: cannot lock it ({error.strerror or error}): processes sharing a sweep folder "
                            "need a filesystem with flock (local, NFS v4 with locking, Lustre or GPFS with flock); "
                            "use another --output-dir") from None
        yield


class SweepFolder:
    """An offline sweep's folder: its state, read and changed only inside `transaction()`."""

    def __init__(self, out_dir: Path, sweep: dict[str, Any], new_sweep_id: Callable[[], str]) -> None:
        self.out_dir, self.new_sweep_id = out_dir, new_sweep_id
        self.sweep = json.loads(json.dumps(sweep))  # as it reads back from JSON

    @property
    def path(self) -> Path:
        return self.out_dir / STATE_FILE

    def read(self) -> SweepState | None:
        """The saved state (call with the lock held), or None for a new sweep; another sweep's is an error."""
        if not self.path.exists():
            return None
        try:
            state = SweepState.from_json(json.loads(self.path.read_text()))
        except (ValueError, KeyError, TypeError, UserError) as error:
            raise UserError(f"{self.path}: not a sweep state this version can read ({error}); give another "
                            "--output-dir or remove that folder") from None
        if state.sweep != self.sweep:
            raise UserError(f"{self.out_dir}: holds another sweep (its {STATE_FILE} has other settings); "
                            "give another --output-dir or remove that folder")
        return state

    @contextlib.contextmanager
    def transaction(self) -> Iterator[SweepState]:
        """Lock, read, yield the state to change, write it back (atomically, when changed), unlock."""
        make_folder(self.out_dir, "--output-dir")
        with state_lock(self.out_dir):
            saved = self.read()
            state = saved or SweepState(self.new_sweep_id(), self.sweep)
            before = None if saved is None else saved.to_json()
            yield state
            after = state.to_json()
            if after != before:
                atomic_write_json(self.path, after)

