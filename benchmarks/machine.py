"""What a measurement ran on: the machine, the software, the commit; and how long this process has lived."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from cifar_resnet.children import PACKAGE_ROOT


def machine_info(device: torch.device) -> dict[str, Any]:
    import torchvision

    cpu_model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model,
        "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count(),
        "load_average": os.getloadavg(),  # 1, 5, 15 min: other work on a shared machine skews every timing
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
    }


def provenance(machine: dict[str, Any]) -> str:
    """One line naming the machine, its load, the software, the date and the commit of a result."""
    load = ", ".join(f"{x:.1f}" for x in machine["load_average"])
    return (f"{machine['device_name']} ({machine['device']}; {machine['cpu_cores']} CPU cores: "
            f"{machine['cpu_model']}; load average {load} at the start), torch {machine['torch']}, {machine['date']}, "
            f"commit {machine['commit']}")


def git_commit() -> str:
    """`GIT_COMMIT` when set (a copy of the tree without its .git), else the short commit of the package's checkout
    with `-dirty` when tracked files have changed; `unknown` if neither."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    root = PACKAGE_ROOT
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def seconds_since_process_start() -> float | None:
    """Seconds since this process started (interpreter start-up and imports included); None where /proc is not."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")
