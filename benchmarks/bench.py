"""`python -m benchmarks.bench`: the write-up's pipeline against ours, in one process, on the device at hand, on
the same images.

- The write-up's pipeline (`writeup.py`): a `DataLoader` without workers and PIL transforms, a float32 NCHW model,
  plain Adam, and the loss and accuracy read back every step.
- Ours: `DeviceLoader` and the engine's `train_one_epoch` with the settings a run uses.

Reported: training images/s and seconds per epoch with their ratio, the data pipelines alone (batches/s, no model),
model FLOPs per image (counted), TFLOP/s reached and their fraction of a peak measured in the same run (a large
bf16 matmul on GPU, fp32 on CPU), peak memory, evaluation images/s, and in GPU mode the tuning options one by one
and runs per hour with 1, 2 and 6 concurrent runs. Warm-up first; clocks are read after a device sync; figures are
medians over repeats. The JSON is rewritten after each section; the tables printed at the end are BENCHMARKS.md's.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar_resnet.config import Config
from cifar_resnet.data.images import IMAGE_SIZE_PX, DataSplits, ImageSet
from cifar_resnet.data.loader import DeviceLoader
from cifar_resnet.data.sources import load_splits
from cifar_resnet.engine.device import build_model, select_device, uses_cuda_graph
from cifar_resnet.engine.evaluation import EvalStep, build_eval_step, evaluate, tta_views
from cifar_resnet.engine.loop import TrainHooks, drive, train_one_epoch
from cifar_resnet.engine.step import build_step
from cifar_resnet.errors import UserError
from cifar_resnet.files import atomic_write_json
from cifar_resnet.table import markdown
from cifar_resnet.threads import set_cpu_threads

from .cli import run_script, settings_from, settings_parser, start_logging
from .launch import SECONDS_PER_HOUR, runs_at_once
from .machine import machine_info, provenance
from .writeup import endless, writeup_datasets, writeup_loader, writeup_step_runner

log = logging.getLogger(__name__)

FULL_WIDTH = 64  # the write-up's model; its FLOPs are reported whatever width is benchmarked
FLOP_COUNT_BATCH = 2  # FLOPs are linear in the batch: count on a small one, report per image
MATMUL_WARMUP, MATMUL_REPEATS = 3, 10
BYTES_PER_MB = 2**20
KILOBYTES_PER_MB = 2**10  # ru_maxrss is in kilobytes on Linux


# --- what to measure -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How much to measure. `Plan.for_mode` gives the defaults: CPU mode fits a couple of minutes on 2 cores."""

    mode: str  # "cpu" or "gpu"
    steps: int
    warmup_steps: int
    repeats: int
    data_batches: int
    peak_size: int
    variants: tuple[str, ...]
    concurrency: tuple[int, ...]

    @classmethod
    def for_mode(cls, mode: str) -> Plan:
        if mode == "gpu":
            return cls(mode, steps=50, warmup_steps=20, repeats=3, data_batches=50, peak_size=8192,
                       variants=GPU_VARIANTS, concurrency=(1, 2, 6))
        return cls(mode, steps=6, warmup_steps=2, repeats=3, data_batches=50, peak_size=2048, variants=("ours",),
                   concurrency=())


PLAN_HELP = {
    "steps": "timed training steps per repeat",
    "warmup_steps": "untimed steps first (cuDNN autotuning, allocator, torch.compile's compilation)",
    "repeats": "repeats of each timing; figures are their medians",
    "data_batches": "batches per repeat when timing a data pipeline alone",
    "peak_size": "n of the n x n x n matmul that measures the peak",
    "variants": "comma-separated tuning variants of our pipeline, each one option changed from a run's",
    "concurrency": "comma-separated counts of concurrent full runs on the device, for runs/hour (empty: none)",
}


@dataclass(frozen=True)
class Variant:
    """Our pipeline with one option changed from what a run does (`ours`), so each row measures that option."""

    bf16: bool | None = None  # bf16 autocast (CUDA only); None: as the config says
    channels_last: bool | None = None  # NHWC (CUDA only); None: as the config says
    fused: bool | None = None  # fused optimizer step; None: as a run (fused on CUDA)
    cudnn_benchmark: bool = False  # cuDNN autotuning of convolution algorithms
    sync_every_step: bool = False  # a host sync each step, as reading the loss each step causes
    compile_mode: str | None = None  # torch.compile mode; "reduce-overhead" replays CUDA graphs
    cuda_graph: bool | None = None  # the step captured as one CUDA graph (CUDA only); None: as the config says
    optimizer: str | None = None  # None: as the config says


