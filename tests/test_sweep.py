"""`cifar-resnet sweep`: offline sweeps through W&B's own sweep engine, with real runs in subprocesses (W&B
offline), and the online path with a stand-in `wandb` executable (there is no W&B server here)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers.runs import processes_of, wait_for
from helpers.sweeps import GRID, sweep_state, table_rows, tiny_settings, write_sweep

from cifar_resnet.cli import main
from cifar_resnet.records import RECORD_FILE, RunRecord
from cifar_resnet.sweep import command as sweep_command
from cifar_resnet.sweep.local import MAX_INITIAL_FAILURES, LocalSweep
from cifar_resnet.sweep.plan import default_output_dir, load_sweep, runs_to_stop
from cifar_resnet.sweep.state import LocalRun
from cifar_resnet.sweep.view import LiveView, LogView, RunProgress
from cifar_resnet.wandb_sweep import run_argv

SIGNAL_TIMEOUT_SECONDS = 120


def test_grid_with_two_workers_runs_every_cell_as_the_agent_would(tmp_path, tiny_config, capsys):
    path = write_sweep(tmp_path / "grid.yaml", GRID | tiny_settings(tiny_config))
    out_dir = tmp_path / "grid-out"

    assert main(["sweep", str(path), "--workers", "2", "--offline", "--output-dir", str(out_dir)]) == 0

    state = sweep_state(out_dir)
    runs = state["runs"]
    assert [run["state"] for run in runs] == ["finished"] * 4
    cells = {(run["params"]["learning_rate"], run["params"]["optimizer"]) for run in runs}
    assert cells == {(0.001, "adam"), (0.001, "sgd"), (0.0005, "adam"), (0.0005, "sgd")}
    records = [RunRecord.load(out_dir / run["run_id"]) for run in runs]
    for run, record in zip(runs, records):
        assert record.run_id == run["run_id"] and record.status == "finished"
        assert record.config["learning_rate"] == run["params"]["learning_rate"]
        assert record.config["optimizer"] == run["params"]["optimizer"]
        assert record.config["width"] == tiny_config.width and record.config["epochs"] == 1
        assert record.config["output_dir"] == str(out_dir.resolve())
        assert "test/acc" in record.summary
        # A real offline W&B run under the run id the sweep gave it, next to the others (WANDB_DIR).
        assert list((tmp_path / "wandb").glob(f"offline-run-*-{run['run_id']}"))
    # Two workers: the first two runs were in progress at the same time.
    first, second = sorted(records, key=lambda record: record.started_at)[:2]
    assert second.started_at < first.updated_at
    rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 4 and "(best)" in rows[0]

    # The same command again: every cell is done, nothing runs, and it says so in one line before the table
    # (issue 27: it printed the table after a few seconds, without a word).
    assert main(["sweep", str(path), "--workers", "2", "--offline", "--output-dir", str(out_dir)]) == 0
    assert sweep_state(out_dir)["runs"] == runs
    again = capsys.readouterr()
    assert again.err.splitlines()[-1] == "INFO: all 4 runs of the sweep finished already: nothing left to do"
    assert len(table_rows(again.out)) == 4

    # And the report reads the sweep's folder.
    assert main(["report", str(out_dir)]) == 0
    assert (out_dir / "report" / "results.md").read_text().count("| ") > 4


def test_a_failed_run_does_not_stop_the_others_and_shows_its_log(tmp_path, tiny_config, capsys):
    parameters = tiny_settings(tiny_config) | {
        "dataset": {"values": ["synthetic", "imagefolder"]},
        "data_dir": {"value": str(tmp_path / "no-such-images")},
    }
    out_dir = tmp_path / "out"
    path = write_sweep(tmp_path / "failing.yaml", parameters)

    assert main(["sweep", str(path), "--workers", "2", "--offline", "--output-dir", str(out_dir)]) == 1

    states = {run["params"]["dataset"]: run for run in sweep_state(out_dir)["runs"]}
    assert states["synthetic"]["state"] == "finished"
    assert states["imagefolder"]["state"] == "failed" and states["imagefolder"]["exit_code"] == 2
    stdout = capsys.readouterr().out
    rows = table_rows(stdout)
    assert len(rows) == 2 and "(failed)" in rows[1]
    failed_id = states["imagefolder"]["run_id"]
    assert f"run {failed_id} failed (exit 2)" in stdout
    assert "no-such-images/train is not a folder" in stdout  # the end of the run's own log


@pytest.mark.slow
def test_an_interrupted_sweep_keeps_finished_runs_and_resumes_the_rest_from_a_moved_folder(tmp_path, tiny_config):
    """The stopped sweep's folder is moved before it resumes (issue 23: output_dir was compared as a setting, so
    the moved run's last.pt was "written with other settings" and the run failed)."""
    # One run at a time: a 1-epoch run that finishes, then a 4-epoch run interrupted after its first epoch.
    parameters = tiny_settings(tiny_config) | {"epochs": {"values": [1, 4]}}
    path = write_sweep(tmp_path / "two.yaml", parameters)
    out_dir = tmp_path / default_output_dir(load_sweep(path, []))  # the sweep's own folder, in the current one
    command = [sys.executable, "-m", "cifar_resnet", "sweep", str(path), "--offline"]
    sweep = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def long_run_has_an_epoch() -> bool:
        runs = sweep_state(out_dir)["runs"] if (out_dir / "sweep.json").exists() else []
        if len(runs) < 2 or runs[0]["state"] != "finished":
            return False
        record = out_dir / runs[1]["run_id"] / RECORD_FILE
        return record.exists() and len(json.loads(record.read_text())["history"]) >= 1

    try:
        wait_for(long_run_has_an_epoch)
        sweep.send_signal(signal.SIGINT)
        output = sweep.communicate(timeout=SIGNAL_TIMEOUT_SECONDS)[0].decode()
    finally:
        sweep.kill()
    assert sweep.returncode == 128 + signal.SIGINT, output
    assert output.rstrip().endswith("stopped; run the same command to resume")  # the last line, after the table
    finished, interrupted = sweep_state(out_dir)["runs"]
    assert finished["state"] == "finished" and interrupted["state"] == "preempted"
    assert (out_dir / interrupted["run_id"] / "last.pt").exists()  # its resume checkpoint
    # No process is left behind: not the run, not its W&B service.
    wait_for(lambda: not processes_of(f"WANDB_SWEEP_PARAM_PATH={out_dir.resolve()}"), timeout=10)
    finished_record = RunRecord.load(out_dir / finished["run_id"])
    interrupted_record = RunRecord.load(out_dir / interrupted["run_id"])
    moved = out_dir.rename(tmp_path / "moved")
    out_dir = moved

    # The same command, pointed at the folder where the sweep now lies (`mv A B`, then `--output-dir B`).
    resumed_sweep = subprocess.run([*command, "--output-dir", str(moved)], capture_output=True, text=True)
    assert resumed_sweep.returncode == 0, resumed_sweep.stderr[-3000:]

    runs = sweep_state(out_dir)["runs"]
    assert [run["run_id"] for run in runs] == [finished["run_id"], interrupted["run_id"]]
    assert [run["state"] for run in runs] == ["finished", "finished"]
    assert RunRecord.load(out_dir / finished["run_id"]) == finished_record  # not run again
    resumed = RunRecord.load(out_dir / interrupted["run_id"])
    assert [entry["epoch"] for entry in resumed.history] == [1, 2, 3, 4]  # each epoch once
    # Resumed, not started over: the same record, and the epochs before the interrupt kept as they were.
    assert resumed.started_at == interrupted_record.started_at
    assert resumed.history[:len(interrupted_record.history)] == interrupted_record.history
    assert not (out_dir / interrupted["run_id"] / "last.pt").exists()
    assert resumed.status == "finished" and resumed.error is None  # not the interrupted attempt's "Interrupted"
    assert resumed.config["output_dir"] == str(moved.resolve())  # where it lies now


