"""The parts of a run's start and end that issue 18 changed, each measured against an older tree of the package
(b142e91, say, exported with `git archive`), old and new alternating so that a shared machine's load drifts over
both alike. Every figure is a median over the repeats, in wall seconds and the CPU seconds the work took.

- imports: a fresh interpreter importing what a `cifar-resnet train` run imports (`cifar_resnet.train` and the W&B
  layer, `cifar_resnet.tracking`);
- the warm decode-cache lookup: a fresh interpreter's `load_image_folder` of an image folder whose cache is built,
  each tree on its own copy of the folder; beside it the two parts of the old lookup, listing the folders and a
  `stat` of every file;
- a warm run's data load: `run_training` on that folder (device cpu), from its call to where its steps would
  start (the data loaded, checked, split; torch._dynamo imported, as every run does there), in a fresh interpreter;
  its CPU seconds in all threads, and in the run's own thread;
- one epoch's checkpoints on the training path, with the real model (width 64) and Adam's state: b142e91 wrote best.pt,
  last.pt and the record on the run's thread (each fsync'd), now the run copies them to host memory and hands them
  to the writer's thread (the writing itself timed apart, as the thread does it);
- the progress file a run rewrites several times an epoch on its training path: fsync'd as b142e91 wrote it, and
  now without the fsync;
- one evaluation pass of the validation images with flip TTA, the old `evaluate` against the evaluation step (on a
  CPU both eager);
- a short whole run through `cifar-resnet train` (W&B disabled) on the image folder, from process start to exit:
  everything above together, on a CPU where training is slow.

    git archive b142e91 | tar -x -C /tmp/old
    python -m benchmarks.startup_parts --old=/tmp/old --old_data=/tmp/old-data/cifar10-jpeg \\
        --data=data/cifar10-jpeg --out=benchmarks/results/startup_parts.json

The two data folders hold the same files; each tree builds its own cache there first (a cold decode, untimed).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

IMPORTS = "import cifar_resnet.train, cifar_resnet.tracking, sys; print('torchvision' in sys.modules)"
LOOKUP = """
import json, sys, time
from pathlib import Path
try:
    from cifar_resnet.data.image_folder import load_image_folder
except ModuleNotFoundError:  # an older tree, whose data module was one file
    from cifar_resnet.data import load_image_folder
wall, cpu = time.perf_counter(), time.process_time()
train, test, classes = load_image_folder(Path(sys.argv[1]))
print(json.dumps({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                  "images": len(train) + len(test)}))
"""
OLD_KEY_PARTS = """
import json, os, sys, time
from pathlib import Path
from cifar_resnet.data.image_folder import list_folder
root = Path(sys.argv[1])
started = time.perf_counter()
samples = [path for split in ("train", "test") for path, _ in list_folder(root / split)[0]]
listed = time.perf_counter()
for path in samples:
    os.stat(path)
print(json.dumps({"list_s": listed - started, "stat_s": time.perf_counter() - listed, "files": len(samples)}))
"""
RUN_DATA_LOAD = """
import json, sys, time
from cifar_resnet import runner
from cifar_resnet.config import Config
runner.drive = lambda steps: steps.close()  # the run ends where its steps would start: its data on the device
config = Config(dataset="imagefolder", data_dir=sys.argv[1], device="cpu", output_dir=sys.argv[2])
try:
    from cifar_resnet.records import RunFolder
    run = RunFolder.of(config.output_dir, "dataload")
except ImportError:  # an older tree, whose run_training took the run's id
    run = "dataload"
wall, cpu, main_thread = time.perf_counter(), time.process_time(), time.thread_time()
runner.run_training(config, run)
print(json.dumps({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                  "main_thread_cpu_s": time.thread_time() - main_thread}))
"""
EVALUATE = """
import json, sys, time
from pathlib import Path
import torch
from cifar_resnet.config import Config
try:
    from cifar_resnet.data.loader import DeviceLoader
    from cifar_resnet.data.sources import load_splits
    from cifar_resnet.engine.device import build_model
    from cifar_resnet.engine.evaluation import evaluate
except ModuleNotFoundError:  # an older tree, whose data and engine modules were one file each
    from cifar_resnet.data import DeviceLoader, load_splits
    from cifar_resnet.engine import build_model, evaluate
