"""Shared fixtures: W&B offline in a temporary folder, and the real Config shrunk to run in seconds on a CPU."""

from __future__ import annotations

import os
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from cifar_resnet.config import Config

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


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test runs in its own folder with W&B offline and no credentials."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / ".wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / ".wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / ".wandb-data"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    # The agent's `${interpreter}` is the `python` on PATH: make it this environment's.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
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


@pytest.fixture
def one_thread():
    """Training in this process on one thread: on a shared 2-core machine, two threads can be many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_config(tmp_path: Path) -> Config:
    """The real defaults, shrunk: a width-8 model on 1,000 synthetic images for 2 epochs."""
    return Config(
        dataset="synthetic", width=8, epochs=2, batch_size=64, eval_batch_size=256,
        val_size=200, train_size=1000, test_size=200, output_dir=str(tmp_path / "runs"), device="cpu",
    )


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
