"""`python -m benchmarks.sharing`: K runs sharing one device, for each way of sharing it, side by side in one call.

- `streams`: one process, the runs as one pack (`packing.pack.Pack`), each on a CUDA stream of its own (the
  trainer's `--pack streams`);
- `fused`: one process, the runs as one fused group of K slots (`packing.fused.FusedGroup`: one model, grouped
  convolutions, every run keeping its optimizer), in a pack (the trainer's `--pack fused`);
- `turns`: the pack on one stream, each run's step after the other (what streams add over it);
- `processes`: K processes at once, one run each (`benchmarks.run`), as runs were before the trainer.

Each case trains K whole runs (validation every epoch and the test included) of the settings given, the cells of
the write-up's grid in turn (Adam and SGD at its three learning rates), seeds differing. Reported per case: the wall
seconds; `together_img_s`, the images all K trained over that wall time (start-up, capture, validation and test
included; for processes, the sum of each run's own rate, as its runs overlap only partly); `epoch_img_s`, the sum
of each run's median epoch rate (with 3 epochs or more, an epoch without the capture: the steady rate together);
each run's own rate and test accuracy; and the training runs per GPU-hour that `epoch_img_s` gives for a full run of
10 epochs. The JSON is rewritten after each case, so a call cut short keeps the cases it finished.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cifar_resnet.config import Config
from cifar_resnet.data.sources import load_source, split
from cifar_resnet.engine.device import build_model, select_device, start_device
from cifar_resnet.engine.loop import fit_steps
from cifar_resnet.errors import UserError
from cifar_resnet.files import atomic_write_json
from cifar_resnet.packing.fused import FusedGroup
from cifar_resnet.packing.pack import Pack
from cifar_resnet.records import TRAIN_IMAGES_PER_SECOND
from cifar_resnet.table import markdown
from cifar_resnet.threads import set_cpu_threads

from .cli import run_script, settings_from, settings_parser, start_logging
from .launch import SECONDS_PER_HOUR, runs_at_once
from .machine import machine_info
from .writeup import WRITEUP_TABLE

log = logging.getLogger(__name__)

SHARINGS = ("streams", "fused", "turns", "processes")
DEFAULT_MEMBERS = (1, 2, 6)
FULL_RUN_EPOCHS = 10  # the sweep's runs: what runs per GPU-hour are projected for


def member_configs(base: Config, count: int) -> list[tuple[str, Config]]:
    """`count` runs: the write-up's cells in turn, each with a seed of its own."""
    cells = [WRITEUP_TABLE[i % len(WRITEUP_TABLE)] for i in range(count)]
    return [(f"m{i}-{cell['optimizer']}-lr{cell['learning_rate']}",
             base.replace(optimizer=cell["optimizer"], learning_rate=cell["learning_rate"], seed=base.seed + i))
            for i, cell in enumerate(cells)]


def train_images(config: Config, train_size: int) -> int:
    """Images one run trains: whole batches of its training split, every epoch."""
    return train_size // config.batch_size * config.batch_size * config.epochs


