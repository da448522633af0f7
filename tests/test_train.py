"""`python -m cifar_resnet.train` (train.py), the entry point `wandb agent` starts, in its own process where the
process is at stake: a bad setting, a missing data source or device and a bad run id are one line before anything
starts; a diverging run fails; one process per run id; a finished run is never trained again; its help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_args
from helpers.runs import cli, error_lines, one_error_line, tree

from cifar_resnet.config import Config
from cifar_resnet.files import LOCK_FILE, folder_lock
from cifar_resnet.records import BEST_CHECKPOINT, RunRecord
from cifar_resnet.train import main as train_main


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optimizer=rmsprop"], "ERROR: optimizer: 'rmsprop' is not one of adam, adamw, sgd"),
        (["--dataset=mnist"], "ERROR: dataset: 'mnist' is not one of cifar10, imagefolder, synthetic"),
        (["--learning_rate=-1"], "ERROR: learning_rate: must be > 0, got -1.0"),
        (["--epochs=0"], "ERROR: epochs: must be > 0, got 0"),
        (["--batch_size=0"], "ERROR: batch_size: must be > 0, got 0"),
        # Issue 23: a float32 overflow deep in torch was a traceback (the other ranges: test_config.py).
        (["--learning_rate=1e300"], "ERROR: learning_rate: must be a finite float32 number (at most 3.40e+38), "
                                    "got 1e+300"),
    ],
)
def test_bad_settings_fail_in_one_line_before_anything_starts(tmp_path, capsys, args, message):
    """In this process: what `python -m cifar_resnet.train` says and returns (its process: the next test)."""
    assert train_main(args) == 2
    assert error_lines(capsys.readouterr().err) == [message]
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # no run folder, W&B not started


# The proxies a download goes through, all at a port where nothing listens: no internet, on any machine.
NO_INTERNET = {name: "http://127.0.0.1:9" for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")} | {
    "no_proxy": "", "NO_PROXY": ""}


def test_a_missing_data_source_or_device_is_one_line_before_wandb_starts(tmp_path):
    """Issue 27: each of these started an offline W&B run first: six `wandb:` lines after the one ERROR line, and an
    offline run folder left behind for a run that never trained. Three processes at once."""
    cases = {
        "nodata01": (["--dataset=imagefolder", f"--data_dir={tmp_path / 'nowhere'}"], {},
                     f"ERROR: data_dir: {tmp_path / 'nowhere' / 'train'} is not a folder; "
                     "expected <data_dir>/train/<class>/*.jpg and test/"),
        "nocifar1": (["--dataset=cifar10", f"--data_dir={tmp_path / 'cifar'}"], NO_INTERNET,
                     f"ERROR: data_dir: could not download or read CIFAR-10 in {tmp_path / 'cifar'} ("),
    }
    if not torch.cuda.is_available():
        cases["nocuda01"] = (["--device=cuda"], {},
                             "ERROR: device: 'cuda' asked for, but CUDA is not available here; use device=cpu or auto")
    runs = {run_id: subprocess.Popen([sys.executable, "-m", "cifar_resnet.train", *args], stderr=subprocess.PIPE,
                                     text=True, env=dict(os.environ, WANDB_RUN_ID=run_id, WANDB_SILENT="false", **env))
            for run_id, (args, env, _) in cases.items()}
    for run_id, run in runs.items():
        stderr = run.communicate(timeout=300)[1]
        assert run.returncode == 2, stderr[-3000:]
        (line,) = error_lines(stderr)
        assert line.startswith(cases[run_id][2]), stderr[-3000:]
        assert "wandb:" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert not list(tmp_path.glob("wandb/offline-run-*"))  # WANDB_DIR's: no W&B run was started


def python_train(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cifar_resnet.train", *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, **env))


def test_diverging_loss_stops_the_run(tiny_config):
    # The highest rates allowed (learning_rate 10, x 1000 for the batch-norm parameters): NaN within epoch 1.
    args = tiny_args(tiny_config.replace(optimizer="sgd", learning_rate=10, norm_lr_scale=1000, epochs=2))
    done = python_train(*args, WANDB_RUN_ID="nan00001")
    assert done.returncode == 1
    (line,) = error_lines(done.stderr)
    assert "training loss became" in line and "lower learning_rate" in line
    assert "Traceback" not in done.stderr
    record = RunRecord.load(Path(tiny_config.output_dir) / "nan00001")
    assert record.status == "failed" and not (Path(tiny_config.output_dir) / "nan00001" / BEST_CHECKPOINT).exists()


def test_help_lists_every_setting():
    done = subprocess.run([sys.executable, "-m", "cifar_resnet", "train", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for name in Config().to_dict():
        assert f"--{name}" in done.stdout
    assert done.stdout.startswith("usage: cifar-resnet train ")  # the command typed, not the module


def test_help_of_the_module_names_the_module():
    done = subprocess.run([sys.executable, "-m", "cifar_resnet.train", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m cifar_resnet.train ")


@pytest.mark.slow
def test_a_second_process_on_the_same_run_id_is_refused_in_one_line(tiny_config):
    """A run holds its folder's lock: a second process with the same run id exits 2 and writes nothing there."""
    run_dir = Path(tiny_config.output_dir) / "twin0001"
    with folder_lock(run_dir):  # held by this process, as a first run would hold it
        done = python_train(*tiny_args(tiny_config), WANDB_RUN_ID="twin0001")
    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        f"ERROR: run twin0001: another process is training it in {run_dir}; wait for it to end, or give this run "
        "another id"
    ]
    assert "Traceback" not in done.stderr
    assert sorted(path.name for path in run_dir.iterdir()) == [LOCK_FILE]
    # Once the lock is free, the same command trains.
    assert python_train(*tiny_args(tiny_config.replace(epochs=1)), WANDB_RUN_ID="twin0001").returncode == 0
    assert RunRecord.load(run_dir).status == "finished"


