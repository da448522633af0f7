"""What CI runs (`.ci/run`, its commands recorded), and that it cannot stay green by skipping the real-data tests:
with REQUIRE_REAL_DATA=1 (set in .ci/run) a missing archive fails them; without it, they skip and say why. The GPU
tests skip, saying why, where there is no GPU."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, require_shared_input
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the test extra installs tomli, the same parser
    import tomli as tomllib

REAL_DATA_TEST = "tests/test_image_folder.py::test_real_jpeg_folder_loads"
WAIT_SECONDS = 300


def pytest_on_real_data_test(tmp_path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CIFAR10_JPEG_ARCHIVE": str(tmp_path / "absent.tar.gz"), **env}
    return subprocess.run([sys.executable, "-m", "pytest", REAL_DATA_TEST, "-q", "-rs", "-p", "no:cacheprovider",
                           f"--basetemp={tmp_path / 'inner'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=WAIT_SECONDS)


# Every program .ci/run starts that installs or tests, replaced by this recorder: CI's commands as it runs them,
# in seconds (a real CI run takes half an hour and the network). `python3 -m venv DIR` makes DIR/bin/{pip,pytest,
# python} recorders too.
RECORDER = """#!{python}
import json, os, sys
from pathlib import Path

program, args = sys.argv[0], sys.argv[1:]
call = {{"program": os.path.join(os.getcwd(), program), "args": args,
        "env": {{name: os.environ.get(name) for name in {variables!r}}}}}
with open(os.environ["CI_CALLS"], "a") as calls:
    calls.write(json.dumps(call) + "\\n")
if Path(program).name == "python3" and args[:2] == ["-m", "venv"]:
    (Path(args[2]) / "bin").mkdir(parents=True)
    for tool in ("pip", "pytest", "python"):
        (Path(args[2]) / "bin" / tool).symlink_to(Path(__file__).resolve())
