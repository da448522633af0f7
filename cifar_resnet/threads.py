"""The CPU thread budget: the cores this process may use, and each run's share of them when several train at
once, so that concurrent runs do not oversubscribe the cores."""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" in microseconds, or "max <period>"


def usable_cpu_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPU cores this process may use: its affinity, capped by a cgroup CPU quota (a container's `--cpus`, a
    Kubernetes CPU limit), which the affinity does not show (a pod limited to 7 cores still sees all of a node's)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):  # no cgroup v2 here, or no quota file: the affinity alone
        pass
    return cores


def cpu_threads_per_run(concurrent_runs: int) -> int:
    """The one place that decides a run's CPU threads: the usable cores shared out among the runs at once, so that
    they do not oversubscribe them (on 2 cores, two runs of 2 threads each took 3.8x as long as two runs of 1
    thread). A run alone gets every core; OMP_NUM_THREADS, where set, wins over this everywhere."""
    return max(1, usable_cpu_cores() // concurrent_runs)


def set_cpu_threads(concurrent_runs: int = 1) -> int:
    """Give torch this process's share of the cores as one of `concurrent_runs` (`train`, a benchmark); where
    OMP_NUM_THREADS is set (by the tool that started it, or by the user), torch has read it already. Returns the
    threads torch uses."""
    import torch  # deferred: the tools that never train need not import it

    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(cpu_threads_per_run(concurrent_runs))
    return torch.get_num_threads()