# `ours` is what a run does: on CUDA the training step captured as one CUDA graph (the hand capture); the eager
# rows are the step as it was before, and torch.compile's reduce-overhead is the alternative way to CUDA graphs.
VARIANTS: dict[str, Variant] = {
    "ours": Variant(),
    "eager (no CUDA graph)": Variant(cuda_graph=False),
    "no bf16": Variant(bf16=False),
    "no channels_last": Variant(channels_last=False),
    "no bf16, no channels_last": Variant(bf16=False, channels_last=False),
    "sgd": Variant(optimizer="sgd"),
    "adamw": Variant(optimizer="adamw"),
    "foreach optimizer (not fused)": Variant(fused=False),
    "cudnn.benchmark": Variant(cudnn_benchmark=True),
    "eager, no bf16": Variant(cuda_graph=False, bf16=False),
    "eager, no channels_last": Variant(cuda_graph=False, channels_last=False),
    "eager, host sync every step": Variant(cuda_graph=False, sync_every_step=True),
    "torch.compile": Variant(cuda_graph=False, compile_mode="default"),
    "torch.compile + CUDA graphs": Variant(cuda_graph=False, compile_mode="reduce-overhead"),
}
# GPU mode's default rows, the questions of issue 18: the graph against the eager step, bf16 and channels_last under
# the graph, and torch.compile's own graphs. The others (measured at b555040) stay available through --variants.
GPU_VARIANTS = ("ours", "eager (no CUDA graph)", "no bf16", "no channels_last", "torch.compile + CUDA graphs")


# --- measuring primitives ------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_repeats(work: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Wall seconds of `work` per repeat, each bracketed by device syncs so queued GPU work is counted."""
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated since the last reset; on CPU the process's peak resident set so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / BYTES_PER_MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KILOBYTES_PER_MB


def measure_peak_tflops(device: torch.device, size: int) -> dict[str, Any]:
    """A large matmul's TFLOP/s: bf16 on GPU (the tensor cores' rate), fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    for _ in range(MATMUL_WARMUP):
        torch.mm(a, b)
    seconds = time_repeats(lambda: torch.mm(a, b), MATMUL_REPEATS, device)
    return {"dtype": str(dtype).removeprefix("torch."), "size": size,
            "tflops": 2 * size**3 / statistics.median(seconds) / 1e12}


def count_flops(model: nn.Module, batch_size: int = FLOP_COUNT_BATCH) -> dict[str, float]:
    """FLOPs per image of a forward pass and of a training step (forward + backward), counted by PyTorch's
    FlopCounterMode: convolutions and matmuls (a multiply-add is 2 FLOPs); batch norm, ReLU and the optimizer
    are not counted. The input needs no gradient, as in training, so the first conv has no input gradient."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    images = torch.zeros(batch_size, 3, IMAGE_SIZE_PX, IMAGE_SIZE_PX, device=device)
    with FlopCounterMode(display=False) as forward_counter:
        model(images)
    with FlopCounterMode(display=False) as train_counter:
        model(images).sum().backward()
    model.zero_grad(set_to_none=True)
    return {"forward": forward_counter.get_total_flops() / batch_size,
            "train": train_counter.get_total_flops() / batch_size}


# --- ours ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def train_loader(config: Config, train: ImageSet, device: torch.device) -> DeviceLoader:
    generator = torch.Generator(device=device).manual_seed(config.seed)
    return DeviceLoader(train, config.batch_size, device, generator=generator, augment=True)


@contextlib.contextmanager
def ours_step_runner(config: Config, train: ImageSet, num_classes: int, device: torch.device,
                     variant: Variant) -> Iterator[Callable[[int], None]]:
    """The engine's `train_one_epoch` over `steps` batches of `DeviceLoader`, with the step a run builds
    (`build_step`: captured as a CUDA graph on CUDA, during the warm-up steps) and the variant's one option changed.
    The step is closed when the block ends, as a run's is: its graph and capture stream are given back, so that no
    two variants' graphs live at once (two live graphs must never share a capture stream)."""
    changes = {"bf16": variant.bf16, "channels_last": variant.channels_last, "cuda_graph": variant.cuda_graph,
               "optimizer": variant.optimizer, "compile": True if variant.compile_mode else None}
    config = config.replace(**{name: value for name, value in changes.items() if value is not None})
    step = build_step(config, build_model(config, num_classes, device), device, fused=variant.fused,
                      mode=variant.compile_mode)
    # The schedule's shape costs nothing; a constant one never runs out of steps however long the timing runs.
    scheduler = torch.optim.lr_scheduler.LambdaLR(step.optimizer, lambda _: 1.0)
    on_batch = (lambda: synchronize(device)) if variant.sync_every_step else None
    stream = endless(train_loader(config, train, device))

    def run(steps: int) -> None:
        drive(train_one_epoch(step, itertools.islice(stream, steps), [scheduler.step],
                              hooks=TrainHooks(on_batch=on_batch)))

    try:
        yield run
    finally:
        step.close()


