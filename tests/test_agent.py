"""`cifar-resnet agent`: one `wandb agent` per GPU, pinned, with signals forwarded and failures reported.

A W&B agent needs W&B's server, which cannot be reached here: a stand-in `wandb` executable on PATH records how
it was started (arguments, CUDA_VISIBLE_DEVICES, the key) and the signals it gets. The real `wandb agent` is
only asked for its --help, to check that it takes the arguments the stand-in was given.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifar_resnet.cli import main as cli_main

API_KEY = "0123456789abcdef0123456789abcdef01234567"  # a made-up key, only passed through
WAIT_SECONDS = 60
SMALL_GPU_MIB = 8192
POLL_SECONDS = 0.05

STAND_IN = """#!{python}
# Stand-in for the `wandb` command: records how it was started; with STAND_IN_WAIT set, runs until a signal.
# With STAND_IN_MISSING set, it ends as `wandb agent` does for a sweep that does not exist.
import json, os, signal, sys, time
record = {{"argv": sys.argv[1:], "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
          "api_key": os.environ.get("WANDB_API_KEY"), "trainer": os.environ.get("CIFAR_RESNET_TRAINER"),
          "signals": [], "exited": False}}
path = os.path.join(os.environ["STAND_IN_LOG"], f"{{os.getpid()}}.json")

def save():
    with open(path + ".part", "w") as f:
        json.dump(record, f)
    os.replace(path + ".part", path)

for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
    signal.signal(sig, lambda signum, frame: record["signals"].append(signum))
save()
sys.stderr.write("wandb: Starting wandb agent\\n")
if os.environ.get("STAND_IN_MISSING"):
    sys.stderr.write("Traceback (most recent call last):\\n  File wandb_agent.py, in run\\n"
                     f"ValueError: Sweep {{sys.argv[-1]}} not found\\n")
    sys.exit(1)
sys.stderr.write(os.environ.get("STAND_IN_OUTPUT", "2026-11-27 - wandb.wandb_agent - INFO - Running runs: []\\n"))
sys.stderr.flush()
while os.environ.get("STAND_IN_WAIT") and not record["signals"]:
    time.sleep(0.02)
time.sleep(float(os.environ.get("STAND_IN_LINGER", "0")))  # shutting down takes a while
record["exited"] = True
save()
sys.exit(int(json.loads(os.environ.get("STAND_IN_STATUS", "{{}}")).get(record["gpu"] or "", 0)))
"""


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_gpus) -> Path:
    """A stand-in `wandb` first on PATH, and a stand-in `nvidia-smi` listing GPUs 0 to 3 (small ones: `auto` puts
    one agent on each); returns the folder where its runs record themselves."""
    fake_gpus([(index, f"GPU-{index}", SMALL_GPU_MIB) for index in range(4)])
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "stand-in"
    bin_dir.mkdir()
    log_dir.mkdir()
    program = bin_dir / "wandb"
    program.write_text(STAND_IN.format(python=sys.executable))
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STAND_IN_LOG", str(log_dir))
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    return log_dir


def records(log_dir: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in log_dir.glob("*.json")]


def agent_process(*args: str) -> subprocess.Popen:
    """`cifar-resnet agent` in a process of its own, to send it signals."""
    return subprocess.Popen([sys.executable, "-m", "cifar_resnet", "agent", "--stagger=0", *args],
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL_SECONDS)


def two_waiting_agents(stand_in, monkeypatch) -> subprocess.Popen:
    """The pool on two GPUs, both agents started and waiting for a signal."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("STAND_IN_WAIT", "1")
    pool = agent_process("ent/proj/abc123")
    wait_for(lambda: len(records(stand_in)) == 2, "both agents")
    return pool


