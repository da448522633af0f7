"""What the README claims of `cifar-resnet sweep --offline`, asserted through its public behaviour (the command,
`sweep.json` and the run records), with real runs:

- bayes learns from the runs: the finished runs' records change the engine's next proposal;
- a re-run starts no finished run: each record's `started_at` is unchanged;
- `early_terminate` (hyperband) stops a real run that falls behind, and the sweep marks it stopped.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.sweeps import sweep_state, tiny_settings, write_sweep

from cifar_resnet.cli import main
from cifar_resnet.records import RECORD_FILE, RunRecord

SIGTERM_EXIT = 128 + 15
# W&B's engine draws the first bayes proposals at random (numpy's global RNG). Two rates close together let its
# Gaussian process fit nothing (it then samples at random, history or not); this seed draws two far apart.
FIRST_PROPOSALS_SEED = 5


def sweep_runs(out_dir: Path) -> list[dict[str, Any]]:
    return sweep_state(out_dir)["runs"]


def sweep(path: Path, out_dir: Path, *args: str) -> int:
    return main(["sweep", str(path), "--offline", "--output-dir", str(out_dir), *args])


@pytest.mark.slow
def test_bayes_proposes_from_the_runs_records_and_a_rerun_starts_no_finished_run(tmp_path, tiny_config):
    parameters = tiny_settings(tiny_config) | {
        "learning_rate": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-1}}
    path = write_sweep(tmp_path / "bayes.yaml", parameters, method="bayes")
    learned = tmp_path / "learned"
    np.random.seed(FIRST_PROPOSALS_SEED)
    assert sweep(path, learned, "--workers", "2", "--count", "2") == 0
    first = {run["run_id"]: RunRecord.load(learned / run["run_id"]) for run in sweep_runs(learned)}
    assert len(first) == 2 and all(record.status == "finished" for record in first.values())
    # A seeded history: tiny runs can score alike, and a flat history teaches a Gaussian process nothing (W&B's
    # engine then samples at random). The smaller rate scores far better.
    for accuracy, run_id in zip((0.6, 0.1), sorted(first, key=lambda run_id: first[run_id].config["learning_rate"])):
        first[run_id].history = [{**entry, "val/acc": accuracy} for entry in first[run_id].history]
        first[run_id].save(learned / run_id)
        first[run_id] = RunRecord.load(learned / run_id)
    # The same sweep, its runs' records gone: the engine sees the runs, but none of their results.
    blind = tmp_path / "blind"
    shutil.copytree(learned, blind)
    for run_id in first:
        (blind / run_id / RECORD_FILE).unlink()

    proposals = {}
    for out_dir in (learned, blind):
        np.random.seed(1)  # the engine's random draws, the same for both
        assert sweep(out_dir.parent / "bayes.yaml", out_dir, "--count", "3") == 0
        runs = sweep_runs(out_dir)
        assert len(runs) == 3 and runs[2]["state"] == "finished"
        proposals[out_dir.name] = runs[2]["params"]["learning_rate"]

    assert proposals["learned"] != proposals["blind"]  # the results changed the proposal
    # ... towards the run that scored better (on the log scale the rate is searched on).
    best_rate = min(record.config["learning_rate"] for record in first.values())
    assert abs(math.log(proposals["learned"] / best_rate)) < abs(math.log(proposals["blind"] / best_rate))
    # The re-run started none of the finished runs again: their records are as they were.
    for run_id, record in first.items():
        again = RunRecord.load(learned / run_id)
        assert again.started_at == record.started_at and again == record


@pytest.mark.slow
def test_early_terminate_stops_a_run_that_falls_behind_and_marks_it_stopped(tmp_path, tiny_config):
    # Two runs at once: Adam at a good rate, and at a rate far too small to learn anything. Hyperband with
    # min_iter 2 and eta 3 judges them at epochs 2, 6, 18...: at epoch 2 the hopeless run (still at chance) is below
    # the top third, while the good one has learned well clear of chance (at epoch 1 the two can still tie near
    # chance on the synthetic set); the good one ends at epoch 5, before the next band.
    epochs = 5
    parameters = tiny_settings(tiny_config.replace(train_size=2000), epochs=epochs) | {
        "optimizer": {"value": "adam"}, "learning_rate": {"values": [0.002, 1e-9]}}
    path = write_sweep(tmp_path / "hyperband.yaml", parameters, method="grid",
                       early_terminate={"type": "hyperband", "min_iter": 2, "eta": 3})
    out_dir = tmp_path / "out"

    assert sweep(path, out_dir, "--workers", "2") == 0  # a stopped run is not a failure

    runs = {run["params"]["learning_rate"]: run for run in sweep_runs(out_dir)}
    good, hopeless = runs[0.002], runs[1e-9]
    assert good["state"] == "finished"
    assert [entry["epoch"] for entry in RunRecord.load(out_dir / good["run_id"]).history] == list(range(1, epochs + 1))
    # Stopped by SIGTERM from the sweep's loop: the run saved its state and exited with 128 + 15.
    assert hopeless["state"] == "stopped" and hopeless["exit_code"] == SIGTERM_EXIT
    stopped = RunRecord.load(out_dir / hopeless["run_id"])
    assert 2 <= len(stopped.history) < epochs and stopped.status == "preempted"
    assert max(entry["val/acc"] for entry in stopped.history) < max(
        entry["val/acc"] for entry in RunRecord.load(out_dir / good["run_id"]).history)
