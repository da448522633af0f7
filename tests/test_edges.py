"""What a W&B user expects at the edges (issue 21): a sweep's folder of its own, hints that work as written, one
line where W&B would give a traceback, and the small things that tell a user the tool is careful."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import shlex
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, tiny_args
from helpers.images import image_folder
from helpers.sweeps import sweep_state, tiny_settings, write_sweep

from cifar_resnet import threads
from cifar_resnet.cli import main
from cifar_resnet.staggered import Launch, run_staggered_statuses
from cifar_resnet.sweep.plan import default_output_dir, load_sweep
from cifar_resnet.sweep.state import LocalRun
from cifar_resnet.sweep.view import LiveView, RunProgress, RunTiming, sweep_seconds_left
from cifar_resnet.threads import cpu_threads_per_run, usable_cpu_cores

# --- a sweep's folder is named by the sweep ----------------------------------------------------------------------


def folder_of(sweep_file: Path, *overrides: str) -> Path:
    return default_output_dir(load_sweep(sweep_file, overrides))


@pytest.mark.quick
def test_the_default_folder_is_the_sweeps_name_and_a_digest_of_its_settings(tmp_path):
    trial = REPO / "examples" / "trial-sweep.yaml"
    folder = folder_of(trial)
    assert re.fullmatch(r"sweeps/trial-[0-9a-f]{8}", folder.as_posix())
    assert folder_of(trial) == folder  # the same command finds its folder again
    real = folder_of(trial, "dataset=imagefolder", "data_dir=/data/cifar10-jpeg")
    assert real != folder and real.name.startswith("trial-")
    # --set values are typed, and their order does not matter: the same sweep, the same folder.
    assert folder_of(trial, "epochs=03", "width=8") == folder_of(trial, "width=8", "epochs=3")
    unnamed = write_sweep(tmp_path / "my grid.yaml", {"epochs": {"value": 1}})
    assert folder_of(unnamed).name.startswith("my-grid-")  # no name: the file's stem, made a folder name


@pytest.mark.quick
def test_the_readmes_report_command_reads_the_folder_its_sweep_command_writes():
    """README's main job is `cifar-resnet sweep FILE ... && cifar-resnet report FOLDER`: FOLDER must be FILE's."""
    lines = [line for line in (REPO / "README.md").read_text().splitlines()
             if "cifar-resnet sweep " in line and "cifar-resnet report " in line]
    assert lines
    for line in lines:
        sweep_part, report_part = line.split("&&")
        words = shlex.split(sweep_part)
        sweep_file = REPO / words[words.index("sweep") + 1]
        overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
        assert shlex.split(report_part)[-1] == folder_of(sweep_file, *overrides).as_posix(), line



# --- docs that hold -----------------------------------------------------------------------------------------------

DOCS = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "benchmarks" / "results").glob("*/README.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(page: Path) -> str:
    """A Markdown page without its fenced code blocks (where `# ...` is a comment, not a heading)."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    found, seen = set(), Counter()
    for heading in re.findall(r"^#+ (.+)$", prose(page), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return found


@pytest.mark.quick
@pytest.mark.parametrize("page", DOCS, ids=lambda page: page.relative_to(REPO).as_posix())
def test_every_link_of_the_docs_points_at_a_file_or_heading_of_the_repository(page):
    broken = []
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.is_relative_to(REPO) or not linked.exists():
            broken.append(f"{target}: no such file in the repository")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no such heading in {linked.relative_to(REPO)}")
    assert not broken, broken


@pytest.mark.quick
def test_the_docs_name_no_path_outside_a_clone_of_the_repository():
    """A user's clone has no folder beside it: the tests' inputs are named by their variables."""
    assert [page.name for page in DOCS if re.search(r"\.\./shared|/work/", page.read_text())] == []


@pytest.mark.slow
def test_a_mistake_every_run_would_repeat_is_fixed_as_its_line_says(tmp_path, tiny_config, capsys):
    """"fix it, then run the same command again", followed literally: both fixes a user would make (the data put
    where the sweep said, or `--set` to where it is) work in the sweep's default folder."""
    missing = tmp_path / "images"
    parameters = tiny_settings(tiny_config) | {"dataset": {"value": "imagefolder"}, "data_dir": {"value": str(missing)},
                                               "val_size": {"value": 2}, "train_size": {"value": 0},
                                               "test_size": {"value": 0}, "batch_size": {"value": 2}}
    command = ["sweep", str(write_sweep(tmp_path / "nodata.yaml", parameters)), "--offline"]

    assert main(command) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "the sweep stopped" in line]
    assert error.startswith(f"ERROR: data_dir: {missing}/train is not a folder") and error.endswith(
        "fix it, then run the same command again)")

    elsewhere = image_folder(tmp_path / "elsewhere", per_class=4)  # fix: point the sweep at the data
    assert main([*command, "--set", f"data_dir={elsewhere}"]) == 0

    image_folder(missing, per_class=4)  # or fix: put the data where the sweep looks, and run the same command
    assert main(command) == 0
    runs = sweep_state(tmp_path / folder_of(Path(command[1])))["runs"]
    assert [(run["state"], run["attempts"]) for run in runs] == [("finished", 2)]  # the failed run, retried


