"""benchmarks/recipe_experiments.py, the experiment script of issues 10 and 22, on tiny runs through an offline
sweep: candidates over seeds with their mean and spread, SGD's own candidates against SGD's tuned row, the six-cell
comparison against recipe=writeup, and a failed run reported as failed."""

import json
import logging

import pytest

from benchmarks import recipe_experiments, writeup
from benchmarks.cli import run_script
from cifar_resnet.config import RECIPE_PRESETS, Config

TINY = ["--dataset=synthetic", "--width=8", "--epochs=1", "--train_size=256", "--val_size=64", "--test_size=64",
        "--batch_size=64", "--device=cpu"]


@pytest.fixture
def experiments(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runs' processes: tiny runs gain nothing from a second thread
    return recipe_experiments


@pytest.mark.slow
def test_candidates_are_run_over_seeds_and_summarised(experiments, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiments, "CANDIDATES", [
        ("tuned", {}),
        ("alternating flip", {"alternating_flip": True}),
        ("batch beyond the data", {"batch_size": 512}),  # fails in its process: 256 training images
    ])
    out = tmp_path / "candidates.json"
    assert experiments.main(["candidates", "--seeds=2", "--workers=2", f"--out={out}", *TINY]) == 1
    result = json.loads(out.read_text())["candidates"]
    tuned, flipped, broken = result["rows"]
    assert [run["config"]["seed"] for run in tuned["runs"]] == [0, 1]
    assert [run["config"]["alternating_flip"] for run in flipped["runs"]] == [True, True]
    assert all(run["config"]["optimizer"] == "adam" and run["config"]["learning_rate"] == 0.001
               for run in tuned["runs"] + flipped["runs"])
    for row in (tuned, flipped):
        summary, accuracies = row["summary"], [run["test_acc_tta"] for run in row["runs"]]
        assert summary["seeds"] == 2 and summary["failed"] == 0
        assert summary["test_acc_tta"] == {"mean": pytest.approx(sum(accuracies) / 2), "min": min(accuracies),
                                           "max": max(accuracies)}
        assert all(0 <= run["test_acc_tta_shift1"] <= 1 for run in row["runs"])
    assert broken["summary"]["seeds"] == 0 and broken["summary"]["failed"] == 2 and result["failed"] == 2
    table = capsys.readouterr().out
    assert "| tuned | 2 |" in table and "| +0.00 |" in table
    assert "| batch beyond the data | 0 (2 failed) | failed |" in table


@pytest.mark.slow
def test_both_runs_the_grid_with_the_winners_against_recipe_writeup(experiments, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiments, "CANDIDATES", [("tuned", {}), ("alternating flip", {"alternating_flip": True})])
    monkeypatch.setattr(experiments, "WRITEUP_TABLE", writeup.WRITEUP_TABLE[1:2])  # sgd 0.001: one cell
    out = tmp_path / "both.json"
    assert experiments.main(["both", "--seeds=1", "--workers=2", f"--out={out}", "--ema_decay=0.9", *TINY]) == 0
    result = json.loads(out.read_text())
    assert result["winners"] == experiments.choose_winners(result["candidates"]["rows"])
    (cell,) = result["grid"]["cells"]
    (new,), (old,) = cell["runs"]["new"], cell["runs"]["writeup"]
    assert new["config"]["ema_decay"] == 0.9 and new["config"]["optimizer"] == "sgd"
    assert {name: new["config"][name] for name in result["winners"]} == result["winners"]
    # recipe=writeup takes every recipe setting from its preset, the candidate included, and keeps the rest
    assert {name: old["config"][name] for name in RECIPE_PRESETS["writeup"]} == RECIPE_PRESETS["writeup"]
    assert old["config"]["width"] == 8 and old["config"]["optimizer"] == "sgd"
    assert "| sgd 0.001 | 76.61% |" in capsys.readouterr().out


@pytest.mark.quick
def test_an_unknown_candidate_is_one_line_naming_the_choices(experiments, caplog):
    with caplog.at_level(logging.ERROR, logger="benchmarks"):
        assert run_script(experiments.main, ["candidates", "--only=warp drive"]) == 2
    (line,) = caplog.messages
    assert line.startswith("--only: unknown warp drive; candidates: tuned, zero-init residual")


def row(label: str, settings: dict, flip: list[float], shifted: list[float] | None = None) -> dict:
    """A candidates row as the script summarises it, from each seed's flip-TTA (and shifted-TTA) accuracy."""
    def stat(values):
        return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return {"label": label, "settings": settings,
            "summary": {"test_acc_tta": stat(flip), "test_acc_tta_shift1": stat(shifted or flip)}}


@pytest.mark.quick
def test_winners_beat_the_tuned_row_by_more_than_the_spread_and_the_best_of_alternatives_is_kept(experiments):
    rows = [
        row("tuned", {}, [0.860, 0.864], shifted=[0.866, 0.868]),  # shifted TTA better on the same weights
        row("zero-init residual", {"zero_init_residual": True}, [0.870, 0.872]),  # +0.9 points, spread 0.1: wins
        row("whitened stem", {"whiten_stem": True}, [0.850, 0.884]),  # +0.5, but spread 1.7: noise
        row("EMA 0.99 per step", {"ema_decay": 0.99}, [0.868, 0.870]),  # wins
        row("EMA 0.95 per step", {"ema_decay": 0.95}, [0.872, 0.874]),  # wins by more: this decay is kept
        row("label smoothing 0.2", {"label_smoothing": 0.2}, [0.855, 0.857]),  # loses
        row("all together", {"zero_init_residual": True, "label_smoothing": 0.2}, [0.9, 0.9]),  # never a source
    ]
    assert experiments.choose_winners(rows) == {"ema_decay": 0.95, "zero_init_residual": True,
                                                 "tta_translate_px": 1}
    assert experiments.choose_winners(rows[:1] + rows[5:6]) == {"tta_translate_px": 1}


@pytest.mark.quick
@pytest.mark.parametrize("epochs", [10, 2, 1])  # the real run, the script's --small, gpu_check.sh's SMALL=1
def test_every_candidate_is_a_valid_run_at_its_cell_and_sgds_set_only_what_sgd_reads(experiments, epochs):
    labels = [label for label, _ in experiments.CANDIDATES]
    assert len(set(labels)) == len(labels)
    cells = {experiments.cell_of(settings) for _, settings in experiments.CANDIDATES
             if not experiments.beyond_cell(settings)}
    for label, settings in experiments.CANDIDATES:
        fitted = experiments.for_run_length(settings, epochs)
        config = Config(epochs=epochs).replace(**{**experiments.BEST_CELL, **fitted})  # raises if not valid
        assert experiments.cell_of(settings) in cells, f"{label}: no tuned row at its cell"
        assert (config.optimizer, config.learning_rate) == experiments.cell_of(settings)
        assert fitted.get("warmup_fraction") == settings.get("warmup_fraction")  # the peak stays where it was put
        if experiments.cell_of(settings) != experiments.cell_of({}):
            assert experiments.beyond_cell(settings).keys() <= set(experiments.SGD_ONLY_SETTINGS), label


@pytest.mark.quick
def test_sgd_candidates_win_against_sgds_tuned_row_and_change_only_sgd_settings(experiments):
    sgd = experiments.SGD_CELL
    rows = [
        row("tuned", {}, [0.870, 0.872]),
        row("norm lr x16", {"norm_lr_scale": 16.0}, [0.880, 0.882]),  # wins
        row("sgd 0.001: tuned", sgd, [0.830, 0.832]),
        row("sgd 0.001: norm lr x32", {**sgd, "sgd_norm_lr_scale": 32.0}, [0.845, 0.847]),  # below adam's tuned row,
        # above sgd's: wins
        row("sgd 0.001: Nesterov momentum 0.9", {**sgd, "momentum": 0.9}, [0.800, 0.802]),  # loses
    ]
    assert experiments.choose_winners(rows) == {"norm_lr_scale": 16.0, "sgd_norm_lr_scale": 32.0}
    assert experiments.choose_winners(rows[2:4]) == {"sgd_norm_lr_scale": 32.0}  # without Adam's rows
    table = experiments.candidates_markdown({"rows": [{**r, "summary": {**r["summary"], "seeds": 2, "failed": 0,
                                                                     "test_acc": r["summary"]["test_acc_tta"],
                                                                     "process_s": None}} for r in rows]})
    (line,) = [line for line in table.splitlines() if line.startswith("| sgd 0.001: norm lr x32 | 2 |")]
    assert line.endswith("| +1.50 | – |")  # against sgd's tuned row


@pytest.mark.slow
def test_sgd_candidates_run_at_the_sgd_cell_and_a_long_warm_up_fits_a_short_run(experiments, tmp_path,
                                                                                  monkeypatch, capsys):
    sgd = experiments.SGD_CELL
    monkeypatch.setattr(experiments, "CANDIDATES", [
        ("tuned", {}),
        ("warm-up 3 epochs", {"warmup_epochs": 3.0, "warmup_fraction": 0.3}),  # the runs have 1 epoch
        ("sgd 0.001: tuned", sgd),
        ("sgd 0.001: norm lr x32", {**sgd, "sgd_norm_lr_scale": 32.0}),
    ])
    out = tmp_path / "candidates.json"
    assert experiments.main(["candidates", "--seeds=1", "--workers=2", f"--out={out}", "--norm_lr_scale=4",
                             *TINY]) == 0
    tuned, warm, sgd_tuned, sgd_x32 = (row["runs"][0]["config"] for row in json.loads(out.read_text())
                                       ["candidates"]["rows"])
    assert (warm["warmup_epochs"], warm["warmup_fraction"], warm["epochs"]) == (1.0, 0.3, 1)
    assert [(c["optimizer"], c["learning_rate"]) for c in (tuned, warm, sgd_tuned, sgd_x32)] == [
        ("adam", 0.001), ("adam", 0.001), ("sgd", 0.001), ("sgd", 0.001)]
    assert all(c["norm_lr_scale"] == 4.0 for c in (tuned, sgd_tuned, sgd_x32))  # the command line's, everywhere
    assert (sgd_tuned["sgd_norm_lr_scale"], sgd_x32["sgd_norm_lr_scale"]) == (0.0, 32.0)
    assert "| sgd 0.001: norm lr x32 | 1 |" in capsys.readouterr().out
