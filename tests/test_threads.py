"""The CPU threads of each run (threads.py), decided in one place: the usable cores (the affinity, capped by a
cgroup quota), a lone run's share unless OMP_NUM_THREADS says otherwise, and an agent pool's runs sharing the
cores as a sweep's do."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import tiny_args

from cifar_resnet import threads
from cifar_resnet.staggered import Launch, run_staggered_statuses
from cifar_resnet.threads import cpu_threads_per_run, usable_cpu_cores


@pytest.mark.quick
def test_the_usable_cores_are_the_affinity_capped_by_a_cgroup_quota(tmp_path):
    cores = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")  # no quota
    assert usable_cpu_cores(cpu_max) == cores
    cpu_max.write_text("150000 100000\n")  # 1.5 cores: a container's --cpus=1.5
    assert usable_cpu_cores(cpu_max) == 1
    assert usable_cpu_cores(tmp_path / "absent") == cores


def test_a_lone_train_takes_its_share_of_the_cores_unless_omp_num_threads_says(tiny_config, monkeypatch):
    import torch

    from cifar_resnet.train import main as train_main

    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)  # the process's threads stay as the suite set them
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert train_main(tiny_args(tiny_config.replace(epochs=1))) == 0
    assert chosen == [cpu_threads_per_run(1)] == [usable_cpu_cores()]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # set by a sweep for its runs, or by the user: torch read it itself
    assert threads.set_cpu_threads() == torch.get_num_threads() and chosen == [usable_cpu_cores()]


@pytest.mark.quick
def test_agents_runs_share_the_cores_as_a_sweeps_do(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    given = []

    def start(argv, env):
        given.append(env)
        return subprocess.Popen(["true"])

    launches = [Launch(["wandb", "agent", "e/p/s"], gpu) for gpu in ("0", "0")]
    assert run_staggered_statuses(launches, 0.0, "agent", start) == [0, 0]
    assert [env["OMP_NUM_THREADS"] for env in given] == [str(cpu_threads_per_run(2))] * 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    given.clear()
    run_staggered_statuses(launches[:1], 0.0, "agent", start)
    assert given[0]["OMP_NUM_THREADS"] == "3"


@pytest.mark.quick
def test_a_child_that_cannot_start_stops_those_started_before_it():
    started = []

    def start(argv, env):
        if started:
            raise OSError(f"cannot start {argv[0]}")
        started.append(subprocess.Popen(["sleep", "600"]))
        return started[-1]

    launches = [Launch(["sleep"], None), Launch(["no-such-agent"], None)]
    with pytest.raises(OSError, match="cannot start no-such-agent"):
        run_staggered_statuses(launches, 0.0, "agent", start)
    assert started[0].poll() is not None  # stopped, not orphaned