# --- measurements --------------------------------------------------------------------------------------------


def measure_data(loader: Iterable, plan: Plan, device: torch.device) -> float:
    """Batches per second of a data pipeline alone (median over repeats)."""
    stream = endless(loader)
    for _ in itertools.islice(stream, plan.warmup_steps):
        pass
    seconds = time_repeats(lambda: list(itertools.islice(stream, plan.data_batches)), plan.repeats, device)
    return plan.data_batches / statistics.median(seconds)


def measure_training(run_steps: Callable[[int], None], plan: Plan, batch_size: int,
                     device: torch.device) -> dict[str, Any]:
    reset_peak_memory(device)
    warmup_s = time_repeats(lambda: run_steps(plan.warmup_steps), 1, device)[0]
    seconds = time_repeats(lambda: run_steps(plan.steps), plan.repeats, device)
    step_s = statistics.median(seconds) / plan.steps
    return {
        "images_per_s": batch_size / step_s,
        "step_ms": step_s * 1000,
        "warmup_s": warmup_s,  # includes torch.compile's compilation when compiled
        "setup_s": max(0.0, warmup_s - plan.warmup_steps * step_s),  # one-off cost: compilation, autotuning
        "repeat_seconds": seconds,
        "peak_memory_mb": peak_memory_mb(device),
    }


def measure_eval(config: Config, val: ImageSet, num_classes: int, plan: Plan,
                 device: torch.device) -> dict[str, float]:
    """Evaluation images/s under inference_mode with the evaluation step a run uses (on CUDA the captured graph,
    warmed up and captured in an untimed first pass): at the evaluation batch, at the training batch, and with TTA;
    where the graph is used, also the eager step at the evaluation batch with flip TTA, for comparison."""
    model = build_model(config, num_classes, device)
    graph = uses_cuda_graph(config, device)
    cases = {  # (batch size, tta, translate_px, captured)
        f"batch {config.eval_batch_size}": (config.eval_batch_size, False, 0, graph),
        f"batch {config.batch_size}": (config.batch_size, False, 0, graph),
        f"batch {config.eval_batch_size}, flip TTA": (config.eval_batch_size, True, 0, graph),
        f"batch {config.eval_batch_size}, flip and 1 px shifts TTA": (config.eval_batch_size, True, 1, graph),
    }
    if graph:
        cases[f"batch {config.eval_batch_size}, flip TTA, eager"] = (config.eval_batch_size, True, 0, False)
    results = {}
    for label, (batch_size, tta, translate_px, captured) in cases.items():
        loader = DeviceLoader(val, batch_size, device)
        settings = config.replace(eval_batch_size=batch_size, tta=tta, tta_translate_px=translate_px)
        step = build_eval_step(settings, model, num_classes, device, capture=captured)

        def work(loader: DeviceLoader = loader, step: EvalStep = step) -> None:
            evaluate(model, loader, num_classes, step=step)

        try:
            work()  # warm-up, and the capture
            results[label] = len(val) / statistics.median(time_repeats(work, plan.repeats, device))
        finally:
            step.close()  # its graph and capture stream given back before the next case captures
    return results


def derived_rates(timing: dict[str, Any], train_flops: float, peak_tflops: float, epoch_images: int,
                  epochs: int) -> dict[str, float]:
    images_per_s = timing["images_per_s"]
    tflops = train_flops * images_per_s / 1e12
    epoch_s = epoch_images / images_per_s
    return {"epoch_s": epoch_s, "tflops": tflops, "fraction_of_peak": tflops / peak_tflops,
            "projected_training_s": timing["setup_s"] + epochs * epoch_s}


