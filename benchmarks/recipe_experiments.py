"""`python -m benchmarks.recipe_experiments`: recipe candidates over seeds, then the six cells, as an offline sweep
on one device (issues 10 and 22).

Two phases, alone or one after the other (`both`). Each phase is one offline sweep (`launch.sweep_runs`), --workers
runs at a time, each run a `benchmarks.run` (no W&B), its best weights tested without TTA, with flip TTA and with
flip plus 1 px shifts TTA (evaluation only, so one training run gives all three numbers and the multi-crop TTA
candidate needs no runs of its own). A run that fails with a user mistake before any run has finished stops its
phase, as it stops a sweep (every other run would fail the same way): the runs not started are reported as failed.

  candidates  the tuned recipe at the sweep's best cell (Adam 0.001), then each candidate alone on top of it, then
              all of them together; SGD's own candidates (its batch-norm factor, Nesterov momentum 0.9) at the best
              SGD cell beside that cell's tuned row; --seeds seeds each. The table gives each row's mean and spread
              (min to max) and its difference from its cell's tuned row.
  grid        the write-up's six cells under the recipe given by the settings on the command line and under
              `recipe=writeup`, --seeds seeds each, beside the write-up's published table.
  both        candidates, then grid with the candidates that won (`choose_winners` says how) on top of tuned.

Any `cifar-resnet train` setting (`--name=value`) applies to every run of the phase (a cell's own optimizer and
learning rate excepted): the candidates are measured on top of it, and it is the recipe the grid tests. On a GPU,
with the JPEG copy unpacked into data/ (six concurrent 10-epoch runs take 72 s on an H200 at b142e91):

    python -m benchmarks.recipe_experiments candidates --workers=6 --seeds=2 --out=candidates.json \\
        --dataset=imagefolder --data_dir=data/cifar10-jpeg
    python -m benchmarks.recipe_experiments grid --workers=6 --seeds=2 --out=grid.json \\
        --dataset=imagefolder --data_dir=data/cifar10-jpeg --norm_lr_scale=8 --label_smoothing=0.2 --ema_decay=0.99
    python -m benchmarks.recipe_experiments both ...   # the two, the grid with the winners

`--small` shrinks every run to CPU size (width 16, 2 epochs, 2,000 synthetic training images): it proves the
script end to end and decides nothing.
"""

from __future__ import annotations

import logging
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cifar_resnet.config import Config
from cifar_resnet.engine.device import select_device
from cifar_resnet.errors import UserError
from cifar_resnet.files import atomic_write_json
from cifar_resnet.records import TEST_ACC
from cifar_resnet.table import markdown
from cifar_resnet.threads import set_cpu_threads

from .cli import run_script, settings_from, settings_parser, start_logging
from .launch import sweep_runs
from .machine import machine_info
from .run import TEST_VIEWS
from .writeup import WRITEUP_TABLE

log = logging.getLogger(__name__)