"""
CI_VARIABLES = ("REQUIRE_REAL_DATA", "CIFAR10_JPEG_ARCHIVE", "SKYPILOT_PYTHON")
IMAGE_BUILD = "tests/test_docker.py::test_build_local_builds_the_image_and_smoke_tests_it"


def ci_calls(tmp_path) -> tuple[Path, list[dict]]:
    """`.ci/run`, run from a copy of it with the recorders first on PATH: the checkout it ran in, and its calls."""
    checkout, bin_dir = tmp_path / "checkout", tmp_path / "bin"
    (checkout / ".ci").mkdir(parents=True)
    shutil.copy2(REPO / ".ci" / "run", checkout / ".ci" / "run")
    recorder = tmp_path / "recorder"
    recorder.write_text(RECORDER.format(python=sys.executable, variables=CI_VARIABLES))
    recorder.chmod(0o755)
    for path in (bin_dir / "python3", checkout / "deploy" / "slurm" / "local-cluster.sh"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(recorder)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp_path / "tmp"),
           "CI_CALLS": str(tmp_path / "calls.jsonl")}
    (tmp_path / "tmp").mkdir()
    done = subprocess.run(["bash", str(checkout / ".ci" / "run")], env=env, capture_output=True, text=True,
                          timeout=WAIT_SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    for call in calls:  # the program as a command line names it: a name on PATH, or a path from the checkout
        path = Path(os.path.normpath(call["program"]))
        call["program"] = path.name if path.parent == bin_dir else os.path.relpath(path, checkout)
    return checkout, calls


def readme_install_and_test_commands() -> list[list[str]]:
    """The commands of the README's install-and-test line (the quick start's first bash block), as a shell parses
    them."""
    quick_start = (REPO / "README.md").read_text().split("## Quick start", 1)[1]
    block = quick_start.split("```bash\n", 1)[1].split("```", 1)[0]
    (line,) = [line for line in block.splitlines() if "pytest" in line]
    commands, words = [[]], shlex.split(line)
    for word in words:
        if word == "&&":
            commands.append([])
        else:
            commands[-1].append(word)
    return commands


def index_of(calls: list[dict], program: str, args: list[str], after: int = -1) -> int:
    found = [i for i, call in enumerate(calls) if i > after and [call["program"], *call["args"]] == [program, *args]]
    assert found, f"CI runs no `{program} {' '.join(args)}` after call {after}: {calls}"
    return found[0]


def lowest_allowed(name: str) -> Version:
    (requirement,) = [Requirement(line) for line in tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "dependencies"] if Requirement(line).name == name]
    (lowest,) = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
    return lowest


@pytest.mark.quick
def test_ci_runs_the_readmes_line_the_lowest_versions_the_deploy_tests_and_every_slow_test(tmp_path):
    checkout, calls = ci_calls(tmp_path)

    # The README's install-and-test line, each command as a user runs it, in its order.
    step = -1
    for program, *args in readme_install_and_test_commands():
        step = index_of(calls, program, args, after=step)
    default_suite = step
    assert calls[default_suite]["program"] == ".venv/bin/pytest" and calls[default_suite]["args"] == ["-n", "auto"]

    # The slow tests after it, every one but the image build; both with the shared archive required.
    slow = index_of(calls, ".venv/bin/pytest", ["-m", "slow and not gpu", "--deselect", IMAGE_BUILD], after=step)
    archive = checkout.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"  # as conftest's default
    for call in (calls[default_suite], calls[slow]):
        assert call["env"]["REQUIRE_REAL_DATA"] == "1"
        assert Path(os.path.normpath(call["env"]["CIFAR10_JPEG_ARCHIVE"])) == archive
    if os.geteuid() == 0:  # the Slurm test's cluster, installed before the slow tests start
        assert index_of(calls, "deploy/slurm/local-cluster.sh", ["install"]) < slow

    # The lowest versions pyproject.toml allows, in a venv of their own, against the quick subset.
    (lowest,) = [call for call in calls if call["program"].endswith("/bin/pip") and "-e" in call["args"]
                 and not call["program"].startswith(".venv/")]
    pins = dict(arg.split("==") for arg in lowest["args"] if "==" in arg)
    assert {name: Version(version) for name, version in pins.items()} == {
        name: lowest_allowed(name) for name in ("torch", "torchvision", "wandb")}
    index_of(calls, lowest["program"].replace("/pip", "/pytest"), ["-m", "quick"], after=calls.index(lowest))

    # The deploy tests with their validators: the deploy extra, and SkyPilot's Python from a venv of its own.
    extra = index_of(calls, ".venv/bin/pip", ["install", "-e", ".[test,deploy]"], after=default_suite)
    deploy = index_of(calls, ".venv/bin/pytest", ["tests/test_deploy.py"], after=extra)
    skypilot_python = calls[deploy]["env"]["SKYPILOT_PYTHON"]
    index_of(calls, os.path.relpath(Path(skypilot_python).with_name("pip"), checkout), ["install", "skypilot"])


@pytest.mark.parametrize(("required", "exit_code", "said"), [
    ("1", 1, "is absent (from CIFAR10_JPEG_ARCHIVE), and REQUIRE_REAL_DATA=1 requires it"),
    ("", 0, "SKIPPED"),
])
def test_a_missing_archive_fails_under_require_real_data_and_skips_with_the_reason_otherwise(
        tmp_path, monkeypatch, required, exit_code, said):
    monkeypatch.delenv("REQUIRE_REAL_DATA", raising=False)
    done = pytest_on_real_data_test(tmp_path, REQUIRE_REAL_DATA=required)
    assert done.returncode == exit_code, done.stdout[-3000:]
    assert said in done.stdout and str(tmp_path / "absent.tar.gz") in done.stdout
    if not required:
        assert "REQUIRE_REAL_DATA=1 makes this a failure" in done.stdout


@pytest.mark.quick
def test_a_missing_input_s_message_names_its_variable_not_a_path_outside_the_clone(monkeypatch):
    """Issue 27: the skip message named the default path, `../shared/...` beside the clone, which a user's clone
    does not have."""
    monkeypatch.delenv("CIFAR10_JPEG_ARCHIVE", raising=False)
    default = REPO.parent / "no-such-folder" / "cifar10-jpeg.tar.gz"
    with pytest.raises((pytest.skip.Exception, pytest.fail.Exception)) as outcome:
        require_shared_input(default, "real-data archive", "CIFAR10_JPEG_ARCHIVE")
    message = str(outcome.value)
    assert message.startswith("real-data archive is absent (set CIFAR10_JPEG_ARCHIVE to its path)")
    assert str(REPO.parent) not in message


def test_gpu_tests_skip_without_cuda_and_need_no_wandb():
    """As benchmarks/gpu_check.sh runs them, on a machine without wandb: here (no GPU) each skips, saying why."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the GPU tests run for real (pytest -m gpu)")
    no_wandb = ("import sys; sys.modules['wandb'] = None; import pytest; "
                "sys.exit(pytest.main(['-m', 'gpu', '-q', '-rs', '-p', 'no:cacheprovider', 'tests/test_gpu.py']))")
    done = subprocess.run([sys.executable, "-c", no_wandb], cwd=REPO, capture_output=True, text=True,
                          timeout=WAIT_SECONDS)
    assert done.returncode == 0, done.stdout[-3000:]
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) >= 2 and all(line.endswith("no CUDA device") for line in skipped), done.stdout[-3000:]
    assert "-m pytest -m gpu" in (REPO / "benchmarks" / "gpu_check.sh").read_text()  # its first step