@pytest.mark.slow
def test_a_finished_run_is_never_trained_again_under_its_id(tiny_config):
    """The same settings again: one line, exit 0; other settings: one line, exit 2. Either way the run's files and
    its W&B run stay as they are (issue 23: the runner started a new record whenever there was no last.pt)."""
    config = tiny_config.replace(epochs=1)
    run_dir = Path(config.output_dir) / "done0001"
    assert python_train(*tiny_args(config), WANDB_RUN_ID="done0001").returncode == 0
    finished = tree(run_dir)

    again = python_train(*tiny_args(config), WANDB_RUN_ID="done0001")
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert [line for line in again.stderr.splitlines() if "done0001" in line] == [
        f"INFO: run done0001: finished already in {run_dir}; nothing to train (remove that folder to train it again)"
    ]
    other = python_train(*tiny_args(config.replace(learning_rate=0.002)), WANDB_RUN_ID="done0001")
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert error_lines(other.stderr) == [
        f"ERROR: run done0001: finished already in {run_dir}, with other settings (learning_rate: 0.001 -> 0.002); "
        "give this run another id (WANDB_RUN_ID), or another output_dir"
    ]
    assert tree(run_dir) == finished
    assert len(list(Path(os.environ["WANDB_DIR"]).glob("wandb/offline-run-*-done0001"))) == 1  # W&B not started


@pytest.mark.parametrize("run_id", ["..", "../escape", "/", "rün id 1", ".hidden", "a" * 122])
def test_a_run_id_that_would_leave_its_folder_or_that_w_and_b_refuses_is_one_line(tmp_path, tiny_config, capsys,
                                                                                  monkeypatch, run_id):
    monkeypatch.setenv("WANDB_RUN_ID", run_id)
    assert train_main(tiny_args(tiny_config)) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"ERROR: run id {run_id!r}: a run id names the run's folder and its W&B artifacts: 1 to 121 letters, "
        "digits, -, _ or ., not starting with . (set WANDB_RUN_ID to such an id, or unset it)"
    ]
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # nothing written, W&B not started


def test_device_cudafoo_fails_in_one_line_on_the_command_line():
    line = one_error_line(cli("train", "--device=cudafoo"), status=2)
    assert line == "ERROR: device: 'cudafoo' is not one of auto, cpu, cuda, cuda:N (N a GPU index: 0, 1, ...)"
    assert not Path("runs").exists()