BEST_CELL = {"optimizer": "adam", "learning_rate": 0.001}
# The best SGD cell of the tuned grid (83.15% with flip TTA on an H200 at b142e91): SGD's own candidates run there.
SGD_CELL = {"optimizer": "sgd", "learning_rate": 0.001}
CELL_KEYS = tuple(BEST_CELL)
# What only SGD reads: a candidate at the SGD cell sets nothing else, so its win cannot change the Adam cells.
SGD_ONLY_SETTINGS = ("momentum", "nesterov", "sgd_norm_lr_scale")
REFERENCE, SGD_REFERENCE, ALL_TOGETHER = "tuned", "sgd 0.001: tuned", "all together"
# (label, settings on top of the tuned recipe). Values follow the sources the issue names: airbench94 and
# hlb-CIFAR10 (EMA, whitening, alternating flips, label smoothing 0.2) and Page's ResNet series (schedule shape).
CANDIDATES: list[tuple[str, dict[str, Any]]] = [
    (REFERENCE, {}),
    ("zero-init residual", {"zero_init_residual": True}),
    ("whitened stem", {"whiten_stem": True}),
    ("EMA 0.99 per step", {"ema_decay": 0.99}),
    # The average's ramp, min(decay, (1 + n) / (10 + n)), reaches 0.99 after 891 steps and 0.997 at the end of a
    # 10-epoch run (3,510 steps): a higher decay would never take effect, so the second value is a shorter window.
    ("EMA 0.95 per step", {"ema_decay": 0.95}),
    ("label smoothing 0.2", {"label_smoothing": 0.2}),
    ("warm-up 2 epochs", {"warmup_epochs": 2.0, "warmup_fraction": 0.2}),
    ("warm-up 0.3 epochs", {"warmup_epochs": 0.3}),
    ("cosine decay", {"lr_schedule": "cosine"}),
    ("norm lr x4", {"norm_lr_scale": 4.0}),
    ("alternating flip", {"alternating_flip": True}),
    ("Adam beta2 0.99", {"adam_beta2": 0.99}),
    ("Adam eps 1e-6", {"adam_eps": 1e-6}),
    (ALL_TOGETHER, {"zero_init_residual": True, "whiten_stem": True, "ema_decay": 0.99, "label_smoothing": 0.2,
                    "alternating_flip": True}),
    # Issue 22's, meant on top of the best measured at b142e91 (--norm_lr_scale=8 --label_smoothing=0.2
    # --ema_decay=0.99 on the command line): the batch-norm factor had not stopped growing at 8.
    ("norm lr x16", {"norm_lr_scale": 16.0}),
    ("norm lr x32", {"norm_lr_scale": 32.0}),
    ("label smoothing 0.3", {"label_smoothing": 0.3}),
    ("lookahead k5 alpha 0.5", {"lookahead_steps": 5, "lookahead_alpha": 0.5}),  # Zhang et al. 2019's defaults
    # The onecycle peak at 25% and 30% of the run (warm-up 2 epochs above: 20%).
    ("warm-up 2.5 epochs", {"warmup_epochs": 2.5, "warmup_fraction": 0.25}),
    ("warm-up 3 epochs", {"warmup_epochs": 3.0, "warmup_fraction": 0.3}),
    (SGD_REFERENCE, SGD_CELL),
    ("sgd 0.001: norm lr x1", {**SGD_CELL, "sgd_norm_lr_scale": 1.0}),
    ("sgd 0.001: norm lr x32", {**SGD_CELL, "sgd_norm_lr_scale": 32.0}),
    ("sgd 0.001: Nesterov momentum 0.9", {**SGD_CELL, "momentum": 0.9, "nesterov": True}),
]
SMALL = {"dataset": "synthetic", "width": 16, "epochs": 2, "train_size": 2000, "val_size": 500, "test_size": 1000,
         "device": "cpu"}
ACC_KEYS = tuple(TEST_VIEWS)  # test_acc, test_acc_tta, test_acc_tta_shift1


def cell_of(settings: dict[str, Any]) -> tuple[Any, ...]:
    """The cell (optimizer, learning rate) a candidate runs at: the best cell unless its settings name another."""
    return tuple({**BEST_CELL, **settings}[key] for key in CELL_KEYS)


def beyond_cell(settings: dict[str, Any]) -> dict[str, Any]:
    """What a candidate changes on top of its cell's tuned row."""
    return {name: value for name, value in settings.items() if name not in CELL_KEYS}