def measure_concurrency(config: Config, count: int, work_dir: Path) -> dict[str, Any]:
    """`count` full runs at once on this device (seeds differ): runs per hour, and each run's time and accuracy."""
    jobs = [(f"concurrent{count}-{i}", config.replace(seed=config.seed + i)) for i in range(count)]
    log.info("%d concurrent runs of %d epochs", count, config.epochs)
    results, wall_s = runs_at_once(jobs, work_dir / f"concurrent{count}")
    finished = [r for r in results if r.get("status") != "failed"]
    return {
        "wall_s": wall_s,
        "runs_per_hour": len(finished) * SECONDS_PER_HOUR / wall_s,
        "failed": len(results) - len(finished),
        "process_s": [r["process_s"] for r in finished],
        "test_acc": [r["test_acc"] for r in finished],
    }


def peak_exceeded(result: dict[str, Any]) -> str | None:
    """A warning when a pipeline's training rate is above the peak measured: then the peak's matmul was too small to
    reach the device's rate (a small --peak_size), and every "of peak" figure overstates."""
    timings = {**result.get("tuning", {}), **result.get("training", {})}
    fractions = {name: t["fraction_of_peak"] for name, t in timings.items() if "fraction_of_peak" in t}
    if not fractions or max(fractions.values()) <= 1:
        return None
    name = max(fractions, key=fractions.__getitem__)
    peak = result["peak"]
    return (f"{name} trained at {fractions[name]:.1%} of the peak measured ({peak['tflops']:.3f} TFLOP/s, a "
            f"{peak['size']}^3 {peak['dtype']} matmul): that matmul is too small to measure this device's peak, so "
            "the \"of peak\" figures overstate; give a larger --peak_size")


def run_flops(flops: dict[str, float], splits: DataSplits, config: Config) -> float:
    """A whole run's FLOPs: training steps, validation every epoch and one test pass (each image once per TTA view)."""
    eval_images = config.epochs * len(splits.val) + len(splits.test)
    passes = tta_views(config.tta, config.tta_translate_px)
    return config.epochs * len(splits.train) * flops["train"] + passes * eval_images * flops["forward"]


# --- the benchmark -------------------------------------------------------------------------------------------


def run_benchmark(config: Config, plan: Plan, work_dir: Path,
                  save: Callable[[dict[str, Any]], None] = lambda result: None) -> dict[str, Any]:
    """Every measurement of one benchmark, as a JSON-ready dict. `work_dir` holds the concurrent runs' files.

    `save` gets the result as it grows, after each section (the tuning variants and the concurrency counts one by
    one), so that a benchmark cut short keeps what it measured; `complete` is True once everything is in. The
    sections come in the order of what they answer today: our step's variants (graph against eager, bf16 and
    channels_last under the graph, torch.compile's graphs), evaluation, runs at once, then the write-up's pipeline.
    """
    unknown = sorted(set(plan.variants) - set(VARIANTS))
    if unknown:
        raise UserError(f"--variants: {', '.join(unknown)} unknown; allowed: {', '.join(VARIANTS)}")
    device = select_device(config.device)
    machine = machine_info(device)  # before the work: its load average is the other work's
    splits = load_splits(config)
    num_classes = len(splits.classes)
    log.info("benchmark on %s: width %d, batch %d, %d training images", device, config.width, config.batch_size,
             len(splits.train))
    result: dict[str, Any] = {
        "machine": machine,
        "plan": asdict(plan),
        "config": config.to_dict(),
        "images": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "complete": False,
    }

    peak = measure_peak_tflops(device, plan.peak_size)
    # Counted on the meta device: shapes only, no arithmetic, so the full model costs nothing to count.
    flops = {width: count_flops(build_model(config.replace(width=width), num_classes, torch.device("meta")))
             for width in sorted({config.width, FULL_WIDTH})}
    model_flops = flops[config.width]
    epoch_images = len(splits.train) // config.batch_size * config.batch_size  # drop_last, as a run
    result.update({
        "peak": peak,
        "flops_per_image": {str(width): value for width, value in flops.items()},
        "run_flops": {str(width): run_flops(value, splits, config) for width, value in flops.items()},
        # The physical floor of a run: its FLOPs at the peak measured above.
        "floor_s": {str(width): run_flops(value, splits, config) / (peak["tflops"] * 1e12)
                    for width, value in flops.items()},
        "tuning": {},
    })
    save(result)

    def rates(timing: dict[str, Any]) -> dict[str, Any]:
        return {**timing, **derived_rates(timing, model_flops["train"], peak["tflops"], epoch_images, config.epochs)}

    tuning = result["tuning"]
    for name in plan.variants:
        log.info("timing ours: %s", name)
        variant = VARIANTS[name]
        try:
            with cudnn_benchmark(variant.cudnn_benchmark), \
                    ours_step_runner(config, splits.train, num_classes, device, variant) as runner:
                tuning[name] = rates(measure_training(runner, plan, config.batch_size, device))
        except Exception as error:  # a variant that fails here (torch.compile, say) must not lose the others
            if name == "ours":
                raise
            log.warning("variant %s failed: %s: %s", name, type(error).__name__, error)
            tuning[name] = {"error": f"{type(error).__name__}: {error}"}
        save(result)

    log.info("timing evaluation")
    result["eval_images_per_s"] = measure_eval(config, splits.val, num_classes, plan, device)
    result["concurrency"] = {}
    save(result)
    for count in plan.concurrency:
        result["concurrency"][str(count)] = measure_concurrency(config, count, work_dir)
        save(result)

    datasets = writeup_datasets(config, splits.train)
    baselines = {name: writeup_loader(dataset, config) for name, dataset in datasets.items()}
    data_pipeline = {name: measure_data(loader, plan, device) for name, loader in baselines.items()}
    data_pipeline["ours"] = measure_data(train_loader(config, splits.train, device), plan, device)
    training = {}
    for name, loader in baselines.items():
        log.info("timing %s", name)
        runner = writeup_step_runner(config, loader, num_classes, device)
        training[name] = rates(measure_training(runner, plan, config.batch_size, device))
    if "ours" in tuning:
        training["ours"] = tuning["ours"]
    result.update({
        "data_pipeline_batches_per_s": data_pipeline,
        "training": training,
        "speedup": {name: training["ours"]["images_per_s"] / training[name]["images_per_s"]
                    for name in baselines if "ours" in training},
        "data_speedup": {name: data_pipeline["ours"] / data_pipeline[name] for name in baselines},
        "complete": True,
    })
    save(result)
    if warning := peak_exceeded(result):
        log.warning("%s", warning)
    return result