config = Config(dataset="imagefolder", data_dir=sys.argv[1], device="cpu", width=16, val_size=2000, test_size=1000)
data = load_splits(config)
model = build_model(config, len(data.classes), torch.device("cpu"))
loader = DeviceLoader(data.val, config.eval_batch_size, torch.device("cpu"))
evaluate(model, loader, len(data.classes), tta=True)  # warm-up
wall, cpu = time.perf_counter(), time.process_time()
result = evaluate(model, loader, len(data.classes), tta=True)
print(json.dumps({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "acc": result.acc}))
"""


def child(tree: Path, *argv: str, env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Wall and CPU seconds of `python ARGV` in `tree` (`python -c` puts its working folder first on the path), and
    the last line it printed."""
    env = dict(os.environ, PYTHONPATH=str(tree), **(env or {}))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], env=env, cwd=tree, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, (done.stdout.strip().splitlines() or [""])[-1]


def medians(samples: list[dict[str, float]]) -> dict[str, Any]:
    return {key: statistics.median(sample[key] for sample in samples) for key in samples[0]
            if isinstance(samples[0][key], float)} | {"samples": samples}


def alternate(repeats: int, old: Callable[[], dict[str, float]], new: Callable[[], dict[str, float]]
              ) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for _ in range(repeats):
        runs["old"].append(old())
        runs["new"].append(new())
    result = {name: medians(samples) for name, samples in runs.items()}
    result["old_over_new"] = {key: result["old"][key] / result["new"][key] for key in result["new"]
                              if key in result["old"] and key != "samples" and result["new"][key] > 0}
    return result


def measure_imports(old: Path, repeats: int) -> dict[str, Any]:
    def imports(tree: Path) -> dict[str, float]:
        wall, cpu, printed = child(tree, "-c", IMPORTS)
        return {"wall_s": wall, "cpu_s": cpu, "torchvision_imported": printed == "True"}

    return alternate(repeats, lambda: imports(old), lambda: imports(REPO))


def measure_lookup(old: Path, old_data: Path, data: Path, repeats: int) -> dict[str, Any]:
    for tree, folder in ((old, old_data), (REPO, data)):  # build each tree's cache (untimed)
        child(tree, "-c", LOOKUP, str(folder))

    def lookup(tree: Path, folder: Path) -> dict[str, float]:
        return json.loads(child(tree, "-c", LOOKUP, str(folder))[2])

    result = alternate(repeats, lambda: lookup(old, old_data), lambda: lookup(REPO, data))
    result["old_key_parts"] = medians([json.loads(child(REPO, "-c", OLD_KEY_PARTS, str(data))[2])
                                       for _ in range(repeats)])
    return result


def measure_run_data_load(old: Path, old_data: Path, data: Path, work: Path, repeats: int) -> dict[str, Any]:
    runs = tempfile.mkdtemp(dir=work)

    def data_load(tree: Path, folder: Path) -> dict[str, float]:
        return json.loads(child(tree, "-c", RUN_DATA_LOAD, str(folder), runs)[2])

    return alternate(repeats, lambda: data_load(old, old_data), lambda: data_load(REPO, data))


def measure_checkpoints(work: Path, repeats: int) -> dict[str, Any]:
    """One epoch's files of a width-64 run with Adam, as b142e91's runner wrote them and as this one does."""
    import torch
    from torch import nn

    from cifar_resnet.checkpoint import CheckpointWriter, host_copy, save_best, save_resume
    from cifar_resnet.config import Config
    from cifar_resnet.engine.device import build_model, build_optimizer, build_scheduler
    from cifar_resnet.engine.loop import TrainState
    from cifar_resnet.records import RunRecord

    config, cpu = Config(device="cpu", width=64), torch.device("cpu")
    model = build_model(config, 10, cpu)
    optimizer = build_optimizer(config, model, cpu)
    nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.arange(8)).backward()
    optimizer.step()  # Adam's two moments per weight exist now, as after any epoch
    state = TrainState(model, optimizer, build_scheduler(config, optimizer, 100), torch.Generator(), epoch=1,
                       best_epoch=1, best_val_acc=0.5,
                       best_model_state={k: v.detach().clone() for k, v in model.state_dict().items()},
                       history=[{"epoch": 1, "val/acc": 0.5}])
    classes = [str(i) for i in range(10)]
    run_dir = Path(tempfile.mkdtemp(dir=work))
    record = RunRecord("bench", config.to_dict(), history=state.history)

    def old() -> dict[str, float]:
        started = time.perf_counter()
        save_best(run_dir / "best.pt", state.best_model_state, config, 1, state.history[0], classes)
        save_resume(run_dir / "last.pt", state.state_dict(), config)
        record.save(run_dir)
        return {"training_path_s": time.perf_counter() - started}

    def new() -> dict[str, float]:
        with CheckpointWriter() as writer:
            started = time.perf_counter()
            snapshot = host_copy(state.state_dict())
            writer.submit(functools.partial(save_best, run_dir / "best.pt", snapshot["best_model_state"], config, 1,
                                            state.history[0], classes),
                          functools.partial(save_resume, run_dir / "last.pt", snapshot, config),
                          functools.partial(record.save, run_dir))
            handed_over = time.perf_counter()
            writer.wait()
            return {"training_path_s": handed_over - started, "writer_thread_s": time.perf_counter() - handed_over}

    result = alternate(repeats, old, new)
    result["bytes"] = {name: (run_dir / name).stat().st_size for name in ("best.pt", "last.pt")}
    return result


