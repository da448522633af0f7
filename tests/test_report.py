"""`cifar-resnet report`: the results table and plots from a folder of run records, the W&B path through the same
rows (with a stand-in for the W&B public API: there is no W&B server here), and the workspace view (built, not
saved)."""

from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

from cifar_resnet import report, wandb_sweep
from cifar_resnet.cli import main
from cifar_resnet.config import RECIPE_PRESETS, Config
from cifar_resnet.records import RunFolder, RunRecord, RunResult, results_from_folder
from cifar_resnet.runner import run_training
from cifar_resnet.table import markdown_table
from cifar_resnet.wandb_sweep import build_sweep_view

# A 2x2 grid of learning rate x optimizer, whose batch size also varies: a sweep's folder of real run records.
CELLS = [(0.001, "adam", 64), (0.001, "sgd", 64), (0.0005, "adam", 32), (0.0005, "sgd", 32)]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep_folder(tmp_path_factory) -> Path:
    """Four finished runs trained by the real runner (no W&B needed for the records), and one still running."""
    folder = tmp_path_factory.mktemp("sweep")
    base = Config(dataset="synthetic", width=8, epochs=2, eval_batch_size=256, val_size=200, train_size=512,
                  test_size=200, output_dir=str(folder), device="cpu")
    for index, (learning_rate, optimizer, batch_size) in enumerate(CELLS):
        config = base.replace(learning_rate=learning_rate, optimizer=optimizer, batch_size=batch_size)
        run_training(config, RunFolder.of(config.output_dir, f"run{index}"))
    unfinished = base.replace(learning_rate=0.0001)
    RunRecord("running0", unfinished.to_dict(), history=[
        {"epoch": 1, "train/loss": 2.3, "train/acc": 0.1, "val/loss": 2.3, "val/acc": 0.05}]).save(folder / "running0")
    return folder


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG header: the file is a real, non-empty image."""
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    return struct.unpack(">II", data[16:24])


def test_report_writes_the_table_and_plots(sweep_folder, tmp_path, capsys):
    out = tmp_path / "report"

    assert main(["report", str(sweep_folder), "--out", str(out)]) == 0

    stdout = capsys.readouterr().out
    table = (out / "results.md").read_text()
    assert table in stdout
    data, _, header, _, *rows = table.strip().splitlines()
    assert data == "data: synthetic (512 train / 200 val / 200 test images, 10 classes)"
    for column in ("Run", "Learning Rate", "Optimizer", "Batch Size", "Test Accuracy", "Train Accuracy",
                   "Train Loss", "Val Accuracy", "Recipe", "Val Loss", "Epochs to Best", "Run Time"):
        assert f" {column} |" in header
    assert len(rows) == 5
    assert "(best)" in rows[0] and sum("(best)" in row for row in rows) == 1
    assert "running0 (running)" in rows[-1]  # no test accuracy yet, so last
    results = {result.run_id: result for result in results_from_folder(sweep_folder)}
    finished = [results[f"run{index}"] for index in range(len(CELLS))]
    best = max(finished, key=lambda result: result.val_acc)
    assert rows[0].startswith(f"| **{best.run_id}** (best) | {best.config['learning_rate']:g} | "
                              f"{best.config['optimizer']} | {best.config['batch_size']} | tuned |")
    assert f"{100 * best.test_acc:.2f}%" in rows[0] and f"{100 * best.val_acc:.2f}%" in rows[0]
    val_accs = [float(row.split(" | ")[8].rstrip("%")) for row in rows[:-1]]
    assert val_accs == sorted(val_accs, reverse=True)
    for name in ("val_acc.png", "loss.png", "test_acc_heatmap.png", "settings_vs_val_acc.png"):
        width, height = png_size(out / name)
        assert width > 100 and height > 100


def run_records(folder: Path) -> dict[str, RunRecord]:
    return {path.parent.name: RunRecord.load(path.parent) for path in folder.glob("*/record.json")}


def line_data(ax) -> dict[str, tuple[list, list]]:
    """Each plotted line's (x, y), by the run id its label starts with."""
    return {line.get_label().split()[0]: (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_curves_plot_one_line_per_run_with_the_runs_values(sweep_folder):
    records = run_records(sweep_folder)
    results = results_from_folder(sweep_folder)

    (val_ax,) = report.PLOTS["val_acc.png"](results).axes
    train_ax, val_loss_ax = report.PLOTS["loss.png"](results).axes

    # Accuracy is drawn in % (as people read it), losses as they are.
    for ax, metric, scale, label in ((val_ax, "val/acc", 100, "val/acc (%)"), (train_ax, "train/loss", 1, "train/loss"),
                                     (val_loss_ax, "val/loss", 1, "val/loss")):
        assert ax.get_ylabel() == label
        assert line_data(ax) == {run_id: ([entry["epoch"] for entry in record.history],
                                          [pytest.approx(scale * entry[metric]) for entry in record.history])
                                 for run_id, record in records.items()}, metric
    assert len(records) == len(CELLS) + 1 and all(len(record.history) >= 1 for record in records.values())


def test_heat_map_cells_are_the_runs_test_accuracy(sweep_folder):
    import numpy as np

    records = {run_id: record for run_id, record in run_records(sweep_folder).items() if record.status == "finished"}

    figure = report.PLOTS["test_acc_heatmap.png"](results_from_folder(sweep_folder))

    ax = figure.axes[0]
    shown = np.ma.filled(ax.images[0].get_array(), np.nan)
    rates = sorted({record.config["learning_rate"] for record in records.values()})
    optimizers = sorted({record.config["optimizer"] for record in records.values()})
    expected = np.full((len(optimizers), len(rates)), np.nan)
    for record in records.values():
        expected[optimizers.index(record.config["optimizer"]), rates.index(record.config["learning_rate"])] = \
            100 * record.summary["test/acc"]
    np.testing.assert_allclose(shown, expected)  # every cell filled, each with its run's test accuracy in %
    assert [label.get_text() for label in ax.get_yticklabels()] == optimizers
    assert [float(label.get_text()) for label in ax.get_xticklabels()] == rates
    assert sorted(text.get_text() for text in ax.texts) == sorted(
        f"{100 * record.summary['test/acc']:.1f}%" for record in records.values())


def contrast_ratio(first, second) -> float:
    """WCAG 2's contrast ratio of two colours, from 1 (none) to 21 (black on white)."""
    from matplotlib.colors import to_rgb

    def luminance(colour) -> float:
        linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in to_rgb(colour)]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    lighter, darker = sorted((luminance(first), luminance(second)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def test_heat_map_labels_are_readable_on_every_cell(sweep_folder):
    """Each cell's label is black or white, whichever reads better on it: white on viridis' yellow did not."""
    ax = report.PLOTS["test_acc_heatmap.png"](results_from_folder(sweep_folder)).axes[0]
    image = ax.images[0]
    colours = {}
    for text in ax.texts:
        column, row = text.get_position()
        cell = image.cmap(image.norm(image.get_array()[int(row), int(column)]))
        colours[text.get_text()] = (text.get_color(), cell)
        assert contrast_ratio(text.get_color(), cell) >= 4.5, text.get_text()  # WCAG AA for normal text
    assert {colour for colour, _ in colours.values()} == {"black", "white"}  # the best cell is yellow, the worst dark


@pytest.mark.parametrize(("recipe", "train_title", "val_title"), [
    ("tuned", "Training loss (label smoothing 0.1)", "Validation loss (no smoothing)"),
    ("writeup", "Training loss", "Validation loss"),
])
def test_the_loss_plot_says_which_loss_is_label_smoothed(sweep_folder, recipe, train_title, val_title):
    results = results_from_folder(sweep_folder)
    for result in results:
        smoothing = RECIPE_PRESETS[recipe]["label_smoothing"]
        result.config = {**result.config, "recipe": recipe, "label_smoothing": smoothing}

    train_ax, val_ax = report.PLOTS["loss.png"](results).axes

    assert (train_ax.get_title(), val_ax.get_title()) == (train_title, val_title)


def test_settings_plot_places_each_run_at_its_setting_and_val_acc(sweep_folder):
    results = results_from_folder(sweep_folder)

    (ax,) = report.PLOTS["settings_vs_val_acc.png"](results).axes  # batch size is the one other varied setting

    assert ax.get_xlabel() == "batch_size"
    points = sorted(map(tuple, ax.collections[0].get_offsets().tolist()))
    expected = []
    for record in run_records(sweep_folder).values():
        best = max(entry["val/acc"] for entry in record.history)  # the best epoch's val/acc
        expected.append((record.config["batch_size"], 100 * best))  # in %
    assert [x for x, _ in points] == [x for x, _ in sorted(expected)]
    assert [y for _, y in points] == pytest.approx([y for _, y in sorted(expected)])


def test_nothing_to_plot_gives_no_figure():
    untested = RunResult("abc", "running", {"learning_rate": 0.001, "optimizer": "adam"}, [], {}, None)
    assert report.PLOTS["test_acc_heatmap.png"]([untested]) is None
    assert report.PLOTS["settings_vs_val_acc.png"]([untested]) is None


def test_report_defaults_to_a_folder_inside_the_source(sweep_folder, tmp_path):
    assert main(["report", str(sweep_folder)]) == 0
    assert (sweep_folder / "report" / "results.md").exists()


def test_the_table_reports_the_best_epoch_not_the_last():
    history = [{"epoch": 1, "train/loss": 1.0, "train/acc": 0.6, "val/loss": 0.9, "val/acc": 0.7},
               {"epoch": 2, "train/loss": 0.5, "train/acc": 0.8, "val/loss": 1.2, "val/acc": 0.65}]
    result = RunResult("abc", "finished", {"learning_rate": 0.001, "optimizer": "adam", "batch_size": 128},
                       history, {"best_epoch": 1, "test/acc": 0.69}, 75.0)

    row = markdown_table([result]).splitlines()[4]

    assert row == ("| **abc** (best) | 0.001 | adam | 128 | – | 69.00% | 60.00% | 1.0000 | 70.00% | 0.9000 | 1 | "
                   "1m 15s |")


@pytest.mark.parametrize(("source", "extra", "message"), [
    ("no-such-folder", [], "no-such-folder: no such folder"),
    (".", [], "holds no run records"),
    (".", ["--wandb-view"], "--wandb-view: needs a W&B sweep path"),
])
def test_bad_sources_are_one_line(capsys, source, extra, message):
    assert main(["report", source, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.quick
def test_a_wandb_sweep_without_credentials_is_one_line_and_never_reaches_wandb(capsys, monkeypatch):
    import wandb

    monkeypatch.setattr(wandb, "Api", lambda *args, **kwargs: pytest.fail("reached W&B's public API"))

    assert main(["report", "team/cifar/sw33p"]) == 2

    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ERROR: WANDB_API_KEY: not set") and "team/cifar/sw33p" in err


@pytest.mark.quick
def test_a_mistyped_local_path_of_three_parts_is_not_taken_for_a_wandb_sweep(tmp_path, capsys, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)  # even with credentials, W&B is not asked
    monkeypatch.setattr(wandb, "Api", lambda *args, **kwargs: pytest.fail("reached W&B's public API"))
    (tmp_path / "sweeps" / "trial").mkdir(parents=True)

    assert main(["report", "sweeps/trial/x"]) == 2

    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ERROR: sweeps/trial/x: no such folder") and "sweeps/" in err
    assert report.is_wandb_sweep_path("team/cifar/sw33p") and not report.is_wandb_sweep_path("./trial/x")


def fake_wandb_run(result: RunResult) -> SimpleNamespace:
    """What `wandb.Api().sweep(path).runs` yields, for a run: id, state, config, summary, scan_history."""
    summary = {**result.summary, "_runtime": result.seconds}
    return SimpleNamespace(id=result.run_id, state=result.status, config={**result.config, "run_info": result.data},
                           summary=summary,
                           scan_history=lambda keys: [entry for entry in result.history if set(keys) <= set(entry)])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # wandb-workspaces' own pydantic-v1 validators
def test_a_wandb_sweep_gives_the_same_table_and_a_view(sweep_folder, tmp_path, monkeypatch, capsys):
    import wandb

    local = [result for result in results_from_folder(sweep_folder) if result.status == "finished"]
    asked = []

    class StandInApi:  # the W&B server cannot be reached here
        def sweep(self, path):
            asked.append(path)
            return SimpleNamespace(runs=[fake_wandb_run(result) for result in local])

    monkeypatch.setattr(wandb, "Api", StandInApi)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    saved = []
    monkeypatch.setattr(wandb_sweep, "save_sweep_view", lambda view: saved.append(view) or "https://w.example/v")

    assert main(["report", "team/cifar/sw33p", "--out", str(tmp_path / "out"), "--wandb-view"]) == 0

    assert asked == ["team/cifar/sw33p"]
    (view,) = saved
    assert (view.entity, view.project) == ("team", "cifar")
    assert [column.metric.name for column in view.sections[0].panels[0].columns] == [
        "learning_rate", "optimizer", "batch_size", "val/acc", "test/acc"]  # the settings this sweep varies
    assert "saved the W&B view: https://w.example/v" in capsys.readouterr().out
    assert (tmp_path / "out" / "results.md").read_text() == markdown_table(local)
    assert png_size(tmp_path / "out" / "val_acc.png")[0] > 100


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # wandb-workspaces' own pydantic-v1 validators
def test_wandb_view_has_the_sweeps_panels():
    import wandb_workspaces.reports.v2 as wr

    view = build_sweep_view("team", "cifar", "sw33p", ["learning_rate", "optimizer"])

    assert (view.entity, view.project) == ("team", "cifar")
    (section,) = view.sections
    parallel, importance, curves = section.panels
    assert isinstance(parallel, wr.ParallelCoordinatesPlot)
    assert [column.metric.name for column in parallel.columns] == ["learning_rate", "optimizer", "val/acc",
                                                                    "test/acc"]
    assert isinstance(importance, wr.ParameterImportancePlot) and importance.with_respect_to == "val/acc"
    assert isinstance(curves, wr.LinePlot) and curves.x == "epoch" and curves.y == ["val/acc"]
    assert "sw33p" in str(view.runset_settings.filters)
    view._to_model()  # serialises for the server without contacting it
