"""Runs per GPU: the table keyed by GPU memory, `auto` for the agent and the sweep, and bad input.

There is no GPU here: a stand-in `nvidia-smi` on PATH reports the GPUs (the one test double; the rest is real).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.sweeps import write_sweep

from cifar_resnet.agent import plan_agents
from cifar_resnet.cli import main
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


@pytest.mark.quick
@pytest.mark.parametrize(("rows", "asked", "missing", "has"), [
    (None, "0", "0", "no GPU"),  # no nvidia-smi, and CUDA finds none
    ([(0, "GPU-aaa", H100_MIB), (1, "GPU-bbb", A10_MIB)], "1,2,3", "2, 3", "GPU 0, 1"),
])
def test_a_sweep_on_gpus_this_machine_lacks_is_one_line_and_starts_nothing(tmp_path, fake_gpus, capsys, rows, asked,
                                                                           missing, has):
    """Issue 27: `--gpus 0` without a GPU was accepted, said each run started on GPU 0, and trained on the CPU."""
    if rows is None and torch.cuda.device_count():
        pytest.skip("a GPU is here")
    fake_gpus(rows)
    path = write_sweep(tmp_path / "grid.yaml", {"seed": {"values": [1, 2]}}, command=["true"])  # fails fast, if run
    assert main(["sweep", str(path), "--gpus", asked, "--offline"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"ERROR: --gpus: GPU {missing} asked for, but this machine has {has}; name GPUs it has, or leave --gpus out "
        "to train on the CPU"]
    assert not Path("sweeps").exists()
