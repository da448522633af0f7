"""The benchmarks (benchmarks/): the benchmark's CPU mode end to end on tiny settings, the FLOP count against hand
counts, whole runs in child processes (at once, and the six cells through an offline sweep), the tables, and bad
input. Timings are checked for sanity, never for speed."""

import json
import logging
import math
import runpy
import sys

import pytest
import torch
from torch import nn

from benchmarks import bench, grid, markdown, run, sharing, writeup
from benchmarks.cli import run_script
from cifar_resnet.model import CIFAR10CNN
from cifar_resnet.records import BEST_EPOCH, TRAIN_ACC, TRAIN_LOSS, VAL_ACC, VAL_LOSS, RunRecord
from cifar_resnet.sweep.state import STATE_FILE
from conftest import REPO

TINY = ["--mode=cpu", "--width=8", "--train_size=384", "--val_size=128", "--test_size=128", "--steps=2",
        "--warmup_steps=1", "--repeats=2", "--data_batches=3", "--peak_size=64"]


def conv_flops(c_in: int, c_out: int, kernel: int, out_px: int) -> int:
    """A convolution's FLOPs by hand: one multiply-add (2 FLOPs) per weight per output pixel."""
    return 2 * c_in * c_out * kernel * kernel * out_px


def test_flop_count_matches_a_hand_count_for_small_convs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Conv2d(8, 4, 3, padding=1, bias=False))
    first, second = conv_flops(3, 8, 3, 32 * 32), conv_flops(8, 4, 3, 32 * 32)
    flops = bench.count_flops(model)
    assert flops["forward"] == first + second
    # Backward: a weight gradient for each conv, and an input gradient for the second only (images need none).
    assert flops["train"] == (first + second) + first + 2 * second


def test_flop_count_of_the_full_model_matches_its_architecture():
    stem = conv_flops(3, 64, 3, 32 * 32)
    stage1 = 4 * conv_flops(64, 64, 3, 32 * 32)
    stage2 = conv_flops(64, 128, 3, 16 * 16) + 3 * conv_flops(128, 128, 3, 16 * 16) + conv_flops(64, 128, 1, 16 * 16)
    stage3 = conv_flops(128, 256, 3, 8 * 8) + 3 * conv_flops(256, 256, 3, 8 * 8) + conv_flops(128, 256, 1, 8 * 8)
    head = 2 * 256 * 10
    model = CIFAR10CNN(width=64).to("meta")  # shapes only: counting needs no arithmetic
    assert bench.count_flops(model)["forward"] == stem + stage1 + stage2 + stage3 + head


def positive(value) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


