"""Runs per GPU: the table keyed by GPU memory, `auto` for the agent and the sweep, and bad input.

There is no GPU here: a stand-in `nvidia-smi` on PATH reports the GPUs (the one test double; the rest is real).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cifar_resnet.agent import plan_agents
from cifar_resnet.errors import UserError
from cifar_resnet.gpus import (
    RUNS_PER_GPU_BY_MEMORY_GIB,
    gpu_memory_gib,
    parse_runs_per_gpu,
    resolve_runs_per_gpu,
    runs_for_memory,
)
from cifar_resnet.sweep.command import parse_gpus

H100_MIB, A10_MIB = 81559, 23028


@pytest.fixture
def fake_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Put a stand-in nvidia-smi on PATH that lists the given (index, uuid, MiB) rows."""
    folder = tmp_path / "bin"
    folder.mkdir()

    def install(rows: list[tuple[int, str, int]]) -> None:
        script = folder / "nvidia-smi"
        lines = "\n".join(f"{index}, {uuid}, {mib}" for index, uuid, mib in rows)
        script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{lines}\nEOF\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")

    return install


def test_the_table_goes_down_with_memory_and_ends_at_one():
    minimums = [least for least, _ in RUNS_PER_GPU_BY_MEMORY_GIB]
    runs = [count for _, count in RUNS_PER_GPU_BY_MEMORY_GIB]
    assert minimums == sorted(minimums, reverse=True) and minimums[-1] == 0
    assert runs == sorted(runs, reverse=True) and runs[-1] == 1
    assert runs_for_memory(141) == runs_for_memory(79.6) == 6  # H200, H100: the measured six
    assert runs_for_memory(22.5) == 2 and runs_for_memory(8) == 1 and runs_for_memory(None) == 1


def test_auto_reads_the_smallest_listed_gpu(fake_gpus):
    fake_gpus([(0, "GPU-aaa", H100_MIB), (1, "GPU-bbb", A10_MIB)])
    assert gpu_memory_gib([]) == pytest.approx(A10_MIB / 1024)
    assert gpu_memory_gib(["0"]) == pytest.approx(H100_MIB / 1024)
    assert gpu_memory_gib(["GPU-aaa"]) == pytest.approx(H100_MIB / 1024)
    assert resolve_runs_per_gpu(None, ["0"]) == 6
    assert resolve_runs_per_gpu(None, ["0", "1"]) == 2
    assert resolve_runs_per_gpu(3, ["0", "1"]) == 3


def test_without_nvidia_smi_auto_is_one(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_memory_gib(["0"]) is None and resolve_runs_per_gpu(None, ["0"]) == 1


@pytest.mark.parametrize("text, message", [
    ("0", "--agents-per-gpu: must be >= 1 or auto, got 0"),
    ("two", "--agents-per-gpu: 'two' is not auto or a whole number"),
])
def test_bad_runs_per_gpu_is_one_line(text, message):
    with pytest.raises(UserError, match=message):
        parse_runs_per_gpu(text, "--agents-per-gpu")


def test_the_agent_and_the_sweep_put_auto_runs_on_each_gpu(fake_gpus):
    fake_gpus([(0, "GPU-aaa", H100_MIB), (1, "GPU-bbb", H100_MIB)])
    launches = plan_agents(["wandb", "agent", "x"], ["0", "1"], resolve_runs_per_gpu(None, ["0", "1"]))
    assert [launch.gpu for launch in launches] == ["0"] * 6 + ["1"] * 6
    assert parse_gpus("0,1", None) == ["0"] * 6 + ["1"] * 6  # --runs-per-gpu auto, the default
    assert parse_gpus("0,1", None, "2") == ["0", "0", "1", "1"]
    assert parse_gpus("0,1", 4) == ["0", "0", "1", "1"]  # --workers given: that many, spread over the GPUs
    with pytest.raises(UserError, match="does not match the 2 GPUs of --gpus 0,1 x 2 runs per GPU"):
        parse_gpus("0,1", 6, "2")
    with pytest.raises(UserError, match="--runs-per-gpu: must be >= 1"):
        parse_gpus("0,1", None, "0")
