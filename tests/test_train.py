"""The sweep run end to end: sweep.yaml -> W&B's own sweep engine and macro expansion -> `python -m
cifar_resnet.train` as a subprocess, offline -> checkpoint, run record and the artifact in the offline run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sweeps
import torch
import yaml
from conftest import REPO, tiny_args
from helpers.runs import error_lines, tree
from wandb.sdk.lib import config_util
from helpers.wandb_records import offline_run_file, read_records

from cifar_resnet.cli import main as cli_main
from cifar_resnet.config import Config
from cifar_resnet.engine.device import build_optimizer
from cifar_resnet.errors import ConfigError
from cifar_resnet.files import LOCK_FILE, folder_lock
from cifar_resnet.model import CIFAR10CNN
from cifar_resnet.records import BEST_CHECKPOINT, RESUME_CHECKPOINT, RunFolder, RunRecord
from cifar_resnet.runner import run_training
from cifar_resnet.train import main as train_main
from cifar_resnet.wandb_sweep import run_argv

SWEEP_YAML = REPO / "sweep.yaml"


def load_sweep() -> dict:
    return yaml.safe_load(SWEEP_YAML.read_text())


def test_sweep_yaml_passes_the_schema_and_expands_to_the_six_cells():
    sweep = load_sweep()
    assert sweeps.schema_violations_from_proposed_config(sweep) == []
    runs: list[sweeps.SweepRun] = []
    while (proposal := sweeps.next_run(sweep, runs)) is not None:
        runs.append(sweeps.SweepRun(name=f"r{len(runs)}", state=sweeps.RunState.finished, config=proposal.config))
    cells = {(r.config["learning_rate"]["value"], r.config["optimizer"]["value"]) for r in runs}
    assert len(runs) == 6
    assert cells == {(lr, opt) for lr in (0.001, 0.0005, 0.0001) for opt in ("adam", "sgd")}
    assert all(r.config["epochs"]["value"] == 10 and r.config["batch_size"]["value"] == 128 for r in runs)
    for run in runs:  # every proposed cell is a valid Config
        Config.from_mapping({name: item["value"] for name, item in run.config.items()})


def sweep_run_argv(sweep: dict, params: dict) -> list[str]:
    """The command `wandb agent` runs for `params` (built with wandb's own macro code, as its Agent does)."""
    return run_argv(sweep["command"], sweep["program"], params, Path("args.json"))


def run_as_agent(tmp_path: Path, params: dict, run_id: str) -> subprocess.CompletedProcess:
    sweep = load_sweep()
    param_path = tmp_path / "sweep-test" / f"config-{run_id}.yaml"
    config_util.save_config_file_from_dict(str(param_path), {k: {"value": v} for k, v in params.items()})
    env = dict(os.environ, WANDB_SWEEP_ID="testsweep", WANDB_RUN_ID=run_id, WANDB_SWEEP_PARAM_PATH=str(param_path))
    return subprocess.run(sweep_run_argv(sweep, params), env=env, capture_output=True, text=True, timeout=300)


def test_agent_runs_a_cell_offline_and_records_checkpoint_and_artifact(tmp_path, tiny_config):
    params = {**tiny_config.to_dict(), "learning_rate": 0.0005, "optimizer": "sgd"}
    done = run_as_agent(tmp_path, params, run_id="cell0001")
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir = Path(tiny_config.output_dir) / "cell0001"
    record = RunRecord.load(run_dir)
    assert record.status == "finished"
    assert record.config["learning_rate"] == 0.0005 and record.config["optimizer"] == "sgd"
    assert [h["epoch"] for h in record.history] == [1, 2]
    assert 0 <= record.summary["test/acc"] <= 1 and record.summary["best_epoch"] in (1, 2)
    assert not (run_dir / RESUME_CHECKPOINT).exists()

    checkpoint = torch.load(run_dir / BEST_CHECKPOINT, weights_only=True)
    assert checkpoint["epoch"] == record.summary["best_epoch"]
    assert checkpoint["config"]["optimizer"] == "sgd"
    assert checkpoint["metrics"]["val/acc"] == max(h["val/acc"] for h in record.history)

    records = read_records(offline_run_file(tmp_path, "cell0001"))
    kinds = [r.WhichOneof("record_type") for r in records]
    run = next(r.run for r in records if r.HasField("run"))
    assert run.sweep_id == "testsweep"
    (model,) = [r.artifact for r in records if r.HasField("artifact") and r.artifact.type == "model"]
    assert model.name == "model-cell0001"
    assert set(model.aliases) >= {"best", "latest"}
    assert [entry.path for entry in model.manifest.contents] == [BEST_CHECKPOINT]
    assert json.loads(model.metadata)["epoch"] == record.summary["best_epoch"]
    assert kinds.count("history") >= 2
    exit_record = next(r.exit for r in records if r.HasField("exit"))
    assert exit_record.exit_code == 0


def test_sweep_values_win_over_the_command_line(tmp_path, tiny_config):
    """Under a sweep, W&B's config (from the parameter file) is the truth, as with a real agent."""
    sweep = load_sweep()
    params = {**tiny_config.to_dict(), "epochs": 1, "optimizer": "adamw"}
    param_path = tmp_path / "params.yaml"
    config_util.save_config_file_from_dict(str(param_path), {k: {"value": v} for k, v in params.items()})
    argv = [a for a in sweep_run_argv(sweep, params) if not a.startswith("--optimizer")] + ["--optimizer=sgd"]
    env = dict(os.environ, WANDB_SWEEP_ID="s", WANDB_RUN_ID="winner01", WANDB_SWEEP_PARAM_PATH=str(param_path))
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert RunRecord.load(Path(tiny_config.output_dir) / "winner01").config["optimizer"] == "adamw"


def test_narrow_model_learns_synthetic_classes(tiny_config):
    config = tiny_config.replace(epochs=3, train_size=2000)
    outcome = run_training(config, RunFolder.of(config.output_dir, "learn01"))
    assert outcome.fit.test.acc > 0.3  # chance is 0.1; measured 0.41 (the synthetic classes are meant to be hard)
    assert outcome.record.history[-1]["train/loss"] < outcome.record.history[0]["train/loss"]


def test_narrow_model_learns_real_cifar_images(cifar_jpeg_dir, tmp_path):
    config = Config(dataset="imagefolder", data_dir=str(cifar_jpeg_dir), width=16, epochs=2, val_size=500,
                    batch_size=64, recipe="writeup", output_dir=str(tmp_path / "runs"), device="cpu")
    outcome = run_training(config, RunFolder.of(config.output_dir, "real01"))
    assert outcome.fit.test.acc > 0.25  # chance is 0.1; 2,500 images and 2 epochs


def python_train(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cifar_resnet.train", *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, **env))


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


def test_no_credentials_goes_offline_by_itself_and_says_how_to_sync(offline_run):
    warning = [line for line in offline_run.done.stderr.splitlines() if "no W&B credentials" in line]
    assert len(warning) == 1 and "wandb sync" in warning[0] and offline_run.run_id in warning[0]


def test_evaluate_command_tests_a_saved_checkpoint(finished_run, capsys):
    outcome = finished_run
    assert cli_main(["evaluate", str(outcome.folder.best), "--device=cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"test acc {100 * outcome.fit.test.acc:.2f}%" in printed  # in %, as the report shows it
    assert cli_main(["evaluate", "missing.pt"]) == 2
    assert "checkpoint: missing.pt does not exist" in capsys.readouterr().err


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


def test_an_unknown_optimizer_name_is_refused_not_replaced(tiny_config):
    config = tiny_config.replace(optimizer="sgd")
    object.__setattr__(config, "optimizer", "lamb")  # past the config's own check, as a caller's typo would be
    with pytest.raises(ConfigError, match="optimizer: 'lamb' is not one of adam, adamw, sgd"):
        build_optimizer(config, CIFAR10CNN(width=8), torch.device("cpu"))


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


def test_an_offline_run_s_wandb_log_names_no_file_outside_its_folder(tmp_path, offline_run):
    """W&B's data folder is the offline run's folder for the whole run (issue 23: the confusion-matrix table was
    staged in WANDB_DATA_DIR, here the conftest's, and the run's .wandb file pointed there). Every path in the
    logs of a copy of the run lies inside the run's folder, and the copy holds each file."""
    (run_folder,) = offline_run.wandb_dir.glob(f"wandb/offline-run-*-{offline_run.run_id}")
    copy = shutil.copytree(run_folder, tmp_path / "copied" / run_folder.name)
    logs = list(copy.rglob("*.wandb"))
    assert logs
    named = [text for log in logs for record in read_records(log) if record.WhichOneof("record_type") != "environment"
             for text in strings_of(record) if text.startswith("/")]  # the environment record describes the host
    assert len(named) >= 2  # the table and the best.pt, staged for the artifacts
    for path in map(Path, named):
        assert path.is_relative_to(run_folder), path
        assert (copy / path.relative_to(run_folder)).is_file(), path
    assert not any(offline_run.wandb_data_dir.rglob("*"))  # nothing staged outside


def strings_of(message) -> list[str]:
    """Every string field of a protobuf message, nested ones too."""
    found = []
    for field, value in message.ListFields():
        for item in value if field.is_repeated else [value]:
            if isinstance(item, str):
                found.append(item)
            elif hasattr(item, "ListFields"):
                found += strings_of(item)
    return found