def measure_progress(work: Path, repeats: int) -> dict[str, Any]:
    from dataclasses import asdict

    from cifar_resnet.files import atomic_write_json
    from cifar_resnet.records import PROGRESS_FILE, EpochProgress

    run_dir = Path(tempfile.mkdtemp(dir=work))
    progress = EpochProgress(epoch=1, epochs=10, step=100, steps=351, images_per_second=50000.0, seconds=3.0,
                             updated_at=time.time())

    def timed(write: Callable[[], None]) -> dict[str, float]:
        started = time.perf_counter()
        write()
        return {"training_path_s": time.perf_counter() - started}

    return alternate(repeats, lambda: timed(lambda: atomic_write_json(run_dir / PROGRESS_FILE, asdict(progress))),
                     lambda: timed(lambda: progress.save(run_dir)))


def measure_evaluation(old: Path, old_data: Path, data: Path, repeats: int) -> dict[str, Any]:
    def evaluation(tree: Path, folder: Path) -> dict[str, float]:
        return json.loads(child(tree, "-c", EVALUATE, str(folder))[2])

    return alternate(repeats, lambda: evaluation(old, old_data), lambda: evaluation(REPO, data))


SHORT_RUN = ("--dataset=imagefolder", "--device=cpu", "--width=16", "--epochs=2", "--train_size=1000",
             "--val_size=500", "--test_size=500")


def measure_short_run(old: Path, old_data: Path, data: Path, work: Path, repeats: int) -> dict[str, Any]:
    runs = Path(tempfile.mkdtemp(dir=work))
    count = iter(range(2 * repeats))

    def run(tree: Path, folder: Path) -> dict[str, float]:
        environment = {"WANDB_MODE": "disabled", "WANDB_RUN_ID": f"short{next(count)}"}
        wall, cpu, _ = child(tree, "-m", "cifar_resnet", "train", *SHORT_RUN, f"--data_dir={folder}",
                             f"--output_dir={runs}", env=environment)
        return {"wall_s": wall, "cpu_s": cpu}

    return alternate(repeats, lambda: run(old, old_data), lambda: run(REPO, data))


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.startup_parts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="the older tree (holding cifar_resnet/)")
    parser.add_argument("--old_data", required=True, help="its copy of the image folder")
    parser.add_argument("--data", required=True, help="this tree's copy of the image folder")
    parser.add_argument("--out", required=True, help="JSON file of the results")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", default=tempfile.gettempdir(), help="where the checkpoints are written")
    parser.add_argument("--only", default="", help="comma-separated parts to measure (default: all)")
    args = parser.parse_args()
    import torch

    from .machine import machine_info

    old, old_data, data = Path(args.old), Path(args.old_data), Path(args.data)
    result: dict[str, Any] = {"machine": machine_info(torch.device("cpu")), "repeats": args.repeats}
    for name, measure in (("imports", lambda: measure_imports(old, args.repeats)),
                          ("warm_cache_lookup", lambda: measure_lookup(old, old_data, data, args.repeats)),
                          ("run_data_load", lambda: measure_run_data_load(old, old_data, data, Path(args.work),
                                                                          args.repeats)),
                          ("checkpoints", lambda: measure_checkpoints(Path(args.work), args.repeats)),
                          ("progress_file", lambda: measure_progress(Path(args.work), 10 * args.repeats)),
                          ("evaluation", lambda: measure_evaluation(old, old_data, data, args.repeats)),
                          ("short_run", lambda: measure_short_run(old, old_data, data, Path(args.work), args.repeats))):
        if args.only and name not in args.only.split(","):
            continue
        result[name] = measure()
        result[name]["load_average_after"] = os.getloadavg()
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(name, json.dumps({k: v for k, v in result[name].items() if k not in ("old", "new")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
