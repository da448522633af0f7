"""Shared fixtures: W&B offline in a temporary folder, and the real Config shrunk to run in seconds on a CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cifar_resnet.config import Config
from cifar_resnet.engine.loop import Interrupted
from cifar_resnet.records import BEST_CHECKPOINT, RESUME_CHECKPOINT, RunFolder
from cifar_resnet.runner import RunHooks, TrainedRun, run_training

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = Path(os.environ.get("CIFAR10_JPEG_ARCHIVE", REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
# The write-up the benchmark's baseline rebuilds.
WRITEUP = Path(os.environ.get("CIFAR10_WRITEUP", REPO.parent / "shared" / "seed" / "000_16085cfeb4f21457.txt"))
# Set in CI (.ci/run): a missing shared input (the real-data archive, the write-up) fails the tests that need it
# instead of skipping them, so that a green CI means they ran.
REQUIRE_SHARED_INPUTS = os.environ.get("REQUIRE_REAL_DATA") == "1"
# A few thousand real images: the first N files of each class folder.
REAL_TRAIN_PER_CLASS = 300
REAL_TEST_PER_CLASS = 100


def pytest_configure(config: pytest.Config) -> None:
    """One thread in the test process and in every process a test starts (OMP_NUM_THREADS, which torch and
    cifar-resnet's own thread budget read): tiny runs gain nothing from a second thread, and on two cores shared with
    other work two threads can be several times slower than one. The tests of the thread budget unset it for their
    own time (monkeypatch)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def offline_wandb_environment(folder: Path) -> dict[str, str]:
    """W&B offline, silent, with its folders under `folder` and no credentials (with WANDB_API_KEY unset)."""
    return {
        "WANDB_MODE": "offline", "WANDB_DIR": str(folder), "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(folder / ".wandb-config"), "WANDB_CACHE_DIR": str(folder / ".wandb-cache"),
        "WANDB_DATA_DIR": str(folder / ".wandb-data"), "NETRC": str(folder / "no-netrc"),
        # The agent's `${interpreter}` is the `python` on PATH: make it this environment's.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test runs in its own folder with W&B offline and no credentials."""
    monkeypatch.chdir(tmp_path)
    for name, value in offline_wandb_environment(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


@pytest.fixture
def fake_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Put a stand-in nvidia-smi first on PATH that lists the given (index, uuid, MiB) rows: there is no GPU here
    (the one test double of the GPU tests; the rest is real). None: no nvidia-smi on PATH at all."""
    folder = tmp_path / "nvidia-bin"

    def install(rows: list[tuple[int, str, int]] | None) -> None:
        if rows is None:
            monkeypatch.setenv("PATH", os.pathsep.join(
                entry for entry in os.environ["PATH"].split(os.pathsep)
                if not (Path(entry) / "nvidia-smi").exists()))
            return
        folder.mkdir(exist_ok=True)
        script = folder / "nvidia-smi"
        lines = "\n".join(f"{index}, {uuid}, {mib}" for index, uuid, mib in rows)
        script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{lines}\nEOF\n")
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")

    return install


@pytest.fixture(autouse=True)
def one_thread() -> None:
    """Each test starts on one thread (see pytest_configure), whatever a test of the thread budget did before it."""
    torch.set_num_threads(1)


def tiny(output_dir: Path) -> Config:
    """The real defaults, shrunk: a width-8 model on 1,000 synthetic images for 2 epochs."""
    return Config(
        dataset="synthetic", width=8, epochs=2, batch_size=64, eval_batch_size=256,
        val_size=200, train_size=1000, test_size=200, output_dir=str(output_dir), device="cpu",
    )


@pytest.fixture
def tiny_config(tmp_path: Path) -> Config:
    return tiny(tmp_path / "runs")


# Runs trained once for the whole session, in this process (no W&B: the runner alone), for the tests that read
# them. A test never writes in a shared run's folder: one that changes a run works on its own copy.


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """The tiny run, trained to its end: its folder holds best.pt and record.json; read it, do not write in it."""
    config = tiny(tmp_path_factory.mktemp("finished") / "runs")
    return run_training(config, RunFolder.of(config.output_dir, "finished1"))


@dataclass(frozen=True)
class OfflineRun:
    """A finished `python -m cifar_resnet.train` process and where W&B put its offline run."""

    run_id: str
    done: subprocess.CompletedProcess
    wandb_dir: Path  # WANDB_DIR: the offline run is wandb/offline-run-*-<run_id> in it
    wandb_data_dir: Path  # WANDB_DATA_DIR, where W&B would stage files


@pytest.fixture(scope="session")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> OfflineRun:
    """The tiny run for 1 epoch, as a newcomer first starts it: `python -m cifar_resnet.train` with no W&B
    credentials and no WANDB_MODE, so that it goes offline by itself. Read its folders, do not write in them."""
    folder = tmp_path_factory.mktemp("offline-run")
    env = {**os.environ, **offline_wandb_environment(folder), "WANDB_RUN_ID": "offline1"}
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        env.pop(name, None)
    args = tiny_args(tiny(folder / "runs").replace(epochs=1))
    done = subprocess.run([sys.executable, "-m", "cifar_resnet.train", *args], capture_output=True, text=True,
                          timeout=300, cwd=folder, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return OfflineRun("offline1", done, folder, Path(env["WANDB_DATA_DIR"]))


def stop_after_first_epoch() -> RunHooks:
    """Hooks that stop a run as a signal would, after its first epoch: its best.pt and last.pt stay."""
    done: list[int] = []
    return RunHooks(on_epoch_recorded=lambda record: done.append(len(record.history)), should_stop=lambda: bool(done))


def stopped(config: Config) -> Config:
    """The tiny run made smaller (4 steps an epoch), to be stopped after its first epoch."""
    return config.replace(train_size=256, val_size=64, test_size=64)


@pytest.fixture(scope="session")
def stopped_run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`stopped(tiny)` run "stopped1", stopped after epoch 1 of 2 as a preempted one is: best.pt and last.pt."""
    config = stopped(tiny(tmp_path_factory.mktemp("stopped") / "runs"))
    with pytest.raises(Interrupted):
        run_training(config, RunFolder.of(config.output_dir, "stopped1"), stop_after_first_epoch())
    run_dir = Path(config.output_dir) / "stopped1"
    assert (run_dir / RESUME_CHECKPOINT).exists() and (run_dir / BEST_CHECKPOINT).exists()
    return run_dir


@pytest.fixture
def stopped_run(stopped_run_folder: Path, tiny_config: Config) -> Path:
    """This test's copy of the stopped run, in `tiny_config`'s output folder (resume it with `stopped(tiny_config)`)."""
    return Path(shutil.copytree(stopped_run_folder, Path(tiny_config.output_dir) / stopped_run_folder.name))


def tiny_args(config: Config) -> list[str]:
    """`config`'s settings as the `--name=value` arguments an agent passes."""
    return [f"--{name}={value}" for name, value in config.to_dict().items()]


def require_shared_input(path: Path, what: str, variable: str) -> None:
    """Skip, saying why, when `path` (`variable`'s, or its default) is absent; fail instead under REQUIRE_REAL_DATA=1
    (CI). The message names the variable, and the path only where the variable gave it: the default lies outside
    the clone, and means nothing to a user of it."""
    if path.is_file():
        return
    absent = f"{what} {path} is absent (from {variable})" if variable in os.environ else (
        f"{what} is absent (set {variable} to its path)")
    if REQUIRE_SHARED_INPUTS:
        pytest.fail(f"{absent}, and REQUIRE_REAL_DATA=1 requires it", pytrace=False)
    pytest.skip(f"{absent}; REQUIRE_REAL_DATA=1 makes this a failure")


@pytest.fixture(scope="session")
def cifar_jpeg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few thousand images of the JPEG copy of CIFAR-10, in its image-folder layout."""
    require_shared_input(ARCHIVE, "real-data archive", "CIFAR10_JPEG_ARCHIVE")
    root = tmp_path_factory.mktemp("cifar10-jpeg")
    with tarfile.open(ARCHIVE, "r:gz") as archive:
        for member in archive:
            parts = Path(member.name).parts  # cifar10-jpeg/<split>/<class>/<NNNN>.jpg
            if not member.isfile() or len(parts) != 4:
                continue
            limit = REAL_TRAIN_PER_CLASS if parts[1] == "train" else REAL_TEST_PER_CLASS
            if int(Path(parts[3]).stem) < limit:
                archive.extract(member, root, filter="data")
    return root / "cifar10-jpeg"
