"""Real file systems a test mounts for itself: a small or a read-only tmpfs (mounting needs root: the test is
skipped, saying so, without it); read-only folders as root sees them."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

# Root ignores folder permissions unless it drops that power: run under this prefix, a read-only folder is to root
# what it is to anyone else (needs util-linux's setpriv).
WITHOUT_ROOTS_OVERRIDE = ["setpriv", "--inh-caps=-dac_override", "--bounding-set=-dac_override"] \
    if os.geteuid() == 0 else []


@contextlib.contextmanager
def tmpfs(mount_point: Path, options: str) -> Iterator[Path]:
    """A real file system (tmpfs, mounted with `options`) at `mount_point` for the block, unmounted after it."""
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)