# --- the small things -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [None, 2])
def test_random_without_count_says_at_the_start_that_it_runs_until_stopped(tmp_path, tiny_config, capsys, count):
    # A command that cannot start: the sweep gives up after a few failed runs instead of running for ever.
    parameters = tiny_settings(tiny_config) | {"seed": {"distribution": "int_uniform", "min": 0, "max": 1000}}
    path = write_sweep(tmp_path / "endless.yaml", parameters, method="random",
                       command=["no-such-python", "-m", "${program}", "${args}"])

    main(["sweep", str(path), "--offline", *(["--count", str(count)] if count else [])])

    lines = capsys.readouterr().err.splitlines()
    said = [index for index, line in enumerate(lines) if "until it is stopped" in line]
    if count:
        assert said == []
    else:
        assert said == [0] and lines[0] == (f"WARNING: {path}: method random without --count proposes runs until it "
                                            "is stopped (Ctrl-C; the same command resumes it); --count N ends it "
                                            "after N runs")


ANSI_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def on_a_terminal(argv: list[str], ready: str, timeout: float = 120.0) -> str:
    """Run `argv` on a pseudo-terminal (80 x 24), send it SIGINT once its output shows `ready`, and return what it
    wrote, as a terminal got it."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    process = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, env={**os.environ,
                                                                                          "TERM": "xterm"})
    os.close(follower)
    shown = bytearray()

    def read() -> None:  # drained all along, so that the process never blocks on a full terminal
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the process closed the terminal
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while ready.encode() not in shown:
            assert process.poll() is None and time.monotonic() < deadline, shown.decode(errors="replace")[-3000:]
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=timeout)
        reader.join(timeout=10)
    finally:
        process.kill()
        os.close(leader)
    return shown.decode(errors="replace")


def test_a_log_line_during_the_live_table_prints_on_a_line_of_its_own(tmp_path, tiny_config):
    """Ctrl-C under the live table: `INFO: stopped by signal 2` starts a line; it was printed onto the bar's."""
    path = write_sweep(tmp_path / "one.yaml", tiny_settings(tiny_config, epochs=20))

    shown = on_a_terminal([sys.executable, "-m", "cifar_resnet", "sweep", str(path), "--offline"], ready="runs 0/1")

    lines = re.split(r"[\r\n]", ANSI_CONTROL.sub("", shown))
    (stopped,) = [line for line in lines if "stopped by signal 2" in line]
    assert stopped == "INFO: stopped by signal 2", shown[-3000:]


# A run of the trial as measured on the 2-core CPU (one run alone, W&B offline, at a load average of 7.8: 31 s before
# the run's own clock started, 16 s of data, model and test pass, 162 s of epochs, 5 s for W&B's finish), scaled to
# the 75 s a run took in the 3:45 trial (3 rounds of 2 runs): seconds of each part.
BEFORE_CLOCK, SETUP, TRAIN, VALIDATE, END = 11.0, 3.0, 26.0, 2.7, 6.5
TRIAL_EPOCHS, TRIAL_RUNS, TRIAL_WORKERS = 2, 6, 2
WHOLE_RUN = BEFORE_CLOCK + SETUP + TRIAL_EPOCHS * (TRAIN + VALIDATE) + END


