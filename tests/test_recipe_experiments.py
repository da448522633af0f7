"""benchmarks/recipe_experiments.py, issue 10's experiment script, on tiny runs: candidates over seeds with their
mean and spread, the six-cell comparison against recipe=writeup, and a failed run reported as failed."""

import importlib.util
import json

import pytest

from cifar_resnet.bench import writeup
from cifar_resnet.config import RECIPE_PRESETS

from conftest import REPO

TINY = ["--dataset=synthetic", "--width=8", "--epochs=1", "--train_size=256", "--val_size=64", "--test_size=64",
        "--batch_size=64", "--device=cpu"]


@pytest.fixture
def experiments():
    spec = importlib.util.spec_from_file_location("recipe_experiments", REPO / "benchmarks" / "recipe_experiments.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
def test_an_unknown_candidate_is_one_line_naming_the_choices(experiments, capsys):
    with pytest.raises(SystemExit) as stopped:
        experiments.main(["candidates", "--only=warp drive"])
    assert stopped.value.code == 2
    assert "--only: unknown warp drive; candidates: tuned, zero-init residual" in capsys.readouterr().err


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