def measure_pack(base: Config, count: int, sharing: str) -> dict[str, Any]:
    """`count` runs as one pack in this process: on streams of their own, as one fused group, or taking turns on
    one stream."""
    device = select_device(base.device)
    source = load_source(base).to(device)  # loaded once, shared by every member
    members = member_configs(base, count)
    images = 0
    started = time.perf_counter()
    pack = Pack(device, separate_streams=sharing != "turns")
    group = None
    if sharing == "fused":
        group = FusedGroup(base, len(source.classes), device, count, streams=pack.streams)
    trainings = {}
    for name, config in members:
        data = split(source, config)
        images += train_images(config, len(data.train))
        trainings[name] = fit_steps(config, build_model(config, len(data.classes), device), data, device,
                                    join=group.joined if group is not None else None, streams=pack.streams)
    ended = pack.drive(trainings)
    if group is not None:
        group.close()
    if failed := [end for end in ended.values() if end.error is not None]:
        raise failed[0].error
    results = {name: end.result for name, end in ended.items()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall_s = time.perf_counter() - started
    run_img_s = [statistics.median(e[TRAIN_IMAGES_PER_SECOND] for e in results[name].history) for name, _ in members]
    return {"wall_s": wall_s, "together_img_s": images / wall_s, "epoch_img_s": sum(run_img_s), "run_img_s": run_img_s,
            "test_acc": [results[name].test.acc for name, _ in members]}


def measure_processes(base: Config, count: int, work_dir: Path) -> dict[str, Any]:
    """`count` runs as `count` processes at once, one run each, their run folders under `work_dir`."""
    results, wall_s = runs_at_once(member_configs(base, count), work_dir / f"processes{count}")
    failed = [r for r in results if r.get("status") == "failed"]
    if failed:
        raise UserError(f"{len(failed)} of {count} runs as processes failed; see {failed[0]['log']}")
    rates = [r["train_images_per_s"] for r in results]
    return {"wall_s": wall_s, "together_img_s": sum(rates), "epoch_img_s": sum(rates), "run_img_s": rates,
            "test_acc": [r["test_acc"] for r in results]}


def run_sharing_benchmark(base: Config, members: Sequence[int], sharings: Sequence[str], work_dir: Path,
                       save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    device = select_device(base.device)
    start_device(device)()
    train_size = len(split(load_source(base), base).train)
    full_run_images = train_size // base.batch_size * base.batch_size * FULL_RUN_EPOCHS
    result: dict[str, Any] = {"machine": machine_info(device), "config": base.to_dict(), "cases": []}
    for sharing in sharings:
        for count in members:
            log.info("%d runs, sharing by %s", count, sharing)
            if sharing == "processes":
                case = measure_processes(base, count, work_dir)
            else:
                case = measure_pack(base, count, sharing)
            case = {"sharing": sharing, "members": count, **case,
                    "training_runs_per_hour": case["epoch_img_s"] * SECONDS_PER_HOUR / full_run_images}
            result["cases"].append(case)
            save(result)
    return result


def sharing_markdown(result: dict[str, Any]) -> str:
    return markdown(["sharing", "runs", "wall s", "together img/s", "epoch img/s", "each img/s", "runs/GPU-h",
                     "test acc"],
                    [[case["sharing"], str(case["members"]), f"{case['wall_s']:.1f}",
                      f"{case['together_img_s']:,.0f}", f"{case['epoch_img_s']:,.0f}",
                      f"{statistics.median(case['run_img_s']):,.0f}",
                      f"{case['training_runs_per_hour']:.0f}", f"{statistics.mean(case['test_acc']):.2%}"]
                     for case in result["cases"]])


def main(argv: Sequence[str]) -> int:
    parser = settings_parser("python -m benchmarks.sharing", "--out=FILE [--members=1,2,6] [--sharing=WAYS]",
                             __doc__.split("\n\n")[0])
    parser.add_argument("--members", default=",".join(map(str, DEFAULT_MEMBERS)),
                        help="comma-separated counts of runs sharing the device (default: %(default)s)")
    parser.add_argument("--sharing", default=",".join(SHARINGS), help="comma-separated ways of sharing it, of "
                        f"{', '.join(SHARINGS)} (default: all)")
    parser.add_argument("--out", required=True, help="JSON file of the results, rewritten after each case")
    parser.add_argument("--runs_dir", default=None, help="the processes' run folders (default: next to --out)")
    args = parser.parse_args(list(argv))
    try:
        members = [int(count) for count in args.members.split(",")]
    except ValueError:
        raise UserError(f"--members: {args.members!r} is not a comma-separated list of whole numbers") from None
    if any(count < 1 for count in members):
        raise UserError(f"--members: each count must be >= 1, got {args.members}")
    sharings = args.sharing.split(",")
    if unknown := [sharing for sharing in sharings if sharing not in SHARINGS]:
        raise UserError(f"--sharing: {unknown[0]!r} is not one of {', '.join(SHARINGS)}")
    set_cpu_threads()
    base = settings_from(args)
    out = Path(args.out)
    work_dir = Path(args.runs_dir) if args.runs_dir else out.parent / "sharing-runs"
    result = run_sharing_benchmark(base, members, sharings, work_dir, lambda partial: atomic_write_json(out, partial))
    print(sharing_markdown(result))
    return 0


if __name__ == "__main__":
    start_logging()
    sys.exit(run_script(main))
