"""The sweep file's checks and W&B's proposer (sweep/plan.py): a bad sweep file or option is one line and exit 2,
in bounded memory; a sweep's default folder is its name and a digest of its settings; a name that would leave its
folder is refused; a command that does not start our training is warned about; hyperband stops a run on its
records."""

from __future__ import annotations

import logging
import re
import resource
import subprocess
import sys

import pytest
import yaml
from conftest import REPO
from helpers.sweeps import SIGNAL_TIMEOUT_SECONDS, folder_of, sweep_state, tiny_settings, write_sweep

from cifar_resnet.cli import main
from cifar_resnet.records import RunRecord
from cifar_resnet.sweep.plan import load_sweep, runs_to_stop, starts_our_training, warn_unless_our_entry_point
from cifar_resnet.sweep.state import LocalRun


@pytest.mark.parametrize(("content", "extra_args", "message"), [
    ("method: grid\nparameters: [\n", [], "not valid YAML at line 3"),
    ("method: grid\nparameters: [1, 2]\n", [], "parameters: expected a mapping of setting names to {value: ...}"),
    ("a: &a [*a]\n", [], "an alias (*name) inside its own anchor"),
    ("- just\n- a list\n", [], "not a sweep"),
    ("method: gird\nparameters:\n  learning_rate: {values: [0.1]}\n", [], "not a valid W&B sweep: 'gird' is not one"),
    ("method: grid\nparameters:\n  learning_rate: {min: 0.0001, max: 0.1}\n", [],
     "parameter learning_rate: a grid needs `values`"),
    ("method: grid\nparameters:\n  lr: {values: [0.1]}\n", [], "unknown setting 'lr'"),
    ("method: grid\nparameters:\n  optimizer: {values: [adam, rmsprop]}\n", [], "optimizer: 'rmsprop' is not one of"),
    ("method: random\nparameters:\n  learning_rate: {min: -1.0, max: 0.1}\n", [], "learning_rate: must be > 0"),
    ("method: bayes\nparameters:\n  learning_rate: {min: 0.001, max: 0.1}\n", [], "bayes needs a metric"),
    ("method: grid\nparameters:\n  output_dir: {value: x}\n", [], "use --output-dir instead"),
    ("method: grid\nparameters:\n  epochs: {value: 2}\n", ["--set", "epochs=two"], "epochs: 'two' is not a valid int"),
    ("method: grid\nparameters:\n  epochs: {value: 2}\n", ["--set", "epoch=2"], "unknown setting 'epoch'"),
    ("method: grid\nparameters:\n  epochs: {value: 2}\n", ["--set", "epochs"], "expected name=value"),
    ("method: grid\nparameters:\n  epochs: {value: 2}\n", ["--gpus", "0,x"], "--gpus: expected comma-separated"),
    ("method: grid\nparameters:\n  epochs: {value: 2}\n", ["--gpus", "0,1", "--workers", "3"], "does not match"),
    ("method: grid\nparameters:\n  epochs: {value: 2}\n", ["--count", "0"], "--count: must be >= 1"),
    ("method: grid\nparameters:\n  epochs: {value: 2}\n", [], "no program, and the command runs ${program}"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, content, extra_args, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(content)

    assert main(["sweep", str(path), "--offline", *extra_args]) == 2

    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ERROR: ") and message in err
    assert not (tmp_path / "sweeps").exists()  # nothing started, nothing written


# A few lines that expand to 9**9 (387 million) strings: PyYAML shares the aliased lists, and whatever walks the
# document later expands them (here the agent's command macros: MemoryError, with a traceback, before issue 23).
ALIAS_BOMB = "method: grid\nprogram: cifar_resnet.train\nparameters: {epochs: {value: 1}}\ncommand: [" + ", ".join(
    f"&a{level} [{', '.join([f'*a{level - 1}' if level else 'lol'] * 9)}]" for level in range(9)) + "]\n"
SWEEP_MEMORY_BYTES = 2**30  # the sweep command's data segment in this test: torch's import needs about half


@pytest.mark.parametrize(("content", "message"), [
    (ALIAS_BOMB.encode(), "more than 100,000 values once its aliases (*name) are expanded: not a sweep file"),
    (bytes(range(255, -1, -1)), "not UTF-8 text (byte 0 is 0xff): not a sweep file"),
    (b"# " + b"x" * 1_000_000, "more than 1,000,000 bytes: not a sweep file"),
], ids=["alias bomb", "random bytes", "too large"])
def test_a_file_that_is_no_sweep_fails_at_once_in_bounded_memory(tmp_path, content, message):
    """In a process whose memory is capped at 1 GiB: an alias bomb used to grow without bound (MemoryError after
    14 s); random bytes gave a UnicodeDecodeError's traceback."""
    path = tmp_path / "sweep.yaml"
    path.write_bytes(content)

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (SWEEP_MEMORY_BYTES, SWEEP_MEMORY_BYTES))

    done = subprocess.run([sys.executable, "-m", "cifar_resnet", "sweep", str(path), "--offline"], text=True,
                          capture_output=True, timeout=SIGNAL_TIMEOUT_SECONDS, preexec_fn=cap_memory)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr == f"ERROR: {path}: {message}\n"
    assert sorted(child.name for child in tmp_path.iterdir()) == ["sweep.yaml"]


def test_missing_sweep_file(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: cannot read the sweep file" in capsys.readouterr().err


@pytest.mark.quick
def test_the_default_folder_is_the_sweeps_name_and_a_digest_of_its_settings(tmp_path):
    trial = REPO / "examples" / "trial-sweep.yaml"
    folder = folder_of(trial)
    assert re.fullmatch(r"sweeps/trial-[0-9a-f]{8}", folder.as_posix())
    assert folder_of(trial) == folder  # the same command finds its folder again
    real = folder_of(trial, "dataset=imagefolder", "data_dir=/data/cifar10-jpeg")
    assert real != folder and real.name.startswith("trial-")
    # --set values are typed, and their order does not matter: the same sweep, the same folder.
    assert folder_of(trial, "epochs=03", "width=8") == folder_of(trial, "width=8", "epochs=3")
    unnamed = write_sweep(tmp_path / "my grid.yaml", {"epochs": {"value": 1}})
    assert folder_of(unnamed).name.startswith("my-grid-")  # no name: the file's stem, made a folder name


@pytest.mark.parametrize("name", ["..", "../escape", "/", ".hidden"])
def test_a_sweep_name_that_would_leave_its_folder_is_one_line_and_starts_nothing(tmp_path, tiny_config, capsys,
                                                                                   name):
    """Issue 23: a sweep named `..` wrote its sweep.json and its runs into the working folder."""
    path = write_sweep(tmp_path / "named.yaml", tiny_settings(tiny_config), name=name)

    assert main(["sweep", str(path), "--offline"]) == 2

    assert capsys.readouterr().err == (
        f"ERROR: sweep name {name!r}: a sweep's name names its folder: 1 to 128 characters, no / or \\, not "
        "starting with . (set name: in the sweep file, or give --output-dir)\n")
    assert sorted(child.name for child in tmp_path.iterdir()) == ["named.yaml"]


def test_the_repository_sweep_starts_our_training_without_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="cifar_resnet"):
        warn_unless_our_entry_point(load_sweep(REPO / "sweep.yaml", []))
    assert caplog.records == []
    assert starts_our_training(["cifar-resnet", "train", "--epochs=1"])
    assert starts_our_training(["/usr/bin/env", "python", "-m", "cifar_resnet", "train"])
    assert not starts_our_training(["/usr/bin/env", "python", "cifar_resnet.train", "--epochs=1"])


def test_a_program_without_a_command_is_warned_about_and_its_runs_fail(tmp_path, tiny_config, capsys):
    """W&B's default command runs `python cifar_resnet.train`, a file path: warned when the sweep starts; the first
    run then fails with Python's own message (exit 2), which every run would repeat: the sweep stops there."""
    path = write_sweep(tmp_path / "no-command.yaml", tiny_settings(tiny_config))
    sweep = yaml.safe_load(path.read_text())
    del sweep["command"]
    path.write_text(yaml.safe_dump(sweep))
    out_dir = tmp_path / "out"

    assert main(["sweep", str(path), "--offline", "--output-dir", str(out_dir)]) == 2

    captured = capsys.readouterr()
    warning = next(line for line in captured.err.splitlines() if line.startswith("WARNING: "))
    assert f"{path}: the agent would run `/usr/bin/env python cifar_resnet.train`" in warning
    assert "-m, ${program}" in warning
    (run,) = sweep_state(out_dir)["runs"]
    assert run["state"] == "failed" and run["exit_code"] == 2
    stopped = [line for line in captured.err.splitlines() if line.startswith("ERROR: ")][-1]  # the sweep's last word
    assert "can't open file" in stopped and "cifar_resnet.train" in stopped and "the sweep stopped" in stopped


def test_early_terminate_stops_a_run_behind_the_others(tmp_path, tiny_config):
    """Hyperband through the real engine, on run records: a running run far behind a finished one is stopped."""
    sweep = {"method": "grid", "metric": {"name": "val/acc", "goal": "maximize"},
             "early_terminate": {"type": "hyperband", "min_iter": 1, "eta": 2},
             "parameters": {"learning_rate": {"values": [0.002, 0.001, 0.0005, 0.0001]}}}
    histories = {"good": [0.5, 0.6], "fine": [0.4, 0.5], "bad": [0.1], "fresh": []}
    runs = [LocalRun("good", {"learning_rate": 0.002}, "finished"),
            LocalRun("fine", {"learning_rate": 0.001}, "finished"),
            LocalRun("bad", {"learning_rate": 0.0005}, "running"),
            LocalRun("fresh", {"learning_rate": 0.0001}, "running")]
    records = {}
    for run in runs:
        history = [{"epoch": epoch, "val/acc": acc} for epoch, acc in enumerate(histories[run.run_id], 1)]
        RunRecord(run.run_id, tiny_config.to_dict(), history=history).save(tmp_path / run.run_id)
        records[run.run_id] = RunRecord.load(tmp_path / run.run_id)

    assert runs_to_stop(sweep, runs, records) == ["bad"]
