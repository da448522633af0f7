"""`cifar-resnet sweep`'s command (sweep/command.py): its options, the line that says why it runs offline, the
warning for a random sweep without --count, and the online path: the sweep created in W&B and one pinned agent per
GPU (a stand-in `wandb` executable: there is no W&B server here)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest
from helpers.sweeps import GRID, tiny_settings, write_sweep

from cifar_resnet.cli import main
from cifar_resnet.sweep import command as sweep_command
from cifar_resnet.run_contract import TRAINER_VARIABLE
from cifar_resnet.sweep.command import offline_reason


def test_sweep_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for option in ("--workers", "--gpus", "--count", "--project", "--offline", "--set", "--output-dir"):
        assert option in shown


@pytest.mark.quick
def test_the_offline_line_says_why(monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    assert offline_reason(False).startswith("no W&B credentials")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert offline_reason(False) == "WANDB_MODE=offline"
    assert offline_reason(True) == "--offline"


@pytest.mark.parametrize("count", [None, 2])
def test_random_without_count_says_at_the_start_that_it_runs_until_stopped(tmp_path, tiny_config, capsys, count):
    # A command that cannot start: the sweep gives up after a few failed runs instead of running for ever.
    parameters = tiny_settings(tiny_config) | {"seed": {"distribution": "int_uniform", "min": 0, "max": 1000}}
    path = write_sweep(tmp_path / "endless.yaml", parameters, method="random",
                       command=["no-such-python", "-m", "${program}", "${args}"])

    main(["sweep", str(path), "--offline", *(["--count", str(count)] if count else [])])

    lines = capsys.readouterr().err.splitlines()
    said = [index for index, line in enumerate(lines) if "until it is stopped" in line]
    if count:
        assert said == []
    else:
        assert said == [0] and lines[0] == (f"WARNING: {path}: method random without --count proposes runs until it "
                                            "is stopped (Ctrl-C; the same command resumes it); --count N ends it "
                                            "after N runs")


FAKE_WANDB = """\
#!{python}
# A stand-in for the `wandb` executable: records how it was called, then exits with FAKE_WANDB_EXIT.
import json, os, sys, time
with open(os.environ["FAKE_WANDB_CALLS"], "a") as calls:
    calls.write(json.dumps({{"argv": sys.argv[1:], "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
                             "trainer": os.environ.get("{trainer}"), "at": time.monotonic()}}) + "\\n")
sys.exit(int(os.environ.get("FAKE_WANDB_EXIT", "0")))
"""


@pytest.fixture
def online(tmp_path, monkeypatch):
    """W&B credentials and a stand-in `wandb` on PATH; `wandb.sweep` records its sweep instead of calling W&B."""
    import wandb

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "wandb"
    fake.write_text(FAKE_WANDB.format(python=sys.executable, trainer=TRAINER_VARIABLE))
    fake.chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_WANDB_CALLS", str(calls))
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setattr(sweep_command, "DEFAULT_STAGGER_SECONDS", 1.0)
    created: list[dict[str, Any]] = []
    monkeypatch.setattr(wandb, "sweep", lambda sweep, project: created.append(
        {"sweep": sweep, "project": project}) or "sweep123")

    def agent_calls() -> list[dict[str, Any]]:
        return [json.loads(line) for line in calls.read_text().splitlines()]

    return created, agent_calls


def test_online_creates_the_sweep_and_starts_one_pinned_agent_per_gpu(tmp_path, tiny_config, online, fake_gpus):
    created, agent_calls = online
    fake_gpus([(0, "GPU-aaa", 8192), (1, "GPU-bbb", 8192)])  # small: one run per GPU
    path = write_sweep(tmp_path / "grid.yaml", GRID | tiny_settings(tiny_config))

    assert main(["sweep", str(path), "--gpus", "0,1", "--count", "3", "--project", "proj",
                 "--set", "epochs=4"]) == 0

    (sweep,) = created
    assert sweep["project"] == "proj"
    assert sweep["sweep"]["run_cap"] == 3
    assert sweep["sweep"]["parameters"]["epochs"] == {"value": 4}
    calls = agent_calls()
    assert [call["argv"] for call in calls] == [["agent", "--forward-signals", "--project", "proj", "sweep123"]] * 2
    assert [call["gpu"] for call in calls] == ["0", "1"]
    assert [call["trainer"] for call in calls] == [None, None]  # one run per GPU: no trainer
    # Staggered: each stand-in stamps the time once its own Python has started, which varies by a few tenths.
    assert calls[1]["at"] - calls[0]["at"] >= 0.5
    assert not (tmp_path / "sweeps").exists()  # nothing ran here


def test_online_with_pack_the_agents_runs_hand_their_training_to_the_machines_trainer(tmp_path, tiny_config,
                                                                                      online):
    """`--pack` online, as offline and as `cifar-resnet agent`: the agents' runs find the trainer (a real one,
    started for the sweep and stopped after it) through the variable their agent inherits."""
    path = write_sweep(tmp_path / "grid.yaml", GRID | tiny_settings(tiny_config))

    assert main(["sweep", str(path), "--workers", "2", "--pack"]) == 0

    trainers = {call["trainer"] for call in online[1]()}
    assert len(trainers) == 1 and None not in trainers  # both agents, one trainer for the machine


def test_online_agent_failure_is_the_exit_status(tmp_path, tiny_config, online, monkeypatch):
    monkeypatch.setenv("FAKE_WANDB_EXIT", "1")
    path = write_sweep(tmp_path / "grid.yaml", GRID | tiny_settings(tiny_config))

    assert main(["sweep", str(path), "--workers", "2"]) == 1
    assert [call["gpu"] for call in online[1]()] == [None, None]