@pytest.mark.slow
def test_a_run_killed_after_its_record_says_finished_is_finished_and_never_run_again(tmp_path, tiny_config):
    """As when the OOM killer, or a second stop, ends a run while it shuts W&B down: its record says finished, its
    exit status does not; the record wins (issue 23: the run was recorded preempted or failed, and the next sweep
    trained it again from scratch, over its record and best.pt)."""
    path = write_sweep(tmp_path / "one.yaml", tiny_settings(tiny_config) | {"seed": {"values": [1]}})
    out_dir = tmp_path / "out"
    command = [sys.executable, "-m", "cifar_resnet", "sweep", str(path), "--offline", "--output-dir", str(out_dir)]
    sweep = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def run_finished() -> bool:
        runs = sweep_state(out_dir)["runs"] if (out_dir / "sweep.json").exists() else []
        record = out_dir / runs[0]["run_id"] / RECORD_FILE if runs else None
        return record is not None and record.exists() and json.loads(record.read_text())["status"] == "finished"

    try:
        wait_for(run_finished)
        for pid in processes_of(f"WANDB_SWEEP_PARAM_PATH={out_dir.resolve()}"):  # the run and its W&B service
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output = sweep.communicate(timeout=SIGNAL_TIMEOUT_SECONDS)[0].decode()
    finally:
        sweep.kill()
    assert sweep.returncode == 0, output
    (run,) = sweep_state(out_dir)["runs"]
    assert run["state"] == "finished" and run["exit_code"] == 128 + signal.SIGKILL, run
    record = RunRecord.load(out_dir / run["run_id"])

    assert main(["sweep", str(path), "--offline", "--output-dir", str(out_dir)]) == 0
    (run,) = sweep_state(out_dir)["runs"]
    assert run["attempts"] == 1 and RunRecord.load(out_dir / run["run_id"]) == record