def trial_progress(t: float) -> tuple[list[RunProgress], dict[str, float]]:
    """What the sweep sees `t` seconds into the trial: each run's progress, and when each running run started."""
    progress, started = [], {}
    for index in range(TRIAL_RUNS):
        start = (index // TRIAL_WORKERS) * WHOLE_RUN
        if t < start:
            break
        run, into = LocalRun(f"run{index}", {}, "running"), t - start
        clock = into - BEFORE_CLOCK  # the run's own clock, which its record and progress file carry
        if into >= WHOLE_RUN:
            run.state = "finished"
            progress.append(RunProgress(run, TRIAL_EPOCHS, TRIAL_EPOCHS, 0.5, WHOLE_RUN - BEFORE_CLOCK))
            continue
        started[run.run_id] = start
        training = max(0.0, clock - SETUP)
        epoch = min(TRIAL_EPOCHS, int(training // (TRAIN + VALIDATE)))
        fraction = 0.0 if epoch == TRIAL_EPOCHS else min(0.999, (training - epoch * (TRAIN + VALIDATE)) / TRAIN)
        progress.append(RunProgress(run, epoch, TRIAL_EPOCHS, None, clock if clock > 0 else None,
                                    epoch_fraction=fraction if clock > SETUP else 0.0))
    return progress, started


@pytest.mark.quick
def test_the_sweeps_time_left_counts_every_runs_start_and_end_and_the_rounds_of_runs():
    """Polled as the sweep polls (every 0.5 s) through the trial: from the first steps on, the estimate is within
    20% of the truth, and once a run has finished, within a second. (The bar's own estimate, epochs left at the
    rate of training steps, gave 1:58 left at 0:10 of a trial that took 3:45.)"""
    from rich.progress import Progress

    total = TRIAL_RUNS // TRIAL_WORKERS * WHOLE_RUN
    timings: dict[str, RunTiming] = {}
    whole_runs: list[float] = []
    estimates, bars = {}, {}
    clock = [0.0]
    bar = Progress(get_time=lambda: clock[0])  # the bar's own estimate, fed the same epochs
    task = bar.add_task("", total=TRIAL_RUNS * TRIAL_EPOCHS)
    for tick in range(int(total * 2)):
        now = clock[0] = tick / 2
        progress, started = trial_progress(now)
        bar.update(task, completed=sum(item.done_epochs for item in progress))
        bars[now] = bar.tasks[0].time_remaining
        for run_id in set(timings) - set(started):
            whole_runs.append(now - timings.pop(run_id).started_at)
        for item in progress:
            if item.run.run_id in started:
                timings.setdefault(item.run.run_id, RunTiming(started[item.run.run_id])).saw(item.done_epochs, now)
        estimates[now] = sweep_seconds_left(progress, TRIAL_RUNS, TRIAL_WORKERS, timings, whole_runs, now)

    first_steps = BEFORE_CLOCK + SETUP
    assert all(estimate is None for now, estimate in estimates.items() if now < first_steps)  # no guess yet
    for now, estimate in estimates.items():
        if first_steps + 1 < now <= WHOLE_RUN + 1:
            assert estimate == pytest.approx(total - now, rel=0.2), now
        elif now > WHOLE_RUN + 1:
            assert estimate == pytest.approx(total - now, abs=1.0), now
    # The bar's own estimate: far too low while the first runs train (their start and end, and the runs waiting for
    # a worker, are left out).
    assert bars[first_steps + 5] < 0.75 * (total - first_steps - 5)


@pytest.mark.quick
def test_the_live_view_shows_the_sweeps_time_left(capsys):
    run = LocalRun("abc12345", {}, "running")
    with LiveView([]) as view:
        view.refresh([RunProgress(run, 1, 2, 0.42, 3.0)], total_runs=6, seconds_left=225.0)
    assert "remaining 3m 45s" in capsys.readouterr().err


# --- a worker's install -----------------------------------------------------------------------------------------

# `python -c` this, then a command line: the package's CLI in a process where what only the sweep and report extras
# install cannot be imported, as in a worker's install (the Docker image's). The image's build test (slow, CI) runs
# the same commands in the real worker install.
WORKER_ONLY = textwrap.dedent("""
    import importlib.machinery
    import sys

    EXTRAS_ONLY = {"sweeps", "scipy", "sklearn", "matplotlib", "wandb_workspaces"}

    class HideTheExtras:  # an import of one of them fails as if it were not installed
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in EXTRAS_ONLY:
                return importlib.machinery.ModuleSpec(name, self)  # no origin: probes (torch's) pass it by

        def create_module(self, spec):
            raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, HideTheExtras())
    from cifar_resnet.cli import main
    sys.exit(main(sys.argv[1:]))
""")
STAND_IN_WANDB = "#!/bin/sh\nexit 0\n"  # `wandb agent` without a W&B server: joins nothing, ends well


def worker_only(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WORKER_ONLY, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


@pytest.mark.slow
def test_a_workers_install_trains_evaluates_and_runs_agents_and_sweep_and_report_name_their_extra(
        tmp_path, tiny_config):
    trained = worker_only("train", *tiny_args(tiny_config.replace(epochs=1)))
    assert trained.returncode == 0, trained.stderr[-3000:]
    (best,) = Path(tiny_config.output_dir).glob("*/best.pt")
    evaluated = worker_only("evaluate", str(best))
    assert evaluated.returncode == 0 and "test acc" in evaluated.stdout, evaluated.stderr[-3000:]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "wandb").write_text(STAND_IN_WANDB)
    (bin_dir / "wandb").chmod(0o755)
    agents = worker_only("agent", "team/cifar/sw33p", "--stagger", "0", WANDB_API_KEY="k" * 40,
                         CUDA_VISIBLE_DEVICES="", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert agents.returncode == 0, agents.stderr[-3000:]

    sweep_file = write_sweep(tmp_path / "grid.yaml", tiny_settings(tiny_config))
    for command, extra in ((["sweep", str(sweep_file), "--offline"], "sweep"), (["report", str(tmp_path)], "report")):
        refused = worker_only(*command)
        assert refused.returncode == 2 and refused.stdout == "", refused.stderr[-3000:]
        assert refused.stderr.count("\n") == 1 and f"cifar-resnet[{extra}]" in refused.stderr
        assert refused.stderr.startswith(f"ERROR: cifar-resnet {command[0]} needs the [{extra}] extra (")


# --- threads: one place decides -------------------------------------------------------------------------------


@pytest.mark.quick
def test_the_usable_cores_are_the_affinity_capped_by_a_cgroup_quota(tmp_path):
    cores = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")  # no quota
    assert usable_cpu_cores(cpu_max) == cores
    cpu_max.write_text("150000 100000\n")  # 1.5 cores: a container's --cpus=1.5
    assert usable_cpu_cores(cpu_max) == 1
    assert usable_cpu_cores(tmp_path / "absent") == cores


def test_a_lone_train_takes_its_share_of_the_cores_unless_omp_num_threads_says(tiny_config, monkeypatch):
    import torch

    from cifar_resnet.train import main as train_main

    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)  # the process's threads stay as the suite set them
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert train_main(tiny_args(tiny_config.replace(epochs=1))) == 0
    assert chosen == [cpu_threads_per_run(1)] == [usable_cpu_cores()]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # set by a sweep for its runs, or by the user: torch read it itself
    assert threads.set_cpu_threads() == torch.get_num_threads() and chosen == [usable_cpu_cores()]


@pytest.mark.quick
def test_agents_runs_share_the_cores_as_a_sweeps_do(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    given = []

    def start(argv, env):
        given.append(env)
        return subprocess.Popen(["true"])

    launches = [Launch(["wandb", "agent", "e/p/s"], gpu) for gpu in ("0", "0")]
    assert run_staggered_statuses(launches, 0.0, "agent", start) == [0, 0]
    assert [env["OMP_NUM_THREADS"] for env in given] == [str(cpu_threads_per_run(2))] * 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    given.clear()
    run_staggered_statuses(launches[:1], 0.0, "agent", start)
    assert given[0]["OMP_NUM_THREADS"] == "3"
