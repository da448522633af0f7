"""deploy/: the Slurm array script's signal handling, and the Kubernetes and SkyPilot files checked by the engines'
own validators.

The Slurm script runs here for real under bash, with stand-ins for the two things that need a cluster (the
command it starts, and `scontrol`); tests/test_deploy_slurm.py runs it on a real Slurm. The Kubernetes manifest is
validated against the Kubernetes API's schemas (kubernetes-validate, the `deploy` extra) and the SkyPilot task by
SkyPilot's own parser (`sky.Task`, in a Python of its own: see SKYPILOT_PYTHON); each test is skipped, with the
reason, where its validator is absent.
No cluster, cloud or W&B server is reached.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cifar_resnet.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
ARRAY_SCRIPT = DEPLOY / "slurm" / "sweep-array.sbatch"
K8S_MANIFEST = DEPLOY / "k8s" / "sweep-agents.yaml"
SKYPILOT_TASK = DEPLOY / "skypilot" / "sweep-agent.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
WAIT_SECONDS = 60
POLL_SECONDS = 0.05

# Stands in for `cifar-resnet` (the script's $CIFAR_RESNET): records its arguments and the signals it gets, runs
# until SIGTERM, then exits as a stopped sweep does (128 + 15) after a moment spent saving.
STAND_IN_COMMAND = """#!{python}
import json, os, signal, sys, time
path = os.environ["STAND_IN_RECORD"]
record = {{"argv": sys.argv[1:], "signals": []}}
def save():
    with open(path + ".part", "w") as f:
        json.dump(record, f)
    os.replace(path + ".part", path)
def stop(signum, frame):
    record["signals"].append(signum)
for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
    signal.signal(sig, stop)
save()
while not record["signals"]:
    time.sleep(0.02)
time.sleep(0.5)
save()
sys.exit(128 + record["signals"][0])
"""
# Stands in for `scontrol`: records its arguments.
STAND_IN_SCONTROL = """#!/bin/sh
echo "$@" >> "$SCONTROL_CALLS"
"""


def sbatch_options(script: Path) -> dict[str, str]:
    """The script's `#SBATCH --name=value` lines (`--name` alone maps to "")."""
    options = {}
    for line in script.read_text().splitlines():
        if match := re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line):
            options[match.group(1)] = match.group(2) or ""
    return options


# --- Slurm -------------------------------------------------------------------------------------------------------


def test_the_array_script_requeues_and_gets_a_warning_before_its_time_limit():
    subprocess.run(["bash", "-n", str(ARRAY_SCRIPT)], check=True)
    options = sbatch_options(ARRAY_SCRIPT)
    assert "requeue" in options
    assert re.fullmatch(r"B:USR1@\d+", options["signal"])  # to the batch shell, which passes it on
    assert options["array"] and options["gres"] == "gpu:1"