def test_cpu_mode_writes_every_figure(tmp_path, capsys, caplog, monkeypatch):
    # A variant that fails is reported as failed, and the others are still measured.
    monkeypatch.setitem(bench.VARIANTS, "broken", bench.Variant(compile_mode="no such mode"))
    # A peak measured too low (as by a small --peak_size) is said in one warning line.
    real_peak = bench.measure_peak_tflops
    monkeypatch.setattr(bench, "measure_peak_tflops", lambda device, size: {**real_peak(device, size), "tflops": 1e-9})
    out = tmp_path / "bench.json"
    written = []  # the JSON after each section, as a benchmark cut short leaves it
    real_write = bench.atomic_write_json
    monkeypatch.setattr(bench, "atomic_write_json",
                        lambda path, value: (written.append(json.loads(json.dumps(value))), real_write(path, value)))
    variants = "--variants=ours,broken,foreach optimizer (not fused)"
    with caplog.at_level(logging.WARNING, logger="benchmarks"):
        assert bench.main([*TINY, variants, "--concurrency=1", "--epochs=1", f"--out={out}"]) == 0
    result = json.loads(out.read_text())
    assert result == written[-1] and result["complete"] and not any(w["complete"] for w in written[:-1])
    assert [len(w["tuning"]) for w in written] == [0, 1, 2, 3, 3, 3, 3]  # then evaluation, 1 run, the write-up's
    assert "peak" in written[0] and "eval_images_per_s" not in written[3] and "eval_images_per_s" in written[4]
    assert written[4]["concurrency"] == {} and "1" in written[5]["concurrency"] and "training" not in written[5]

    assert set(result) >= {"machine", "plan", "config", "images", "peak", "flops_per_image", "floor_s", "complete",
                           "data_pipeline_batches_per_s", "training", "speedup", "data_speedup", "tuning",
                           "eval_images_per_s", "concurrency"}
    assert result["machine"]["device"] == "cpu" and result["machine"]["cpu_cores"] >= 1
    assert result["peak"]["dtype"] == "float32" and result["peak"]["size"] == 64
    assert set(result["flops_per_image"]) == {"8", "64"}
    assert result["flops_per_image"]["8"]["train"] > 2 * result["flops_per_image"]["8"]["forward"]
    assert set(result["training"]) == {"write-up, arrays", "ours"}
    for name, timing in result["training"].items():
        for key in ("images_per_s", "epoch_s", "tflops", "fraction_of_peak", "peak_memory_mb", "warmup_s"):
            assert positive(timing[key]), (name, key)
        assert timing["epoch_s"] == pytest.approx(384 // 128 * 128 / timing["images_per_s"])
        train_flops = result["flops_per_image"]["8"]["train"]
        assert timing["tflops"] == pytest.approx(train_flops * timing["images_per_s"] / 1e12)
        assert len(timing["repeat_seconds"]) == 2
    ours, writeup = result["training"]["ours"], result["training"]["write-up, arrays"]
    assert result["speedup"]["write-up, arrays"] == pytest.approx(ours["images_per_s"] / writeup["images_per_s"])
    pipeline = result["data_pipeline_batches_per_s"]
    assert positive(pipeline["ours"]) and positive(pipeline["write-up, arrays"])
    assert set(result["tuning"]) == {"ours", "broken", "foreach optimizer (not fused)"}
    assert "no such mode" in result["tuning"]["broken"]["error"]
    assert positive(result["tuning"]["foreach optimizer (not fused)"]["images_per_s"])
    assert all(positive(v) for v in result["eval_images_per_s"].values()) and len(result["eval_images_per_s"]) == 4
    flops64 = result["flops_per_image"]["64"]  # 384 training, 128 validation and 128 test images; TTA doubles eval
    assert result["run_flops"]["64"] == pytest.approx(384 * flops64["train"] + 2 * 2 * 128 * flops64["forward"])
    assert result["floor_s"]["64"] == pytest.approx(result["run_flops"]["64"] / (result["peak"]["tflops"] * 1e12))
    concurrent = result["concurrency"]["1"]
    assert concurrent["failed"] == 0 and positive(concurrent["runs_per_hour"])
    assert 0 <= concurrent["test_acc"][0] <= 1
    assert (tmp_path / "bench-runs" / "concurrent1" / "concurrent1-0" / "record.json").exists()

    (warning,) = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING
                  and "peak" in record.getMessage()]
    assert "of the peak measured" in warning and "--peak_size" in warning and "\n" not in warning
    printed = capsys.readouterr().out
    assert printed.startswith(bench.benchmark_markdown(result))  # what it prints is BENCHMARKS.md's tables
    assert "ours / write-up, arrays: training x" in printed and "| 1 | " in printed  # the concurrent run's row
    assert "| broken | failed: " in printed and f"Warning: {warning}." in printed


def test_a_peak_below_the_rates_reached_is_flagged_and_one_above_is_not():
    result = {"peak": {"tflops": 2.0, "size": 256, "dtype": "bfloat16"},
              "tuning": {"ours": {"fraction_of_peak": 0.4}, "broken": {"error": "x"}},
              "training": {"write-up, arrays": {"fraction_of_peak": 0.2}}}
    assert bench.peak_exceeded(result) is None
    result["tuning"]["ours"]["fraction_of_peak"] = 2.326  # `--peak_size 256` on a GPU, issue 27
    assert bench.peak_exceeded(result).startswith("ours trained at 232.6% of the peak measured (2.000 TFLOP/s, a "
                                                  "256^3 bfloat16 matmul)")


def test_image_folder_adds_torchvisions_imagefolder_baseline(cifar_jpeg_dir, tmp_path):
    out = tmp_path / "bench.json"
    argv = [*TINY, "--dataset=imagefolder", f"--data_dir={cifar_jpeg_dir}", "--val_size=500", "--train_size=0",
            "--test_size=0", "--variants=", "--steps=1", f"--out={out}"]  # the baselines only
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["data_pipeline_batches_per_s"]) == {"write-up, arrays", "write-up, ImageFolder", "ours"}
    assert set(result["training"]) == {"write-up, arrays", "write-up, ImageFolder"} and result["tuning"] == {}
    assert positive(result["training"]["write-up, ImageFolder"]["images_per_s"])


