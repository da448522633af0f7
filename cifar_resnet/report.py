"""`cifar-resnet report`: a sweep's runs as the write-up's results table (Markdown) and PNG plots.

The runs come from a local folder of run records (`<run id>/record.json`: a `cifar-resnet sweep` folder, or the
output_dir of runs that `wandb agent` started), or from a W&B sweep `entity/project/sweep_id` through W&B's public
API. Both give the same rows, so the table and the plots are made the same way.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .credentials import NO_CREDENTIALS, has_credentials
from .errors import UserError, extra_needed, reject_unknown_arguments
from .records import TRAIN_ACC, TRAIN_LOSS, VAL_ACC, VAL_LOSS, RunResult, results_from_folder
from .table import data_line, markdown_table, setting_text, varied_settings

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DEFAULT_SOURCE = "./runs"  # Config's default output_dir: where runs started by `wandb agent` leave their records
REPORT_FOLDER = "report"  # inside a local source folder
TABLE_FILE = "results.md"
W_AND_B_SWEEP_PATH = re.compile(r"^[\w.-]+/[\w.-]+/[\w-]+$")
PLOTTED_TOGETHER = ("learning_rate", "optimizer")  # the heat map's axes
FIGURE_DPI = 120
PERCENT = 100  # accuracies are plotted in %, as people read them; the records and W&B keep fractions
ACCURACY_METRICS = (TRAIN_ACC, VAL_ACC)
CAPTION_FONT_SIZE = "small"
# The relative luminance (WCAG 2) at which black and white text contrast equally with a cell: sqrt(1.05 x 0.05) - 0.05.
EQUAL_CONTRAST_LUMINANCE = 0.179


# --- the plots --------------------------------------------------------------------------------------------------


def _label(result: RunResult, settings: Sequence[str]) -> str:
    return " ".join([result.run_id] + [f"{name}={setting_text(result.config.get(name))}" for name in settings])


def _save(figure: Figure, path: Path, results: Sequence[RunResult]) -> Path:
    """Write the figure as a PNG, captioned with the data its runs used (a synthetic result must say so)."""
    from .files import atomic_path

    figure.text(0.5, 0.005, data_line(results), ha="center", va="bottom", fontsize=CAPTION_FONT_SIZE, wrap=True)

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=FIGURE_DPI)
    return path


def _figure(columns: int = 1) -> tuple[Figure, list[Axes]]:
    # A bare Figure draws with Agg: no pyplot, no global backend, no display needed.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6 * columns, 4.8), layout="constrained")
    figure.get_layout_engine().set(rect=(0, 0.05, 1, 0.95))  # room for the data caption at the bottom
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def plot_curves(results: Sequence[RunResult], metrics: Sequence[tuple[str, str]]) -> Figure:
    """One panel per (metric, title): the metric per epoch, one line per run."""
    from matplotlib.ticker import MaxNLocator

    figure, axes = _figure(len(metrics))
    settings = varied_settings(results)
    for ax, (metric, title) in zip(axes, metrics):
        scale, unit = (PERCENT, " (%)") if metric in ACCURACY_METRICS else (1, "")
        for result in results:
            epochs, values = result.curve(metric)
            ax.plot(epochs, [scale * value for value in values], marker="o", label=_label(result, settings))
        ax.set(title=title, xlabel="epoch", ylabel=f"{metric}{unit}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize="small")
    return figure


def plot_losses(results: Sequence[RunResult]) -> Figure:
    """Training and validation loss per epoch. Training's is the loss the run minimised, label-smoothed where the
    run smooths its labels; validation's never is (smoothing puts a floor under the loss): the titles say so."""
    smoothing = sorted({float(result.config.get("label_smoothing") or 0) for result in results})
    if smoothing == [0.0]:
        return plot_curves(results, [(TRAIN_LOSS, "Training loss"), (VAL_LOSS, "Validation loss")])
    how = (f"label smoothing {setting_text(smoothing[0])}" if len(smoothing) == 1
           else "label-smoothed as each run sets it")
    return plot_curves(results, [(TRAIN_LOSS, f"Training loss ({how})"), (VAL_LOSS, "Validation loss (no smoothing)")])