@pytest.fixture
def stand_ins(tmp_path: Path) -> dict[str, str]:
    """The environment that runs the array script outside Slurm: stand-ins for the command and `scontrol`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    command = bin_dir / "cifar-resnet"
    command.write_text(STAND_IN_COMMAND.format(python=sys.executable))
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(STAND_IN_SCONTROL)
    for program in (command, scontrol):
        program.chmod(0o755)
    environment = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CIFAR_RESNET": str(command),
                   "STAND_IN_RECORD": str(tmp_path / "command.json"), "SCONTROL_CALLS": str(tmp_path / "scontrol.txt"),
                   "SLURM_JOB_ID": "42", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "2"}
    environment.pop("CUDA_VISIBLE_DEVICES", None)  # a task without a GPU unless a test gives it one
    return environment


def run_array_script(env: dict[str, str], sent: signal.Signals, tmp_path: Path,
                     args: tuple[str, ...] = ("sweep", "sweep.yaml", "--offline")) -> tuple[int, dict, str]:
    """Run the script as Slurm would, send `sent` to the shell alone (as `B:` does); its status, the command's
    record and the `scontrol` calls."""
    script = subprocess.Popen(["bash", str(ARRAY_SCRIPT), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    record_path = tmp_path / "command.json"
    deadline = time.monotonic() + WAIT_SECONDS
    while not record_path.exists():
        assert time.monotonic() < deadline and script.poll() is None, script.communicate()[0]
        time.sleep(POLL_SECONDS)
    script.send_signal(sent)
    output = script.communicate(timeout=WAIT_SECONDS)[0]
    calls = (tmp_path / "scontrol.txt").read_text() if (tmp_path / "scontrol.txt").exists() else ""
    return script.returncode, json.loads(record_path.read_text()), calls + output


def test_the_time_limit_warning_stops_the_command_and_requeues_the_task(stand_ins, tmp_path):
    status, record, output = run_array_script(stand_ins, signal.SIGUSR1, tmp_path)
    assert record["argv"] == ["sweep", "sweep.yaml", "--offline"]
    assert record["signals"] == [signal.SIGTERM]  # passed on as the stop every tool and run knows
    assert status == 128 + signal.SIGTERM, output  # waited for the command to end: its status
    assert "requeue 42" in output


def test_sigterm_scancel_or_preemption_stops_the_command_without_a_requeue_of_its_own(stand_ins, tmp_path):
    status, record, output = run_array_script(stand_ins, signal.SIGTERM, tmp_path)
    assert record["signals"] == [signal.SIGTERM]
    assert status == 128 + signal.SIGTERM, output
    assert "requeue" not in output.replace("requeueing", "")


@pytest.mark.parametrize(("args", "expected"), [
    (("sweep", "sweep.yaml", "--offline"), ["sweep", "sweep.yaml", "--offline", "--gpus", "3"]),
    (("sweep", "sweep.yaml", "--offline", "--workers", "2"), ["sweep", "sweep.yaml", "--offline", "--workers", "2"]),
    (("agent", "e/p/s"), ["agent", "e/p/s"]),  # the agent puts its runs per GPU on the visible GPU itself
])
def test_an_offline_task_runs_as_many_runs_on_its_gpu_as_an_agent(stand_ins, tmp_path, args, expected):
    """The task's GPU (Slurm's CUDA_VISIBLE_DEVICES) goes to the sweep as --gpus, whose --runs-per-gpu auto puts as
    many runs on it as `cifar-resnet agent --agents-per-gpu auto` does; one run per task before."""
    _, record, output = run_array_script({**stand_ins, "CUDA_VISIBLE_DEVICES": "3"}, signal.SIGTERM, tmp_path, args)
    assert record["argv"] == expected, output


def test_the_array_script_refuses_a_command_other_than_agent_or_sweep(stand_ins):
    done = subprocess.run(["bash", str(ARRAY_SCRIPT), "train"], env=stand_ins, capture_output=True, text=True,
                          timeout=WAIT_SECONDS)
    assert done.returncode == 2
    assert done.stderr.strip() == "sweep-array.sbatch: the first argument must be 'agent' or 'sweep', got 'train'"


# --- Kubernetes --------------------------------------------------------------------------------------------------


K8S_RENDER = DEPLOY / "k8s" / "render.sh"


def render(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(K8S_RENDER), *args], capture_output=True, text=True)


def manifest(runs_per_gpu: int = 6, gpus: int = 4) -> list[dict]:
    """The Job's template rendered as a user renders it (render.sh), with `runs_per_gpu` runs on each of `gpus`."""
    done = render("--sweep", "ent/proj/abc123", "--image", "registry.example.com/cifar-resnet-agent:0.1",
                  "--gpus", str(gpus), "--runs-per-gpu", str(runs_per_gpu))
    assert done.returncode == 0, done.stderr
    return list(yaml.safe_load_all(done.stdout))