@pytest.mark.quick
def test_a_run_killed_by_a_signal_is_recorded_with_128_plus_its_number(tmp_path):
    """Issue 27: a run stopped in its start-up, before it handles signals, was recorded with exit_code -15 (Python's
    returncode), where the docs and every other status say 143. Killed by the sweep's stop it is preempted; killed
    by anything else (SIGKILL: the OOM killer), failed."""
    path = write_sweep(tmp_path / "wait.yaml", {"seed": {"values": [1, 2]}}, command=["sleep", "60"])
    sweep = LocalSweep(load_sweep(path, []), tmp_path / "out", [None, None], None, None, LogView([]))
    sweep.step()  # both runs start
    killed, stopped = sweep.active.values()
    killed.process.kill()
    killed.process.wait()
    sweep.step()  # reaps the killed run
    sweep.interrupt(signal.SIGTERM)  # as Ctrl-C or SIGTERM to the sweep: the other run gets SIGTERM
    runs = sweep_state(tmp_path / "out")["runs"]
    assert [(run["state"], run["exit_code"]) for run in runs] == [("failed", 128 + signal.SIGKILL),
                                                                 ("preempted", 128 + signal.SIGTERM)]


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


@pytest.mark.parametrize(("method", "count"), [("random", 2), pytest.param("bayes", 3, marks=pytest.mark.slow)])
def test_random_and_bayes_stop_at_count(tmp_path, tiny_config, method, count):
    """The engine proposes each run; bayes proposes from the finished runs' val/acc, fed back from their records."""
    parameters = tiny_settings(tiny_config) | {
        "learning_rate": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
        "optimizer": {"values": ["adam", "sgd"]},
    }
    path = write_sweep(tmp_path / f"{method}.yaml", parameters, method=method)
    out_dir = tmp_path / "out"

    assert main(["sweep", str(path), "--workers", "2", "--count", str(count), "--offline", "--output-dir",
                 str(out_dir)]) == 0

    runs = sweep_state(out_dir)["runs"]
    assert len(runs) == count and all(run["state"] == "finished" for run in runs)
    assert len({run["params"]["learning_rate"] for run in runs}) == count
    for run in runs:
        assert 1e-4 <= run["params"]["learning_rate"] <= 1e-2
        assert RunRecord.load(out_dir / run["run_id"]).config["learning_rate"] == run["params"]["learning_rate"]


def test_a_command_that_cannot_start_fails_its_runs_and_the_sweep_gives_up(tmp_path, tiny_config, capsys):
    """Like `wandb agent`: after 5 failed runs and none finished, no new runs (a random sweep would never end)."""
    parameters = tiny_settings(tiny_config) | {"seed": {"distribution": "int_uniform", "min": 0, "max": 1000}}
    path = write_sweep(tmp_path / "broken.yaml", parameters, method="random",
                       command=["no-such-python", "-m", "${program}", "${args}"])
    out_dir = tmp_path / "out"

    assert main(["sweep", str(path), "--workers", "2", "--offline", "--output-dir", str(out_dir)]) == 1

    runs = sweep_state(out_dir)["runs"]
    assert len(runs) == MAX_INITIAL_FAILURES
    assert all(run["state"] == "failed" and run["exit_code"] is None for run in runs)
    captured = capsys.readouterr()
    assert "5 runs failed and 0 finished: no new runs" in captured.err
    assert "could not start" in captured.out and "No such file or directory: 'no-such-python'" in captured.out