def references(rows: Sequence[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Each cell's reference summary: its row that changes nothing beyond the cell ("tuned" at the best cell)."""
    return {cell_of(row["settings"]): row["summary"] for row in rows if not beyond_cell(row["settings"])}


def for_run_length(settings: dict[str, Any], epochs: int) -> dict[str, Any]:
    """A candidate's settings for runs of `epochs`: a warm-up declared longer than the run (the small CPU runs) is
    cut to the run, and its warmup_fraction keeps the schedule's peak where the candidate puts it."""
    if settings.get("warmup_epochs", 0) > epochs:
        return {**settings, "warmup_epochs": float(epochs)}
    return settings


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def failures(runs: Sequence[dict[str, Any]]) -> int:
    return sum(run.get("status") == "failed" for run in runs)


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean, min and max over seeds of each test accuracy and of the run time; failed runs counted apart."""
    done = [run for run in runs if run.get("status") != "failed"]
    summary: dict[str, Any] = {"seeds": len(done), "failed": failures(runs)}
    for key in (*ACC_KEYS, "process_s"):
        values = [run[key] for run in done]
        summary[key] = ({"mean": statistics.fmean(values), "min": min(values), "max": max(values)} if values
                        else None)
    return summary


def percent(stat: dict[str, float] | None, spread: bool = False) -> str:
    if stat is None:
        return "failed"
    text = f"{stat['mean']:.2%}"
    return f"{text} ({stat['min']:.2%}–{stat['max']:.2%})" if spread else text


def points(stat: dict[str, float] | None, reference: dict[str, float] | None) -> str:
    if stat is None or reference is None:
        return "–"
    return f"{100 * (stat['mean'] - reference['mean']):+.2f}"


def run_candidates(base: Config, seeds: int, workers: int, folder: Path, only: set[str]) -> dict[str, Any]:
    chosen = [(label, for_run_length(settings, base.epochs)) for label, settings in CANDIDATES
              if not only or label in only]
    jobs = [(f"{slug(label)}-s{seed}", base.replace(**{**BEST_CELL, **settings}, seed=seed))
            for label, settings in chosen for seed in range(base.seed, base.seed + seeds)]
    log.info("%d candidates x %d seeds, %d runs at a time", len(chosen), seeds, workers)
    results, wall_s = sweep_runs(jobs, workers, folder / "candidates", "recipe-candidates")
    rows = []
    for index, (label, settings) in enumerate(chosen):
        runs = results[index * seeds : (index + 1) * seeds]
        rows.append({"label": label, "settings": settings, "summary": summarise(runs), "runs": runs})
    return {"phase": "candidates", "wall_s": wall_s, "failed": failures(results), "rows": rows}


def candidates_markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    cells = references(rows)
    lines = []
    for row in rows:
        s, reference = row["summary"], cells.get(cell_of(row["settings"]))
        failed = f" ({s['failed']} failed)" if s["failed"] else ""
        lines.append([row["label"], f"{s['seeds']}{failed}", percent(s["test_acc"], True),
                      percent(s["test_acc_tta"], True), percent(s["test_acc_tta_shift1"]),
                      points(s["test_acc_tta"], reference and reference["test_acc_tta"]),
                      f"{s['process_s']['mean']:.0f}" if s["process_s"] else "–"])
    return markdown(["candidate (on tuned, adam 0.001 unless named)", "seeds", "test (min–max)",
                     "flip TTA (min–max)", "flip + 1 px shifts TTA", "vs its cell's tuned row, points (flip TTA)",
                     "run s"], lines)


def half_range(stat: dict[str, float]) -> float:
    return (stat["max"] - stat["min"]) / 2


def choose_winners(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The settings the candidates phase says to keep, for the grid phase of `both`.

    A candidate wins when its mean flip-TTA test accuracy beats its cell's tuned row's by more than the larger of
    the two rows' spreads (half their min-max range over seeds; with one seed any gain wins). Of winners that set
    the same setting (two EMA decays, two warm-ups), the best is kept. The multi-crop TTA is kept when, over the
    tuned row's own runs (the same weights), flip + 1 px shifts beats flip alone on average. "all together" is a
    check of the combination, never a source. The SGD cell's candidates set only what SGD alone reads, so what
    they win changes the grid's SGD cells and nothing else.
    """
    cells = references(rows)
    winners = []
    for row in rows:
        stat, settings = row["summary"]["test_acc_tta"], beyond_cell(row["settings"])
        reference = cells.get(cell_of(row["settings"]))
        base = reference and reference["test_acc_tta"]  # None when the cell's tuned row did not run, or failed
        if row["label"] == ALL_TOGETHER or not settings or stat is None or base is None:
            continue
        margin = stat["mean"] - base["mean"]
        if margin > max(half_range(stat), half_range(base)):
            winners.append((margin, settings))
    chosen: dict[str, Any] = {}
    for _, settings in sorted(winners, key=lambda winner: winner[0], reverse=True):
        if not settings.keys() & chosen.keys():
            chosen.update(settings)
    tuned = cells.get(cell_of({}))
    if tuned is not None and tuned["test_acc_tta"] is not None and (
            tuned["test_acc_tta_shift1"]["mean"] > tuned["test_acc_tta"]["mean"]):
        chosen["tta_translate_px"] = 1
    return chosen


def run_six_cells(base: Config, seeds: int, workers: int, folder: Path) -> dict[str, Any]:
    recipes = {"new": base, "writeup": base.replace(recipe="writeup")}  # the writeup keeps non-recipe settings
    jobs = [(f"{name}-{cell['optimizer']}-lr{cell['learning_rate']}-s{seed}",
             config.replace(optimizer=cell["optimizer"], learning_rate=cell["learning_rate"], seed=seed))
            for name, config in recipes.items() for cell in WRITEUP_TABLE
            for seed in range(base.seed, base.seed + seeds)]
    log.info("six cells x 2 recipes x %d seeds, %d runs at a time", seeds, workers)
    results, wall_s = sweep_runs(jobs, workers, folder / "grid", "recipe-grid")
    per_recipe = len(WRITEUP_TABLE) * seeds
    cells = []
    for index, cell in enumerate(WRITEUP_TABLE):
        new, writeup = (results[offset + index * seeds : offset + (index + 1) * seeds]
                        for offset in (0, per_recipe))
        cells.append({"writeup_published": cell, "new": summarise(new), "writeup": summarise(writeup),
                      "runs": {"new": new, "writeup": writeup}})
    return {"phase": "grid", "wall_s": wall_s, "failed": failures(results), "new_recipe": base.to_dict(),
            "cells": cells}


def six_cells_markdown(result: dict[str, Any]) -> str:
    return markdown(
        ["cell", "write-up, published (PNG data)", "`recipe=writeup`", "new", "new, flip TTA",
         "new, flip + 1 px shifts TTA", "new (flip TTA) vs `recipe=writeup`, points"],
        [[f"{cell['writeup_published']['optimizer']} {cell['writeup_published']['learning_rate']}",
          f"{cell['writeup_published'][TEST_ACC]:.2%}", percent(cell["writeup"]["test_acc"], True),
          percent(cell["new"]["test_acc"], True), percent(cell["new"]["test_acc_tta"], True),
          percent(cell["new"]["test_acc_tta_shift1"]), points(cell["new"]["test_acc_tta"], cell["writeup"]["test_acc"])]
         for cell in result["cells"]])


def main(argv: Sequence[str]) -> int:
    parser = settings_parser("python -m benchmarks.recipe_experiments",
                             "{candidates,grid,both} [--seeds=N] [--workers=N] [--out=FILE] [--only=LABELS] [--small]",
                             __doc__.split("\n\n")[0])
    parser.epilog = "The run settings above apply to every run of the phase."
    parser.add_argument("phase", choices=("candidates", "grid", "both"),
                        help="both: candidates, then the grid with the winners (see choose_winners)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per row, from the base seed up (default 2)")
    parser.add_argument("--workers", type=int, default=1, help="runs at a time on the device (default 1)")
    parser.add_argument("--out", default="recipe_experiments.json",
                        help="JSON file of every run and the tables, rewritten after each phase")
    parser.add_argument("--runs_dir", default="", help="run folders and logs (default: next to --out)")
    parser.add_argument("--only", default="", help="candidates: comma-separated labels (default: all)")
    parser.add_argument("--small", action="store_true", help="CPU-sized runs: proves the script, decides nothing")
    args = parser.parse_args(list(argv))
    if args.seeds < 1 or args.workers < 1:
        raise UserError(f"--seeds and --workers: must be >= 1, got {args.seeds} and {args.workers}")
    only = {label.strip() for label in args.only.split(",") if label.strip()}
    unknown = only - {label for label, _ in CANDIDATES}
    if unknown:
        raise UserError(f"--only: unknown {', '.join(sorted(unknown))}; "
                        f"candidates: {', '.join(label for label, _ in CANDIDATES)}")
    set_cpu_threads()
    out = Path(args.out)
    folder = Path(args.runs_dir) if args.runs_dir else out.parent / f"{out.stem}-runs"
    base = settings_from(args, base=Config(output_dir=str(folder), **(SMALL if args.small else {})))
    report: dict[str, Any] = {"machine": machine_info(select_device(base.device)), "base": base.to_dict(),
                              "seeds": args.seeds, "workers": args.workers, "small": args.small}

    def finish(phase: str, result: dict[str, Any], table: str) -> None:
        report[phase] = {**result, "table": table}
        atomic_write_json(out, report)  # after each phase: a later phase that is cut short loses only itself
        print(f"{table}\n\n{phase}: {result['wall_s']:.0f} s wall; written: {out}\n", flush=True)

    grid_base = base
    if args.phase in ("candidates", "both"):
        result = run_candidates(base, args.seeds, args.workers, folder, only)
        finish("candidates", result, candidates_markdown(result))
    if args.phase == "both":
        report["winners"] = choose_winners(report["candidates"]["rows"])
        log.info("the grid's recipe: tuned with %s", report["winners"] or "no change")
        grid_base = base.replace(**report["winners"])
    if args.phase in ("grid", "both"):
        result = run_six_cells(grid_base, args.seeds, args.workers, folder)
        finish("grid", result, six_cells_markdown(result))
    return 1 if any(report[phase]["failed"] for phase in ("candidates", "grid") if phase in report) else 0


if __name__ == "__main__":
    start_logging()
    sys.exit(run_script(main))