def test_one_pinned_agent_per_gpu_and_k_per_gpu(stand_in, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert cli_main(["agent", "ent/proj/abc123", "--agents-per-gpu=2", "--project=proj", "--entity=ent",
                     "--stagger=0"]) == 0
    started = records(stand_in)
    assert sorted(r["gpu"] for r in started) == ["0", "0", "1", "1", "2", "2"]
    for r in started:
        assert r["argv"] == ["agent", "--forward-signals", "--project", "proj", "--entity", "ent", "ent/proj/abc123"]
        assert r["api_key"] == API_KEY and r["exited"]


def test_the_agents_of_each_gpu_get_its_trainer_which_stops_with_the_pool(stand_in, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("STAND_IN_WAIT", "1")
    pool = agent_process("ent/proj/abc123", "--agents-per-gpu=2")  # --pack by default: two agents share a GPU
    wait_for(lambda: len(records(stand_in)) == 4, "four agents")
    sockets = {r["gpu"]: r["trainer"] for r in records(stand_in)}
    assert sorted(sockets) == ["0", "1"] and len(set(sockets.values())) == 2
    assert all(r["trainer"] == sockets[r["gpu"]] for r in records(stand_in))  # one trainer per GPU
    wait_for(lambda: all(Path(path).is_socket() for path in sockets.values()), "both trainers to listen")
    pool.send_signal(signal.SIGTERM)
    _, stderr = pool.communicate(timeout=WAIT_SECONDS)
    assert pool.returncode == 0, stderr
    assert not any(Path(path).exists() for path in sockets.values())  # the trainers ended with the pool


def test_without_cuda_visible_devices_it_counts_the_gpus_and_reads_sweep_id(stand_in, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("SWEEP_ID", "ent/proj/fromenv")
    assert cli_main(["agent", "--stagger=0"]) == 0
    gpus = torch.cuda.device_count()  # none here: one agent, not pinned
    assert sorted(r["gpu"] for r in records(stand_in)) == ([str(i) for i in range(gpus)] if gpus else [None])
    assert all(r["argv"] == ["agent", "--forward-signals", "ent/proj/fromenv"] for r in records(stand_in))


def test_sigterm_reaches_every_agent_and_a_failed_agent_fails_the_pool(stand_in, monkeypatch):
    monkeypatch.setenv("STAND_IN_LINGER", "0.5")
    monkeypatch.setenv("STAND_IN_STATUS", json.dumps({"1": 3}))  # the agent on GPU 1 fails
    pool = two_waiting_agents(stand_in, monkeypatch)
    pool.send_signal(signal.SIGTERM)
    _, stderr = pool.communicate(timeout=WAIT_SECONDS)
    assert pool.returncode == 3, stderr
    # Every agent got the signal once, and had exited (after lingering) before the pool did.
    assert [(r["signals"], r["exited"]) for r in records(stand_in)] == [([signal.SIGTERM], True)] * 2
    assert "agent 2 exited with status 3" in stderr or "agent 1 exited with status 3" in stderr


def test_sigint_during_the_stagger_starts_no_more_agents(stand_in, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    monkeypatch.setenv("STAND_IN_WAIT", "1")
    pool = agent_process("ent/proj/abc123", "--stagger=30")
    wait_for(lambda: len(records(stand_in)) == 1, "the first agent")
    started = time.monotonic()
    pool.send_signal(signal.SIGINT)
    _, stderr = pool.communicate(timeout=WAIT_SECONDS)
    assert pool.returncode == 0, stderr
    assert time.monotonic() - started < 10  # not the 30 s stagger
    assert [(r["gpu"], r["signals"]) for r in records(stand_in)] == [("0", [signal.SIGINT])]


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["ent/proj/abc"], {}, "WANDB_API_KEY: not set"),
        ([], {"WANDB_API_KEY": API_KEY}, "SWEEP_ID: no sweep given"),
        (["ent/proj/abc", "--agents-per-gpu=0"], {"WANDB_API_KEY": API_KEY}, "--agents-per-gpu: must be >= 1"),
        (["ent/proj/abc", "--count=0"], {"WANDB_API_KEY": API_KEY}, "--count: must be >= 1"),
    ],
)
def test_refuses_in_one_line(args, env, message, monkeypatch, capsys):
    monkeypatch.delenv("SWEEP_ID", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli_main(["agent", *args]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"ERROR: {message}")


@pytest.mark.parametrize(("rows", "listed", "missing", "has"), [
    (None, "0", "0", "no GPU"),  # no nvidia-smi, and CUDA finds none
    ([(0, "GPU-aaa", SMALL_GPU_MIB), (1, "GPU-bbb", SMALL_GPU_MIB)], "1,GPU-aaa,2", "2", "GPU 0, 1"),
])
def test_cuda_visible_devices_naming_gpus_this_machine_lacks_is_one_line_and_starts_no_agent(
        stand_in, fake_gpus, monkeypatch, capsys, rows, listed, missing, has):
    """Issue 27: agents pinned to a GPU that is not there would train their runs on the CPU."""
    if rows is None and torch.cuda.device_count():
        pytest.skip("a GPU is here")
    fake_gpus(rows)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    assert cli_main(["agent", "ent/proj/abc123", "--stagger=0"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"ERROR: CUDA_VISIBLE_DEVICES: GPU {missing} asked for, but this machine has {has}; name GPUs it has, or "
        "unset it to use every GPU (none: the CPU)"]
    assert records(stand_in) == []


def test_the_real_wandb_agent_takes_the_arguments_given_to_the_stand_in():
    done = subprocess.run([str(Path(sys.executable).parent / "wandb"), "agent", "--help"], capture_output=True,
                          text=True, timeout=WAIT_SECONDS)
    assert done.returncode == 0
    for option in ("--forward-signals", "--project", "--entity"):
        assert option in done.stdout


def test_count_is_passed_on_and_agents_that_end_for_want_of_work_end_the_pool_with_0(stand_in, monkeypatch):
    # The stand-in exits 0, as `wandb agent` does after `--count` runs or on the controller's "exit" command (the
    # sweep is finished); the pool then exits 0 too, so that a batch job ends and gives its GPU back.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert cli_main(["agent", "ent/proj/abc123", "--count=2", "--stagger=0"]) == 0
    started = records(stand_in)
    assert len(started) == 2
    assert all(r["argv"] == ["agent", "--forward-signals", "--count", "2", "ent/proj/abc123"] and r["exited"]
               for r in started)


def test_sigusr1_the_schedulers_warning_reaches_every_agent_as_sigterm(stand_in, monkeypatch):
    # W&B's agent forwards SIGUSR1 to its run but would then take the next one; SIGTERM stops run and agent both.
    pool = two_waiting_agents(stand_in, monkeypatch)
    pool.send_signal(signal.SIGUSR1)
    _, stderr = pool.communicate(timeout=WAIT_SECONDS)
    assert pool.returncode == 0, stderr
    assert [(r["signals"], r["exited"]) for r in records(stand_in)] == [([signal.SIGTERM], True)] * 2


def test_a_sweep_that_does_not_exist_is_one_line_and_exit_2(stand_in, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("STAND_IN_MISSING", "1")
    pool = agent_process("ent/proj/nosuch")
    _, stderr = pool.communicate(timeout=WAIT_SECONDS)
    assert pool.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if not line.startswith("INFO: ")]
    assert errors == ["ERROR: SWEEP_ID: W&B has no sweep ent/proj/nosuch (Sweep ent/proj/nosuch not found); check "
                      "the id that `wandb sweep` printed, and --project/--entity"]


def test_agents_output_is_passed_on_and_a_failure_at_start_is_shown_not_hidden(stand_in, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("STAND_IN_OUTPUT", "wandb: ERROR some other failure\n")
    monkeypatch.setenv("STAND_IN_STATUS", json.dumps({"0": 1}))
    pool = agent_process("ent/proj/abc123")
    _, stderr = pool.communicate(timeout=WAIT_SECONDS)
    assert pool.returncode == 1, stderr
    assert "wandb: ERROR some other failure" in stderr and "agent 1 exited with status 1" in stderr


def test_the_real_wandb_agent_writes_what_the_pool_looks_for():
    """The lines the pool reads are wandb's own: checked against the installed wandb, so that a wandb that words
    them differently fails here rather than in a user's batch job."""
    import inspect

    import wandb.wandb_agent
    from wandb.apis.public import sweeps

    from cifar_resnet.agent import JOINED, SWEEP_NOT_FOUND

    agent_source, sweeps_source = inspect.getsource(wandb.wandb_agent), inspect.getsource(sweeps)
    assert JOINED.search('logger.info("Running runs: %s"') and '"Running runs: %s"' in agent_source
    assert "Agent Starting Run" in agent_source
    assert 'raise ValueError(f"Sweep {entity}/{project}/{sweep} not found")' in sweeps_source
    assert SWEEP_NOT_FOUND.search("Sweep ent/proj/x not found")
    assert "Sweep was deleted or agent was not found" in agent_source


def trainer_pids(pool: subprocess.Popen) -> set[int]:
    """The pool's `cifar-resnet trainer` children."""
    children = set()
    for task in Path(f"/proc/{pool.pid}/task").iterdir():
        children |= {int(pid) for pid in (task / "children").read_text().split()}
    return {pid for pid in children
            if b"trainer" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[3:4]}


def test_a_trainer_that_dies_is_started_again(stand_in, monkeypatch):
    """The agent never started a dead trainer again: each later run waited 60 s on its socket, then trained alone."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("STAND_IN_WAIT", "1")
    pool = agent_process("ent/proj/abc123", "--agents-per-gpu=2")
    try:
        wait_for(lambda: len(trainer_pids(pool)) == 1, "the trainer")
        (first,) = trainer_pids(pool)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: trainer_pids(pool) - {first}, "another trainer")
    finally:
        pool.send_signal(signal.SIGTERM)
        pool.communicate(timeout=WAIT_SECONDS)
    assert pool.returncode == 0


def test_pack_on_a_cpu_puts_the_agents_runs_in_one_trainer_as_a_sweeps(stand_in, monkeypatch):
    """On a CPU `--pack streams` started no trainer and said nothing, where the sweep's runs take turns in one."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cli_main(["agent", "ent/proj/abc123", "--pack", "streams", "--stagger=0"]) == 0
    (started,) = records(stand_in)
    assert started["trainer"].endswith("trainer-default.sock")  # the machine's one trainer
