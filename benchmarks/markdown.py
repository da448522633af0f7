"""Markdown tables for BENCHMARKS.md from the JSON that `cifar-resnet bench`, `bench grid` and `bench run` write
(a run's metrics under the names of its record, `cifar_resnet.records`).

    python benchmarks/markdown.py gpu-check/bench.json gpu-check/full10.json gpu-check/grid*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cifar_resnet.records import BEST_EPOCH, RUN_SECONDS, TEST_ACC, TRAIN_ACC, TRAIN_LOSS, VAL_ACC, VAL_LOSS

# Bench's own names for a run's figures in the JSON stored before 2026-11-30 (benchmarks/results/): read as the
# record's names, which bench has written since.
STORED_NAMES = {"train_acc": TRAIN_ACC, "train_loss": TRAIN_LOSS, "val_acc": VAL_ACC, "val_loss": VAL_LOSS,
                "run_s": RUN_SECONDS}
STORED_WRITEUP_NAMES = {**STORED_NAMES, "test_acc": TEST_ACC}  # the write-up's table (bench keeps `test_acc` its own)


def record_names(figures: dict[str, Any], names: dict[str, str] = STORED_NAMES) -> dict[str, Any]:
    return {names.get(name, name): value for name, value in figures.items()}


def provenance(machine: dict[str, Any]) -> str:
    load = ", ".join(f"{x:.1f}" for x in machine["load_average"])
    return (f"{machine['device_name']} ({machine['device']}; {machine['cpu_cores']} CPU cores: "
            f"{machine['cpu_model']}; load average {load} at the start), torch {machine['torch']}, {machine['date']}, "
            f"commit {machine['commit']}")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def bench_markdown(result: dict[str, Any]) -> str:
    config, peak = result["config"], result["peak"]
    parts = [f"Machine: {provenance(result['machine'])}. Model width {config['width']}, batch {config['batch_size']}, "
             f"{result['images']['train']} training images ({config['dataset']}). Peak: {peak['dtype']} matmul "
             f"{peak['size']}^3 at {peak['tflops']:.3f} TFLOP/s, measured in the same run."]
    if not result.get("complete", True):  # a benchmark cut short: the sections it finished
        parts.append("(cut short: the sections below are those it finished)")
    if "training" in result:  # the write-up's pipeline, its last section
        pipeline = result["data_pipeline_batches_per_s"]
        rows = [[name, f"{pipeline[name]:.1f}", f"{t['images_per_s']:.0f}", f"{t['epoch_s']:.2f}",
                 f"{t['tflops']:.3f}", f"{t['fraction_of_peak']:.1%}", f"{t['peak_memory_mb']:.0f}"]
                for name, t in result["training"].items()]
        parts.append(table(["pipeline", "data alone, batches/s", "training images/s", "s/epoch (projected)",
                            "TFLOP/s", "of peak", "peak memory, MB"], rows))
        parts.append("; ".join(f"ours / {name}: training x{result['speedup'][name]:.1f}, data pipeline "
                               f"x{result['data_speedup'][name]:.1f}" for name in result["speedup"]) or "")
    parts.append(table(["width", "forward GFLOP/image", "training step GFLOP/image",
                        f"{config['epochs']}-epoch run, PFLOP", "its floor at the peak, s"],
                       [[width, f"{f['forward'] / 1e9:.3f}", f"{f['train'] / 1e9:.3f}",
                         f"{result['run_flops'][width] / 1e15:.3f}", f"{result['floor_s'][width]:.2f}"]
                        for width, f in result["flops_per_image"].items()]))
    if len(result["tuning"]) > 1 and "images_per_s" in result["tuning"].get("ours", {}):
        reference = result["tuning"]["ours"]["images_per_s"]
        parts.append(table(["variant of ours", "training images/s", "vs ours", "one-off setup, s",
                            f"{config['epochs']}-epoch training, s (projected)"],
                           [[name, f"failed: {t['error']}", "", "", ""] if "error" in t else
                            [name, f"{t['images_per_s']:.0f}", f"{t['images_per_s'] / reference:.2f}",
                             f"{t['setup_s']:.1f}", f"{t['projected_training_s']:.1f}"]
                            for name, t in result["tuning"].items()]))
    if "eval_images_per_s" in result:
        parts.append("Evaluation images/s (inference_mode): " + ", ".join(
            f"{name}: {value:.0f}" for name, value in result["eval_images_per_s"].items()))
    if result.get("concurrency"):
        parts.append(table(["concurrent runs", "runs/hour", "wall, s", "each from process start, s", "test acc"],
                           [[count, f"{c['runs_per_hour']:.0f}", f"{c['wall_s']:.1f}",
                             ", ".join(f"{s:.1f}" for s in c["process_s"]),
                             ", ".join(f"{a:.2%}" for a in c["test_acc"])]
                            for count, c in result["concurrency"].items()]))
    return "\n\n".join(part for part in parts if part)


def grid_markdown(result: dict[str, Any]) -> str:
    config = result["config"]
    rows = []
    for cell in result["cells"]:
        writeup, ours = record_names(cell["writeup"], STORED_WRITEUP_NAMES), record_names(cell["ours"])
        name = [str(writeup["learning_rate"]), writeup["optimizer"]]
        if ours.get("status") == "failed":
            rows.append([*name, f"{writeup[TEST_ACC]:.2%}", "failed", "", "", "", "", "", ""])
            continue
        rows.append([*name, f"{writeup[TEST_ACC]:.2%}", f"{ours['test_acc']:.2%}", f"{ours['test_acc_tta']:.2%}",
                     f"{writeup[TRAIN_ACC]:.2%} / {ours[TRAIN_ACC]:.2%}",
                     f"{writeup[TRAIN_LOSS]:.4f} / {ours[TRAIN_LOSS]:.4f}",
                     f"{writeup[VAL_ACC]:.2%} / {ours[VAL_ACC]:.2%}",
                     f"{writeup[VAL_LOSS]:.4f} / {ours[VAL_LOSS]:.4f}", f"{ours['process_s']:.1f}"])
    head = (f"recipe={config['recipe']}, width {config['width']}, {config['epochs']} epochs, batch "
            f"{config['batch_size']}, {config['dataset']}; {result['workers']} at a time, {result['wall_s']:.1f} s "
            f"wall for the six. Machine: {provenance(result['machine'])}.")
    return head + "\n\n" + table(
        ["learning rate", "optimizer", "write-up test", "ours test", "ours test, flip TTA",
         "train acc (write-up / ours)", "train loss", "val acc", "val loss", "ours, s from process start"], rows)


def run_markdown(result: dict[str, Any]) -> str:
    result = record_names(result)
    config = result["config"]
    return (f"Run {result['run_id']} (recipe={config['recipe']}, {config['optimizer']} {config['learning_rate']}, "
            f"width {config['width']}, {config['epochs']} epochs, {config['dataset']}, {config['device']}): "
            f"{result['process_s']:.1f} s from process start ({result[RUN_SECONDS]:.1f} s in the runner), "
            f"{result['train_images_per_s']:.0f} training images/s (median epoch), test acc {result['test_acc']:.2%}, "
            f"{result['test_acc_tta']:.2%} with flip TTA, best epoch {result[BEST_EPOCH]}.")


def main(paths: list[str]) -> int:
    for path in paths:
        result = json.loads(Path(path).read_text())
        render = bench_markdown if "training" in result else grid_markdown if "cells" in result else run_markdown
        print(f"<!-- {path} -->\n{render(result)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