# --- the tables and the command line -------------------------------------------------------------------------


def benchmark_markdown(result: dict[str, Any]) -> str:
    """The benchmark's tables, as BENCHMARKS.md quotes them; a benchmark cut short shows the sections it finished."""
    config, peak = result["config"], result["peak"]
    parts = [f"Machine: {provenance(result['machine'])}. Model width {config['width']}, batch {config['batch_size']}, "
             f"{result['images']['train']} training images ({config['dataset']}). Peak: {peak['dtype']} matmul "
             f"{peak['size']}^3 at {peak['tflops']:.3f} TFLOP/s, measured in the same run."]
    if not result.get("complete", True):
        parts.append("(cut short: the sections below are those it finished)")
    if "training" in result:  # the write-up's pipeline, its last section
        pipeline = result["data_pipeline_batches_per_s"]
        parts.append(markdown(["pipeline", "data alone, batches/s", "training images/s", "s/epoch (projected)",
                               "TFLOP/s", "of peak", "peak memory, MB"],
                              [[name, f"{pipeline[name]:.1f}", f"{t['images_per_s']:.0f}", f"{t['epoch_s']:.2f}",
                                f"{t['tflops']:.3f}", f"{t['fraction_of_peak']:.1%}", f"{t['peak_memory_mb']:.0f}"]
                               for name, t in result["training"].items()]))
        parts.append("; ".join(f"ours / {name}: training x{result['speedup'][name]:.1f}, data pipeline "
                               f"x{result['data_speedup'][name]:.1f}" for name in result["speedup"]))
    parts.append(markdown(["width", "forward GFLOP/image", "training step GFLOP/image",
                           f"{config['epochs']}-epoch run, PFLOP", "its floor at the peak, s"],
                          [[width, f"{f['forward'] / 1e9:.3f}", f"{f['train'] / 1e9:.3f}",
                            f"{result['run_flops'][width] / 1e15:.3f}", f"{result['floor_s'][width]:.2f}"]
                           for width, f in result["flops_per_image"].items()]))
    tuning = result["tuning"]
    if len(tuning) > 1:
        reference = next((t["images_per_s"] for t in (tuning.get("ours"), *tuning.values()) if t and "error" not in t),
                         None)
        parts.append(markdown(["variant of ours", "training images/s", "vs ours", "one-off setup, s",
                               f"{config['epochs']}-epoch training, s (projected)"],
                              [[name, f"failed: {t['error'][:200]}", "", "", ""] if "error" in t else
                               [name, f"{t['images_per_s']:.0f}", f"{t['images_per_s'] / reference:.2f}",
                                f"{t['setup_s']:.1f}", f"{t['projected_training_s']:.1f}"]
                               for name, t in tuning.items()]))
    if "eval_images_per_s" in result:
        parts.append("Evaluation images/s (inference_mode): " + ", ".join(
            f"{name}: {value:.0f}" for name, value in result["eval_images_per_s"].items()))
    if result.get("concurrency"):
        parts.append(markdown(["concurrent runs", "runs/hour", "wall, s", "each from process start, s", "test acc",
                               "failed"],
                              [[count, f"{c['runs_per_hour']:.0f}", f"{c['wall_s']:.1f}",
                                ", ".join(f"{s:.1f}" for s in c["process_s"]),
                                ", ".join(f"{a:.2%}" for a in c["test_acc"]), str(c.get("failed", 0))]
                               for count, c in result["concurrency"].items()]))
    if warning := peak_exceeded(result):
        parts.append(f"Warning: {warning}.")
    return "\n\n".join(part for part in parts if part)