def label_colour(rgba: Sequence[float]) -> str:
    """Black or white, whichever contrasts more with a background of colour `rgba` (sRGB, 0 to 1): chosen by the
    background's relative luminance, as WCAG 2 defines it."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return "black" if luminance > EQUAL_CONTRAST_LUMINANCE else "white"


def plot_test_acc_heatmap(results: Sequence[RunResult]) -> Figure | None:
    """Test accuracy over learning rate x optimizer (the mean where several runs share a cell)."""
    tested = [result for result in results if result.test_acc is not None]
    if not tested:
        return None
    rates = sorted({result.config["learning_rate"] for result in tested})
    optimizers = sorted({result.config["optimizer"] for result in tested})
    cells: dict[tuple[int, int], list[float]] = {}
    for result in tested:
        key = (optimizers.index(result.config["optimizer"]), rates.index(result.config["learning_rate"]))
        cells.setdefault(key, []).append(result.test_acc)
    grid = [[math.nan] * len(rates) for _ in optimizers]
    for (row, column), values in cells.items():
        grid[row][column] = PERCENT * sum(values) / len(values)
    figure, (ax,) = _figure()
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    for (row, column), values in cells.items():
        count = f"\n(n={len(values)})" if len(values) > 1 else ""
        cell_colour = image.cmap(image.norm(grid[row][column]))
        ax.text(column, row, f"{grid[row][column]:.1f}%{count}", ha="center", va="center",
                color=label_colour(cell_colour))
    ax.set_xticks(range(len(rates)), [setting_text(rate) for rate in rates])
    ax.set_yticks(range(len(optimizers)), optimizers)
    ax.set(title="Test accuracy", xlabel="learning rate", ylabel="optimizer")
    figure.colorbar(image, ax=ax, label="test accuracy (%)")
    return figure


def plot_settings_vs_val_acc(results: Sequence[RunResult]) -> Figure | None:
    """Best validation accuracy against every varied setting the heat map does not show."""
    settings = [name for name in varied_settings(results) if name not in PLOTTED_TOGETHER]
    scored = [result for result in results if result.val_acc is not None]
    if not settings or not scored:
        return None
    figure, axes = _figure(len(settings))
    for ax, name in zip(axes, settings):
        values = [result.config.get(name) for result in scored]
        if all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values):
            positions = values
        else:  # categorical: one position per distinct value
            categories = sorted({str(value) for value in values})
            positions = [categories.index(str(value)) for value in values]
            ax.set_xticks(range(len(categories)), categories)
        ax.scatter(positions, [PERCENT * result.val_acc for result in scored])
        ax.set(xlabel=name, ylabel="best val/acc (%)")
        ax.grid(alpha=0.3)
    figure.suptitle("Validation accuracy against the other varied settings")
    return figure


# Each builds its figure (None: nothing to plot); write_report saves it, so tests can read the figures' data.
PLOTS: dict[str, Callable[[Sequence[RunResult]], Figure | None]] = {
    "val_acc.png": lambda results: plot_curves(results, [(VAL_ACC, "Validation accuracy")]),
    "loss.png": plot_losses,
    "test_acc_heatmap.png": plot_test_acc_heatmap,
    "settings_vs_val_acc.png": plot_settings_vs_val_acc,
}


def write_report(results: Sequence[RunResult], out_dir: Path) -> tuple[str, list[Path]]:
    """Write the table and the plots into `out_dir`; the table and the files written."""
    from .files import atomic_write

    table = markdown_table(results)
    table_path = out_dir / TABLE_FILE
    atomic_write(table_path, lambda f: f.write(table.encode()))
    written = [table_path]
    for name, plot in PLOTS.items():
        figure = plot(results)
        if figure is not None:
            written.append(_save(figure, out_dir / name, results))
    return table, written


# --- the command ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", default=DEFAULT_SOURCE,
                        help="a folder of runs (a sweep's --output-dir, or an output_dir) or a W&B sweep path "
                        f"entity/project/sweep_id (default: {DEFAULT_SOURCE})")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for {TABLE_FILE} and the PNG plots (default: SOURCE/{REPORT_FOLDER} for a "
                        f"folder, ./{REPORT_FOLDER}-<sweep id> for a W&B sweep)")
    parser.add_argument("--wandb-view", action="store_true",
                        help="also save a W&B workspace view of the sweep (a W&B sweep path only)")


def is_wandb_sweep_path(source: str) -> bool:
    """Whether `source` names a W&B sweep, ENTITY/PROJECT/SWEEP_ID, rather than a local folder: a path that exists
    here, or whose first part is a folder here (`sweeps/trial/x`, a mistyped sweep folder), is local."""
    if W_AND_B_SWEEP_PATH.match(source) is None:
        return False
    return not Path(source).exists() and not Path(source.split("/")[0]).is_dir()


def report_command(args: argparse.Namespace, rest: Sequence[str]) -> int:
    reject_unknown_arguments("report", rest)
    with extra_needed("report", "report"):  # before any work: the plots need matplotlib, the view wandb-workspaces
        import matplotlib  # noqa: F401
        if args.wandb_view:
            import wandb_workspaces  # noqa: F401
    folder = Path(args.source)
    online = is_wandb_sweep_path(args.source)
    if args.wandb_view and not online:
        raise UserError("--wandb-view: needs a W&B sweep path entity/project/sweep_id, not a local folder")
    if not online and not folder.is_dir() and W_AND_B_SWEEP_PATH.match(args.source):
        raise UserError(f"{folder}: no such folder (read as a local path, since {args.source.split('/')[0]}/ is a "
                        "folder here; a W&B sweep is ENTITY/PROJECT/SWEEP_ID)")
    if online and not has_credentials():
        raise UserError(f"{NO_CREDENTIALS}; reading the W&B sweep {args.source} needs W&B's server: `wandb login` "
                        "or export WANDB_API_KEY (a local sweep's report needs neither: give its folder)")
    if online:
        from .wandb_sweep import fetch_sweep_results

        results = fetch_sweep_results(args.source)
        if not results:
            raise UserError(f"{args.source}: this sweep has no runs yet")
        out_dir = args.out or Path(f"{REPORT_FOLDER}-{args.source.rsplit('/', 1)[-1]}")
    else:
        results = results_from_folder(folder)
        out_dir = args.out or folder / REPORT_FOLDER
    table, written = write_report(results, out_dir)
    print(table)
    for path in written:
        print(f"wrote {path}")
    if args.wandb_view:
        from .wandb_sweep import build_sweep_view, save_sweep_view

        entity, project, sweep_id = args.source.split("/")
        view = build_sweep_view(entity, project, sweep_id, varied_settings(results))
        print(f"saved the W&B view: {save_sweep_view(view)}")
    return 0