def test_grid_runs_the_cells_through_an_offline_sweep_beside_the_writeups_table(tiny_config, tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.setattr(grid, "WRITEUP_TABLE", writeup.WRITEUP_TABLE[:2])  # two of the six: each is a process
    out = tmp_path / "grid.json"
    settings = [f"--{k}={v}" for k, v in tiny_config.replace(epochs=1, train_size=256, val_size=64, test_size=64,
                                                               batch_size=64).to_dict().items() if k != "output_dir"]
    assert grid.main(["--workers=2", f"--out={out}", *settings]) == 0
    result = json.loads(out.read_text())
    cells = result["cells"]
    assert [(c["ours"]["config"]["optimizer"], c["ours"]["config"]["learning_rate"]) for c in cells] == \
        [(c["optimizer"], c["learning_rate"]) for c in grid.WRITEUP_TABLE]
    folder = tmp_path / "grid-runs"  # the sweep's folder: its state, and one folder per cell
    sweep = json.loads((folder / STATE_FILE).read_text())
    assert [(run["run_id"], run["state"]) for run in sweep["runs"]] == \
        [(cell["ours"]["run_id"], "finished") for cell in cells]
    assert sweep["sweep"]["program"] == "benchmarks.run"  # the runs are the benchmark's, without W&B
    assert not (folder / "wandb").exists() and not (tmp_path / "wandb").exists()
    for cell in cells:
        ours = cell["ours"]
        assert 0 <= ours["test_acc"] <= 1 and 0 <= ours["test_acc_tta"] <= 1 and ours["best_epoch"] == 1
        assert positive(ours["process_s"])
        # The run's figures at its best epoch, under its record's names.
        best = RunRecord.load(folder / ours["run_id"]).history[ours[BEST_EPOCH] - 1]
        assert {name: ours[name] for name in (TRAIN_ACC, TRAIN_LOSS, VAL_ACC, VAL_LOSS)} == \
            {name: best[name] for name in (TRAIN_ACC, TRAIN_LOSS, VAL_ACC, VAL_LOSS)}
    assert len(cells) == 2 and result["data"] == "synthetic (256 train / 64 val / 64 test images, 10 classes)"
    printed = capsys.readouterr().out
    # The sweep's results table of the cells, then the comparison under the line naming each column's data.
    assert printed.index("| **adam-lr0.001** (best) |") < printed.index("| 0.001 | adam | 86.34% |")
    (header,) = [line for line in printed.splitlines() if line.startswith("write-up: ")]
    assert "the original CIFAR-10" in header and f"ours: {result['data']}." in header
    assert "Different data" in header


@pytest.mark.quick
@pytest.mark.parametrize(("dataset", "warned"), [("synthetic", True), ("imagefolder", False)])
def test_the_grids_comparison_names_the_data_of_each_column(dataset, warned):
    cell = {"learning_rate": 0.001, "optimizer": "adam", "test_acc": 0.5, "test_acc_tta": 0.5, "process_s": 1.0,
            TRAIN_ACC: 0.5, TRAIN_LOSS: 1.0, VAL_ACC: 0.5, VAL_LOSS: 1.0}
    machine = {"device_name": "cpu", "device": "cpu", "cpu_cores": 2, "cpu_model": "x", "load_average": [0, 0, 0],
               "torch": "2", "date": "today", "commit": "abc"}
    result = {"machine": machine, "workers": 1, "wall_s": 1.0, "data": f"{dataset} (500 train images)",
              "config": {"dataset": dataset, "recipe": "tuned", "width": 8, "epochs": 1, "batch_size": 64},
              "cells": [{"writeup": writeup.WRITEUP_TABLE[0], "ours": cell}]}
    lines = grid.grid_markdown(result).splitlines()
    header = lines[lines.index("| learning rate | optimizer | write-up test | ours test | ours test, flip TTA | "
                               "train acc (write-up / ours) | train loss | val acc | val loss | ours, s from process "
                               "start |") - 2]
    assert header.startswith(f"write-up: {grid.WRITEUP_DATA}. ours: {dataset} (500 train images).")
    assert ("Different data" in header) == warned


@pytest.mark.slow
def test_sharing_measures_each_way_of_sharing_with_its_runs_under_the_runs_folder(tiny_config, tmp_path,
                                                                                   monkeypatch):
    """The pack step of the GPU check, tiny: runs taking turns in one process, fused in one group, and runs as
    processes, K = 1 then 2 (the processes of K = 2 reuse K = 1's run names: each K keeps its runs apart, and none
    lands in the working directory)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sharing.json"
    settings = [f"--{k}={v}" for k, v in tiny_config.replace(epochs=1, train_size=256, val_size=64, test_size=64,
                                                               batch_size=64).to_dict().items() if k != "output_dir"]
    assert sharing.main(["--members=1,2", "--sharing=turns,fused,processes", f"--out={out}", *settings]) == 0
    cases = json.loads(out.read_text())["cases"]
    assert [(case["sharing"], case["members"]) for case in cases] == \
        [("turns", 1), ("turns", 2), ("fused", 1), ("fused", 2), ("processes", 1), ("processes", 2)]
    for case in cases:
        assert len(case["run_img_s"]) == len(case["test_acc"]) == case["members"]
        assert positive(case["together_img_s"]) and positive(case["epoch_img_s"])
        assert positive(case["training_runs_per_hour"])
    assert sorted(path.name for path in (tmp_path / "sharing-runs" / "processes2").iterdir()) == \
        ["m0-adam-lr0.001", "m1-sgd-lr0.001"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "script, argv, message",
    [
        (bench, ["--variants=warp drive"], "--variants: warp drive unknown; allowed: ours"),
        (bench, ["--steps=0"], "--steps: must be >= 1, got 0"),
        (bench, ["--concurrency=two"], "--concurrency: 'two' is not a list of integers"),
        (bench, ["--width=0"], "width: must be > 0"),
        (bench, ["--mode=tpu"], "argument --mode: invalid choice: 'tpu'"),
        (grid, ["--workers=0"], "--workers: must be >= 1, got 0"),
        (grid, ["--workers=two"], "argument --workers: invalid int value: 'two'"),
        (run, [], "--run_id: needed (or WANDB_RUN_ID)"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(script, argv, message, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # the benchmarks' own logger, whatever other tests did to logging's setup
    logging.getLogger("benchmarks").addHandler(handler)
    try:
        assert run_script(script.main, argv) == 2
    finally:
        logging.getLogger("benchmarks").removeHandler(handler)
    assert len(records) == 1 and message in records[0].getMessage()
    assert list(tmp_path.iterdir()) == []  # no results file, no runs folder


@pytest.mark.quick
@pytest.mark.parametrize("script", [bench, run, grid, sharing], ids=lambda script: script.__name__)
def test_help_is_one_usage_block_listing_the_scripts_options_and_every_setting(script, capsys):
    with pytest.raises(SystemExit) as done:
        script.main(["--help"])
    printed = capsys.readouterr().out
    assert done.value.code == 0 and printed.count("usage:") == 1
    assert printed.startswith(f"usage: python -m {script.__name__} ") and "--learning_rate" in printed


def test_peak_is_measured_with_a_matmul():
    peak = bench.measure_peak_tflops(torch.device("cpu"), 128)
    assert peak["size"] == 128 and positive(peak["tflops"])


def test_writeup_table_has_the_sweeps_six_cells():
    import itertools

    import yaml
    from conftest import REPO

    parameters = yaml.safe_load((REPO / "sweep.yaml").read_text())["parameters"]
    cells = set(itertools.product(parameters["learning_rate"]["values"], parameters["optimizer"]["values"]))
    assert {(c["learning_rate"], c["optimizer"]) for c in writeup.WRITEUP_TABLE} == cells and len(cells) == 6


SCRIPTS = sorted(path.stem for path in (REPO / "benchmarks").glob("*.py")
                 if 'if __name__ == "__main__":' in path.read_text())


@pytest.mark.quick
@pytest.mark.filterwarnings("ignore:'benchmarks.:RuntimeWarning")  # runpy: the module was imported already
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help_with_its_own_usage(script, monkeypatch, capsys):
    """BENCHMARKS.md: every script runs as `python -m benchmarks.NAME`, and `--help` lists its options (the
    training scripts' settings: the test above)."""
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{script}.py", "--help"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module(f"benchmarks.{script}", run_name="__main__")
    assert exited.value.code in (0, None)
    assert capsys.readouterr().out.startswith(f"usage: python -m benchmarks.{script}")


def test_markdown_refuses_a_json_it_does_not_render_in_one_line(tmp_path, capsys):
    other = tmp_path / "pack-streams.json"
    other.write_text(json.dumps({"members": [1, 2]}))
    with pytest.raises(SystemExit) as exited:
        markdown.main([str(other)])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"error: {other}: not a JSON of benchmarks.bench, .grid or .run (the other " \
                                      "scripts print their own tables)\n"