def memory_mib(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()
    return int(number) * (1024 if unit == "Gi" else 1)


def test_the_kubernetes_template_is_applied_only_rendered_with_every_value():
    """The template's placeholders fail a schema (`parallelism: ${GPUS}` is no integer), and render.sh refuses a
    missing value in one line, printing nothing to apply."""
    assert "${GPUS}" in K8S_MANIFEST.read_text()
    for args, message in (([], "--sweep: expected ENTITY/PROJECT/SWEEP_ID"),
                          (["--sweep", "e/p/s", "--image", "r/i:1"], "--gpus: expected a number"),
                          (["--sweep", "e/p/s", "--image", "r/i:1", "--gpus", "2", "--runs-per-gpu", "0"],
                           "--runs-per-gpu: expected a number >= 1")):
        done = render(*args)
        assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
        assert message in done.stderr
    assert "${" not in yaml.safe_dump_all(manifest())


def image_user() -> int:
    (user,) = re.findall(r"^USER (\d+)", DOCKERFILE.read_text(), re.MULTILINE)
    return int(user)


def test_the_kubernetes_manifest_is_valid_against_the_kubernetes_schemas():
    validator = pytest.importorskip("kubernetes_validate", reason="the deploy extra (kubernetes-validate) is not "
                                    "installed: pip install -e '.[test,deploy]'")
    from kubernetes_validate.utils import latest_version

    version = latest_version()
    for document in manifest():
        validator.validate(document, version, strict=True)
    # The validator does fail: a misspelt field and a wrong type are both refused.
    job = next(document for document in manifest() if document["kind"] == "Job")
    template = next(d for d in yaml.safe_load_all(K8S_MANIFEST.read_text()) if d["kind"] == "Job")
    with pytest.raises(validator.ValidationError):  # the template unrendered: `parallelism: ${GPUS}` is refused
        validator.validate(template, version, strict=True)
    for mistake in ({"backofLimit": 3}, {"parallelism": "four"}):
        broken = copy.deepcopy(job)
        broken["spec"].update(mistake)
        with pytest.raises(validator.ValidationError):
            validator.validate(broken, version, strict=True)


def test_the_kubernetes_job_runs_gpu_agents_as_the_images_user_and_survives_preemption():
    documents = {document["kind"]: document for document in manifest()}
    job, claim = documents["Job"], documents["PersistentVolumeClaim"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # The work-queue pattern: agents end when the sweep does, so the Job has parallelism and no completions.
    assert spec["parallelism"] == 4 and "completions" not in spec and spec["backoffLimit"] >= 1
    assert pod["restartPolicy"] == "Never"  # what podFailurePolicy needs
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
    assert any(rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2] for rule in rules)
    assert pod["terminationGracePeriodSeconds"] >= 60  # a run saves and uploads its state within it
    # Non-root, as the image's user, no privileges.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_user()
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The key from a Secret, never written in the manifest.
    env = {variable["name"]: variable for variable in container["env"]}
    assert "value" not in env["WANDB_API_KEY"] and env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert "SWEEP_ID" in env
    # The data cache on the claim, shared by every pod.
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    data_mount = next(mount for mount in container["volumeMounts"] if mount["mountPath"] == "/workspace/data")
    assert volumes[data_mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    # The container's arguments are ones `cifar-resnet agent` takes (the image's entry point): 6 runs per GPU.
    assert build_parser().parse_args(["agent", *container["args"]]).agents_per_gpu == "6"


def test_the_kubernetes_pods_resources_scale_with_the_runs_per_gpu():
    resources = {}
    for runs in (1, 6):
        (container,) = next(d for d in manifest(runs) if d["kind"] == "Job")["spec"]["template"]["spec"]["containers"]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert int(requests["cpu"]) == runs + 1  # a core per run, and one for the agents
        assert memory_mib(requests["memory"]) == memory_mib(limits["memory"]) >= runs * 4096
        resources[runs] = memory_mib(requests["memory"])
    assert resources[6] - resources[1] == 5 * (4096 + 512)  # 4 GiB and 512 MiB of /dev/shm per run


# --- SkyPilot ----------------------------------------------------------------------------------------------------

# SkyPilot cannot share an environment with wandb (it needs click < 8.2, wandb >= 8.2): its parser runs in a Python
# of its own, SKYPILOT_PYTHON (a venv with `pip install skypilot`), or in this one where `sky` imports.
SKYPILOT_PYTHON_VARIABLE = "SKYPILOT_PYTHON"
PARSE_SKYPILOT_TASK = """
import json, sys, yaml
import sky
path, overrides = sys.argv[1], json.loads(sys.argv[2])
config = yaml.safe_load(open(path))
try:
    task = sky.Task.from_yaml_config(dict(config), env_overrides=list(overrides["envs"].items()),
                                     secrets_overrides=list(overrides["secrets"].items()))
except Exception as error:  # the parser's refusal, reported to the test
    print(json.dumps({"error": f"{type(error).__name__}: {error}"}))
    sys.exit(0)
print(json.dumps({
    "resources": [{"use_spot": option.use_spot, "job_recovery": option.job_recovery,
                   "accelerators": option.accelerators, "image_ids": list(option.image_id.values()),
                   "config_overrides": option.cluster_config_overrides} for option in task.resources],
    "envs": dict(task.envs), "secrets": sorted(task.secrets),
    "mounts": {path: storage.mode.name for path, storage in task.storage_mounts.items()},
    "run": task.run,
}))
"""


def skypilot_python() -> list[str]:
    if configured := os.environ.get(SKYPILOT_PYTHON_VARIABLE):
        return [configured]
    try:
        import sky  # noqa: F401
    except ImportError:
        pytest.skip(f"SkyPilot is not installed: it cannot share an environment with wandb, so install it in a venv "
                    f"of its own (python3 -m venv V && V/bin/pip install skypilot) and set "
                    f"{SKYPILOT_PYTHON_VARIABLE}=V/bin/python")
    return [sys.executable]


def parse_skypilot_task(envs: dict[str, str], secrets: dict[str, str]) -> dict:
    """SkyPilot's own parse of the task, with `--env` and `--secret` values as `sky jobs launch` passes them."""
    done = subprocess.run([*skypilot_python(), "-c", PARSE_SKYPILOT_TASK, str(SKYPILOT_TASK),
                           json.dumps({"envs": envs, "secrets": secrets})],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_skypilot_task_parses_with_skypilot_and_recovers_spot_jobs():
    # SWEEP_ID must be given: SkyPilot refuses the task without it.
    refused = parse_skypilot_task({}, {"WANDB_API_KEY": "k"})
    assert "SWEEP_ID" in refused["error"]
    task = parse_skypilot_task({"SWEEP_ID": "ent/proj/abc123"}, {"WANDB_API_KEY": "k"})
    assert "error" not in task, task
    options = task["resources"]  # one per accepted GPU type
    assert options and all(option["use_spot"] for option in options)
    assert all(option["job_recovery"]["strategy"] and option["job_recovery"]["max_restarts_on_errors"] >= 1
               for option in options)
    assert all(sum(option["accelerators"].values()) == 1 for option in options)  # one GPU, one agent
    (image,) = {image for option in options for image in option["image_ids"]}
    assert image.startswith("docker:") and image.endswith("/cifar-resnet-agent:0.1")
    # SkyPilot installs its runtime in the container as the container's user: root, not the image's 10001.
    assert all(option["config_overrides"]["docker"]["run_options"] == ["--user=0"] for option in options)
    # The key is a secret (kept out of logs and the job's record), not an env.
    assert task["secrets"] == ["WANDB_API_KEY"] and "WANDB_API_KEY" not in task["envs"]
    # The caches on a mounted bucket, torch.compile's among them.
    ((mount_path, mode),) = task["mounts"].items()
    assert mode in ("MOUNT", "MOUNT_CACHED")
    assert task["envs"]["TORCHINDUCTOR_CACHE_DIR"].startswith(mount_path)
    assert 'cifar-resnet agent "$SWEEP_ID"' in task["run"]
    # A private image: the registry's credentials as the task's comments give them at launch, all three secrets.
    registry = {"SKYPILOT_DOCKER_SERVER": "registry.example.com", "SKYPILOT_DOCKER_USERNAME": "user",
                "SKYPILOT_DOCKER_PASSWORD": "token"}
    for name in registry:
        assert f"--secret {name}" in SKYPILOT_TASK.read_text(), name
    private = parse_skypilot_task({"SWEEP_ID": "ent/proj/abc123"}, {"WANDB_API_KEY": "k", **registry})
    assert "error" not in private, private
    assert private["secrets"] == sorted([*registry, "WANDB_API_KEY"]) and not registry.keys() & private["envs"].keys()