def test_each_run_gets_the_agents_environment_and_its_share_of_the_cores(tmp_path, tiny_config, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("WANDB_DIR")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a shell where this environment is not activated
    plan = load_sweep(write_sweep(tmp_path / "grid.yaml", GRID | tiny_settings(tiny_config)), [])
    local = LocalSweep(plan, tmp_path / "out", ["0", "1"], None, "proj", LogView([]))
    run = LocalRun("abcd1234", {"learning_rate": 0.001})

    env = local.environment(run, "1")

    assert env["WANDB_MODE"] == "offline" and env["WANDB_RUN_ID"] == "abcd1234"
    assert env["WANDB_SWEEP_PARAM_PATH"] == str((tmp_path / "out" / "abcd1234" / "sweep-params.yaml").resolve())
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["WANDB_PROJECT"] == "proj"
    assert env["WANDB_DIR"] == str((tmp_path / "out").resolve())
    assert env["WANDB_RUN_GROUP"] == f"sweep-grid-{local.state.sweep_id}"
    assert "WANDB_SWEEP_ID" not in env  # a local id would make `wandb sync` refuse the run
    # `python` (the agent's `${interpreter}`) resolves to the interpreter cifar_resnet is installed in.
    assert shutil.which("python", path=env["PATH"]) == str(Path(sys.executable).parent / "python")
    assert env["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert local.environment(run, None)["OMP_NUM_THREADS"] == "3"  # the user's own choice wins


def test_the_run_command_is_expanded_as_the_agent_expands_it(tmp_path, monkeypatch):
    monkeypatch.setenv("EXTRA_FLAG", "--seed=3")
    params = {"learning_rate": 0.001, "tta": False}
    command = ["${env}", "${interpreter}", "-m", "${program}", "${args_no_hyphens}", "${envvar:EXTRA_FLAG}",
               "${args_json_file}"]

    expanded = run_argv(command, "cifar_resnet.train", params, tmp_path / "args.json")

    assert expanded == ["/usr/bin/env", "python", "-m", "cifar_resnet.train", "learning_rate=0.001", "tta=False",
                        "--seed=3", str(tmp_path / "args.json")]
    assert json.loads((tmp_path / "args.json").read_text()) == params
    assert run_argv(None, "train.py", params, tmp_path / "unused.json") == [
        "/usr/bin/env", "python", "train.py", "--learning_rate=0.001", "--tta=False"]  # W&B's default command


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


def test_an_output_folder_of_another_sweep_is_refused(tmp_path, tiny_config, capsys):
    out_dir = tmp_path / "out"
    first = write_sweep(tmp_path / "a.yaml", tiny_settings(tiny_config) | {"seed": {"values": [1]}})
    out_dir.mkdir()
    (out_dir / "sweep.json").write_text(json.dumps({"sweep_id": "x", "sweep": {"other": 1}, "runs": []}))

    assert main(["sweep", str(first), "--offline", "--output-dir", str(out_dir)]) == 2
    assert "holds another sweep" in capsys.readouterr().err


FAKE_WANDB = """\
#!{python}
# A stand-in for the `wandb` executable: records how it was called, then exits with FAKE_WANDB_EXIT.
import json, os, sys, time
with open(os.environ["FAKE_WANDB_CALLS"], "a") as calls:
    calls.write(json.dumps({{"argv": sys.argv[1:], "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
                             "at": time.monotonic()}}) + "\\n")
sys.exit(int(os.environ.get("FAKE_WANDB_EXIT", "0")))
"""


@pytest.fixture
def online(tmp_path, monkeypatch):
    """W&B credentials and a stand-in `wandb` on PATH; `wandb.sweep` records its sweep instead of calling W&B."""
    import wandb

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "wandb"
    fake.write_text(FAKE_WANDB.format(python=sys.executable))
    fake.chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_WANDB_CALLS", str(calls))
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setattr(sweep_command, "DEFAULT_STAGGER_SECONDS", 1.0)
    created: list[dict[str, Any]] = []
    monkeypatch.setattr(wandb, "sweep", lambda sweep, project: created.append(
        {"sweep": sweep, "project": project}) or "sweep123")

    def agent_calls() -> list[dict[str, Any]]:
        return [json.loads(line) for line in calls.read_text().splitlines()]

    return created, agent_calls


def test_online_creates_the_sweep_and_starts_one_pinned_agent_per_gpu(tmp_path, tiny_config, online, fake_gpus):
    created, agent_calls = online
    fake_gpus([(0, "GPU-aaa", 8192), (1, "GPU-bbb", 8192)])  # small: one run per GPU
    path = write_sweep(tmp_path / "grid.yaml", GRID | tiny_settings(tiny_config))

    assert main(["sweep", str(path), "--gpus", "0,1", "--count", "3", "--project", "proj",
                 "--set", "epochs=4"]) == 0

    (sweep,) = created
    assert sweep["project"] == "proj"
    assert sweep["sweep"]["run_cap"] == 3
    assert sweep["sweep"]["parameters"]["epochs"] == {"value": 4}
    calls = agent_calls()
    assert [call["argv"] for call in calls] == [["agent", "--forward-signals", "--project", "proj", "sweep123"]] * 2
    assert [call["gpu"] for call in calls] == ["0", "1"]
    # Staggered: each stand-in stamps the time once its own Python has started, which varies by a few tenths.
    assert calls[1]["at"] - calls[0]["at"] >= 0.5
    assert not (tmp_path / "sweeps").exists()  # nothing ran here


def test_online_agent_failure_is_the_exit_status(tmp_path, tiny_config, online, monkeypatch):
    monkeypatch.setenv("FAKE_WANDB_EXIT", "1")
    path = write_sweep(tmp_path / "grid.yaml", GRID | tiny_settings(tiny_config))

    assert main(["sweep", str(path), "--workers", "2"]) == 1
    assert [call["gpu"] for call in online[1]()] == [None, None]


def test_live_view_shows_runs_and_progress(capsys):
    run = LocalRun("abc12345", {"learning_rate": 0.001, "optimizer": "adam"}, "running")
    with LiveView(["learning_rate", "optimizer"]) as view:
        view.refresh([RunProgress(run, 1, 2, 0.42, 3.0)], total_runs=6)
    shown = capsys.readouterr().err
    assert "abc12345" in shown and "1/2" in shown and "42.00%" in shown and "runs 0/6" in shown


@pytest.mark.quick
@pytest.mark.parametrize("columns", [80, 200])
def test_the_live_table_keeps_the_run_ids_and_swept_values_whole_on_a_narrow_terminal(capsys, monkeypatch, columns):
    """Issue 27: at 80 columns every swept value was cut to `0.0…` or `ad…`, and the runs could not be told apart.
    Other columns give way, from the per-run bar on; a wide terminal shows them all."""
    monkeypatch.setenv("COLUMNS", str(columns))
    cells = [(0.001, "adam", "running"), (0.0005, "adamw", "preempted"), (0.0001, "sgd", "finished")]
    runs = [LocalRun(f"run{index:05d}", {"learning_rate": rate, "optimizer": optimizer}, state)
            for index, (rate, optimizer, state) in enumerate(cells)]
    with LiveView(["learning_rate", "optimizer"]) as view:
        view.refresh([RunProgress(run, 1, 2, 0.42, 63.0, 0.5, 12345.0) for run in runs], total_runs=6)
    lines = capsys.readouterr().err.splitlines()
    header = next(line for line in lines if line.startswith("run "))
    assert "learning_rate" in header and "optimizer" in header and "…" not in header
    for run, (rate, optimizer, state) in zip(runs, cells):
        (row,) = [line for line in lines if line.startswith(run.run_id)]
        assert row.split()[:4] == [run.run_id, state, str(rate), optimizer] and "…" not in row
        assert len(row.rstrip()) <= columns
    assert ("12,345" in "".join(lines)) == (columns == 200)  # images per second: given way at 80, shown at 200


def test_sweep_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for option in ("--workers", "--gpus", "--count", "--project", "--offline", "--set", "--output-dir"):
        assert option in shown
