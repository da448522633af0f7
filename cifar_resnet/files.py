"""Atomic writes and inter-process locks: no reader ever sees a half-written file, and several agents on one
host can share a data folder or an output folder."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from .errors import StorageError, UserError

BYTES_PER_MB = 1e6  # free space is reported in MB
NOT_WRITABLE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)  # a read-only file system, no permission


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error, move it onto `path` in one step.

    The temporary file sits in the same folder, so `os.replace` is atomic; a crash leaves at worst a stray
    `.tmp` file, never a truncated `path`. `durable` fsyncs the file first, so that a machine that goes down keeps
    it too; a file rewritten every fraction of a second that nothing needs after a crash (a run's live progress)
    skips that wait, which can take from milliseconds to most of a second.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any], durable: bool = True) -> None:
    """Write `path` atomically with `write(file)`; any OSError (a full disk, ...) becomes one StorageError line."""
    try:
        with atomic_path(path, durable) as tmp, open(tmp, "wb") as f:
            write(f)
    except OSError as error:
        raise storage_error(Path(path), error) from None


def storage_error(path: Path, error: OSError) -> StorageError:
    """One line naming `path` and why it could not be written; for a full disk, how much space is left."""
    if error.errno == errno.ENOSPC:
        try:
            free = f"{shutil.disk_usage(path.parent).free / BYTES_PER_MB:.1f} MB free there"
        except OSError:
            free = "free space unknown"
        reason = f"no space left on device ({free})"
    else:
        reason = _reason(error)
    return StorageError(f"could not write {path}: {reason}; its previous version, if any, is intact")


def _reason(error: OSError) -> str:
    """The operating system's reason, and for a folder that cannot be written what to do."""
    advice = " (make the folder writable, or give another one)" if error.errno in NOT_WRITABLE_ERRNOS else ""
    return f"{error.strerror or error}{advice}"


def atomic_write_json(path: str | os.PathLike[str], value: Any, durable: bool = True) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(value, indent=2, sort_keys=False) + "\n").encode()), durable)


class _WriteErrorKeeper:
    """A file for torch.save that keeps the OSError its write() raised: torch reports a failed write as a
    RuntimeError ("unexpected pos ..."), without the errno that says the disk is full."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def atomic_torch_save(path: str | os.PathLike[str], value: Any) -> None:
    def write(f: IO[bytes]) -> None:
        keeper = _WriteErrorKeeper(f)
        try:
            torch.save(value, keeper)
        except RuntimeError:
            if keeper.error is not None:
                raise keeper.error from None
            raise

    atomic_write(path, write)


def check_folder_path(folder: Path, setting: str) -> None:
    """A UserError naming `setting` (the setting that gave the path) when a file stands where `folder`, or a folder
    above it, would be: the user's mistake, found before anything is written."""
    for path in (folder, *folder.parents):
        if os.path.exists(path):
            if not os.path.isdir(path):
                raise UserError(f"{setting}: {path} is a file, not a folder; give {setting} a folder")
            return


def make_folder(folder: Path, setting: str) -> None:
    """Create `folder` and the folders above it. A file in the way is the user's mistake (a UserError naming
    `setting`); a folder that cannot be made (a read-only file system, no permission) the machine's (StorageError)."""
    check_folder_path(folder, setting)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StorageError(f"could not create folder {folder}: {_reason(error)}") from None


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if missing) for the block; other processes wait."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


LOCK_FILE = ".lock"  # the lock of a folder that one process at a time may work in (a run's, a sweep's)


class FolderBusy(Exception):
    """Another process holds the folder's lock."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold `folder`'s lock (`folder/.lock`, created with the folder) for the block, or raise FolderBusy at once.

    The kernel drops the lock when its holder exits, even by SIGKILL, so a crashed run never leaves its folder
    locked for ever. A folder that cannot be written (read-only, full) is a StorageError.
    """
    path = Path(folder) / LOCK_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+b")  # closed by the with below
    except OSError as error:
        raise storage_error(path, error) from None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(str(folder)) from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