def main(argv: Sequence[str]) -> int:
    """The benchmark, from the command line."""
    parser = settings_parser("python -m benchmarks.bench", "[--mode=auto|cpu|gpu] [--out=FILE] [--steps=N ...]",
                             __doc__.split("\n\n")[0])
    parser.epilog = ("The run settings above apply too (--width, --dataset, --data_dir, --batch_size, --epochs for "
                     "the concurrent runs, ...); the default data set is synthetic and the default width 16 on CPU, "
                     "64 on GPU.")
    parser.add_argument("--mode", choices=("auto", "cpu", "gpu"), default="auto", help="auto: gpu when CUDA is here")
    parser.add_argument("--out", default="bench.json", help="JSON file of the results, rewritten after each "
                        "section (default: bench.json)")
    parser.add_argument("--runs_dir", default="", help="the concurrent runs' folders and logs (default: next to --out)")
    defaults = {mode: asdict(Plan.for_mode(mode)) for mode in ("cpu", "gpu")}
    for name, text in PLAN_HELP.items():
        cpu, gpu = (",".join(map(str, value)) if isinstance(value, tuple) else value
                    for value in (defaults["cpu"][name], defaults["gpu"][name]))
        parser.add_argument(f"--{name}", default=None, help=f"{text} (default: cpu {cpu!r}, gpu {gpu!r})")
    args = parser.parse_args(list(argv))
    set_cpu_threads()  # as `train` does: every core, or OMP_NUM_THREADS
    mode = ("gpu" if torch.cuda.is_available() else "cpu") if args.mode == "auto" else args.mode
    out = Path(args.out)
    work_dir = Path(args.runs_dir) if args.runs_dir else out.parent / f"{out.stem}-runs"
    base = Config(dataset="synthetic", width=FULL_WIDTH if mode == "gpu" else 16,
                  device="cuda" if mode == "gpu" else "cpu", output_dir=str(work_dir))
    config = settings_from(args, base=base)
    plan = Plan.for_mode(mode)
    plan = replace(plan, **{name: parse_plan_value(name, getattr(args, name), getattr(plan, name))
                            for name in PLAN_HELP if getattr(args, name) is not None})
    result = run_benchmark(config, plan, work_dir, save=lambda partial: atomic_write_json(out, partial))
    print(benchmark_markdown(result))
    print(f"\nwritten: {out}")
    return 0


def parse_plan_value(name: str, text: str, default: Any) -> Any:
    """A `--name=value` option of the plan, typed like its default: a number, or a comma-separated list."""
    try:
        if isinstance(default, tuple):
            items = [item.strip() for item in text.split(",") if item.strip()]
            return tuple(int(item) for item in items) if name == "concurrency" else tuple(items)
        value = int(text)
    except ValueError:
        raise UserError(f"--{name}: {text!r} is not {'a list of integers' if name == 'concurrency' else 'an integer'}"
                        ) from None
    if value < 1:
        raise UserError(f"--{name}: must be >= 1, got {value}")
    return value


if __name__ == "__main__":
    start_logging()
    sys.exit(run_script(main))
