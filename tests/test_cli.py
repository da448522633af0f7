"""The `cifar-resnet` command (cli.py) over its tools: `evaluate` tests a best.pt, or a last.pt's best weights so
far; a tool's bad arguments are one line; in a worker's install (no extras), train, evaluate and agent work, and
sweep and report name the extra they need."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import tiny_args
from helpers.runs import cli_in_process, one_error_line
from helpers.sweeps import tiny_settings, write_sweep

from cifar_resnet.cli import main as cli_main
from cifar_resnet.records import BEST_CHECKPOINT, RESUME_CHECKPOINT


def test_evaluate_command_tests_a_saved_checkpoint(finished_run, capsys):
    outcome = finished_run
    assert cli_main(["evaluate", str(outcome.folder.best), "--device=cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"test acc {100 * outcome.fit.test.acc:.2f}%" in printed  # in %, as the report shows it
    assert cli_main(["evaluate", "missing.pt"]) == 2
    assert "checkpoint: missing.pt does not exist" in capsys.readouterr().err


def test_evaluate_accepts_a_last_pt_and_tests_its_best_weights_so_far(stopped_run, capsys):
    from_best = cli_in_process(capsys, "evaluate", str(stopped_run / BEST_CHECKPOINT), "--device=cpu")
    from_last = cli_in_process(capsys, "evaluate", str(stopped_run / RESUME_CHECKPOINT), "--device=cpu")
    assert from_best.returncode == 0 and from_last.returncode == 0, from_last.stderr[-3000:]
    assert "Traceback" not in from_last.stderr
    assert "the best weights so far (epoch 1)" in from_last.stderr
    # best.pt holds the same best-so-far weights: the same test result, to the printed digit.
    assert from_last.stdout.split(":", 1)[1] == from_best.stdout.split(":", 1)[1]
    assert "test acc" in from_last.stdout
    # Weights that do not fit the model asked for (a last.pt has no class names to check first): one line.
    line = one_error_line(cli_in_process(capsys, "evaluate", str(stopped_run / RESUME_CHECKPOINT), "--device=cpu",
                                         "--width=16"), 2)
    assert line.startswith(f"ERROR: checkpoint: {stopped_run / RESUME_CHECKPOINT}'s weights do not fit a width=16 ")


@pytest.mark.parametrize(("args", "message"), [
    (["ent/proj/abc", "--stagger=-1"], "ERROR: --stagger: must be >= 0 seconds, got -1"),
    (["ent/proj/abc", "--no-such-option"], "ERROR: agent: unknown argument '--no-such-option' (see cifar-resnet "
                                           "agent --help)"),
])
def test_bad_agent_arguments_are_one_line_and_exit_2(monkeypatch, capsys, args, message):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)  # with credentials: the arguments alone are at fault
    assert cli_main(["agent", *args]) == 2
    assert capsys.readouterr().err.splitlines() == [message]


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
